"""The tensor-parallel plan of the decoder (every family): Megatron-style column/row splits,
optional sequence parallel.

q/k/v and w1/w3 are split by output features (each rank computes a slice of the heads / hidden
units; a q/k/v bias is split with its weight), wo and w2 by input features (partial sums reduced
afterwards). Qwen3's q/k norms run on each rank's own heads (Shard on the heads dim), their
replicated weights' gradients summed over the tp group. With sequence parallel the residual
stream between blocks is sharded on the sequence dim (Shard(1)), so norms run on a slice of the
tokens and the reductions after wo/w2 are reduce-scatters instead of all-reduces. Tied embeddings
are one DTensor: the embedding (row-parallel on nn.Embedding) and the output projection
(column-parallel) both shard the [vocab, dim] matrix on the vocabulary, Shard(0).
The projection styles also accept LoRA adapters (`dtcollie.peft.tensor_parallel`), so the same plan
parallelises a model with or without them.
"""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module

from dtcollie.errors import ConfigError
from dtcollie.models.llama import ModelArgs
from dtcollie.peft.tensor_parallel import LoRAColwiseParallel, LoRARowwiseParallel


def check_tensor_parallel(args: ModelArgs, tp: int, seq_len: int, sequence_parallel: bool) -> None:
    """Refuse sizes the plan cannot split evenly, before any process group traffic."""
    if tp == 1:
        return
    for name, value in (("attention heads", args.n_heads), ("kv heads", args.n_kv_heads),
                        ("FFN hidden size", args.hidden_dim), ("vocabulary size", args.vocab_size)):
        if value % tp:
            raise ConfigError(f"parallelism.tp = {tp} does not divide the model's {name} ({value}); "
                              f"choose a tp that divides it")
    if sequence_parallel and seq_len % tp:
        raise ConfigError(f"parallelism.sequence_parallel needs training.seq_len ({seq_len}) divisible by "
                          f"parallelism.tp ({tp})")


def _replicate_norm(norm: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Without sequence parallel a norm sees the full activations; its weight still becomes a
    Replicate DTensor on the tp mesh so every parameter of a block lives on the same mesh (one
    global-norm computation, one foreach optimizer group)."""
    distribute_module(
        norm, tp_mesh,
        input_fn=lambda module, inputs, mesh: tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                                                     for x in inputs),
        output_fn=lambda module, output, mesh: output.to_local())


def block_plan(sequence_parallel: bool, qk_norm: bool) -> dict:
    activations = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "attention.wq": LoRAColwiseParallel(),
        "attention.wk": LoRAColwiseParallel(),
        "attention.wv": LoRAColwiseParallel(),
        "attention.wo": LoRARowwiseParallel(output_layouts=activations),
        "feed_forward.w1": LoRAColwiseParallel(),
        "feed_forward.w3": LoRAColwiseParallel(),
        "feed_forward.w2": LoRARowwiseParallel(output_layouts=activations),
    }
    if qk_norm:
        # q and k arrive as local [batch, seq, local heads, head_dim]: Shard(2) on the heads.
        plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    if sequence_parallel:
        # Gather the sequence-sharded residual stream before the column-parallel projections.
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
        # Inputs (x, cos, sin, documents, kv_cache): only x is sharded; the rest are whole-sequence
        # tensors (or None).
        plan["attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                               desired_input_layouts=(Replicate(), None, None, None, None),
                                               use_local_output=True)
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                  use_local_output=True)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool,
                          loss_parallel: bool) -> None:
    """Parallelise `model` (or the pipeline stage of it) in place over `tp_mesh`."""
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    activations = Shard(1) if sequence_parallel else Replicate()
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=activations)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        # Loss parallel keeps the logits vocab-sharded; the loss is then computed under loss_parallel().
        top["output"] = LoRAColwiseParallel(input_layouts=activations,
                                            output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                            use_local_output=not loss_parallel)
    parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel, block.attention.q_norm is not None))
        if not sequence_parallel:
            _replicate_norm(block.attention_norm, tp_mesh)
            _replicate_norm(block.ffn_norm, tp_mesh)
    if model.norm is not None and not sequence_parallel:
        _replicate_norm(model.norm, tp_mesh)
    if model.args.tie_embeddings and model.output is not None and model.tok_embeddings is not None:
        model.output.weight = model.tok_embeddings.weight  # one Shard(0) DTensor; the style made a second Parameter
    # torch's SequenceParallel re-creates the norm weights as trainable Parameters; keep frozen
    # ones (under LoRA, every weight but the adapters) frozen.
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
