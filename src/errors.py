"""One project exception type; scripts turn it into one line on stderr and exit code 1."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from src.logs import set_quiet


class BiomassError(Exception):
    """A user-facing error: the message names the file/row/column and says what to do."""

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        # A DataLoader worker re-raises as BiomassError("Caught BiomassError in DataLoader worker process 0.
        # Original Traceback ...: <message>"): keep the one-line message, the traceback is for --debug.
        self.worker_traceback = None
        if text.startswith("Caught BiomassError") and "\nOriginal Traceback" in text:
            self.worker_traceback = text
            last = text.rstrip().splitlines()[-1]
            text = last.partition("BiomassError: ")[2] or last
        super().__init__(text, *args)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a script's main; a BiomassError becomes `error: <message>` on stderr and exit 1.

    `--debug` anywhere on the command line shows the full traceback instead; `--quiet` keeps only warnings.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    set_quiet("--quiet" in args)  # the scripts declare --quiet (src.logs.add_quiet_flag); it acts before main runs
    try:
        return int(main(args) or 0)
    except BiomassError as err:
        if debug:
            traceback.print_exc()
            if getattr(err, "worker_traceback", None):
                print(err.worker_traceback, file=sys.stderr)
        print("error: " + " ".join(str(err).split("\n")), file=sys.stderr)  # always one line
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
