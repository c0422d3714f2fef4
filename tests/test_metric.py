"""The competition metric: weighted R^2 over all (image, target) rows with one global weighted mean."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import r2_score

from src.data import wide_to_long
from src.metric import per_target_r2, score, weighted_r2, weighted_r2_long
from src.schema import TARGET_WEIGHTS, TARGETS


def _random(n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.gamma(2.0, 15.0, (n, 5)) * np.array([1.0, 0.5, 0.3, 1.3, 1.8])
    return y, np.clip(y + rng.normal(0, 8, y.shape), 0, None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_r2_equals_sklearn_on_flattened_rows(seed: int):
    y, p = _random(seed=seed)
    expected = r2_score(y.ravel(), p.ravel(), sample_weight=np.tile(TARGET_WEIGHTS, len(y)))
    assert weighted_r2(y, p) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected < 1.0  # a non-trivial case, not a degenerate 0 or 1


def test_weighted_r2_hand_computed_two_images():
    # Weights 0.1 0.1 0.1 0.2 0.5 sum to 1 per image, 2 over both images.
    # Weighted mean of all 10 rows = (0.5 * 10 + 0.5 * 30) / 2 = 10.
    # ss_tot, image 1 (0,0,0,0,10): 0.1*100*3 + 0.2*100 + 0.5*0   = 50
    #         image 2 (0,0,0,0,30): 0.1*100*3 + 0.2*100 + 0.5*400 = 250   -> 300
    # ss_res: image 1 off by 10 on Total: 0.5 * 100 = 50; image 2 off by 2 on Green: 0.1 * 4 = 0.4 -> 50.4
    # R^2 = 1 - 50.4 / 300 = 0.832
    y = np.array([[0, 0, 0, 0, 10], [0, 0, 0, 0, 30]], dtype=float)
    p = np.array([[0, 0, 0, 0, 20], [2, 0, 0, 0, 30]], dtype=float)
    assert weighted_r2(y, p) == pytest.approx(0.832, abs=1e-12)


def test_perfect_prediction_scores_one():
    y, _ = _random()
    assert weighted_r2(y, y.copy()) == 1.0


def test_global_mean_is_zero_and_per_target_means_beat_it():
    y, _ = _random(n=50)
    w = np.broadcast_to(TARGET_WEIGHTS, y.shape)
    global_mean = np.full_like(y, np.sum(w * y) / np.sum(w))
    assert weighted_r2(y, global_mean) == pytest.approx(0.0, abs=1e-12)
    column_means = np.broadcast_to(y.mean(axis=0), y.shape)
    # the mean is global, so predicting each target's own mean already explains the between-target spread
    assert weighted_r2(y, column_means) > 0.1


def test_weighted_r2_long_equals_wide_in_any_row_order():
    y, p = _random()
    ids = [f"ID{i:010d}" for i in range(len(y))]
    truth, pred = wide_to_long(ids, y), wide_to_long(ids, p).sample(frac=1.0, random_state=0)
    assert weighted_r2_long(truth, pred) == pytest.approx(weighted_r2(y, p), abs=1e-12)


def test_weighted_r2_long_raises_when_a_truth_row_has_no_prediction():
    y, p = _random(n=4)
    ids = [f"ID{i}" for i in range(4)]
    truth, pred = wide_to_long(ids, y), wide_to_long(ids, p)
    with pytest.raises(ValueError, match="1 truth rows have no prediction"):
        weighted_r2_long(truth, pred.drop(index=7))


def test_weighted_r2_long_raises_when_a_duplicate_hides_a_missing_prediction():
    # a missing row and a repeated row keep the merged length equal to len(truth): still a missing prediction
    y, p = _random(n=4)
    ids = [f"ID{i}" for i in range(4)]
    truth, pred = wide_to_long(ids, y), wide_to_long(ids, p)
    pred = pd.concat([pred.drop(index=7), pred.iloc[[0]]], ignore_index=True)
    assert len(pred) == len(truth)
    with pytest.raises(ValueError):
        weighted_r2_long(truth, pred)


@pytest.mark.parametrize(
    "shape_true, shape_pred",
    [((10, 4), (10, 4)), ((10, 5), (9, 5)), ((50,), (50,)), ((10, 5), (10, 6)), ((2, 10, 5), (2, 10, 5))],
)
def test_shape_errors_raise_value_error(shape_true, shape_pred):
    with pytest.raises(ValueError, match="expected two"):
        weighted_r2(np.ones(shape_true), np.ones(shape_pred))
    with pytest.raises(ValueError):
        score(np.ones(shape_true), np.ones(shape_pred))


def test_per_target_r2_keys_in_target_order_and_values():
    y, p = _random()
    out = per_target_r2(y, p)
    assert list(out) == list(TARGETS)
    for j, name in enumerate(TARGETS):
        assert out[name] == pytest.approx(r2_score(y[:, j], p[:, j]), abs=1e-12)
    flat = score(y, p)
    assert list(flat) == ["weighted_r2", *(f"r2_{t}" for t in TARGETS)]
    assert flat["weighted_r2"] == weighted_r2(y, p)
