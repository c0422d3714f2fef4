"""`make kaggle-sim` (kernels/rehearse.py) in the test suite: the hidden rerun rehearsed on the session's checkpoints.

The rehearsal builds the kernel from the tiny experiment (one checkpoint poisoned with NaN weights), lays out a
Kaggle input tree (2026 layout with the weights left zipped; competition-era layout with Kaggle's timm 1.0.19
first on the path), runs kernel.py with sockets refused and only I2B_KAGGLE_INPUT set, on a test.csv with an
extra column, a reordered sample_submission.csv and two corrupt images, and checks the submission against
infer.py's on the healthy checkpoints. Each check is a named boolean; this test demands every one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from kernels import rehearse

EXPECTED_CHECKS = [
    "exit 0", "every test.csv id once", "sample_submission.csv order", "finite and >= 0", "healthy images = infer.py",
    "corrupt images = fallback", "extra column ignored", "2 unreadable images counted", "NaN model left out",
    "devices logged", "code from the code dataset",
]  # fmt: skip


@pytest.fixture(scope="module")
def rehearsal(trained_exp: Path, synthetic_dir: Path, tmp_path_factory) -> dict:
    return rehearse.rehearse(tmp_path_factory.mktemp("rehearsal"), trained_exp, synthetic_dir)


def test_the_hidden_rerun_rehearsal_passes_every_check(rehearsal: dict, tmp_path: Path):
    first, second = rehearsal["runs"]
    assert first["layout"] == "2026" and first["returncode"] == 0
    assert list(first["checks"]) == EXPECTED_CHECKS and all(first["checks"].values()), first
    assert first["details"]["healthy images = infer.py"].startswith("20 rows, max abs diff ")  # 4 healthy images
    if second["skipped"]:  # only when the package index cannot be reached
        assert "the package index cannot be reached" in second["skipped"], second["skipped"]
        # and it really cannot: the same pip asked for the same wheel fails too (else the skip hides a failed run)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check"]
        probe = subprocess.run(
            [*pip, "-d", str(tmp_path), f"timm=={rehearse.KAGGLE_TIMM}"], capture_output=True, text=True, timeout=300
        )
        assert probe.returncode != 0, f"timm {rehearse.KAGGLE_TIMM} is installable here, yet its run was skipped"
    else:
        assert second["layout"] == "classic" and second["returncode"] == 0
        assert list(second["checks"]) == [*EXPECTED_CHECKS, f"timm {rehearse.KAGGLE_TIMM} first on the path"]
        assert all(second["checks"].values()), second
    assert rehearsal["passed"] is True
    assert json.loads((Path(rehearsal["work"]) / "rehearsal.json").read_text())["passed"] is True


def test_the_rehearsal_inputs_are_what_the_issue_asks(rehearsal: dict):
    """The kernel saw no I2B_*_DIR override, the 2026 tree and a zipped weights folder."""
    work = Path(rehearsal["work"])
    inputs = work / "kaggle-2026" / "input"
    assert (inputs / "competitions" / "csiro-biomass" / "test.csv").is_file()
    assert sorted(p.name for p in (inputs / "datasets" / rehearse.OWNER).iterdir()) == [
        f"{rehearse.SLUG}-code",
        f"{rehearse.SLUG}-weights",
    ]
    assert [p.suffix for p in (inputs / "datasets" / rehearse.OWNER / f"{rehearse.SLUG}-weights").iterdir() if
            p.name != "MANIFEST.json" and p.name != "dataset-metadata.json"] == [".zip"]  # fmt: skip
    env = rehearse.kernel_env(inputs, work / "home")
    assert env[rehearse.INPUT_ENV] == str(inputs) and not [
        k for k in env if k.startswith("I2B_") and k.endswith("_DIR")
    ]
    header = (work / "competition" / "test.csv").read_text().splitlines()[0]
    assert header == f"sample_id,{rehearse.EXTRA_TEST_COLUMN},image_path,target_name"
    assert "kaggle-sim:" in (REPO / "Makefile").read_text() and "kernels/rehearse.py" in (REPO / "Makefile").read_text()


def test_a_pip_failure_other_than_the_index_fails_the_timm_run(tmp_path: Path, monkeypatch):
    """A broken install is a failure, not a skip: only an unreachable index (or a missing version) excuses it."""

    def fake_pip(returncode: int, stderr: str):
        return lambda *a, **k: subprocess.CompletedProcess(a[0], returncode, "", stderr)

    monkeypatch.setattr(rehearse.subprocess, "run", fake_pip(1, "ERROR: could not install: [Errno 28] No space left"))
    path, note = rehearse.kaggle_timm(tmp_path / "a")
    assert path is None and note.endswith(": a failed install") and "No space left" in note
    monkeypatch.setattr(rehearse.subprocess, "run", fake_pip(1, "ERROR: No matching distribution found for timm"))
    path, note = rehearse.kaggle_timm(tmp_path / "b")
    assert path is None and note.endswith(": the package index cannot be reached")
