"""Shared entry-point handling: user errors become one line on stderr and exit code 2; output cut
short by its reader (`| head`) ends quietly."""

import os
import sys

from dtcollie.errors import UserError


def run_main(main, *args) -> None:
    """Call `main(*args)`; a `UserError` prints `error: <message>` and exits 2 (no traceback). A
    reader that closes the pipe early ends the run with exit code 1 and no traceback."""
    try:
        try:
            main(*args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BrokenPipeError:
        # As the Python docs advise: stdout goes to devnull, so the exit flush has nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
