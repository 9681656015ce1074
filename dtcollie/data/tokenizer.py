"""Tokenizer: train a small byte-level BPE, load any `tokenizer.json` folder.

The trainer needs only encode/decode, the vocabulary size, the BOS/EOS/pad ids and the special
tokens the model expects around a text, so `Tokenizer` wraps a `tokenizers.Tokenizer` with exactly
that. A folder written by `train_tokenizer` also carries a `tokenizer_config.json`, so transformers'
`AutoTokenizer` loads it too (for HF export and eval). Folders from the HF hub (e.g. Llama 3) load
the same way: BOS, EOS and pad come from their `tokenizer_config.json`; a missing pad token falls
back to EOS.

Special tokens. Llama 2/3 were trained with BOS (`<s>`, `<|begin_of_text|>`) before every sequence,
others (Qwen) with none. What a model's own tokenizer puts around a single text is what transformers'
`AutoTokenizer.from_pretrained(folder)(text)` adds; transformers 5 takes it from tokenizer.json's
post-processor whenever there is a tokenizer.json (not from tokenizer_config.json's add_bos_token),
so the backend is asked once at load time with a probe text, and the ids it adds before and after
the text become `prefix_ids` and `suffix_ids` (tested equal to transformers' for Llama 2/3 and Qwen
style folders). Encoding itself stays on the
`tokenizers` backend: `encode` adds nothing, `encode_prompt` the prefix, `encode_documents` the
prefix, the suffix and a final EOS.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dtcollie.errors import DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
PROBE = "Hello world"  # any text whose tokens transformers' special tokens cannot be mistaken for


class Tokenizer:
    """Text <-> token ids. `encode` adds no special tokens; `prefix_ids` / `suffix_ids` are what the
    model's tokenizer adds before / after a text (e.g. [BOS] / [])."""

    def __init__(self, backend: BackendTokenizer, eos_token: str, pad_token: str | None, folder: str = "",
                 bos_token: str | None = None, prefix_ids: list[int] = (), suffix_ids: list[int] = ()):
        self.backend = backend
        self.folder = folder
        self.eos_id = self._token_id(eos_token, "eos_token")
        self.pad_id = self._token_id(pad_token, "pad_token") if pad_token else self.eos_id
        self.bos_id = self._token_id(bos_token, "bos_token") if bos_token else None
        self.prefix_ids, self.suffix_ids = list(prefix_ids), list(suffix_ids)
        # Documents are separated by EOS (document masks find boundaries there): one a suffix ends with is enough.
        self.document_end = self.suffix_ids + ([] if self.suffix_ids[-1:] == [self.eos_id] else [self.eos_id])
        # max id + 1, not the token count: the embedding table must cover every id even if ids have gaps.
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def _token_id(self, token: str, name: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise DataError(f"tokenizer {self.folder or '(in memory)'}: {name} {token!r} is not in the vocabulary; "
                            f"fix tokenizer_config.json or rebuild with tools/build_tokenizer.py")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once; the Rust side uses all cores, which keeps dataset start-up fast."""
        return [enc.ids for enc in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as the model's tokenizer encodes it, suffix left out: generation continues it."""
        return self.prefix_ids + self.encode(text)

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Pre-training documents: prefix + text + suffix, each ending with EOS."""
        return [self.prefix_ids + ids + self.document_end for ids in self.encode_batch(texts)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)  # lists or tensors


def _special_token(config: dict, key: str) -> str | None:
    """HF configs store a special token either as a string or as {"content": ...}."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_ids(backend: BackendTokenizer, folder: str) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer adds before and after one text. transformers 5 takes
    them from tokenizer.json's post-processor, which the backend applies too, so the backend is
    asked (transformers would cost a second of start-up in every process; the tests compare both)."""
    plain, full = backend.encode(PROBE, add_special_tokens=False).ids, backend.encode(PROBE).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise DataError(f"tokenizer {folder}: {PROBE!r} encodes with special tokens as {full}, which does not contain "
                    f"its encoding without them, {plain}; the special tokens cannot be told apart")


def load_tokenizer(folder: str) -> Tokenizer:
    """Load `folder/tokenizer.json`; BOS/EOS/pad from `folder/tokenizer_config.json` (defaults: ours),
    the special tokens around a text from its post-processor (`special_ids`)."""
    path = Path(folder)
    if not (path / "tokenizer.json").is_file():
        what = "does not exist" if not path.exists() else "has no tokenizer.json"
        raise DataError(f"tokenizer folder {folder} {what}; set data.tokenizer to a folder with tokenizer.json or "
                        f"build one with python tools/build_tokenizer.py --out {folder}")
    try:
        backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as err:  # the Rust side raises a bare Exception with the parse error
        raise DataError(f"tokenizer {path / 'tokenizer.json'} cannot be read ({err}); rebuild it with "
                        f"tools/build_tokenizer.py") from None
    config = {}
    if (path / "tokenizer_config.json").is_file():
        try:
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            json.dumps(config, ensure_ascii=False).encode("utf-8")  # a lone \ud800 escape is no text
        except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a lone surrogate
            raise DataError(f"{path / 'tokenizer_config.json'} is not valid JSON ({err}); fix or delete it") from None
        if not isinstance(config, dict):
            raise DataError(f"{path / 'tokenizer_config.json'} must hold a JSON object, not a "
                            f"{type(config).__name__}; fix or delete it")
    eos = _special_token(config, "eos_token") or EOS_TOKEN
    pad = _special_token(config, "pad_token")
    if not config and backend.token_to_id(PAD_TOKEN) is not None:  # no config: our own token names
        pad = PAD_TOKEN
    return Tokenizer(backend, eos, pad, folder, _special_token(config, "bos_token"),
                     *special_ids(backend, folder))


def train_tokenizer(texts, vocab_size: int, out_dir: str | None = None, min_frequency: int = 2) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE on `texts` (an iterable of strings), optionally saving it.

    Byte-level means any UTF-8 text encodes without unknown tokens and decodes back exactly. Ids 0
    and 1 are `<|endoftext|>` (EOS) and `<|pad|>`. Training is deterministic for the same texts.
    """
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    if out_dir:
        save_tokenizer(backend, out_dir)
    return Tokenizer(backend, EOS_TOKEN, PAD_TOKEN, out_dir or "")


def save_tokenizer(backend: BackendTokenizer, out_dir: str) -> None:
    """Write tokenizer.json plus the tokenizer_config.json that transformers' AutoTokenizer reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
