"""Local Hugging Face datasets and parquet files give exactly the rows the same records give as jsonl.

Datasets are built here with the `datasets` library (save_to_disk folders, DatasetDicts) and
pyarrow (parquet files); nothing is downloaded.
"""

import dataclasses
import json

import datasets
import pyarrow
import pyarrow.parquet
import pytest
import torch

from dtcollie.config import Data
from dtcollie.data import build_dataset, load_tokenizer
from dtcollie.errors import DataError

TEXTS = [f"Document {i}: the number {i * 7} is written here {'again ' * (i % 5)}." for i in range(30)]
PAIRS = [{"input": f"Question: what is {i} plus {i}?\nAnswer:", "output": f" {2 * i}."} for i in range(30)]
CHATS = [{"messages": [{"role": "user", "content": f"Double {i}."}, {"role": "assistant", "content": f"{2 * i}."},
                       {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]}
         for i in range(30)]
KINDS = {  # kind: (records, tokenizer asset, options)
    "pretrain": ([{"text": t} for t in TEXTS], "tokenizer", {}),
    "sft": (PAIRS, "tokenizer", {"sft_packing": True}),
    "chat": (CHATS, "chat_tokenizer", {"sft_packing": True}),
}


def rows(dataset) -> dict[str, torch.Tensor]:
    fields = {"input_ids": dataset.input_ids, "labels": dataset.labels}
    return fields if dataset.positions is None else {**fields, "positions": dataset.positions}


def assert_same_rows(first, second) -> None:
    first, second = rows(first), rows(second)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def jsonl(tmp_path, name: str, records: list[dict]) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(params=sorted(KINDS))
def kind_case(request, assets):
    records, tokenizer, options = KINDS[request.param]
    base = Data(kind=request.param, tokenizer=str(assets / tokenizer), val_fraction=0.1, **options)
    return base, records, load_tokenizer(base.tokenizer)


def test_saved_dataset_and_parquet_equal_jsonl(kind_case, tmp_path):
    base, records, tok = kind_case
    from_jsonl = dataclasses.replace(base, train_files=[jsonl(tmp_path, "d.jsonl", records)])
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), tmp_path / "d.parquet", row_group_size=7)
    sources = [dataclasses.replace(base, hf_dataset=str(tmp_path / "saved")),
               dataclasses.replace(base, hf_dataset=str(tmp_path / "*.parquet")),
               dataclasses.replace(base, train_files=[str(tmp_path / "d.parquet")])]
    for split in ("train", "val"):
        expected = build_dataset(from_jsonl, tok, 64, split)
        assert len(expected) >= 1
        for source in sources:
            assert_same_rows(build_dataset(source, tok, 64, split), expected)


def test_dataset_dict_splits(tmp_path, tok):
    splits = {"train": [{"text": t} for t in TEXTS[:20]], "validation": [{"text": t} for t in TEXTS[20:]]}
    datasets.DatasetDict({name: datasets.Dataset.from_list(r) for name, r in splits.items()}).save_to_disk(
        str(tmp_path / "dict"))
    cfg = Data(hf_dataset=str(tmp_path / "dict"), hf_val_split="validation")
    for split, name in (("train", "train"), ("val", "validation")):
        expected = Data(train_files=[jsonl(tmp_path, f"{name}.jsonl", splits[name])], val_fraction=0.0)
        assert_same_rows(build_dataset(cfg, tok, 32, split), build_dataset(expected, tok, 32, "train"))
    with pytest.raises(DataError, match=r"has splits train, validation, not 'test'; set data.hf_split"):
        build_dataset(dataclasses.replace(cfg, hf_split="test"), tok, 32, "train")


def test_bad_sources_and_records_are_one_line(tmp_path, tok):
    with pytest.raises(DataError, match=r"data.hf_dataset '.*nowhere' is neither a dataset folder nor existing"):
        build_dataset(Data(hf_dataset=str(tmp_path / "nowhere")), tok, 32, "train")
    datasets.Dataset.from_list([{"text": "fine " * 40}, {"text": None}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad row 2: field 'text' must be a string, got NoneType; fix it or set "
                                        r"data.skip_bad_lines = true") as error:
        build_dataset(Data(hf_dataset=str(tmp_path / "bad")), tok, 32, "train")
    assert "\n" not in str(error.value)
    skipping = Data(hf_dataset=str(tmp_path / "bad"), skip_bad_lines=True, val_fraction=0.0)
    assert len(build_dataset(skipping, tok, 32, "train")) >= 1
