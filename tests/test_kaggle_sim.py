"""`make kaggle-sim` (kernels/rehearse.py) in the test suite: the hidden rerun rehearsed on the session's checkpoints.

The rehearsal builds the kernel from the tiny experiment (one checkpoint poisoned with NaN weights), lays out a
Kaggle input tree (2026 layout with the weights left zipped; competition-era layout with Kaggle's timm 1.0.19
first on the path), runs kernel.py with sockets refused and only I2B_KAGGLE_INPUT set, on a test.csv with an
extra column, a reordered sample_submission.csv and two corrupt images, and checks the submission against
infer.py's on the healthy checkpoints. Each check is a named boolean; this test demands every one.
"""

from __future__ import annotations

import json
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


def test_the_hidden_rerun_rehearsal_passes_every_check(rehearsal: dict):
    first, second = rehearsal["runs"]
    assert first["layout"] == "2026" and first["returncode"] == 0
    assert list(first["checks"]) == EXPECTED_CHECKS and all(first["checks"].values()), first
    assert first["details"]["healthy images = infer.py"].startswith("20 rows, max abs diff ")  # 4 healthy images
    if second["skipped"]:  # only when the package index cannot be reached
        assert "the package index cannot be reached" in second["skipped"], second["skipped"]
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
