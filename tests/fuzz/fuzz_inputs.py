"""Hostile inputs for the fuzz tests, and the property they all check.

The project's rule is that whatever a user hands a reader (a config, a data file, a tokenizer
folder, a checkpoint) either works or raises the project's own `UserError` with a one-line
message. `reader_outcome` checks exactly that for one call; the strategies here make the inputs:
byte edits of a valid file (so most of it still parses and the damage reaches deep code), edits of
its parsed JSON (so it still parses and the damage reaches the code that trusts its structure),
JSON and TOML values of every type, and texts that the json/tomllib modules themselves choke on
(nesting past the recursion limit, integers past Python's 4300-digit limit).

Every fuzz test runs with `fixed_budget(n)`: derandomized, no example database, so CI runs the
same n examples every time and a failure reproduces exactly. Random inputs seldom pair a key with
the one value that breaks it, so each reader also has a table test pairing every key of each kind
with every edge value (`edge_failures`), which reports all its findings at once.
"""

import json
import os
import re
import traceback
from pathlib import Path

from hypothesis import HealthCheck, currently_in_test_context, event, settings
from hypothesis import strategies as st


def fixed_budget(max_examples: int) -> settings:
    """n examples chosen by a fixed seed; no deadline (file I/O on a shared machine varies)."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def reader_outcome(call, *allowed: type[Exception]):
    """`call()`'s result, or the `allowed` error it raised, whose message must be one non-empty line.
    Any other exception propagates: that is the failure the fuzz tests look for."""
    try:
        result = call()
    except allowed as err:
        message = str(err)
        assert message.strip(), f"{type(err).__name__} with an empty message"
        assert "\n" not in message and "\r" not in message, (
            f"{type(err).__name__} message is not one line: {message!r}")
        note_outcome(f"raised {type(err).__name__}")
        return err
    except RecursionError as err:
        if hasattr(err, "dtcollie_line"):  # raised afresh by an inner reader_outcome already
            raise
        recursion = RecursionError(f"escaped from {dtcollie_line(err)}: {err}")
        recursion.dtcollie_line = dtcollie_line(err)
    else:
        note_outcome("returned a result")
        return result
    # Where the recursion limit trips depends on the stack's depth, which differs between
    # hypothesis's replays (it calls the failure flaky), and the traceback runs to thousands of
    # frames: raised afresh here, outside the except block so nothing of the original is attached.
    raise recursion


def dtcollie_line(err: BaseException) -> str:
    """`file.py:line` of the innermost dtcollie frame the exception passed through."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f"{os.sep}dtcollie{os.sep}" in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else getattr(err, "dtcollie_line", "?")


def note_outcome(outcome: str) -> None:
    """Count the outcome for --hypothesis-show-statistics (how often inputs got through; a fuzz test
    whose inputs all fail the first check tests only that check). Plain tests have no statistics."""
    if currently_in_test_context():
        event(outcome)


def edge_failures(cases) -> list[str]:
    """Run `(label, call, allowed errors)` cases through `reader_outcome`; one line for each
    distinct way they broke the rule (exception type and the dtcollie line it came from), naming the
    first case that broke it so and how many did. A table of edge values fails with all its
    findings at once, where a hypothesis test stops at its first."""
    broken = {}
    for label, call, allowed in cases:
        try:
            reader_outcome(call, *allowed)
        except Exception as err:
            # A message of more lines fails the assertion: the cause is the UserError it was about.
            cause = err.__context__ if isinstance(err, AssertionError) and err.__context__ else err
            what = f"{type(err).__name__} from {dtcollie_line(cause)}"
            count, first = broken.get(what, (0, f"{label}: {' '.join(str(err).split())[:160]}"))
            broken[what] = (count + 1, first)
    return [f"{what} in {count} case(s), first {first}" for what, (count, first) in broken.items()]


def shorten(text: str, keep: int = 24) -> str:
    """A long edge value as its start and length, for a case's label."""
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} chars)"


# --- bytes --------------------------------------------------------------------------------------

EDITS = ("flip", "delete", "insert", "truncate")


@st.composite
def mutated(draw, data: bytes, edits: tuple[str, ...] = EDITS, max_edits: int = 4) -> bytes:
    """`data` after 1..max_edits edits, each one of `edits`: flip bits of a byte, delete a short
    range, insert random bytes, or cut the tail off. ("flip" alone keeps the size, which is what
    gets a file past a size check such as files.json.)"""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        edit = draw(st.sampled_from(edits))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if edit == "flip" and out:
            out[at] ^= draw(st.integers(1, 255))
        elif edit == "delete":
            del out[at:at + draw(st.integers(1, 16))]
        elif edit == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "truncate":
            del out[at:]
    return bytes(out)


def any_bytes(max_size: int = 512):
    """Random bytes, or random text as UTF-8 (which gets further into text parsers)."""
    return st.one_of(st.binary(max_size=max_size), st.text(max_size=max_size).map(str.encode))


# --- JSON ---------------------------------------------------------------------------------------

# Texts that trip code expecting ordinary strings: line breaks (one-line messages), NUL, lone
# surrogates (valid as JSON escapes, not encodable as UTF-8), and the tokenizer's own special tokens.
HOSTILE_TEXTS = ("", " ", "\n", "a\nb", "\r", "\x00", "\ud800", "x\udfffy", "\u2028", "\x1b[31m",
                 "<|endoftext|>", "<|pad|>", "../x", "model.layers.0.self_attn.q_proj.weight")
# Numbers at the edges: past int64, past float (an int too large to convert), and the non-finite floats.
EDGE_NUMBERS = (0, -1, 1, 2**31, 2**63, -2**63 - 1, 2**64, 2**1024, 10**400, -(10**400), float("inf"),
                float("-inf"), float("nan"), 1e308, 5e-324, -0.0, 0.5)
