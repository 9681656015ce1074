"""Shared entry-point handling: user errors become one line on stderr and exit code 2."""

import sys

from dtcollie.errors import UserError


def run_main(main, *args) -> None:
    """Call `main(*args)`; a `UserError` prints `error: <message>` and exits 2 (no traceback)."""
    try:
        main(*args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
