"""Fuzzing the config reader: whatever the TOML file or the command line says, `config.load` returns
a JobConfig or raises a one-line ConfigError (see fuzz_inputs.py for the inputs and the budget)."""

import dataclasses
import itertools
import tempfile
import tomllib
import typing
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from dtcollie import config
from dtcollie.errors import ConfigError

from fuzz_inputs import (EDGE_TOML, HOSTILE_TEXTS, any_bytes, edge_failures, fixed_budget, mutated, reader_outcome,
                         shorten, texts, toml_document, toml_key, toml_literal, toml_values)

DEBUG_TOML = Path(__file__).resolve().parents[2] / "train_configs" / "debug.toml"
KNOWN_KEYS = [(section, f.name) for section, kind in config.SECTIONS.items() for f in dataclasses.fields(kind)]


def load_text(content: bytes):
    """`config.load` of a .toml file holding `content`: the JobConfig or the ConfigError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "job.toml")
        path.write_bytes(content)
        result = reader_outcome(lambda: config.load(str(path)), ConfigError)
    assert isinstance(result, (config.JobConfig, ConfigError)), result
    return result


def test_the_valid_seed_config_loads():
    # The mutations below start from debug.toml; it must itself be a good config, or they test only errors.
    assert load_text(DEBUG_TOML.read_bytes()) == config.load(None)


@fixed_budget(150)
@given(any_bytes(max_size=400))
def test_arbitrary_bytes_as_a_config_file(content):
    load_text(content)


@fixed_budget(200)
@given(mutated(DEBUG_TOML.read_bytes()))
def test_byte_edits_of_the_debug_config(content):
    load_text(content)


# A key to set: half of them known ones (their values reach the type and range checks), the rest
# unknown keys of known sections or of unknown ones, named by any text.
known_keys = st.sampled_from(KNOWN_KEYS)
keys = st.one_of(known_keys, known_keys, st.tuples(st.sampled_from(list(config.SECTIONS)), texts()),
                 st.tuples(texts(), texts()))


@fixed_budget(200)
@given(st.lists(st.tuples(keys, toml_values()), min_size=1, max_size=4))
def test_random_values_for_keys_of_the_debug_config(assignments):
    tables = {section: {key: toml_literal(value) for key, value in table.items()}
              for section, table in tomllib.loads(DEBUG_TOML.read_text()).items()}
    for (section, key), value in assignments:
        tables.setdefault(section, {})[key] = value
    load_text(toml_document(tables).encode("utf-8", "surrogatepass"))


# One command-line item: --name=value, --name value, a flag without its value, or a stray word;
# names are known keys half of the time.
names = st.one_of(st.sampled_from([f"{section}.{key}" for section, key in KNOWN_KEYS]), texts())
cli_values = st.one_of(toml_values(), texts())
argv_items = st.one_of(st.tuples(names, cli_values).map(lambda nv: [f"--{nv[0]}={nv[1]}"]),
                       st.tuples(names, cli_values).map(lambda nv: [f"--{nv[0]}", nv[1]]),
                       st.tuples(names).map(lambda n: [f"--{n[0]}"]),
                       texts().map(lambda word: [word]))


@fixed_budget(200)
@given(st.lists(argv_items, max_size=5).map(lambda items: list(itertools.chain.from_iterable(items))))
def test_random_command_line_overrides(argv):
    parse_and_load(argv)


def parse_and_load(argv: list[str]):
    """`parse_overrides` then `load(None, overrides)`: the JobConfig or the ConfigError."""
    parsed = reader_outcome(lambda: config.parse_overrides(argv), ConfigError)
    if isinstance(parsed, ConfigError):
        return parsed
    _, overrides = parsed  # a --config path is not read: the files are fuzzed above
    result = reader_outcome(lambda: config.load(None, overrides), ConfigError)
    assert isinstance(result, (config.JobConfig, ConfigError)), result
    return result


def test_edge_texts_as_section_key_and_option_names():
    # Names are echoed in the error that refuses them: each edge text as a section, a key and an option.
    cases = []
    for text in HOSTILE_TEXTS:
        for content in (f"[{toml_key(text)}]\nx = 1\n", f"[job]\n{toml_key(text)} = 1\n"):
            cases.append((f"file {content!r}", lambda c=content: load_text(c.encode("utf-8", "surrogatepass")), ()))
        for argv in (["--" + text], ["--" + text, "1"], [f"--{text}=1"], [text], [f"--job.{text}", "1"],
                     [f"--{text}.seed", "1"], ["--job.seed", text]):
            cases.append((f"argv {argv!r}", lambda a=argv: parse_and_load(a), ()))
    failures = edge_failures(cases)
    assert not failures, "\n".join(failures)


def key_of_each_kind() -> list[str]:
    """One known key for each kind `load` tells apart: its type, and whether it has choices, a
    minimum, an upper bound or holds paths. (Checking every key would cost ten times as long.)"""
    kinds = {}
    for section, fields in config.SECTIONS.items():
        hints = typing.get_type_hints(fields)
        for f in dataclasses.fields(fields):
            meta = f.metadata
            kind = (hints[f.name], bool(meta["choices"]), meta["minimum"] is not None, meta["below"] is not None,
                    meta["path"])
            kinds.setdefault(kind, f"{section}.{f.name}")
    return sorted(kinds.values())


def test_edge_literals_for_a_key_of_each_kind():
    # The random values above seldom pair a key with the literal that breaks it; this table pairs all.
    keys = key_of_each_kind()
    assert len(keys) >= 10 and {"job.overwrite", "training.max_norm", "data.train_files"} <= set(keys)
    cases = []
    for key, literal in itertools.product(keys, EDGE_TOML):
        section, name = key.split(".")
        content = f"[{section}]\n{name} = {literal}\n".encode()
        cases.append((f"{key} = {shorten(literal)} in a file", lambda content=content: load_text(content), ()))
        cases.append((f"--{key} {shorten(literal)}", lambda override=(key, literal): config.load(None, [override]),
                      (ConfigError,)))
    failures = edge_failures(cases)
    assert not failures, "\n".join(failures)
