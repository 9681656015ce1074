"""Chat SFT data: the label mask against transformers' own assistant mask, formats, bad records."""

import json

import pytest
import torch

from dtcollie.config import Data
from dtcollie.data import build_dataset, load_tokenizer
from dtcollie.data.chat import CHATML_TEMPLATE, load_chat_tokenizer, make_chatml_tokenizer, tokenize_conversations
from dtcollie.loss import IGNORE_INDEX
from dtcollie.errors import DataError

# The same ChatML rendering with transformers' {% generation %} markers around what is trained:
# apply_chat_template(return_assistant_tokens_mask=True) then computes the mask on its own.
GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"},
     {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 4 plus 4?"},
     {"role": "assistant", "content": "It is 8, which is twice 4."}],
    [{"role": "user", "content": "Name a capital."}, {"role": "assistant", "content": "Lima, of Peru."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!\nHow can I help?"},
     {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "one two three"},
     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}],
]


@pytest.fixture(scope="module")
def chat_tok(assets):
    return load_chat_tokenizer(str(assets / "chat_tokenizer"))


def transformers_mask(tokenizer, messages) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) as transformers computes them from the generation markers."""
    original = tokenizer.chat_template
    tokenizer.chat_template = GENERATION_TEMPLATE
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    finally:
        tokenizer.chat_template = original
    return out["input_ids"], out["assistant_masks"]


def test_shipped_tokenizer_is_the_generation_template_without_markers(chat_tok):
    for messages in CONVERSATIONS:
        ours = chat_tok.apply_chat_template(messages, tokenize=False)
        chat_tok.chat_template = GENERATION_TEMPLATE
        theirs = chat_tok.apply_chat_template(messages, tokenize=False)
        chat_tok.chat_template = CHATML_TEMPLATE
        assert ours == theirs


def test_mask_equals_transformers_assistant_mask(chat_tok):
    where = [(f"conversation {i}", m) for i, m in enumerate(CONVERSATIONS)]
    for (tokens, trained), (_, messages) in zip(tokenize_conversations(chat_tok, where, 512, "train"), where):
        ids, mask = transformers_mask(chat_tok, messages)
        assert tokens == ids
        assert [int(t) for t in trained] == mask
        # and it is what the issue asks: assistant content plus <|im_end|>, nothing else
        expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert chat_tok.decode([t for t, keep in zip(tokens, trained) if keep]) == expected


def test_last_turn_only(chat_tok):
    (tokens, trained), = tokenize_conversations(chat_tok, [("c", CONVERSATIONS[0])], 512, "train", last_turn_only=True)
    assert chat_tok.decode([t for t, keep in zip(tokens, trained) if keep]) == "It is 8, which is twice 4.<|im_end|>"


def test_dataset_rows_shift_the_mask_and_sharegpt_reads_the_same(write, assets):
    tok = load_tokenizer(str(assets / "chat_tokenizer"))
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]} for c in CONVERSATIONS]
    datasets = [build_dataset(Data(kind="chat", tokenizer=str(assets / "chat_tokenizer"), val_fraction=0.0,
                                   train_files=[write(name, rows)]), tok, 96, "train")
                for name, rows in (("m.jsonl", [{"messages": c} for c in CONVERSATIONS]), ("s.jsonl", sharegpt))]
    assert torch.equal(datasets[0].input_ids, datasets[1].input_ids)
    assert torch.equal(datasets[0].labels, datasets[1].labels)
    inputs, labels = datasets[0].input_ids[0], datasets[0].labels[0]
    kept = labels != IGNORE_INDEX
    assert tok.decode(labels[kept].tolist()) == "5.<|im_end|>It is 8, which is twice 4.<|im_end|>"
    assert torch.equal(labels[:-1][kept[:-1]], inputs[1:][kept[:-1]])  # labels[t] is input[t + 1]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'robot'"),
    ({"conversations": [{"from": "gpt", "value": 3}]}, "turn 1 must be an object with a string 'value'"),
    ({"text": "hello"}, "has neither 'messages' nor 'conversations'"),
    ({"messages": []}, "non-empty list"),
])
def test_bad_records_name_file_and_line(write, assets, record, message):
    tok = load_tokenizer(str(assets / "chat_tokenizer"))
    path = write("bad.jsonl", [{"messages": CONVERSATIONS[1]}, record])
    cfg = Data(kind="chat", tokenizer=str(assets / "chat_tokenizer"), train_files=[path], val_fraction=0.0)
    with pytest.raises(DataError, match=f"{path} line 2: .*{message}") as error:
        build_dataset(cfg, tok, 64, "train")
    assert "\n" not in str(error.value)
    skipping = Data(kind="chat", tokenizer=str(assets / "chat_tokenizer"), train_files=[path], val_fraction=0.0,
                    skip_bad_lines=True)
    assert len(build_dataset(skipping, tok, 64, "train")) == 1


def test_tokenizer_without_template_is_one_line_unless_a_file_gives_one(tmp_path, assets):
    with pytest.raises(DataError, match="has no chat template.*data.chat_template"):
        load_chat_tokenizer(str(assets / "tokenizer"))
    (tmp_path / "chatml.jinja").write_text(CHATML_TEMPLATE)
    tokenizer = load_chat_tokenizer(str(assets / "tokenizer"), str(tmp_path / "chatml.jinja"))
    assert tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False).startswith("<|im_start|>user\nName")


def test_a_template_that_fails_to_render_names_the_conversation(tmp_path, assets, chat_tok):
    (tmp_path / "bad.jinja").write_text("{{ raise_exception('no system messages here') }}")
    tokenizer = load_chat_tokenizer(str(assets / "chat_tokenizer"), str(tmp_path / "bad.jinja"))
    conversations = [("data.jsonl line 1", CONVERSATIONS[0])]
    with pytest.raises(DataError, match="data.jsonl line 1: the chat template failed to render it"):
        tokenize_conversations(tokenizer, conversations, 64, "train")
    with pytest.raises(DataError, match="no usable chat example"):  # skipped, and then none is left
        tokenize_conversations(tokenizer, conversations, 64, "train", skip_bad_lines=True)


def test_shipped_chat_tokenizer_is_what_the_tool_makes(tmp_path, assets):
    """The committed asset equals a fresh build (no hand edits), and dtcollie's own loader reads it."""
    make_chatml_tokenizer(str(assets / "tokenizer"), str(tmp_path / "chat"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / "chat" / name).read_text()) == json.loads((assets / "chat_tokenizer" / name).read_text())
    tok = load_tokenizer(str(assets / "chat_tokenizer"))
    assert tok.vocab_size == 2050 and tok.decode([tok.eos_id]) == "<|im_end|>"