# JSON texts json.dumps never writes and json.loads cannot read into a value.
# (3000 levels is past Python's recursion limit, 1000, or 2048 under hypothesis, and past the Rust
# JSON readers' 128.)
RAW_JSON = ("[" * 3000, '{"a":' * 3000 + "1" + "}" * 3000, "1" * 5000, "-" + "9" * 5000, "1e999999")


# Characters st.text() leaves out or rarely draws: surrogates, controls, line and paragraph separators.
ODD_CHARACTERS = st.characters(codec=None, categories=["Cs", "Cc", "Zl", "Zp"])


# A value of each JSON type, for the tables of edge values (and every edge number and text).
ODD_JSON_VALUES = (None, True, [], {}, [1], {"content": 1}, *EDGE_NUMBERS, *HOSTILE_TEXTS)


def texts(max_size: int = 12):
    """Any text: ordinary, one of HOSTILE_TEXTS, or mixed with ODD_CHARACTERS. A text may hold a lone
    surrogate, so write one to a file through json.dumps or with "surrogatepass"."""
    return st.one_of(st.text(max_size=max_size), st.sampled_from(HOSTILE_TEXTS),
                     st.text(st.one_of(st.characters(), ODD_CHARACTERS), max_size=max_size))


def numbers():
    return st.one_of(st.integers(), st.floats(), st.sampled_from(EDGE_NUMBERS))


def json_values(max_leaves: int = 8):
    """Any JSON value (NaN and Infinity included: Python's json reads them)."""
    scalars = st.one_of(st.none(), st.booleans(), numbers(), texts())
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(texts(), inner, max_size=4)),
                        max_leaves=max_leaves)


def json_texts(values=None):
    """JSON text: a dumped value (non-ASCII escaped, so a lone surrogate is a \\ud800 escape) or one
    of RAW_JSON."""
    return st.one_of((values or json_values()).map(json.dumps), st.sampled_from(RAW_JSON))


# Every edge value as JSON text, for the tables: ODD_JSON_VALUES dumped, and RAW_JSON.
EDGE_JSON_TEXTS = (*(json.dumps(value) for value in ODD_JSON_VALUES), *RAW_JSON)


def json_object_text(fields: dict[str, str]) -> str:
    """A JSON object from names to already-encoded JSON texts (which may be RAW_JSON)."""
    return "{" + ", ".join(f"{json.dumps(name)}: {text}" for name, text in fields.items()) + "}"


def json_members(document: dict) -> dict[str, str]:
    """Each member of a JSON object as JSON text, for json_object_text."""
    return {key: json.dumps(value) for key, value in document.items()}


@st.composite
def json_mutated(draw, document, values=None, max_edits: int = 3):
    """`document` (a parsed JSON value) with 1..max_edits nodes replaced by random values, deleted
    or (an object's member) renamed to any text, each found by a random walk from the root: the
    file stays valid JSON, so the damage reaches the code that reads its structure."""
    values = values or json_values(max_leaves=4)
    document = json.loads(json.dumps(document))  # a deep copy
    for _ in range(draw(st.integers(1, max_edits))):
        parent, key, node = None, None, document
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):  # stop at each level 1 in 4
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            return draw(values)  # the root itself: a value of the wrong type
        edit = draw(st.sampled_from(["replace", "replace", "delete", "rename"] if isinstance(parent, dict) else
                                    ["replace", "replace", "delete"]))
        if edit == "delete":
            del parent[key]
        elif edit == "rename":
            parent[draw(texts())] = parent.pop(key)
        else:
            parent[key] = draw(values)
    return document


# --- TOML ---------------------------------------------------------------------------------------

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# TOML literals at the edges: past int64, past Python's digit limit, past float, non-finite, odd bases,
# dates (a type no field has), and nesting past tomllib's recursion limit.
EDGE_TOML = ("9223372036854775808", "-9223372036854775809", "1" + "0" * 400, "9" * 5000, "0x7fffffffffffffffff",
             "0o777", "0b101", "1_000", "inf", "-inf", "nan", "1e400", "-0.0", "1979-05-27", "07:32:00",
             "1979-05-27T07:32:00Z", "[" * 3000 + "]" * 3000, "{a = " * 1500 + "1" + "}" * 1500, '""', "''", "[]", "{}")


def toml_key(name: str) -> str:
    """`name` as a TOML key: bare when it can be, else a basic string (JSON escapes are TOML's,
    except a lone surrogate's, which makes the file invalid TOML: a case worth having too)."""
    return name if BARE_KEY.fullmatch(name) else json.dumps(name)


def toml_values():
    """TOML value text: scalars of every type, edge literals, arrays and inline tables."""
    scalars = st.one_of(st.integers().map(str), st.floats().map(repr), st.sampled_from(("true", "false")),
                        texts().map(json.dumps), st.sampled_from(EDGE_TOML))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        st.dictionaries(texts(max_size=5), inner, max_size=3).map(
            lambda table: "{" + ", ".join(f"{toml_key(k)} = {v}" for k, v in table.items()) + "}")),
        max_leaves=6)


def toml_literal(value) -> str:
    """A plain Python value from a config file (str, bool, int, float, list) as TOML text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def toml_document(tables: dict[str, dict[str, str]]) -> str:
    """TOML text of {section: {key: value text}}."""
    return "".join(f"[{toml_key(section)}]\n" + "".join(f"{toml_key(k)} = {v}\n" for k, v in keys.items()) + "\n"
                   for section, keys in tables.items())
