"""Shared fixtures: one tiny synthetic dataset and one tiny training per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
REAL_TRAIN_CSV = REPO.parent / "shared" / "data" / "csiro" / "train.csv"

# Small enough for 2 cores: 40 train images in 4 months-groups, 6 test images, 400x200 pixels.
N_TRAIN, N_TEST, SIZE = 40, 6, (400, 200)
TINY_FLAGS = [
    "--preset",
    "tiny",
    "--tile-size",
    "28",
    "--epochs",
    "2",
    "--freeze-epochs",
    "1",
    "--batch-size",
    "8",
    "--seed",
    "0",
]


def run_script(
    *args: str, cwd: Path = REPO, check: bool = True, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run a repo script as a user would; on failure show its output."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


def cuda_skip_reason() -> str | None:
    """Why the `gpu` tests cannot run here (None when a CUDA device answers): one line for `pytest -ra`."""
    import torch

    if not torch.cuda.is_available():
        return f"needs a CUDA device (torch {torch.__version__} sees none); run on a GPU box: make gpu-check"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped, with the reason, where CUDA is absent: CI on the CPU stays green."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = cuda_skip_reason() if gpu_items else None
    if reason is None:
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def one_thread():
    """Tiny ops on 2 shared cores: one torch thread avoids OpenMP spin-waiting (modules opt in with usefixtures)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_train_csv() -> Path:
    """The real competition label file when present (never copied into the repo)."""
    if not REAL_TRAIN_CSV.is_file():
        pytest.skip("real train.csv not available at ../shared/data/csiro/train.csv")
    return REAL_TRAIN_CSV


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A competition-layout synthetic dataset, generated once per session."""
    from src.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, N_TRAIN, N_TEST, seed=0, size=SIZE)
    return out


@pytest.fixture(scope="session")
def folds_csv(synthetic_dir: Path, tmp_path_factory) -> Path:
    """group_month folds of the synthetic dataset (3 folds: 40 images span few months)."""
    from src.data import load_train
    from src.folds import make_folds, save_folds

    path = tmp_path_factory.mktemp("folds") / "folds.csv"
    save_folds(make_folds(load_train(synthetic_dir), "group_month", n_folds=3, seed=0), path)
    return path


@pytest.fixture(scope="session")
def trained_exp(synthetic_dir: Path, folds_csv: Path, tmp_path_factory) -> Path:
    """checkpoints/<exp> with two grids (2x2, 1x2) x two folds of the tiny preset, via the real train.py."""
    out = tmp_path_factory.mktemp("checkpoints")
    for grid in (("2", "2"), ("1", "2")):
        for fold in ("0", "1"):
            run_script(
                "train.py",
                "--fold",
                fold,
                "--grid",
                *grid,
                "--data-dir",
                str(synthetic_dir),
                "--folds",
                str(folds_csv),
                "--out-dir",
                str(out),
                "--exp",
                "tiny",
                *TINY_FLAGS,
            )
    return out / "tiny"


@pytest.fixture(scope="session")
def stamp_dir(tmp_path_factory) -> Path:
    """800x400 synthetic images (the stamp detector needs >= 250 px of height); test images under harsh/dim light."""
    from src.synthetic import generate

    return generate(tmp_path_factory.mktemp("stamps"), 30, 12, seed=1, size=(800, 400), shift="lighting")


@pytest.fixture(scope="session")
def clean_exp(stamp_dir: Path, tmp_path_factory) -> tuple[Path, str]:
    """One fold of the tiny preset trained by train.py with --clean-stamps --crop-bottom 0.05 --drop-ids.

    The drop file lists two training images and one validation image of fold 0. Returns (experiment dir, stdout).
    """
    from src.data import load_train
    from src.folds import make_folds, save_folds

    root = tmp_path_factory.mktemp("clean")
    folds = make_folds(load_train(stamp_dir), "group_month", n_folds=3, seed=0)
    save_folds(folds, root / "folds.csv")
    train_ids = folds.loc[folds["fold"] != 0, "image_id"].tolist()
    val_ids = folds.loc[folds["fold"] == 0, "image_id"].tolist()
    (root / "drop.txt").write_text(f"{train_ids[0]}\n{train_ids[1]}\n{val_ids[0]}\n")
    proc = run_script(
        "train.py", "--fold", "0", "--data-dir", str(stamp_dir), "--folds", str(root / "folds.csv"),
        "--out-dir", str(root / "ck"),
        "--exp", "clean", *TINY_FLAGS, "--clean-stamps", "--crop-bottom", "0.05", "--drop-ids", str(root / "drop.txt"),
    )  # fmt: skip
    return root / "ck" / "clean", proc.stdout
