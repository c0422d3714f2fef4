"""Atomic writes: a crash or a full disk never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from src.errors import BiomassError


def _why(err: OSError, directory: Path) -> str:
    """The reason a directory cannot be created or written, in words (a file in the way is named)."""
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            break
    return err.strerror or str(err)


def _cannot_write(path: Path, err: OSError) -> BiomassError:
    return BiomassError(f"{path}: cannot write ({_why(err, path.parent)}); choose a writable output directory")


def make_dir(path: str | os.PathLike) -> Path:
    """mkdir -p that fails with a BiomassError naming the directory (read-only disk, a file in the way)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BiomassError(
            f"{path}: cannot create directory ({_why(err, path)}); choose a writable output directory"
        ) from err
    return path


def _umask() -> int:
    """The process umask (read by setting it and putting it back: os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _cannot_write(path, err) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would make submission.csv unreadable to others
        os.replace(tmp_path, path)
    except OSError as err:
        raise BiomassError(f"{path}: write failed ({err.strerror or err}); the previous file is left intact") from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_writable(path: str | os.PathLike) -> Path:
    """Fail before the work, not after it: the output's nearest existing folder must take a new file."""
    path = Path(path).absolute()
    existing = next(p for p in path.parents if p.exists())  # creates no folder: a failed run leaves none behind
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.NamedTemporaryFile(prefix=f".{path.name}.", suffix=".tmp", dir=existing):
            pass
    except OSError as err:
        raise _cannot_write(path, err) from err
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write text to path atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv_atomic(frame, path: str | os.PathLike, **kwargs) -> Path:
    """Write a pandas frame as CSV atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)
    return Path(path)


def save_config(cfg, path: str | os.PathLike) -> Path:
    """Write a resolved config (anything with `to_yaml()`: Config, InferConfig) as YAML, atomically."""
    return write_text_atomic(path, cfg.to_yaml())
