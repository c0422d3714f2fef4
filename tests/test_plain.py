"""The plain end-to-end loop (`python -m src.baseline --plain`): a peer written apart from fit()."""

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
