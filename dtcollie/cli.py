"""Shared entry-point handling: user errors become one line on stderr and exit code 2; output cut
short by its reader (`| head`) ends quietly; one rank's failure ends every rank (`dtcollie.rank_failure`)."""

import os
import sys

from dtcollie.errors import UserError, environment_errors_as_user_errors
from dtcollie.rank_failure import one_failure_ends_all


def run_main(main, *args) -> None:
    """Call `main(*args)`; a `UserError` prints `error: <message>` and exits 2 (no traceback), and
    so do filesystem faults and failed allocations (`environment_errors_as_user_errors`). A
    reader that closes the pipe early ends the run with exit code 1 and no traceback. While a
    process group is up, any failure ends this rank at once and every other rank soon after, each
    with one line (a bug's own traceback aside)."""
    try:
        try:
            with one_failure_ends_all(), environment_errors_as_user_errors():
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
