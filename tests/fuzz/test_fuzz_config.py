"""Fuzzing the config reader: whatever the TOML file or the command line says, `config.load` returns
a JobConfig or raises a one-line ConfigError (see fuzz_inputs.py for the inputs and the budget)."""

import dataclasses
import itertools
import tempfile
import tomllib
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from dtcollie import config
from dtcollie.errors import ConfigError

from fuzz_inputs import any_bytes, fixed_budget, mutated, reader_outcome, texts, toml_document, toml_literal, toml_values

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


# A key to set: mostly known ones (their values reach the type and range checks), some unknown or odd.
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.tuples(st.sampled_from(list(config.SECTIONS)), texts()),
                 st.tuples(texts(), texts()))


@fixed_budget(250)
@given(st.lists(st.tuples(keys, toml_values()), min_size=1, max_size=4))
def test_random_values_for_keys_of_the_debug_config(settings_):
    tables = {section: {key: toml_literal(value) for key, value in table.items()}
              for section, table in tomllib.loads(DEBUG_TOML.read_text()).items()}
    for (section, key), value in settings_:
        tables.setdefault(section, {})[key] = value
    load_text(toml_document(tables).encode("utf-8", "surrogatepass"))


# One command-line item: --name=value, --name value, or a stray word; names mostly known keys.
names = st.one_of(st.sampled_from([f"{section}.{key}" for section, key in KNOWN_KEYS]), texts())
cli_values = st.one_of(toml_values(), texts())
argv_items = st.one_of(st.tuples(names, cli_values).map(lambda nv: [f"--{nv[0]}={nv[1]}"]),
                       st.tuples(names, cli_values).map(lambda nv: [f"--{nv[0]}", nv[1]]),
                       st.tuples(names).map(lambda n: [f"--{n[0]}"]),
                       texts().map(lambda word: [word]))


@fixed_budget(250)
@given(st.lists(argv_items, max_size=5).map(lambda items: list(itertools.chain.from_iterable(items))))
def test_random_command_line_overrides(argv):
    parsed = reader_outcome(lambda: config.parse_overrides(argv), ConfigError)
    if isinstance(parsed, ConfigError):
        return
    _, overrides = parsed  # a --config path is not read: the files are fuzzed above
    result = reader_outcome(lambda: config.load(None, overrides), ConfigError)
    assert isinstance(result, (config.JobConfig, ConfigError)), result
