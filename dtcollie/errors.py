"""The project's user-facing error types, and the one-line form of a filesystem fault.

Anything a user can cause (bad config, bad data, missing file, impossible layout) raises a
`UserError` with a one-line message that names the thing and the fix. Entry points catch it,
print `error: <message>` and exit with code 2.
"""

import contextlib
import errno

# What to do about a filesystem fault, by its errno (the rest name the error alone).
OS_ERROR_FIXES = {
    errno.ENOSPC: "free disk space there or choose another folder",
    errno.EDQUOT: "free disk space there or choose another folder",
    errno.EACCES: "make it writable or choose another folder",
    errno.EPERM: "make it writable or choose another folder",
    errno.EROFS: "the filesystem is read-only; choose another folder",
    errno.ENOTDIR: "a file stands where a folder should be on that path; move it away or choose another folder",
    errno.EISDIR: "a folder stands where a file should be; move it away or choose another path",
}


def shown(value) -> str:
    """A value for a message: its repr, shortened when long (a 4000-digit integer, a huge list)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def describe_os_error(err: OSError) -> str:
    """`<path>: <what went wrong>; <the fix>` for an OSError, on one line."""
    where = f"{err.filename}: " if err.filename else ""
    fix = OS_ERROR_FIXES.get(err.errno)
    return f"{where}{err.strerror or err}" + (f"; {fix}" if fix else "")


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2. A line break inside the
    message (a file name, a key or a library's own message can hold one) is shown escaped, so the
    line stays one."""

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class ConfigError(UserError):
    """A bad TOML file, unknown key, wrong type or impossible value."""


class DataError(UserError):
    """A missing or malformed data file or tokenizer."""


class CheckpointError(UserError):
    """A missing, partial or mismatched checkpoint."""


OUT_OF_MEMORY_FIX = ("lower training.micro_batch_size or training.seq_len, set activation_checkpoint.mode = "
                     "\"full\", or use more ranks (tools/plan.py --layout estimates a layout's memory)")


@contextlib.contextmanager
def environment_errors_as_user_errors():
    """A filesystem fault (disk full, no permission, a file in the way) or an allocation that fails
    is the environment's or the config's, not a bug: one line naming the path or the memory, and
    the fix. A closed output pipe passes through (run_main ends it quietly)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as err:
        raise UserError(describe_os_error(err)) from None
    except (MemoryError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        out_of_memory = (isinstance(err, MemoryError) or "out of memory" in first.lower()
                         or "can't allocate memory" in first)
        if not out_of_memory:
            raise
        raise UserError(f"out of memory ({first[:200]}); {OUT_OF_MEMORY_FIX}") from None
