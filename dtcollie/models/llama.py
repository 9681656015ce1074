"""The decoder of the Llama family in plain PyTorch: the math only, no parallelism.

One decoder serves every supported family; each family's difference is one option of ModelArgs,
visible where it acts (as in Hugging Face's "modular" model files, which build Qwen2, Qwen3 and
Mistral from Llama's blocks):

- llama (2, 3, 3.1, 3.2): the base; Llama 3.1 RoPE scaling; 3.2's small sizes tie the embeddings.
- qwen2 (Qwen2, Qwen2.5): `qkv_bias`, a bias on the q, k and v projections.
- qwen3 (dense): `qk_norm`, an RMSNorm over each head of q and k before RoPE; an explicit head_dim.
- mistral: `sliding_window`, each position attends to the last `sliding_window` positions only.

Parameter names follow Meta's checkpoints (`tok_embeddings`, `layers.N.attention.wq`, ...). Layers
live in an `nn.ModuleDict` keyed by `str(i)`, and the embedding, final norm and output projection may
be `None`, so a pipeline stage that keeps a subset of the model keeps the same parameter names.
RoPE uses the rotate-half layout with cos/sin tables, which is what Hugging Face checkpoints
expect, so no q/k permutation is needed on conversion. Attention reshapes with `-1` heads so that a
tensor-parallel plan applied from outside can shard heads across ranks.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None

from dtcollie.precision import BF16_COMPUTE
from dtcollie.errors import ConfigError, shown


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0: dim // n_heads
    vocab_size: int = 32000  # 0: taken from the tokenizer
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1 frequency scaling: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings. Empty: plain RoPE.
    rope_scaling: dict = field(default_factory=dict)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # qwen2: biases on the q, k and v projections
    qk_norm: bool = False  # qwen3: RMSNorm (weight [head_dim]) on each head of q and k, before RoPE
    sliding_window: int = 0  # mistral: attend to the last this many positions (itself included); 0: all
    family: str = "llama"  # the HF architecture the weights convert to: see FAMILIES
    attention: str = "sdpa"  # "sdpa" or "flash"

    def __post_init__(self):
        check_model_args(self)

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads


FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SHAPE_LIMIT = 2**24  # no real model has a size this large; past it, allocation fails far from the cause


def is_finite_number(value) -> bool:
    """An int or float that is finite as a float (a JSON integer may be too large for one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_model_args(args: ModelArgs) -> None:
    """Refuse a shape no model can have (wherever it comes from: a flavor, model_args.json, an HF
    config.json), so that it fails here by name rather than as a division by zero or an
    allocation failure far away. The callers add which file it came from."""
    sizes = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
             "hidden_dim": args.hidden_dim, "max_seq_len": args.max_seq_len}
    optional = {"head_dim": args.head_dim, "vocab_size": args.vocab_size, "sliding_window": args.sliding_window}
    for name, value in {**sizes, **optional}.items():
        lowest = 0 if name in optional else 1
        if type(value) is not int or not lowest <= value < SHAPE_LIMIT:
            raise ConfigError(f"{name} = {shown(value)} is not a size a model can have (an integer in "
                              f"[{lowest}, {SHAPE_LIMIT}))")
    if args.n_heads % args.n_kv_heads:
        raise ConfigError(f"n_heads = {args.n_heads} is not a multiple of n_kv_heads = {args.n_kv_heads}")
    if not args.head_dim and args.dim % args.n_heads:
        raise ConfigError(f"dim = {args.dim} is not a multiple of n_heads = {args.n_heads} (and head_dim is unset)")
    if args.attention_head_dim % 2:
        raise ConfigError(f"the head dimension {args.attention_head_dim} is odd; RoPE rotates pairs, so it "
                          f"must be even")
    for name in ("norm_eps", "rope_theta"):
        value = getattr(args, name)
        if not (is_finite_number(value) and value > 0):
            raise ConfigError(f"{name} = {shown(value)} must be a positive finite number")
    check_rope_scaling(args.rope_scaling)
    if args.family not in FAMILIES or args.attention not in ("sdpa", "flash"):
        raise ConfigError(f"family = {args.family!r} / attention = {args.attention!r}: choose a family from "
                          f"{', '.join(FAMILIES)} and sdpa or flash")


def check_rope_scaling(scaling: dict) -> None:
    """Llama 3.1 scaling needs all four numbers, positive, with high_freq_factor > low_freq_factor."""
    if not scaling:
        return
    if sorted(scaling) != sorted(ROPE_SCALING_KEYS):
        raise ConfigError(f"rope_scaling has keys {sorted(scaling)}; Llama 3.1 scaling needs exactly "
                          f"{', '.join(ROPE_SCALING_KEYS)}")
    bad = [key for key, value in scaling.items() if not (is_finite_number(value) and value > 0)]
    if bad:
        raise ConfigError(f"rope_scaling {bad[0]} = {shown(scaling[bad[0]])} must be a positive finite number")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"rope_scaling high_freq_factor = {scaling['high_freq_factor']} must exceed "
                          f"low_freq_factor = {scaling['low_freq_factor']}")


LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
LLAMA3_2_ROPE_SCALING = {**LLAMA3_ROPE_SCALING, "factor": 32.0}

FLAVORS = {
    # Tiny: a training step in well under a second on one CPU core; 8 layers so pipeline tests can
    # cut it into 2, 4 or 8 stages; GQA so the grouped path is always exercised.
    "debug": ModelArgs(dim=128, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=0, hidden_dim=384,
                       max_seq_len=2048),
    "llama2_7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008),
    "llama2_13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "llama2_70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    # Llama 3.1 shapes, with its RoPE scaling.
    "llama3_8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                           hidden_dim=14336, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING),
                           max_seq_len=8192),
    "llama3_70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                            hidden_dim=28672, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE_SCALING),
                            max_seq_len=8192),
    # Llama 3.2: small, tied embeddings, RoPE scaled by 32.
    "llama3_2_1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                             rope_theta=500000.0, rope_scaling=dict(LLAMA3_2_ROPE_SCALING), max_seq_len=131072,
                             tie_embeddings=True),
    "llama3_2_3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                             rope_theta=500000.0, rope_scaling=dict(LLAMA3_2_ROPE_SCALING), max_seq_len=131072,
                             tie_embeddings=True),
    "qwen2_5_0_5b": ModelArgs(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, vocab_size=151936, hidden_dim=4864,
                              norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True,
                              qkv_bias=True, family="qwen2"),
    "qwen2_5_7b": ModelArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064, hidden_dim=18944,
                            norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=131072, qkv_bias=True, family="qwen2"),
    "qwen3_0_6b": ModelArgs(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, vocab_size=151936,
                            hidden_dim=3072, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960,
                            tie_embeddings=True, qk_norm=True, family="qwen3"),
    "qwen3_8b": ModelArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, vocab_size=151936,
                          hidden_dim=12288, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960, qk_norm=True,
                          family="qwen3"),
    # Mistral 7B v0.1 attends through a 4096-position window; v0.2 and v0.3 attend to everything.
    "mistral_7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, hidden_dim=14336,
                            max_seq_len=32768, sliding_window=4096, family="mistral"),
    "mistral_7b_v0_3": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32768,
                                 hidden_dim=14336, rope_theta=1000000.0, max_seq_len=32768, family="mistral"),
}


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies per rotary pair, with Llama 3.1 scaling when configured."""
    head_dim = args.attention_head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if not args.rope_scaling:
        return inv_freq
    scaling = args.rope_scaling
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(in_band, smoothed, scaled)


def rope_tables(args: ModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [max_seq_len, head_dim] in the rotate-half layout."""
    inv_freq = rope_frequencies(args).to(device)
    positions = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, head_dim]; cos/sin: [seq, head_dim] (positions 0..seq-1) or
    [batch, seq, head_dim] (each token's own position)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def sliding_window_mask(seq: int, window: int, device) -> torch.Tensor:
    """[seq, seq] boolean: query i sees key j when 0 <= i - j < window (causal, last `window` positions)."""
    offset = torch.arange(seq, device=device)[:, None] - torch.arange(seq, device=device)[None, :]
    return (offset >= 0) & (offset < window)


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """[batch, seq] -> the number of the document each token belongs to: a document starts
    wherever its position restarts at 0."""
    return (positions == 0).cumsum(dim=-1)


def document_mask(positions: torch.Tensor, window: int) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean for SDPA: query i sees key j when both are in one document and j
    is causally visible (within the last `window` positions when window > 0)."""
    documents = document_ids(positions)
    seq = positions.shape[-1]
    visible = sliding_window_mask(seq, window if window > 0 else seq, positions.device)
    same_document = documents[:, :, None] == documents[:, None, :]
    return (same_document & visible)[:, None]


def document_offsets(positions: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths over the flattened batch, int32 [documents + 1], for flash-attn's
    varlen kernel (a row's first token always starts a document, so no document spans two rows)."""
    starts = (positions.flatten() == 0) | (torch.arange(positions.numel(), device=positions.device)
                                           % positions.shape[-1] == 0)
    offsets = torch.nonzero(starts).flatten()
    total = torch.tensor([positions.numel()], device=positions.device)
    return torch.cat((offsets, total)).to(torch.int32)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.attention_head_dim
        self.use_flash = args.attention == "flash"
        self.sliding_window = args.sliding_window
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """`documents` is None (one causal sequence per row) or the document layout of packed rows
        in the form this attention's kernel takes (see `Transformer.document_layout`), or in
        generation the cache's attention mask; cos/sin are then already taken at each token's
        position. `kv_cache` (generation) keeps this layer's earlier keys and values."""
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if documents is None:
            cos, sin = cos[:seq], sin[:seq]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)  # queries attend over every cached key; the cache masks them
        windowed = 0 < self.sliding_window < seq  # a window as long as the sequence is plain causal
        window = (self.sliding_window - 1, 0) if windowed else (-1, -1)
        if self.use_flash and kv_cache is None and documents is not None:
            out = self.flash_documents(q, k, v, documents, window)
        elif self.use_flash and kv_cache is None:
            out = flash_attn_func(q, k, v, causal=True, window_size=window)
        else:
            mask = documents
            if mask is None and windowed:
                mask = sliding_window_mask(seq, self.sliding_window, x.device)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=True).transpose(1, 2)
        return self.wo(out.reshape(batch, seq, -1))

    @staticmethod
    def flash_documents(q, k, v, offsets: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """Packed rows through flash-attn's varlen kernel: the batch flattened into one token
        sequence, each document attended to on its own."""
        batch, seq = q.shape[:2]
        max_len = int((offsets[1:] - offsets[:-1]).max())
        out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), offsets, offsets,
                                     max_len, max_len, causal=True, window_size=window)
        return out.view(batch, seq, *out.shape[1:])


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, documents, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ConfigError("model vocab_size is unset; take it from the tokenizer before building the model")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # Moving off the meta device (to_empty) makes new Parameter objects, which unties shared
        # weights; tie them again so the output projection keeps reading the embedding.
        super()._apply(fn, recurse)
        if self.args.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight
        return self

    def init_rope(self) -> None:
        """Recompute the RoPE tables, e.g. after `to_empty` from the meta device."""
        self.rope_cos, self.rope_sin = rope_tables(self.args, device=self.rope_cos.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
        self.init_rope()
        std, depth_std = 0.02, 0.02 / math.sqrt(2 * self.args.n_layers)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers.values():
            for name, linear in (("wq", block.attention.wq), ("wk", block.attention.wk), ("wv", block.attention.wv),
                                 ("wo", block.attention.wo), ("w1", block.feed_forward.w1),
                                 ("w2", block.feed_forward.w2), ("w3", block.feed_forward.w3)):
                nn.init.trunc_normal_(linear.weight, std=depth_std if name in ("wo", "w2") else std,
                                      a=-3 * std, b=3 * std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            for norm in (block.attention_norm, block.ffn_norm, block.attention.q_norm, block.attention.k_norm):
                if norm is not None:
                    norm.reset_parameters()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self.args.tie_embeddings:
            out_std = self.args.dim ** -0.5
            nn.init.trunc_normal_(self.output.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

    def document_layout(self, positions: torch.Tensor) -> torch.Tensor:
        """Document boundaries of packed rows, as the attention kernel takes them: a boolean mask for
        SDPA, cumulative document lengths for flash-attn."""
        if self.args.attention == "flash":
            return document_offsets(positions)
        return document_mask(positions, self.args.sliding_window)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """tokens [batch, seq] (or hidden states on a later pipeline stage) -> logits [batch, seq, vocab].

        `positions` [batch, seq]: packed rows, each token's position within its document (0 where
        a document starts); attention stays inside documents and RoPE restarts with each, so every
        document is computed as if alone. None: each row is one sequence, positions 0..seq-1.
        `cache` (a `dtcollie.generation.KVCache`, with `positions`): incremental decoding, the new
        tokens attending to the cached ones through the cache's mask."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            # Full tables: under sequence parallelism `h` holds a slice of the sequence, and
            # attention, which sees the whole sequence, takes the positions it needs.
            cos, sin, documents = self.rope_cos, self.rope_sin, None
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            documents = cache.mask if cache is not None else self.document_layout(positions)
        for layer_id, layer in self.layers.items():
            h = layer(h, cos, sin, documents, None if cache is None else cache.layers[int(layer_id)])
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def check_attention(args: ModelArgs, device: torch.device, mixed_precision: str) -> None:
    """Refuse flash attention where it cannot run, instead of silently falling back."""
    if args.attention != "flash":
        return
    if flash_attn_func is None:
        raise ConfigError("model.attention = 'flash' needs the flash-attn package: pip install 'dtcollie[gpu]'")
    if device.type != "cuda":
        raise ConfigError(f"model.attention = 'flash' needs a CUDA device; this run uses {device.type}")
    if mixed_precision not in BF16_COMPUTE:
        raise ConfigError(f"model.attention = 'flash' needs training.mixed_precision = 'bf16' or 'bf16_weights', "
                          f"not {mixed_precision!r}")


def count_parameters(model: nn.Module, exclude_embedding: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if exclude_embedding and model.tok_embeddings is not None:
        total -= model.tok_embeddings.weight.numel()
    return total


def flops_per_token(args: ModelArgs, num_params_no_embedding: int, seq_len: int) -> int:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention (PaLM's formula)."""
    return 6 * num_params_no_embedding + 12 * args.n_layers * args.n_heads * args.attention_head_dim * seq_len
