"""One project exception type; scripts turn it into one line on stderr and exit code 1."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable


class BiomassError(Exception):
    """A user-facing error: the message names the file/row/column and says what to do."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a script's main; a BiomassError becomes `error: <message>` on stderr and exit 1.

    `--debug` anywhere on the command line shows the full traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        return int(main(args) or 0)
    except BiomassError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
