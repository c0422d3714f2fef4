"""One line-length rule (ruff E501 at 120, pyproject.toml) and ruff's format, held for the whole repo."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_check_and_format_are_clean():
    check = subprocess.run([sys.executable, "-m", "ruff", "check", "-q", "."], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-1000:]
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "-q", "."], cwd=REPO, capture_output=True, text=True
    )
    assert fmt.returncode == 0, "run `ruff format .`: " + fmt.stdout[-2000:]
