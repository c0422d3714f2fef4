"""`python -m src.download [--out data/csiro-biomass]`: the competition files, through the kaggle CLI.

Also the project's one edge to the kaggle CLI (credentials check, owner name, running a command and
keeping its last output line), shared with kernels/push.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from src.errors import BiomassError, run_cli

COMPETITION = "csiro-biomass"
CREDENTIALS_HELP = (
    "no Kaggle credentials found: create a token at https://www.kaggle.com/settings/api and "
    "`export KAGGLE_API_TOKEN=<token>` (or save it to ~/.kaggle/access_token, or put the legacy kaggle.json "
    "in ~/.kaggle/ with chmod 600)"
)


def _kaggle_config_dirs() -> list[Path]:
    """Where the kaggle CLI looks for kaggle.json: $KAGGLE_CONFIG_DIR, ~/.kaggle, $XDG_CONFIG_HOME/kaggle."""
    home = Path(os.path.expanduser("~"))
    dirs = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return dirs + [home / ".kaggle", xdg / "kaggle"]


def find_credentials() -> str | None:
    """The first Kaggle credential source the CLI would use (None if there is none); offline, validity not checked."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    home_kaggle = Path(os.path.expanduser("~")) / ".kaggle"
    for name in ("access_token", "access_token.txt", "credentials.json"):
        path = home_kaggle / name
        if path.is_file() and path.stat().st_size > 0:
            return str(path)
    for folder in _kaggle_config_dirs():
        if (folder / "kaggle.json").is_file():
            return str(folder / "kaggle.json")
    return None


def require_credentials() -> str:
    """The credential source, or a BiomassError saying how to set one up (before any CLI command runs)."""
    source = find_credentials()
    if source is None:
        raise BiomassError(CREDENTIALS_HELP)
    return source


def kaggle_username() -> str | None:
    """The Kaggle user name from KAGGLE_USERNAME, kaggle.json or the `kaggle auth login` file (None if unknown).

    An API token alone does not name its user offline (the CLI asks the server), hence --owner.
    """
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    files = [folder / "kaggle.json" for folder in _kaggle_config_dirs()]
    files.append(Path(os.path.expanduser("~")) / ".kaggle" / "credentials.json")
    for path in files:
        try:
            name = json.loads(path.read_text()).get("username")
        except (OSError, ValueError, AttributeError):
            continue
        if name:
            return str(name)
    return None


def kaggle_executable() -> list[str]:
    """$KAGGLE_CLI if set (a command line), else the kaggle CLI of this interpreter's environment, else PATH's."""
    if os.environ.get("KAGGLE_CLI"):
        return shlex.split(os.environ["KAGGLE_CLI"])
    beside = Path(sys.executable).parent / "kaggle"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("kaggle")
    if found:
        return [found]
    raise BiomassError("kaggle CLI not found; install it with `pip install -r requirements.txt` (kaggle==2.2.5, six)")


def run_kaggle(args: list[str], echo: bool = True) -> tuple[int, str]:
    """Run `kaggle ARGS`, echoing its output live (progress bars included); return (exit code, output).

    stdout and stderr are merged: the CLI prints some failures to stdout with exit code 0, so callers
    inspect the text as well as the code.
    """
    proc = subprocess.Popen([*kaggle_executable(), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []
    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        chunks.append(chunk)
        if echo:
            _echo(chunk)
    return proc.wait(), b"".join(chunks).decode("utf-8", errors="replace")


def _echo(chunk: bytes) -> None:
    buffer = getattr(sys.stdout, "buffer", None)  # absent when stdout is captured (pytest)
    sys.stdout.flush()
    if buffer is not None:
        buffer.write(chunk)
        buffer.flush()
    else:
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()


def last_line(text: str) -> str:
    """The last non-empty line of CLI output (progress bars end lines with \\r)."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


# ---- the competition files -------------------------------------------------------------------------------------
def competition_files_present(out: Path) -> bool:
    """train.csv, test.csv and non-empty train/ and test/ image folders are all there."""
    return all((out / name).is_file() for name in ("train.csv", "test.csv")) and all(
        (out / name).is_dir() and any((out / name).iterdir()) for name in ("train", "test")
    )


def download_competition(out: str | os.PathLike, force: bool = False) -> Path:
    """`kaggle competitions download csiro-biomass -p OUT`, then unzip into OUT and delete the archive."""
    out = Path(out)
    if competition_files_present(out) and not force:
        print(f"{out}: competition files already there (train.csv, test.csv, train/, test/); nothing to do")
        return out
    require_credentials()
    out.mkdir(parents=True, exist_ok=True)
    code, text = run_kaggle(["competitions", "download", COMPETITION, "-p", str(out), *(["--force"] if force else [])])
    if code != 0:
        hint = f"; accept the rules at https://www.kaggle.com/competitions/{COMPETITION}/rules" if "403" in text else ""
        raise BiomassError(f"kaggle competitions download {COMPETITION} failed (exit {code}): {last_line(text)}{hint}")
    archive = out / f"{COMPETITION}.zip"
    if not archive.is_file():
        raise BiomassError(f"{archive}: not found after the download ({last_line(text)}); re-run with --force")
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out)  # extractall drops '..' and absolute parts of member names
    except zipfile.BadZipFile as err:
        raise BiomassError(f"{archive}: not a valid zip ({err}); delete it and re-run") from err
    archive.unlink()
    if not competition_files_present(out):
        raise BiomassError(
            f"{out}: train.csv/test.csv/train/test missing after unzipping {archive.name}; check the "
            "competition's data page"
        )
    print(f"{out}: competition files ready")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.download", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=f"data/{COMPETITION}", help="where the competition files go")
    parser.add_argument("--force", action="store_true", help="download again even if the files are there")
    args = parser.parse_args(argv)
    download_competition(args.out, args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
