"""Fuzzing the data readers: jsonl/txt files and tokenizer folders that are anything but what they
should be give a dataset (or tokenizer) or a one-line DataError (see fuzz_inputs.py for the inputs
and the budget)."""

import itertools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtcollie.config import Data
from dtcollie.data import build_dataset, load_tokenizer
from dtcollie.data.chat import conversations_of, load_chat_tokenizer, tokenize_conversations
from dtcollie.data.records import Unreadable, jsonl_records
from dtcollie.data.tokenizer import Tokenizer
from dtcollie.errors import DataError
from dtcollie.loss import IGNORE_INDEX

from fuzz_inputs import (EDGE_JSON_TEXTS, HOSTILE_TEXTS, ODD_JSON_VALUES, any_bytes, edge_failures, fixed_budget,
                         json_members, json_mutated, json_object_text, json_texts, json_values, mutated, reader_outcome,
                         shorten, texts)

ASSETS = Path(__file__).resolve().parents[2] / "dtcollie" / "assets"
SEQ_LEN = 32  # fits a shipped sft example or short chat; a few records make a pre-training row
SFT_LINES = (ASSETS / "sft" / "train.jsonl").read_bytes().splitlines(keepends=True)[:20]
# The same records with a "text" field too, so each reads as pretrain (data.text_field) and as sft data.
GOOD_LINES = [json.dumps({"text": record["input"], **record}).encode() + b"\n"
              for record in map(json.loads, SFT_LINES)]
