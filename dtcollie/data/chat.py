"""Chat SFT: conversations rendered with the tokenizer's own chat template, loss on assistant turns.

Records are jsonl lines with `messages`, a list of {"role", "content"} (roles system, user,
assistant), or ShareGPT-style `conversations`, a list of {"from", "value"} (from: system,
human/user, gpt/assistant). The whole conversation is rendered once by transformers'
`apply_chat_template` with the template of the tokenizer folder's `tokenizer_config.json` (or
`data.chat_template`, a Jinja file) and tokenized once, so the tokens are exactly what the model
sees at inference.

Which tokens are trained: each assistant turn i spans, in the rendered text, from the end of the
rendering of the turns before it with the generation prompt (`add_generation_prompt=True`: the
"<|im_start|>assistant\\n" a chat model is prompted with) to the end of the rendering of the
turns up to it, cut after its last end-of-turn token (the tokenizer's EOS, e.g. `<|im_end|>`),
so a newline the template puts after the turn is not trained. Tokens whose characters fall in a
trained span are labels (fast-tokenizer offsets map tokens to characters); every other token is
context only. This needs nothing of the template but that it renders a conversation's prefixes
as prefixes of the whole, which is checked.
"""

import json
import logging
from pathlib import Path

from dtcollie.data.records import convert_records
from dtcollie.data.sft import drop_untrainable
from dtcollie.errors import DataError

log = logging.getLogger("dtcollie.data")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def conversation_problem(record) -> tuple[list[dict] | None, str | None]:
    """(messages as [{"role", "content"}], None) for a valid record, else (None, what is wrong)."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        turns, role_key, content_key, roles = record["messages"], "role", "content", {r: r for r in ROLES}
    elif "conversations" in record:
        turns, role_key, content_key, roles = record["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        return None, "has neither 'messages' nor 'conversations'"
    if not isinstance(turns, list) or not turns:
        return None, "its conversation must be a non-empty list of turns"
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            return None, f"turn {number} must be an object with a string {content_key!r}"
        if not isinstance(turn.get(role_key), str) or turn[role_key] not in roles:
            return None, f"turn {number} has unknown role {turn.get(role_key)!r}; use one of {', '.join(roles)}"
        messages.append({"role": roles[turn[role_key]], "content": turn[content_key]})
    if not any(m["role"] == "assistant" for m in messages):
        return None, "has no assistant turn, so nothing to train on"
    return messages, None


def conversations_of(records, skip_bad_lines: bool) -> list[tuple[str, list[dict]]]:
    """(where, messages) of every valid conversation record, in order."""
    return list(convert_records(records, conversation_problem, skip_bad_lines))


def load_chat_tokenizer(folder: str, template_file: str = ""):
    """transformers' tokenizer of `folder` with its chat template, or the one in `template_file`."""
    from transformers import AutoTokenizer  # imported here: only chat data needs transformers

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises many types for a malformed tokenizer folder
        raise DataError(f"tokenizer folder {folder} cannot be loaded by transformers ({err})") from None
    if template_file:
        if not Path(template_file).is_file():
            raise DataError(f"data.chat_template file {template_file} does not exist")
        tokenizer.chat_template = Path(template_file).read_text(encoding="utf-8")
    if not tokenizer.chat_template:
        raise DataError(f"tokenizer {folder} has no chat template (tokenizer_config.json 'chat_template'); set "
                        f"data.chat_template to a Jinja template file")
    if not tokenizer.is_fast:
        raise DataError(f"tokenizer {folder} is not a fast tokenizer; chat data needs tokenizer.json")
    return tokenizer


def render(tokenizer, messages: list[dict], where: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2 raises its own TemplateError types, and templates raise_exception()
        raise DataError(f"{where}: the chat template failed to render it ({type(err).__name__}: {err})") from None


def assistant_spans(tokenizer, messages: list[dict], where: str, last_turn_only: bool) -> tuple[str, list[tuple]]:
    """(rendered conversation, [(start, end) character spans of the trained assistant turns])."""
    text = render(tokenizer, messages, where)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for i in turns[-1:] if last_turn_only else turns:
        before = render(tokenizer, messages[:i], where, add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], where)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise DataError(f"{where}: the chat template does not render the conversation's beginning as the "
                            f"beginning of the whole, so the assistant turns cannot be located")
        end_of_turn = through.rfind(tokenizer.eos_token, len(before)) if tokenizer.eos_token else -1
        spans.append((len(before), end_of_turn + len(tokenizer.eos_token) if end_of_turn >= 0 else len(through)))
    return text, spans


def tokenize_conversations(tokenizer, conversations: list[tuple[str, list[dict]]], seq_len: int, split: str,
                           last_turn_only: bool = False,
                           skip_bad_lines: bool = False) -> list[tuple[list[int], list[bool]]]:
    """(tokens, is_trained) per conversation, truncated to seq_len + 1, in the format of
    `dtcollie.data.sft` (packing and padding are shared); conversations left with nothing to train
    dropped (`drop_untrainable`). One the template cannot render is a DataError, or with
    `skip_bad_lines` skipped and counted."""
    rows, unrendered = [], 0
    for where, messages in conversations:
        try:
            text, spans = assistant_spans(tokenizer, messages, where, last_turn_only)
        except DataError:
            if not skip_bad_lines:
                raise
            unrendered += 1
            continue
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        # A token is trained when its characters [a, b) overlap a trained span [start, end).
        trained = [any(a < end and start < b for start, end in spans) for a, b in encoding["offset_mapping"]]
        rows.append((encoding["input_ids"][: seq_len + 1], trained[: seq_len + 1]))
    if unrendered:
        log.warning("skipped %d %s conversations the chat template could not render", unrendered, split)
    return drop_untrainable(rows, seq_len, split, "chat")


# ChatML, as Qwen's instruct models use it: every turn is <|im_start|>role\ncontent<|im_end|>\n.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_chatml_tokenizer(base_folder: str, out_folder: str):
    """`base_folder`'s tokenizer plus the ChatML special tokens and template, EOS = <|im_end|>, saved
    by transformers into `out_folder`; the template is kept in tokenizer_config.json, with the
    generic tokenizer class, so older transformers releases load the folder too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.save_pretrained(out_folder)
    config_path = Path(out_folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHATML_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(out_folder)
