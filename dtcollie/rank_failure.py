"""One rank's failure ends every rank of a multi-process run within seconds, each with one line.

Left alone, the ranks whose peer failed die of torchrun's SIGTERM without a word or print gloo's
"Connection closed by peer" traceback, which names neither the rank nor the cause; and a failing
rank that does not exit at once (destroy_process_group or interpreter shutdown waiting on peers)
leaves them in a collective until the backend's timeout, 30 minutes for gloo.

The failing rank records its rank and message in the default process group's store (the first
failure stays), prints its own line (`error: <message>`; a bug of its own prints its traceback)
and leaves with `os._exit`. Its sockets close with it, so a peer inside a gloo collective fails
within milliseconds, and torchrun sends the others SIGTERM about 0.1 s after a rank exits
non-zero (a Python handler runs between bytecodes: a rank inside a long C call answers when it
returns; inside the training loop, StopFlag takes SIGTERM as "stop after this step" and the step's
next collective fails instead). Whichever reaches a rank first, it prints `error: rank R failed:
<message>; this rank (S) stopped` and exits 2 when that failure was a user error, 1 otherwise.
Under torchrun the store lives in torchrun's agent and outlives the failed rank; where rank 0
hosts it (a plain env:// launch) and rank 0 failed, the others say "another rank failed".
"""

import json
import os
import signal
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import NoReturn

from dtcollie.errors import UserError

FAILURE_KEY = "dtcollie/first_failure"
# How gloo words a collective whose peer has gone (a plain RuntimeError); other backends and the
# store raise torch.distributed.DistError.
GLOO_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")
STORE_TIMEOUT = timedelta(seconds=5)  # a store that no longer answers must not hold up the exit


def process_group_up() -> bool:
    """Whether this process is one rank of a process group (never, if torch.distributed was not imported)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


@contextmanager
def one_failure_ends_all():
    """Around an entry point's main: while a process group is up, an exception ends this rank as
    the module docstring says; under torchrun (WORLD_SIZE > 1) its SIGTERM after another rank's
    failure does too. Without a process group, exceptions pass through unchanged."""
    watch = int(os.environ.get("WORLD_SIZE", "1")) > 1
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if watch else None
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:  # BaseException: DCP's CheckpointException is one
        if process_group_up():
            leave(err)
        raise
    finally:
        if watch:
            signal.signal(signal.SIGTERM, previous)


def leave(err: BaseException) -> NoReturn:
    """End this rank after `err`: a lost peer is reported as that peer's failure; this rank's own
    failure is recorded for the others, then shown (one line, or the traceback of a bug)."""
    signal.signal(signal.SIGTERM, _ignore)  # torchrun's SIGTERM must not add a second line
    store = _store()
    if not isinstance(err, UserError):
        first = read_failure(store)
        if first is not None or peer_gone(err):
            _stop_after(first)
    record_failure(store, sys.modules["torch.distributed"].get_rank(), err)
    if isinstance(err, UserError):
        print(f"error: {err}", file=sys.stderr)
        _exit(2)
    if not isinstance(err, BrokenPipeError):  # a reader that stopped early (`| head`) ends it quietly, as in run_main
        sys.excepthook(type(err), err, err.__traceback__)  # a bug: its traceback is the report
    _exit(1)


def peer_gone(err: BaseException) -> bool:
    """Whether `err` is a collective or store failing because another rank has left."""
    dist = sys.modules["torch.distributed"]
    return isinstance(err, dist.DistError) or any(words in str(err) for words in GLOO_PEER_GONE)


def record_failure(store, rank: int, err: BaseException) -> None:
    """Record rank `rank`'s failure `err` unless another rank's came first. compare_set waits for the
    store's answer, so the record is there before this rank exits and its peers' collectives fail."""
    text = str(err).strip().splitlines()
    message = text[0] if isinstance(err, UserError) else type(err).__name__ + (f": {text[0]}" if text else "")
    value = json.dumps({"rank": rank, "message": message, "user_error": isinstance(err, UserError)})
    try:
        with _quiet_stderr():
            store.compare_set(FAILURE_KEY, "", value)
    except RuntimeError:  # the store went with its host (rank 0 outside torchrun): nobody can read it anyway
        pass


def read_failure(store) -> dict | None:
    """The first failure a rank recorded ({"rank", "message", "user_error"}), or None: none yet, or
    the store is gone."""
    try:
        with _quiet_stderr():
            if not store.check([FAILURE_KEY]):
                return None
            return json.loads(store.get(FAILURE_KEY))
    except RuntimeError:
        return None


def describe_stop(first: dict | None, rank: int) -> tuple[str, int]:
    """The line a rank stopped by another's failure prints, and its exit code."""
    if first is None:
        return f"error: another rank failed; this rank ({rank}) stopped", 1
    return (f"error: rank {first['rank']} failed: {first['message']}; this rank ({rank}) stopped",
            2 if first["user_error"] else 1)


def _stop_after(first: dict | None) -> NoReturn:
    line, code = describe_stop(first, sys.modules["torch.distributed"].get_rank())
    print(line, file=sys.stderr)
    _exit(code)


def _on_sigterm(signum, frame) -> None:
    signal.signal(signum, _ignore)
    first = read_failure(_store()) if process_group_up() else None
    if first is None:  # an ordinary stop (a scheduler, Ctrl-C at torchrun): end as without this handler
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _stop_after(first)


def _ignore(signum, frame) -> None:
    """A Python-level no-op: a SIGTERM already pending then runs it (with SIG_IGN, CPython would
    print a warning about the race)."""


def _store():
    from dtcollie.torch_private import default_store  # only with a process group up: torch is imported

    store = default_store()
    store.set_timeout(STORE_TIMEOUT)
    return store


@contextmanager
def _quiet_stderr():
    """The store client logs a multi-line C++ warning when its server has gone; this rank's one line
    must stay one."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a reader that has gone must not stop the exit
            pass
    os._exit(code)