CHAT_SEED = (ASSETS / "chat" / "train.jsonl").read_bytes().splitlines(keepends=True)[1]  # a short one
TOKENIZER_JSON = json.loads((ASSETS / "tokenizer" / "tokenizer.json").read_text())
TOKENIZER_CONFIG = json.loads((ASSETS / "tokenizer" / "tokenizer_config.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ASSETS / "tokenizer"))


@pytest.fixture(scope="module")
def chat_tok():
    return load_chat_tokenizer(str(ASSETS / "chat_tokenizer"))


def read_dataset(tok, content: bytes, suffix: str, kind: str, split: str = "train", skip_bad_lines: bool = False,
                 packing: bool = False):
    """`build_dataset` of one file holding `content`: the dataset, checked, or the DataError.
    `packing`: sft packs examples, pretrain adds document positions."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "data" + suffix)
        path.write_bytes(content)
        data_cfg = Data(kind=kind, train_files=[str(path)], val_fraction=0.5 if split == "val" else 0.0,
                        skip_bad_lines=skip_bad_lines, sft_packing=packing, document_mask=packing)
        dataset = reader_outcome(lambda: build_dataset(data_cfg, tok, SEQ_LEN, split), DataError)
    if not isinstance(dataset, DataError):
        check_rows(dataset, tok)
    return dataset


def check_rows(dataset, tok):
    """What the loader relies on: at least one row, each SEQ_LEN tokens of the vocabulary."""
    assert len(dataset) >= 1
    assert dataset.input_ids.shape == dataset.labels.shape == (len(dataset), SEQ_LEN)
    assert 0 <= int(dataset.input_ids.min()) and int(dataset.input_ids.max()) < tok.vocab_size
    labels = dataset.labels[dataset.labels != IGNORE_INDEX]
    assert labels.numel() == 0 or (0 <= int(labels.min()) and int(labels.max()) < tok.vocab_size)


def test_the_valid_seed_data_loads(tok, chat_tok):
    # The fuzzing below starts from these lines; they must make a dataset, or only errors are tested.
    assert len(read_dataset(tok, b"".join(GOOD_LINES), ".jsonl", "sft")) == len(GOOD_LINES)
    assert len(read_dataset(tok, b"".join(GOOD_LINES), ".jsonl", "pretrain")) >= 1
    conversation = [("seed", json.loads(CHAT_SEED)["messages"])]
    [(tokens, trained)] = tokenize_conversations(chat_tok, conversation, SEQ_LEN, "train")
    assert len(tokens) <= SEQ_LEN + 1 and any(trained)


# --- records ------------------------------------------------------------------------------------

@fixed_budget(150)
@given(any_bytes(max_size=300))
def test_jsonl_records_of_arbitrary_bytes(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "data.jsonl")
        path.write_bytes(content)
        records = reader_outcome(lambda: list(jsonl_records(str(path))), DataError)
    if not isinstance(records, DataError):
        assert all(where.startswith(f"{path} line ") for where, _ in records)
        unreadable = [record.problem for _, record in records if isinstance(record, Unreadable)]
        assert all(problem and "\n" not in problem for problem in unreadable), unreadable


kinds = st.sampled_from(["pretrain", "sft"])
splits = st.sampled_from(["train", "val"])


@fixed_budget(120)
@given(any_bytes(max_size=300), st.sampled_from([".jsonl", ".txt"]), kinds, splits, st.booleans())
def test_datasets_of_arbitrary_bytes(tok, content, suffix, kind, split, skip):
    read_dataset(tok, content, suffix, kind, split, skip)


@fixed_budget(120)
@given(mutated(b"".join(GOOD_LINES), max_edits=6), kinds, splits, st.booleans())
def test_datasets_of_byte_edits_of_valid_sft_lines(tok, content, kind, split, skip):
    read_dataset(tok, content, ".jsonl", kind, split, skip)


# A record line: an object with the fields the readers look for holding any JSON (including texts
# json.loads cannot read), a JSON value of another type, or a line of text.
field_values = st.one_of(texts().map(json.dumps), json_texts())
objects = st.dictionaries(st.sampled_from(["text", "input", "output", "messages", "extra"]), field_values,
                          max_size=4).map(json_object_text)
lines = st.one_of(objects, objects, json_texts(), texts())  # a text may hold a lone surrogate: written as is


@fixed_budget(200)
@given(st.lists(lines, min_size=1, max_size=6), st.integers(0, 3), kinds, splits, st.booleans())
def test_datasets_of_records_with_fields_of_any_type(tok, record_lines, good_lines, kind, split, skip):
    # Good lines alongside, so a bad record is met among good ones, and some datasets get built.
    content = "".join(line + "\n" for line in record_lines).encode("utf-8", "surrogatepass")
    read_dataset(tok, content + b"".join(GOOD_LINES[:good_lines]), ".jsonl", kind, split, skip)


# Records that pass every type check: their strings (any text at all) reach the tokenizer.
string_records = st.fixed_dictionaries({"text": texts(40), "input": texts(40), "output": texts(40)})


@fixed_budget(80)
@given(st.lists(string_records, min_size=1, max_size=4), kinds, st.booleans())
def test_datasets_of_records_whose_strings_hold_any_text(tok, records, kind, packing):
    content = b"".join(json.dumps(record).encode() + b"\n" for record in records) + b"".join(GOOD_LINES[:3])
    read_dataset(tok, content, ".jsonl", kind, packing=packing)


# Chat records: mostly well-formed conversations, so contents of any text (the template's own
# markers too) reach the chat template and the tokenizer; some with a turn of any shape, some any
# JSON at all. tokenize_conversations is called with a tokenizer loaded once (build_dataset would
# load transformers' tokenizer on every example).
contents = st.one_of(texts(40), st.sampled_from(["<|im_start|>", "<|im_end|>", "<|im_start|>assistant\n", "{{ x }}"]))
turn = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": contents})
odd_turn = st.one_of(st.fixed_dictionaries({"role": texts() | json_values(2), "content": contents}), json_values(3))
# A turn before the last (an assistant's): a conversation of one assistant turn is refused before its text is read.
conversations = st.tuples(st.lists(turn, min_size=1, max_size=3), st.lists(odd_turn, max_size=1), contents).map(
    lambda parts: {"messages": [*parts[0], *parts[1], {"role": "assistant", "content": parts[2]}]})
chat_records = st.one_of(conversations, conversations, json_values(4))


def read_chat(chat_tok, content: bytes, last_turn_only: bool = False, skip_bad_lines: bool = False):
    """The chat records of a .jsonl file holding `content`, tokenized: the rows (checked) or the DataError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "chat.jsonl")
        path.write_bytes(content)
        conversations = reader_outcome(lambda: conversations_of(jsonl_records(str(path)), skip_bad_lines), DataError)
    if isinstance(conversations, DataError):
        return conversations
    rows = reader_outcome(lambda: tokenize_conversations(chat_tok, conversations, SEQ_LEN, "train", last_turn_only,
                                                         skip_bad_lines), DataError)
    if not isinstance(rows, DataError):
        assert rows and all(len(tokens) == len(trained) <= SEQ_LEN + 1 for tokens, trained in rows)
    return rows


@fixed_budget(80)
@given(st.lists(chat_records, min_size=1, max_size=3), st.booleans(), st.booleans())
def test_chat_records_of_any_shape(chat_tok, records, last_turn_only, skip):
    content = "".join(json.dumps(record) + "\n" for record in records).encode() + CHAT_SEED
    read_chat(chat_tok, content, last_turn_only, skip)


def test_edge_values_for_every_record_field(tok, chat_tok):
    # The random records above seldom pair a field with the value that breaks it; this table pairs all.
    good = json.loads(GOOD_LINES[0])
    cases = []
    for kind, field, value in itertools.product(["pretrain", "sft"], ["text", "input", "output"], EDGE_JSON_TEXTS):
        content = json_object_text({**json_members(good), field: value}).encode() + b"\n" + b"".join(GOOD_LINES[1:4])
        cases.append((f"{kind} {field}: {shorten(value)}", lambda c=content, k=kind: read_dataset(tok, c, ".jsonl", k),
                      ()))
    chat = json.loads(CHAT_SEED)["messages"]
    for turn, key, value in itertools.product(range(len(chat)), ["role", "content"], EDGE_JSON_TEXTS):
        turns = [json_object_text({**json_members(t), key: value}) if i == turn else json.dumps(t)
                 for i, t in enumerate(chat)]
        content = ('{"messages": [' + ", ".join(turns) + "]}\n").encode()
        cases.append((f"chat turn {turn} {key}: {shorten(value)}", lambda c=content: read_chat(chat_tok, c), ()))
    failures = edge_failures(cases)
    assert not failures, "\n".join(failures)


# --- tokenizer folders --------------------------------------------------------------------------

def load_tokenizer_folder(tokenizer_json: bytes | None, tokenizer_config: bytes | None):
    """`load_tokenizer` of a copy of the shipped tokenizer folder with either file replaced (None:
    the shipped one; b"" is an empty file); a tokenizer that loads must encode a document."""
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(ASSETS / "tokenizer", folder, dirs_exist_ok=True)
        for name, content in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", tokenizer_config)):
            if content is not None:
                Path(folder, name).write_bytes(content)
        tokenizer = reader_outcome(lambda: load_tokenizer(folder), DataError)
        if isinstance(tokenizer, Tokenizer):
            assert tokenizer.encode_documents(["Hello world"])[0][-1] == tokenizer.eos_id
    return tokenizer


def dumped(document) -> bytes:
    return json.dumps(document).encode()


tokenizer_json_files = st.one_of(any_bytes(max_size=200), json_values().map(dumped),
                                 mutated(dumped(TOKENIZER_JSON), max_edits=2),
                                 json_mutated(TOKENIZER_JSON).map(dumped))
special_tokens = st.one_of(st.sampled_from(["<|endoftext|>", "<|pad|>", "Hello"]), texts(), json_values(4),
                           st.fixed_dictionaries({"content": texts() | json_values(2)}))
tokenizer_configs = st.one_of(
    any_bytes(max_size=200), json_values().map(dumped), mutated(dumped(TOKENIZER_CONFIG)),
    json_mutated(TOKENIZER_CONFIG).map(dumped),
    st.dictionaries(st.sampled_from(["eos_token", "pad_token", "bos_token"]), special_tokens).map(dumped))


@fixed_budget(80)
@given(tokenizer_json_files)
def test_tokenizer_folder_with_a_hostile_tokenizer_json(content):
    load_tokenizer_folder(content, None)


@fixed_budget(120)
@given(tokenizer_configs)
def test_tokenizer_folder_with_a_hostile_tokenizer_config(content):
    load_tokenizer_folder(None, content)


@fixed_budget(40)
@given(tokenizer_json_files, st.none() | tokenizer_configs)
def test_tokenizer_folder_with_both_files_hostile(tokenizer_json, tokenizer_config):
    load_tokenizer_folder(tokenizer_json, tokenizer_config)


def test_edge_values_for_every_special_token():
    # The random configs above seldom pair a token key with the value that breaks it; this table pairs all.
    values = [*EDGE_JSON_TEXTS, *(json.dumps({"content": value}) for value in ODD_JSON_VALUES)]  # HF's {"content"} form
    cases = []
    for key, value in itertools.product(["eos_token", "pad_token", "bos_token"], values):
        content = json_object_text({**json_members(TOKENIZER_CONFIG), key: value}).encode()
        cases.append((f"{key}: {shorten(value)}", lambda c=content: load_tokenizer_folder(None, c), ()))
    failures = edge_failures(cases)
    assert not failures, "\n".join(failures)


def test_edge_values_in_tokenizer_json():
    # The Rust parser names what it refuses, quoting it: each edge value in each part of the file
    # that names a type or version, and in the first added token.
    paths = [("version",), ("model", "type"), ("pre_tokenizer", "type"), ("decoder", "type"), ("model", "unk_token"),
             ("added_tokens", 0, "content")]
    cases = []
    for path, value in itertools.product(paths, (None, 1, [], {}, *HOSTILE_TEXTS)):
        document = json.loads(json.dumps(TOKENIZER_JSON))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        label = f"tokenizer.json {'.'.join(map(str, path))}: {shorten(json.dumps(value))}"
        cases.append((label, lambda c=dumped(document): load_tokenizer_folder(c, None), ()))
    failures = edge_failures(cases)
    assert not failures, "\n".join(failures)
