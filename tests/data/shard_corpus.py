"""Build small token-shard corpora directly with the shard writer (no tokenizer, no workers)."""

from pathlib import Path

from dtcollie.data.shards import ShardWriter, write_manifest


def write_corpus(folder: Path, shards: list[list[list[int]]], vocab_size: int = 100, eos_id: int = 0) -> Path:
    """`shards`: per shard, its documents as token lists without EOS."""
    folder.mkdir(parents=True, exist_ok=True)
    metas = []
    for number, documents in enumerate(shards):
        writer = ShardWriter(str(folder), f"{number:05d}", vocab_size, eos_id, {"test": number})
        writer.add_documents([document + [eos_id] for document in documents])
        metas.append(writer.finish())
    write_manifest(str(folder), metas, vocab_size, eos_id, {"test": True})
    return folder
