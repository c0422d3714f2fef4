"""Logging: console lines for the person at the terminal, a timestamped copy in each run's log file.

Every module logs through `get_logger(__name__)` into the project logger `i2b`. Its console handler writes
to whatever `sys.stdout` is at that moment (so pytest's capture and redirections see it), warnings prefixed
`warning: `; `--quiet` keeps only warnings and errors and hides the `progress` bars (tqdm). `log_file(path)`
adds a file handler for the length of a job: `train.log` in a fold directory, `infer.log` beside a submission.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

PROJECT = "i2b"
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"


class _ConsoleHandler(logging.StreamHandler):
    """A StreamHandler bound to the current sys.stdout, not the one of its creation."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: D401 - logging reads this attribute on every record
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno == logging.WARNING else text


_console = _ConsoleHandler()
_console.quiet = False  # --quiet: warnings and errors only, no progress bars
_console.setFormatter(_ConsoleFormatter("%(message)s"))
_project = logging.getLogger(PROJECT)
# the project's own logger only (libraries' loggers are left alone); set up once, when the first module asks
if _console not in _project.handlers:
    _project.addHandler(_console)
    _project.setLevel(logging.INFO)
    _project.propagate = False


def get_logger(module: str) -> logging.Logger:
    """The logger of a module (`get_logger(__name__)`), a child of the project logger."""
    return logging.getLogger(f"{PROJECT}.{module}")


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    """`--quiet`, one definition for every script (run_cli reads it before main runs)."""
    parser.add_argument(
        "--quiet", action="store_true", help="print only warnings and errors (log files keep everything)"
    )


def set_quiet(quiet: bool) -> None:
    """Console shows only warnings and errors, `progress` bars go too; log files are unaffected."""
    _console.setLevel(logging.WARNING if quiet else logging.NOTSET)
    _console.quiet = quiet


def progress(iterable=None, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar on stderr, unless the caller or `--quiet` turns it off (the project's only bar maker)."""
    return tqdm(iterable, disable=disable or _console.quiet, **kwargs)


class _LogFileHandler(logging.Handler):
    """Appends to `path`; while its folder does not exist yet the records wait in memory.

    A job that fails before it made its output folder therefore creates none (the error went to stderr);
    one that made it gets the whole log, the lines from before the folder existed included.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.file = None
        self.pending: list[str] = []
        self.setFormatter(logging.Formatter(FILE_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))

    def _open(self) -> bool:
        if self.file is None and self.path.parent.is_dir():
            self.file = self.path.open("a", encoding="utf-8")
            self.file.writelines(self.pending)
            self.pending.clear()
        return self.file is not None

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record) + "\n"
        if self._open():
            self.file.write(line)
            self.file.flush()
        else:
            self.pending.append(line)

    def close(self) -> None:
        try:
            self._open()
            if self.file is not None:
                self.file.close()
        finally:
            super().close()


@contextlib.contextmanager
def log_file(path: str | os.PathLike, enabled: bool = True) -> Iterator[Path | None]:
    """Copy every project log record (with its time) to `path` for the length of the block, appending.

    An exception leaving the block is written to the file as its last line, so a log never ends silently.
    """
    if not enabled:
        yield None
        return
    handler = _LogFileHandler(Path(path))
    _project.addHandler(handler)
    try:
        yield handler.path
    except BaseException as err:
        text = " ".join(str(err).split()) or type(err).__name__
        record = {"name": PROJECT, "levelno": logging.ERROR, "levelname": "ERROR", "msg": f"error: {text}"}
        handler.handle(logging.makeLogRecord(record))
        raise
    finally:
        _project.removeHandler(handler)
        handler.close()
