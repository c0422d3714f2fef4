"""Test-time adaptation: pseudo-label fine-tuning in infer.py (mechanics, blend, budget, untouched inputs)."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO

from src import adapt
from src.config import Config, InferConfig, PseudoLabelConfig
from src.errors import BiomassError, run_cli
from src.losses import mixup, target_loss
from src.schema import TARGETS

spec = importlib.util.spec_from_file_location("infer_script_adapt", REPO / "infer.py")
infer_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(infer_script)


def snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under the roots: size, mtime and content hash (what 'nothing written' means)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def infer(data_dir: Path, checkpoints: Path, out: Path, *extra: str) -> pd.DataFrame:
    argv = [
        "--data-dir",
        str(data_dir),
        "--checkpoints",
        str(checkpoints),
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]
    assert run_cli(infer_script.main, argv) == 0
    return pd.read_csv(out)


@pytest.fixture(scope="module")
def one_grid(trained_exp: Path) -> Path:
    """The 2x2 half of the session experiment (two folds): one model to fine-tune keeps these tests quick."""
    return trained_exp / "grid2x2"


@pytest.fixture(scope="module")
def plain(synthetic_dir: Path, one_grid: Path, tmp_path_factory) -> pd.DataFrame:
    return infer(synthetic_dir, one_grid, tmp_path_factory.mktemp("plain") / "sub.csv")


# ---- pieces ---------------------------------------------------------------------------------------------------
def test_settings_are_checked():
    assert not PseudoLabelConfig().enabled and PseudoLabelConfig(epochs=1).enabled
    for values, message in (
        ({"pseudo_label": {"epochs": -1}}, "--pseudo-label-epochs -1"),
        ({"pseudo_label": {"weight": -0.5}}, "--pseudo-label-weight -0.5"),
        ({"pseudo_label": {"blend": 1.5}}, "--pseudo-label-blend 1.5"),
        ({"pseudo_label": {"fold": "first"}}, "--pseudo-label-fold first"),
        ({"time_budget": 0}, "--time-budget 0"),
    ):
        with pytest.raises(BiomassError, match=message):
            InferConfig.from_dict(values)


def test_blend_is_the_convex_mix():
    plain, adapted = np.array([[10.0, 2.0]]), np.array([[20.0, 4.0]])
    np.testing.assert_allclose(adapt.blend(plain, adapted, 0.0), plain)
    np.testing.assert_allclose(adapt.blend(plain, adapted, 1.0), adapted)
    np.testing.assert_allclose(adapt.blend(plain, adapted, 0.8), [[18.0, 3.6]])


def test_pick_predictors_best_fold_per_grid_or_a_given_fold():
    p = lambda grid, fold, metric: SimpleNamespace(grid=grid, fold=fold, val_metric=metric)  # noqa: E731
    preds = [p((2, 2), 0, 0.5), p((2, 2), 1, 0.7), p((1, 2), 0, 0.6), p((1, 2), 1, None)]
    assert [(c.grid, c.fold) for c in adapt.pick_predictors(preds)] == [((1, 2), 0), ((2, 2), 1)]
    assert [(c.grid, c.fold) for c in adapt.pick_predictors(preds, "1")] == [((1, 2), 1), ((2, 2), 1)]
    with pytest.raises(
        BiomassError, match=r"--pseudo-label-fold 3: grid 1x2 has no checkpoint of that fold \(folds \[0, 1\]\)"
    ):
        adapt.pick_predictors(preds, "3")


def test_estimate_is_measured_seconds_per_forward_times_the_fine_tunes_passes():
    # 12 s for 10 images x 4 models x 3 flips = 0.1 s per forward; 2 grids x (2 epochs x 50 images x 3 + 10 x 3)
    assert adapt.estimate_seconds(12.0, 4, 3, 10, 40, 2, 2) == pytest.approx(2 * (2 * 50 * 3 * 0.1 + 10 * 3 * 0.1))


def test_pseudo_label_frame_keeps_readable_images_with_weight_and_unknown_aux_labels():
    images = pd.DataFrame(
        {"image_id": ["a", "b", "c"], "path": ["a.jpg", "b.jpg", "c.jpg"], "image_path": ["x", "y", "z"]}
    )
    values = np.arange(15, dtype=float).reshape(3, 5)
    frame = adapt.pseudo_label_frame(images, values, np.array([True, False, True]), 0.5)
    assert frame["image_id"].tolist() == ["a", "c"]
    np.testing.assert_allclose(frame[list(TARGETS)].to_numpy(), values[[0, 2]])
    assert (frame["sample_weight"] == 0.5).all() and (frame[list(adapt.AUX_INDEX_COLUMNS)] == -1).all().all()


def test_sample_weights_scale_each_images_loss_term():
    pred = torch.log1p(torch.tensor([[1.0] * 5, [2.0] * 5]))
    target = torch.tensor([[3.0] * 5, [2.0] * 5])  # image 0 is off, image 1 exact
    weights = (0.1, 0.1, 0.1, 0.2, 0.5)
    full = target_loss(pred, target, weights)
    expected = ((torch.log1p(torch.tensor(1.0)) - torch.log1p(torch.tensor(3.0))) ** 2) / 2  # mean over 2 images
    assert float(full) == pytest.approx(float(expected))
    assert float(target_loss(pred, target, weights, sample_weight=torch.tensor([0.5, 1.0]))) == pytest.approx(
        float(expected) / 2
    )
    assert float(target_loss(pred, target, weights, sample_weight=torch.tensor([0.0, 1.0]))) == 0.0
    batch = {
        "left": torch.zeros(2, 3, 2, 2),
        "right": torch.zeros(2, 3, 2, 2),
        "targets": target,
        "weight": torch.tensor([0.5, 1.0]),
    }
    mixed = mixup(batch, 0.25, torch.tensor([1, 0]))
    np.testing.assert_allclose(mixed["weight"].numpy(), [0.25 * 0.5 + 0.75 * 1.0, 0.25 * 1.0 + 0.75 * 0.5])


def test_finetune_trains_all_epochs_unfrozen_on_train_plus_pseudo_and_saves_nothing(monkeypatch):
    seen = {}

    def fake_fit(cfg, frame, val_frame, run_dir, device, model=None, **kwargs):
        seen.update(cfg=cfg, frame=frame, val_frame=val_frame, run_dir=run_dir, model=model)
        with torch.no_grad():
            model.weight += 1.0  # "training": the copy moves, the ensemble's model must not
        return SimpleNamespace(model=model)

    monkeypatch.setattr(adapt, "fit", fake_fit)
    cfg = Config()
    cfg.train.epochs, cfg.train.freeze_epochs, cfg.train.swa_top_k = 12, 3, 3
    model = torch.nn.Linear(2, 2)
    initial = model.weight.detach().clone()
    lrs = (cfg.train.finetune_head_lr, cfg.train.backbone_lr, cfg.train.lr)
    predictor = SimpleNamespace(
        cfg=cfg, model=model, path=Path("best.pt"), grid=(2, 2), with_model=lambda m: ("adapted", m)
    )
    train = pd.DataFrame({"image_id": ["t1", "t2"], "sample_weight": 1.0})
    pseudo = pd.DataFrame({"image_id": ["x1"], "sample_weight": 0.3})
    result = adapt.finetune(predictor, train, pseudo, 2, torch.device("cpu"), amp=False, num_workers=0, show=False)
    assert seen["frame"]["image_id"].tolist() == ["t1", "t2", "x1"] and seen["frame"]["sample_weight"].tolist() == [
        1.0,
        1.0,
        0.3,
    ]
    assert (seen["cfg"].train.epochs, seen["cfg"].train.freeze_epochs, seen["cfg"].train.swa_top_k) == (2, 0, 0)
    assert seen["val_frame"] is None and seen["run_dir"] is None
    # a copy is trained and the predictor is rebuilt around that trained copy; the ensemble's model stays as it was
    assert result[0] == "adapted" and result[1] is seen["model"] and seen["model"] is not model
    torch.testing.assert_close(result[1].weight, initial + 1.0, rtol=0, atol=0)
    torch.testing.assert_close(model.weight, initial, rtol=0, atol=0)
    tc = seen["cfg"].train  # a gentle continuation: lrs x the default scale 0.1, no warm-up, mixup, EMA, patience
    assert (tc.finetune_head_lr, tc.backbone_lr, tc.lr) == pytest.approx(tuple(0.1 * v for v in lrs), rel=1e-12)
    assert (tc.warmup_frac, tc.mixup_prob, tc.ema_decay, tc.patience) == (0.0, 0.0, 0.0, 0)
    assert cfg.train.epochs == 12 and (cfg.train.finetune_head_lr, cfg.train.backbone_lr, cfg.train.lr) == lrs


def test_oof_and_pseudo_labels_do_not_mix(synthetic_dir: Path, trained_exp: Path, capsys):
    argv = ["--data-dir", str(synthetic_dir), "--checkpoints", str(trained_exp), "--oof", "--pseudo-label-epochs", "1"]
    assert run_cli(infer_script.main, argv) == 1
    assert "does not go with --oof" in capsys.readouterr().err


# ---- end to end through infer.py ------------------------------------------------------------------------------
def test_time_budget_skips_the_fine_tune_and_submits_the_plain_ensemble(
    synthetic_dir, one_grid, plain, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(adapt, "finetune", lambda *a, **k: pytest.fail("fine-tuned despite the time budget"))
    sub = infer(synthetic_dir, one_grid, tmp_path / "sub.csv", "--pseudo-label-epochs", "50", "--time-budget", "0.0001")
    assert "pseudo-label fine-tune skipped: estimated" in capsys.readouterr().out
    pd.testing.assert_frame_equal(sub, plain)


def test_blend_arithmetic_end_to_end_and_inputs_untouched(synthetic_dir, one_grid, plain, tmp_path, capsys):
    """B = 0 gives the plain ensemble, B = 1 the adapted models, B = 0.5 their mean; data and checkpoints unchanged."""
    before = snapshot(synthetic_dir, one_grid)
    flags = ["--pseudo-label-epochs", "1", "--pseudo-label-weight", "0.5"]
    zero = infer(synthetic_dir, one_grid, tmp_path / "b0.csv", *flags, "--pseudo-label-blend", "0")
    out = capsys.readouterr().out
    assert "pseudo-label fine-tune of" in out and "1 model(s), 1 epoch(s)" in out  # one model per grid: the better fold
    np.testing.assert_allclose(zero["target"], plain["target"], rtol=0, atol=1e-9)
    one = infer(synthetic_dir, one_grid, tmp_path / "b1.csv", *flags, "--pseudo-label-blend", "1")
    half = infer(synthetic_dir, one_grid, tmp_path / "b5.csv", *flags, "--pseudo-label-blend", "0.5")
    assert not np.allclose(one["target"], plain["target"])  # the fine-tune changed the models
    np.testing.assert_allclose(half["target"], 0.5 * (one["target"] + plain["target"]), rtol=0, atol=1e-6)
    assert snapshot(synthetic_dir, one_grid) == before  # nothing written into the inputs


def test_shifted_test_set_reports_plain_and_adapted_r2(synthetic_dir, one_grid, tmp_path, capsys):
    """Test images under a soil shift the models never saw: infer.py reports both scores on the synthetic truth."""
    from src.synthetic import generate

    shifted = generate(tmp_path / "shifted", 1, 8, seed=7, size=(400, 200), shift="soil")
    for name in ("train.csv", "train"):  # the training images of the checkpoints, the shifted test images
        target = shifted / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        (shutil.copytree if (synthetic_dir / name).is_dir() else shutil.copy)(synthetic_dir / name, target)
    blended = infer(shifted, one_grid, tmp_path / "sub.csv", "--pseudo-label-epochs", "1")
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("test_labels.csv (synthetic truth)"))
    scores = {k: float(v) for k, v in (part.strip().split(" ") for part in line.split(": ", 1)[1].split(","))}
    assert set(scores) == {"plain", "adapted", "blend"}
    # the printed scores are the metric of what was submitted, against the generator's truth (by hand, long rows)
    truth = pd.read_csv(shifted / "test_labels.csv")
    plain = infer(shifted, one_grid, tmp_path / "plain.csv")
    assert scores["blend"] == pytest.approx(r2_long_by_hand(truth, blended), abs=6e-5)
    assert scores["plain"] == pytest.approx(r2_long_by_hand(truth, plain), abs=6e-5)
    assert scores["blend"] != scores["plain"]  # the fine-tune moved the submission, so the two checks differ


def r2_long_by_hand(truth: pd.DataFrame, sub: pd.DataFrame) -> float:
    """The competition metric written out again: one weighted R² over every (image, target) row."""
    weight = {"Dry_Green_g": 0.1, "Dry_Dead_g": 0.1, "Dry_Clover_g": 0.1, "GDM_g": 0.2, "Dry_Total_g": 0.5}
    rows = truth.merge(sub[["sample_id", "target"]], on="sample_id", suffixes=("", "_pred"), validate="one_to_one")
    assert len(rows) == len(truth) == len(sub)
    w = rows["target_name"].map(weight).to_numpy()
    y, p = rows["target"].to_numpy(), rows["target_pred"].to_numpy()
    mean = (w * y).sum() / w.sum()
    return float(1 - (w * (y - p) ** 2).sum() / (w * (y - mean) ** 2).sum())
