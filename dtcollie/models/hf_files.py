"""The files besides the weights that make a model folder usable alone: the tokenizer's files and
`generation_config.json`.

They travel with the weights through every step: `convert_hf_to_dcp` copies them from the HF
folder into the DCP folder, training copies them from `data.tokenizer` (and the generation config
from `checkpoint.initial_load_path`) into every checkpoint and weights folder, and
`convert_dcp_to_hf` / `export_lora` copy them into the HF or PEFT folder, so `AutoTokenizer` loads
it and `generate` stops at the model's EOS.
"""

import json
import shutil
from pathlib import Path

from dtcollie.errors import CheckpointError

# What transformers' tokenizers read from a model folder (any that exist are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
GENERATION_CONFIG = "generation_config.json"


def copy_tokenizer_files(source: str | Path, out: str | Path) -> list[str]:
    """Copy the tokenizer files of folder `source` into `out`; returns the names copied."""
    copied = [name for name in TOKENIZER_FILES if Path(source, name).is_file()]
    for name in copied:
        shutil.copyfile(Path(source, name), Path(out, name))
    return copied


def copy_generation_config(sources: list[str | Path], out: str | Path) -> bool:
    """Copy the first `generation_config.json` found in `sources` (folders) into `out`."""
    for source in sources:
        if source and Path(source, GENERATION_CONFIG).is_file():
            shutil.copyfile(Path(source, GENERATION_CONFIG), Path(out, GENERATION_CONFIG))
            return True
    return False


def special_token_ids(tokenizer_folder: str | Path) -> dict:
    """bos/eos/pad token ids of the tokenizer in `tokenizer_folder`, as transformers loads it (an
    absent token is None)."""
    from transformers import AutoTokenizer  # imported here: only export needs it

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"transformers cannot load the tokenizer in {tokenizer_folder} ({err}); give a "
                              f"folder with tokenizer.json and tokenizer_config.json") from None
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def write_side_files(out: str | Path, tokenizer_folder: str | Path | None, sources: list, token_ids: dict) -> None:
    """The tokenizer's files and a generation config for the model folder `out`: the first
    `generation_config.json` among `sources`, else one holding `token_ids` (when there are any)."""
    if tokenizer_folder:
        copy_tokenizer_files(tokenizer_folder, out)
    if not copy_generation_config([*sources, tokenizer_folder], out) and token_ids:
        from transformers import GenerationConfig

        GenerationConfig(**token_ids).save_pretrained(str(out))


def find_tokenizer(folder: str | Path, given: str | Path | None) -> str | None:
    """`given`, else `folder` when it holds a tokenizer.json (as every dtcollie checkpoint does), else None."""
    if given:
        if not Path(given, "tokenizer.json").is_file():
            raise CheckpointError(f"tokenizer folder {given} has no tokenizer.json")
        return str(given)
    return str(folder) if Path(folder, "tokenizer.json").is_file() else None


def export_tokenizer(folder: str | Path, given: str | Path | None) -> tuple[str | None, dict]:
    """(the tokenizer an export ships, as `find_tokenizer` picks it, and its bos/eos/pad ids for
    config.json; {} without a tokenizer)."""
    tokenizer = find_tokenizer(folder, given)
    return tokenizer, special_token_ids(tokenizer) if tokenizer else {}
