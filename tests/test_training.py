"""Training: fold directory contents, reloaded score == recorded score, resume, DDP parity, losses, mixup."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, TINY_FLAGS, run_script

from src import training
from src.config import Config, resolve_config
from src.data import load_train
from src.dataset import FeatureCacheDataset, ViewPairDataset
from src.errors import BiomassError, run_cli
from src.feature_cache import compute_feature_cache
from src.folds import load_folds
from src.inference import Predictor, predict_ensemble
from src.losses import aux_loss, mixup, target_loss
from src.metric import weighted_r2
from src.model import FLIP_VARIANTS, build_model
from src.runtime import DistInfo
from src.schema import TARGET_WEIGHTS, TARGETS
from src.training import fit, train_one_epoch
from src.transforms import build_transform

CPU = torch.device("cpu")
# fold 1 of the session folds holds 14 of 40 images: 26 training images, an even number, so a 2-rank
# DistributedSampler needs no padding and its shards add up to the single-process batches
EVEN_FOLD = 1
# tiny ops on 2 shared cores: one thread avoids OpenMP spin-waiting (25x faster under load)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = _train_script()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops on 2 shared cores


def tiny_config(synthetic_dir: Path, folds_csv: Path, *extra: str, fold: int = EVEN_FOLD):
    """The config train.py builds from TINY_FLAGS (+ extra flags), through the real parser."""
    argv = [
        "--fold",
        str(fold),
        *TINY_FLAGS,
        "--data-dir",
        str(synthetic_dir),
        "--folds",
        str(folds_csv),
        "--device",
        "cpu",
        *extra,
    ]
    return resolve_config(train_script.parse_args(argv))


def split(synthetic_dir: Path, folds_csv: Path, fold: int = EVEN_FOLD) -> tuple[pd.DataFrame, pd.DataFrame]:
    wide = load_train(synthetic_dir)
    wide = wide.merge(load_folds(folds_csv, wide), on="image_id")
    return wide[wide["fold"] != fold].reset_index(drop=True), wide[wide["fold"] == fold].reset_index(drop=True)


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"largest weight difference {worst:.3e} > {atol:.0e}"


# ---- end to end: the fold directory of a real train.py run -------------------------------------------------
FOLD_DIRS = [("grid2x2", 0), ("grid2x2", 1), ("grid1x2", 0), ("grid1x2", 1)]


@pytest.mark.parametrize("grid,fold", FOLD_DIRS)
def test_fold_dir_contents(trained_exp: Path, folds_csv: Path, grid: str, fold: int):
    run_dir = trained_exp / grid / f"fold{fold}"
    for name in ("best.pt", "last.pt", "metrics.csv", "oof.csv", "config.yaml", "git.txt", "train.log"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "git.txt").read_text().strip()

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1] and list(metrics["stage"]) == ["frozen", "finetune"]
    # train.log: the console lines with their times, from the fold line to the best score
    log = (run_dir / "train.log").read_text().splitlines()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO    fold \d: \d+ train / \d+ val images", log[0])
    assert sum(" INFO    epoch " in line for line in log) == 2 and " frozen " in log[1] and " finetune " in log[2]
    assert "best val weighted R2" in log[-1]
    for col in ("epoch", "stage", "train_loss", "weighted_r2", "seconds", *(f"r2_{t}" for t in TARGETS)):
        assert col in metrics.columns, col
    assert np.isfinite(metrics[["train_loss", "weighted_r2"]].to_numpy()).all()

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["grid"] == [int(grid[4]), int(grid[6])]
    assert config["model"]["tile_size"] == 28

    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["model"]["grid"] == config["model"]["grid"]
    assert ckpt["fold"] == fold and ckpt["targets"] == list(TARGETS)
    assert set(ckpt["target_stats"]) >= {"max", "median", "mean_log1p"}
    for values in ckpt["target_stats"].values():
        assert len(values) == 5 and np.isfinite(values).all()
    assert np.isfinite(ckpt["val_metric"])
    assert ckpt["val_metric"] == pytest.approx(metrics["weighted_r2"].max(), abs=1e-12)
    assert ckpt["epoch"] == int(metrics["epoch"][metrics["weighted_r2"].idxmax()])

    oof = pd.read_csv(run_dir / "oof.csv", dtype={"image_id": str})
    assert list(oof.columns) == ["image_id", "fold", *TARGETS, *(f"true_{t}" for t in TARGETS)]
    folds = pd.read_csv(folds_csv, dtype={"image_id": str})
    held_out = folds.loc[folds["fold"] == fold, "image_id"]
    assert sorted(oof["image_id"]) == sorted(held_out) and (oof["fold"] == fold).all()
    # the OOF file re-scored gives the recorded score
    rescored = weighted_r2(oof[[f"true_{t}" for t in TARGETS]].to_numpy(), oof[list(TARGETS)].to_numpy())
    assert rescored == pytest.approx(ckpt["val_metric"], abs=1e-6)


@pytest.mark.parametrize("grid,fold", FOLD_DIRS)
def test_reloaded_best_checkpoint_reproduces_val_metric(
    trained_exp: Path, synthetic_dir: Path, folds_csv: Path, grid: str, fold: int
):
    """argus test_pipeline: the inference path on the held-out images scores what training recorded."""
    run_dir = trained_exp / grid / f"fold{fold}"
    predictor = Predictor(run_dir / "best.pt", "cpu", tta="none")
    _, val = split(synthetic_dir, folds_csv, fold)
    pred = predict_ensemble([predictor], val, batch_size=8, show=False).mean("none")
    truth = val[list(TARGETS)].to_numpy(dtype=np.float64)
    assert weighted_r2(truth, pred) == pytest.approx(predictor.val_metric, abs=1e-4)
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"image_id": str}).set_index("image_id").loc[val["image_id"]]
    np.testing.assert_allclose(pred, oof[list(TARGETS)].to_numpy(), rtol=1e-4, atol=1e-3)


def test_existing_fold_dir_needs_resume_or_overwrite(trained_exp: Path, synthetic_dir: Path, folds_csv: Path):
    run_dir = trained_exp / "grid2x2" / "fold0"
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    proc = run_script(
        "train.py",
        "--fold",
        "0",
        "--grid",
        "2",
        "2",
        "--data-dir",
        str(synthetic_dir),
        "--folds",
        str(folds_csv),
        "--out-dir",
        str(trained_exp.parent),
        "--exp",
        trained_exp.name,
        *TINY_FLAGS,
        check=False,
        env=ONE_THREAD,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert str(run_dir) in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # nothing touched


def _bad_inputs(tmp_path: Path, synthetic_dir: Path, folds_csv: Path) -> dict[str, tuple[list[str], str]]:
    base = ["--data-dir", str(synthetic_dir), "--folds", str(folds_csv)]
    return {
        "missing data dir": (
            ["--fold", "0", "--data-dir", str(tmp_path / "no_data"), "--folds", str(folds_csv)],
            str(tmp_path / "no_data"),
        ),
        "missing folds file": (
            ["--fold", "0", "--data-dir", str(synthetic_dir), "--folds", str(tmp_path / "no_folds.csv")],
            "no_folds.csv",
        ),
        "fold out of range": (["--fold", "7", *base], "fold 7"),
        "unknown backbone": (["--fold", "0", *base, "--backbone", "not_a_vit_at_all"], "not_a_vit_at_all"),
    }


@pytest.mark.parametrize("case", ["missing data dir", "missing folds file", "fold out of range", "unknown backbone"])
def test_errors_before_work_starts(tmp_path: Path, synthetic_dir: Path, folds_csv: Path, capsys, case: str):
    """train.py's main under run_cli (what `python train.py` runs): exit 1, one `error:` line, nothing written."""
    argv, named = _bad_inputs(tmp_path, synthetic_dir, folds_csv)[case]
    out_dir = tmp_path / "ckpt"
    rc = run_cli(train_script.main, [*argv, *TINY_FLAGS, "--out-dir", str(out_dir), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 1
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert named in lines[0]
    assert not out_dir.exists()


@pytest.mark.slow
def test_errors_before_work_starts_subprocess(tmp_path: Path, synthetic_dir: Path, folds_csv: Path):
    """The same through the real script once: the exit code and stderr a user sees."""
    argv, named = _bad_inputs(tmp_path, synthetic_dir, folds_csv)["missing data dir"]
    proc = run_script("train.py", *argv, *TINY_FLAGS, "--out-dir", str(tmp_path / "ckpt"), check=False, env=ONE_THREAD)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], proc.stderr
    assert not (tmp_path / "ckpt").exists()


# ---- resume ------------------------------------------------------------------------------------------------------
RESUME_EPOCHS = 3  # stage 1 (epoch 0), stage 2 (epochs 1, 2)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dir: Path, folds_csv: Path, tmp_path_factory) -> Path:
    """Reference: RESUME_EPOCHS epochs in one go (default augmentation, mixup and stereo swap on)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = tiny_config(synthetic_dir, folds_csv, "--epochs", str(RESUME_EPOCHS))
    train, val = split(synthetic_dir, folds_csv)
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    fit(cfg, train, val, run_dir, CPU, fold=EVEN_FOLD)
    torch.set_num_threads(before)
    return run_dir


@pytest.mark.parametrize("crash_epoch", [1, 2], ids=["at-stage-boundary", "mid-stage-2"])
def test_resume_after_crash_matches_uninterrupted(
    uninterrupted: Path, synthetic_dir, folds_csv, tmp_path, monkeypatch, crash_epoch
):
    """Crash at the start of `crash_epoch`, resume from last.pt: same weights as the uninterrupted run.

    Crashing in stage 2 also restores the optimizer and scheduler; crashing at epoch 1 rebuilds stage 2.
    """
    cfg = tiny_config(synthetic_dir, folds_csv, "--epochs", str(RESUME_EPOCHS))
    train, val = split(synthetic_dir, folds_csv)
    real = training.train_one_epoch
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_epoch + 1:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg, train, val, tmp_path, CPU, fold=EVEN_FOLD)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["state"]["epoch"] == crash_epoch - 1
    monkeypatch.setattr(training, "train_one_epoch", real)

    result = fit(cfg, train, val, tmp_path, CPU, resume=True, fold=EVEN_FOLD)
    assert [row["epoch"] for row in result.history] == list(range(RESUME_EPOCHS))
    assert_same_weights(weights_of(tmp_path / "last.pt"), weights_of(uninterrupted / "last.pt"), 1e-5)
    assert_same_weights(weights_of(tmp_path / "best.pt"), weights_of(uninterrupted / "best.pt"), 1e-5)
    ours, ref = pd.read_csv(tmp_path / "metrics.csv"), pd.read_csv(uninterrupted / "metrics.csv")
    np.testing.assert_allclose(ours["weighted_r2"], ref["weighted_r2"], atol=1e-6)
    np.testing.assert_allclose(ours["train_loss"], ref["train_loss"], atol=1e-6)


@pytest.mark.slow
def test_resume_after_sigkill(synthetic_dir: Path, folds_csv: Path, tmp_path: Path):
    """Kill -9 a real train.py after its first epoch, --resume it: same last.pt as an uninterrupted run."""
    epochs = 5
    args = [
        "train.py",
        "--fold",
        str(EVEN_FOLD),
        "--data-dir",
        str(synthetic_dir),
        "--folds",
        str(folds_csv),
        "--exp",
        "kill",
        *TINY_FLAGS,
        "--epochs",
        str(epochs),
        "--patience",
        "0",
        "--device",
        "cpu",
    ]
    env = {**os.environ, **ONE_THREAD}
    victim = tmp_path / "victim"
    fold_dir = victim / "kill" / "grid2x2" / f"fold{EVEN_FOLD}"
    with open(tmp_path / "victim.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *args, "--out-dir", str(victim)], cwd=REPO, stdout=log, stderr=log, env=env
        )
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                metrics = fold_dir / "metrics.csv"
                if (fold_dir / "last.pt").is_file() and metrics.is_file() and len(pd.read_csv(metrics)) >= 1:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, (
                f"train.py ended (rc {proc.returncode}) before it could be killed:\n"
                + (tmp_path / "victim.log").read_text()[-2000:]
            )
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(pd.read_csv(fold_dir / "metrics.csv"))
    assert 1 <= done < epochs

    run_script(*args, "--out-dir", str(victim), "--resume", env=ONE_THREAD)
    run_script(*args, "--out-dir", str(tmp_path / "reference"), env=ONE_THREAD)
    reference = tmp_path / "reference" / "kill" / "grid2x2" / f"fold{EVEN_FOLD}"
    assert_same_weights(weights_of(fold_dir / "last.pt"), weights_of(reference / "last.pt"), 1e-5)
    ours, ref = pd.read_csv(fold_dir / "metrics.csv"), pd.read_csv(reference / "metrics.csv")
    assert list(ours["epoch"]) == list(range(epochs))
    np.testing.assert_allclose(ours["weighted_r2"], ref["weighted_r2"], atol=1e-6)
    assert [p.name for p in fold_dir.iterdir() if p.name.endswith(".tmp")] == []


# ---- DDP --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_ranks_match_single_process(synthetic_dir: Path, folds_csv: Path, tmp_path: Path):
    """2 gloo ranks x batch 4 == 1 process x batch 8: DDP averages the two half-batch gradients.

    26 training images (even): no sampler padding, and every global batch is split evenly over the ranks
    (the last one 1 + 1 images), so each step's gradient equals the single-process one.
    """
    common = [
        "train.py",
        "--fold",
        str(EVEN_FOLD),
        "--data-dir",
        str(synthetic_dir),
        "--folds",
        str(folds_csv),
        "--exp",
        "ddp",
        *TINY_FLAGS,
        "--mixup-prob",
        "0",
        "--augment",
        "none",
        "--stereo-swap-prob",
        "0",
        "--device",
        "cpu",
    ]
    run_script(*common, "--out-dir", str(tmp_path / "single"), "--batch-size", "8", env=ONE_THREAD)
    run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *common,
        "--out-dir",
        str(tmp_path / "ddp"),
        "--batch-size",
        "4",
        env=ONE_THREAD,
    )
    single = tmp_path / "single" / "ddp" / "grid2x2" / f"fold{EVEN_FOLD}"
    ddp = tmp_path / "ddp" / "ddp" / "grid2x2" / f"fold{EVEN_FOLD}"
    # Gradients agree to float rounding (the shard sums run in another order). Adam divides by sqrt(v), so for
    # a parameter whose gradient is ~0 that rounding can move a step by up to lr (2e-3 in the tiny preset):
    # bound the worst element by half a step, and demand that nearly every element agrees to 1e-5.
    a, b = weights_of(ddp / "last.pt"), weights_of(single / "last.pt")
    assert_same_weights(a, b, 1e-3)
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert float(torch.quantile(diffs, 0.99)) <= 1e-5, (
        f"99th percentile weight difference {float(torch.quantile(diffs, 0.99)):.2e}"
    )
    ours, ref = pd.read_csv(ddp / "metrics.csv"), pd.read_csv(single / "metrics.csv")
    assert list(ours["epoch"]) == list(ref["epoch"]) == [0, 1]
    np.testing.assert_allclose(ours["weighted_r2"], ref["weighted_r2"], atol=1e-3)
    oof_ddp, oof_single = (pd.read_csv(d / "oof.csv", dtype={"image_id": str}) for d in (ddp, single))
    assert list(oof_ddp["image_id"]) == list(oof_single["image_id"])  # gathered shards, original order, no duplicates


# ---- stage 1: the feature cache is the uncached forward pass ------------------------------------------------
def test_cached_and_uncached_stage1_first_step_agree(synthetic_dir: Path, folds_csv: Path):
    cfg = tiny_config(synthetic_dir, folds_csv, "--mixup-prob", "0", "--stereo-swap-prob", "0")
    frame = split(synthetic_dir, folds_csv)[0].iloc[:8].reset_index(drop=True)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.freeze_backbone()
    feats = compute_feature_cache(model, frame, cfg, CPU, variants=FLIP_VARIANTS[:1], show=False)
    assert feats.shape == (8, 1, 2, 4, model.feature_dim)
    cached = next(iter(torch.utils.data.DataLoader(FeatureCacheDataset(feats, frame, 0.0, 0), batch_size=8)))
    eval_views = ViewPairDataset(
        frame, model.view_size, build_transform(model.view_size, train=False), 0.0, cfg.data.jpeg_reduce
    )
    images = next(iter(torch.utils.data.DataLoader(eval_views, batch_size=8)))
    assert torch.equal(cached["targets"], images["targets"])

    model.train()
    losses, grads = [], []
    for batch, is_cached in ((cached, True), (images, False)):
        model.zero_grad(set_to_none=True)
        loss = training.batch_loss(model, batch, cfg, CPU, is_cached, None)
        loss.backward()
        losses.append(loss.detach().item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert grads[0].keys() == grads[1].keys() and not any(n.startswith("backbone.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_feature_cache_dataset_is_a_function_of_seed_epoch_index():
    torch.manual_seed(0)
    feats = torch.randn(12, 4, 2, 3, 5)
    frame = pd.DataFrame({t: np.arange(12.0) + j for j, t in enumerate(TARGETS)})
    a, b = FeatureCacheDataset(feats, frame, 0.5, seed=3), FeatureCacheDataset(feats, frame, 0.5, seed=3)

    def item(ds, epoch, i):
        ds.set_epoch(epoch)
        return ds[i]

    picked = {}
    for epoch in (0, 1):
        for i in range(12):
            x, y = item(a, epoch, i), item(b, epoch, i)
            assert torch.equal(x["left"], y["left"]) and torch.equal(x["right"], y["right"])
            assert torch.equal(item(a, epoch, i)["left"], x["left"])  # repeatable
            # each item is one cached variant of image i, views possibly swapped
            variants = [(v, s) for v in range(4) for s in (0, 1) if torch.equal(x["left"], feats[i, v, s])]
            assert variants and torch.equal(x["right"], feats[i, variants[0][0], 1 - variants[0][1]])
            assert float(x["targets"][0]) == i
            picked[epoch, i] = variants[0]
    assert any(picked[0, i] != picked[1, i] for i in range(12))


# ---- mixup and losses ------------------------------------------------------------------------------------------
def _identity_targets(parts: torch.Tensor) -> torch.Tensor:
    green, dead, clover = parts.unbind(-1)
    return torch.stack([green, dead, clover, green + clover, green + dead + clover], dim=-1)


def test_mixup_uses_one_lambda_and_permutation_for_views_and_targets():
    left = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    right = torch.tensor([255, 102, 0], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    targets = _identity_targets(torch.tensor([[10.0, 2.0, 4.0], [0.0, 8.0, 0.0], [32.0, 0.0, 16.0]]))
    batch = {"left": left, "right": right, "targets": targets, "state": torch.tensor([0, 1, 2])}
    lam, perm = 0.25, torch.tensor([2, 0, 1])
    out = mixup(batch, lam, perm)

    assert out["left"].dtype == torch.float32 and out["right"].dtype == torch.float32
    exp_left = torch.tensor([0.25 * 0 + 0.75 * 1.0, 0.25 * 0.2 + 0.75 * 0.0, 0.25 * 1.0 + 0.75 * 0.2])
    exp_right = torch.tensor([0.25 * 1.0 + 0.75 * 0.0, 0.25 * 0.4 + 0.75 * 1.0, 0.25 * 0.0 + 0.75 * 0.4])
    torch.testing.assert_close(out["left"][:, 0, 0, 0], exp_left)
    torch.testing.assert_close(out["right"][:, 0, 0, 0], exp_right)
    assert float(out["left"].min()) >= 0 and float(out["left"].max()) <= 1
    torch.testing.assert_close(out["targets"], 0.25 * targets + 0.75 * targets[perm])
    # dyadic values: the identities hold bit for bit after mixing
    t = out["targets"]
    assert torch.equal(t[:, 3], t[:, 0] + t[:, 2]) and torch.equal(t[:, 4], t[:, 0] + t[:, 1] + t[:, 2])
    assert torch.equal(out["state"], batch["state"]) and torch.equal(
        batch["left"], left
    )  # labels kept, input untouched

    # float (cached feature) views are mixed as they are; random grams keep the identities to rounding
    gen = torch.Generator().manual_seed(0)
    parts = torch.rand(6, 3, generator=gen) * 100
    feats = torch.randn(6, 4, 8, generator=gen)
    perm = torch.randperm(6, generator=gen)
    out = mixup({"left": feats, "right": -feats, "targets": _identity_targets(parts)}, 0.3, perm)
    torch.testing.assert_close(out["left"], 0.3 * feats + 0.7 * feats[perm])
    torch.testing.assert_close(out["right"], -(0.3 * feats + 0.7 * feats[perm]))
    t = out["targets"].double()
    torch.testing.assert_close(t[:, 3], t[:, 0] + t[:, 2], atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(t[:, 4], t[:, 0] + t[:, 1] + t[:, 2], atol=1e-4, rtol=1e-6)


def _ce_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels >= 0
    logp = logits[keep] - logits[keep].exp().sum(dim=1, keepdim=True).log()
    return -logp[torch.arange(int(keep.sum())), labels[keep]].mean()


def test_aux_loss_mixup_and_ignored_labels():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, -2.0, 0.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2, -1, 1])
    torch.testing.assert_close(aux_loss(logits, labels, None), _ce_by_hand(logits, labels))
    lam, perm = 0.3, torch.tensor([1, 2, 3, 0])
    expected = lam * _ce_by_hand(logits, labels) + (1 - lam) * _ce_by_hand(logits, labels[perm])
    torch.testing.assert_close(aux_loss(logits, labels, (lam, perm)), expected)
    # all labels unknown: zero, finite, differentiable
    logits.requires_grad_(True)
    loss = aux_loss(logits, torch.full((4,), -1), (lam, perm))
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_target_loss_log1p_round_trip_and_hand_values():
    grams = torch.tensor([[10.0, 0.0, 3.0, 13.0, 13.0], [50.0, 20.0, 0.0, 50.0, 70.0]])
    assert float(target_loss(torch.log1p(grams), grams, TARGET_WEIGHTS)) == pytest.approx(0.0, abs=1e-12)

    pred = torch.log1p(grams) + torch.tensor([[0.1, -0.2, 0.3, 0.0, 0.5], [-1.0, 0.0, 0.2, 0.4, -0.3]])
    w = np.asarray(TARGET_WEIGHTS)
    err = np.array([[0.1, -0.2, 0.3, 0.0, 0.5], [-1.0, 0.0, 0.2, 0.4, -0.3]])
    by_hand = np.mean(np.sum(w * err**2, axis=1)) / w.sum()
    assert float(target_loss(pred, grams, TARGET_WEIGHTS)) == pytest.approx(by_hand, abs=1e-6)
    assert by_hand == pytest.approx((0.139 + 0.181) / 2)  # rows: 0.1*0.14 + 0.5*0.25; 0.1*1.04 + 0.2*0.16 + 0.5*0.09

    # huber, delta 1: 0.5 e^2 inside, |e| - 0.5 outside
    huber = np.where(np.abs(err) <= 1.0, 0.5 * err**2, np.abs(err) - 0.5)
    expected = np.mean(np.sum(w * huber, axis=1)) / w.sum()
    assert float(target_loss(pred, grams, TARGET_WEIGHTS, kind="huber")) == pytest.approx(expected, abs=1e-6)
    big = torch.log1p(grams) + 3.0  # all outside delta 0.5: 0.5 * (3 - 0.25) per entry
    torch_huber = F.huber_loss(big, torch.log1p(grams), delta=0.5, reduction="none")
    assert float(target_loss(big, grams, TARGET_WEIGHTS, kind="huber", delta=0.5)) == pytest.approx(1.375, abs=1e-5)
    assert float(torch_huber.mean()) == pytest.approx(1.375, abs=1e-5)
    # unequal weights matter: an error on Total costs 5x one on Green
    only_green = target_loss(torch.log1p(grams) + torch.tensor([1.0, 0, 0, 0, 0]), grams, TARGET_WEIGHTS)
    only_total = target_loss(torch.log1p(grams) + torch.tensor([0, 0, 0, 0, 1.0]), grams, TARGET_WEIGHTS)
    assert float(only_total) == pytest.approx(5 * float(only_green))
    with pytest.raises(BiomassError, match="unknown --loss 'l1'; choose one of mse, huber"):  # refused with the config
        Config.from_dict({"train": {"loss": "l1"}})


# ---- non-finite losses -------------------------------------------------------------------------------------------
def _head_only_setup(synthetic_dir, folds_csv, max_bad_steps: int = 3):
    cfg = tiny_config(synthetic_dir, folds_csv, "--mixup-prob", "0", "--max-bad-steps", str(max_bad_steps))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.freeze_backbone()
    return cfg, model


def _feature_batch(model, seed: int, nan: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n_tiles = model.grid[0] * model.grid[1]
    targets = _identity_targets(torch.rand(4, 3, generator=gen) * 50)
    if nan:
        targets[1, 4] = float("nan")
    return {
        "left": torch.randn(4, n_tiles, model.feature_dim, generator=gen),
        "right": torch.randn(4, n_tiles, model.feature_dim, generator=gen),
        "targets": targets,
        "index": torch.arange(4),
        "state": torch.tensor([0, 1, -1, 2]),
        "month": torch.tensor([0, 3, 4, -1]),
        "species": torch.tensor([1, 0, 2, 7]),
    }


def _run_epoch(cfg, model, loader) -> tuple[dict, dict]:
    model = copy.deepcopy(model)
    groups = model.param_groups(cfg.train.lr, cfg.train.backbone_lr, cfg.train.weight_decay, include_backbone=False)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    stats = train_one_epoch(model, loader, optimizer, scheduler, cfg, CPU, True, DistInfo(), epoch=0)
    return stats, {k: v.clone() for k, v in model.state_dict().items()}


def test_non_finite_loss_skips_the_step(synthetic_dir: Path, folds_csv: Path):
    cfg, model = _head_only_setup(synthetic_dir, folds_csv)
    good1, good2, bad = _feature_batch(model, 1), _feature_batch(model, 2), _feature_batch(model, 3, nan=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    stats, after = _run_epoch(cfg, model, [bad])
    assert stats["bad_steps"] == 1
    assert_same_weights(after, start, 0.0)

    clean_stats, clean = _run_epoch(cfg, model, [good1, good2])
    stats, skipped = _run_epoch(cfg, model, [good1, bad, good2])
    assert clean_stats["bad_steps"] == 0 and stats["bad_steps"] == 1
    assert_same_weights(skipped, clean, 0.0)  # the NaN batch neither stepped the optimizer nor the scheduler
    assert np.isfinite(stats["train_loss"]) and stats["train_loss"] == pytest.approx(clean_stats["train_loss"])
    assert not all(torch.equal(clean[k], start[k]) for k in start)


def test_consecutive_non_finite_losses_stop_the_run(synthetic_dir: Path, folds_csv: Path):
    cfg, model = _head_only_setup(synthetic_dir, folds_csv, max_bad_steps=3)
    good, bad = _feature_batch(model, 1), _feature_batch(model, 3, nan=True)
    stats, _ = _run_epoch(cfg, model, [bad, bad, good, bad, bad])  # never 3 in a row
    assert stats["bad_steps"] == 4
    with pytest.raises(BiomassError, match="non-finite") as info:
        _run_epoch(cfg, model, [good, bad, bad, bad, good])
    assert "3 non-finite losses in a row" in str(info.value)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns that CUDA autocast is off on a CPU-only machine
def test_autocast_dtype_per_gpu_generation(monkeypatch):
    """fp16 on a T4/P100 (bf16 only emulated there; training adds a GradScaler), bf16 on Ampere+ and CPU."""
    from src.runtime import autocast

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # a T4
    assert autocast(cuda, True).fast_dtype == torch.float16
    assert autocast(cuda, True, training=True).fast_dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100 / H100
    assert autocast(cuda, True).fast_dtype == autocast(cuda, True, training=True).fast_dtype == torch.bfloat16
    assert autocast(torch.device("cpu"), True).fast_dtype == torch.bfloat16
    assert isinstance(autocast(cuda, False), contextlib.nullcontext)
