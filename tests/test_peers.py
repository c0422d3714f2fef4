"""The peers: the plain end-to-end loop (`python -m src.baseline --plain`), a colour head that needs no backbone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from src.baseline import plain_loop_oof
from src.data import load_train
from src.folds import load_folds
from src.schema import TARGETS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plain_loop_never_sees_its_held_out_labels(synthetic_dir, folds_csv):
    """Scrambling one fold's labels leaves that fold's predictions bit for bit, and moves the other folds'."""
    wide = load_train(synthetic_dir)
    folds = load_folds(folds_csv, wide)
    fold_of = wide[["image_id"]].merge(folds, on="image_id", how="left")["fold"].to_numpy()
    before = plain_loop_oof(wide, folds, tile=14, epochs=1, seed=0)
    assert before.shape == (len(wide), len(TARGETS)) and np.isfinite(before).all() and (before >= 0).all()
    held = fold_of == fold_of[0]
    scrambled = wide.copy()
    rng = np.random.default_rng(1)
    values = scrambled.loc[held, list(TARGETS)].to_numpy()
    scrambled.loc[held, list(TARGETS)] = values[rng.permutation(len(values))] * 3.0 + 7.0
    after = plain_loop_oof(scrambled, folds, tile=14, epochs=1, seed=0)
    np.testing.assert_array_equal(after[held], before[held])
    assert not np.allclose(after[~held], before[~held])  # the other folds train on those labels: they move


def test_colour_head_builds_no_backbone_and_asks_for_no_weights(synthetic_dir, folds_csv, tmp_path, monkeypatch):
    """`train.py --regressor ridge --features colour` on the default (pretrained-size) backbone trains, no weights."""
    import src.model
    import train

    def no_backbone(*args, **kwargs):
        raise AssertionError("a colour head must not build a backbone")

    monkeypatch.setattr(src.model, "create_backbone", no_backbone)
    argv = ["--fold", "all", "--regressor", "ridge", "--features", "colour", "--data-dir", str(synthetic_dir),
            "--folds", str(folds_csv), "--out-dir", str(tmp_path), "--exp", "colour"]  # fmt: skip
    assert train.main(argv) == 0
    heads = sorted(tmp_path.glob("colour/grid*/fold*/head.json"))
    assert len(heads) == 3 and all((h.parent / "oof.csv").is_file() for h in heads)


def _frame(truth: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame({"image_id": [f"i{k}" for k in range(len(truth))], "fold": np.arange(len(truth)) % 3})
    for j, name in enumerate(TARGETS):
        out[name] = pred[:, j]
        out[f"true_{name}"] = truth[:, j]
    return out


def test_blend_verdicts_read_better_only_when_the_blend_beats_the_system():
    """blend - system with its paired interval: a blend near the truth beats a noisy system, not an equal one."""
    from src.docs import blend_verdicts
    from src.metric import score

    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 20.0, size=(120, 5))
    blend = _frame(truth, truth * rng.normal(1.0, 0.05, size=truth.shape))
    noisy = [_frame(truth, truth * rng.normal(1.0, 0.6, size=truth.shape).clip(0)) for _ in range(2)]
    rows = blend_verdicts(blend, {"noisy": noisy, "same": [blend]}, pd.Index(blend["image_id"]))
    by = {r["system"]: r for r in rows}
    expected = np.mean([score(truth, f[list(TARGETS)].to_numpy())["weighted_r2"] for f in noisy])
    assert by["noisy"]["weighted_r2"] == pytest.approx(expected) and by["noisy"]["seeds"] == 2
    assert by["noisy"]["verdict"] == "better" and by["noisy"]["low"] > 0
    assert by["same"]["delta"] == 0 and by["same"]["verdict"] == "can't tell"


def test_demo_trains_with_a_one_epoch_ema_and_no_early_stop():
    """The demo's flags (Makefile DEMO_FLAGS): every fold runs its whole cosine schedule, and what is validated
    and scored is an EMA of the weights with a one-epoch half-life (issue 26: the raw weights' epoch-to-epoch
    swings set the fixed-schedule headline)."""
    import re
    import shlex
    from pathlib import Path

    import train
    from src.averaging import ema_decay_for
    from src.config import resolve_config
    from src.training import steps_per_epoch

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    flags = shlex.split(re.search(r"^DEMO_FLAGS := (.*)$", makefile, re.M).group(1))
    cfg = resolve_config(train.parse_args(["--fold", "0", *flags]))
    per_epoch = steps_per_epoch(192, cfg.train, 1)  # a demo fold: ~192 training images, batch 16
    assert per_epoch == 12 and cfg.train.patience == 0 and cfg.train.ema_warmup
    assert ema_decay_for(cfg.train, per_epoch) == pytest.approx(0.5 ** (1 / 12))
