"""The peers: the plain end-to-end loop (`python -m src.baseline --plain`), a colour head that needs no backbone."""

from __future__ import annotations

import numpy as np
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
