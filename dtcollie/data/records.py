"""Records: the JSON-like rows of `.jsonl` and `.parquet` files and of local Hugging Face datasets.

Each reader yields (where, record) lazily, so a file larger than memory streams through; `where`
names the file or dataset and the line or row, for messages. A line that is not JSON is yielded
as an `Unreadable` record, so it is reported (or skipped) like any other bad record.

`convert_records` turns records into values with a `convert(record) -> (value, None) or (None,
problem)` function: a bad record is a DataError naming where it is and what is wrong, or, with
`skip_bad_lines`, skipped and counted in a warning (silently dropping data hides broken exports).

Hugging Face datasets (`datasets`, read with HF_DATASETS_OFFLINE so nothing reaches a hub):
- a folder written by `save_to_disk` (a Dataset, or a DatasetDict whose `split` is taken), read
  memory-mapped with `load_from_disk`;
- any other folder, or data files and globs (.parquet, .arrow, .json, .jsonl, .csv), read by
  `load_dataset` in streaming mode: rows are read as they are used, and no cache is written.
"""

import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dtcollie.errors import DataError

log = logging.getLogger("dtcollie.data")

HF_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class Unreadable:
    problem: str


def jsonl_records(path: str):
    """(where, record) of each non-blank line of a .jsonl file."""
    offset = 0
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {offset + err.start}); "
                                f"convert it to UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if "\\ud" in line.lower():  # \uXXXX escapes of UTF-16 halves: text only as a pair
                    json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                record = Unreadable("holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text")
            except json.JSONDecodeError as err:
                record = Unreadable(f"not valid JSON ({err.msg} at column {err.colno})")
            except ValueError as err:  # an integer longer than Python reads (sys.get_int_max_str_digits)
                record = Unreadable(f"not readable ({str(err).split(':')[0]})")
            except RecursionError:
                record = Unreadable("nested too deeply to read")
            yield f"{path} line {number}", record


def parquet_records(path: str):
    """(where, record) of each row of a .parquet file, as a dict of its columns, read in batches."""
    import pyarrow  # only parquet files need pyarrow (it comes with `datasets`)
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path} is not a readable parquet file ({err}); re-export it") from None
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", record


def file_records(path: str):
    """The records of a .jsonl or .parquet file."""
    return parquet_records(path) if path.endswith(".parquet") else jsonl_records(path)


def hf_dataset_records(source: str, split: str):
    """(where, record) of each row of the local Hugging Face dataset `source` (see the module doc)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets  # only data.hf_dataset needs it

    try:
        if Path(source, "dataset_info.json").is_file() or Path(source, "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(source)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = _split_of(dataset, source, split)
        elif Path(source).is_dir():
            dataset = datasets.load_dataset(source, split=split, streaming=True)
        else:
            files = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
            builder = HF_FILE_BUILDERS.get(Path(files[0]).suffix) if files and Path(files[0]).is_file() else None
            if builder is None:
                raise DataError(f"data.hf_dataset {source!r} is neither a dataset folder nor existing "
                                f"{'/'.join(HF_FILE_BUILDERS)} files; fix the path")
            dataset = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        for row, record in enumerate(dataset, start=1):
            yield f"{source} row {row}", record
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        raise DataError(f"data.hf_dataset {source!r} cannot be read by datasets "
                        f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def _split_of(dataset_dict, source: str, split: str):
    if split not in dataset_dict:
        raise DataError(f"data.hf_dataset {source} has splits {', '.join(dataset_dict)}, not {split!r}; set "
                        f"data.hf_split (or data.hf_val_split)")
    return dataset_dict[split]


def convert_records(records, convert, skip_bad_lines: bool, skip_fix: str = "set data.skip_bad_lines = true"):
    """(where, value) for each good record; `skip_fix` says how the user turns skipping on."""
    bad, source = 0, None
    for where, record in records:
        source = where.rsplit(" ", 2)[0]
        value, problem = (None, record.problem) if isinstance(record, Unreadable) else convert(record)
        if problem is None:
            yield where, value
        elif skip_bad_lines:
            bad += 1
        else:
            raise DataError(f"{where}: {problem}; fix it or {skip_fix}")
    if bad:
        log.warning("skipped %d bad records in %s", bad, source)


def string_fields(fields: dict[str, str]):
    """A converter to the tuple of the string fields of a record; `fields` maps the option that names
    each field (e.g. "data.text_field", for messages) to the field's name."""
    def convert(record):
        if not isinstance(record, dict):
            return None, f"expected a JSON object, got {type(record).__name__}"
        for option, name in fields.items():
            if name not in record:
                return None, f"has no field {name!r} ({option})"
            if not isinstance(record[name], str):
                return None, f"field {name!r} must be a string, got {type(record[name]).__name__}"
        return tuple(record[name] for name in fields.values()), None
    return convert
