"""The competition metric: one weighted R^2 over all (image, target) rows at once."""

from __future__ import annotations

import numpy as np
import pandas as pd

from src.schema import SAMPLE_ID_SEP, TARGET_WEIGHTS, TARGETS


def weighted_r2(y_true: np.ndarray, y_pred: np.ndarray, weights=TARGET_WEIGHTS) -> float:
    """Weighted R^2 over flattened rows of wide (N, 5) arrays in TARGETS order.

    1 - sum w (y - p)^2 / sum w (y - ybar_w)^2, ybar_w the weighted mean of every row. Because the mean
    is global (not per target) a per-target-mean predictor already scores above 0.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[1] != len(weights):
        raise ValueError(f"expected two (N, {len(weights)}) arrays, got {y_true.shape} and {y_pred.shape}")
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), y_true.shape)
    mean = np.sum(w * y_true) / np.sum(w)
    ss_res = np.sum(w * (y_true - y_pred) ** 2)
    ss_tot = np.sum(w * (y_true - mean) ** 2)
    return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else 0.0


def per_target_r2(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Plain R^2 of each target column (for diagnosis: which target loses the score)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    out = {}
    for j, name in enumerate(TARGETS):
        ss_tot = np.sum((y_true[:, j] - y_true[:, j].mean()) ** 2)
        ss_res = np.sum((y_true[:, j] - y_pred[:, j]) ** 2)
        out[name] = float(1.0 - ss_res / ss_tot) if ss_tot > 0 else 0.0
    return out


def score(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """The competition metric plus the R^2 of each target, as one flat dict."""
    return {
        "weighted_r2": weighted_r2(y_true, y_pred),
        **{f"r2_{k}": v for k, v in per_target_r2(y_true, y_pred).items()},
    }


def weighted_r2_long(truth: pd.DataFrame, pred: pd.DataFrame) -> float:
    """The metric on long frames (`sample_id,target`), joined on sample_id as Kaggle does."""
    if pred["sample_id"].duplicated().any():
        raise ValueError(f"prediction repeats sample_id {pred['sample_id'][pred['sample_id'].duplicated()].iloc[0]}")
    missing = ~truth["sample_id"].isin(pred["sample_id"])
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} truth rows have no prediction, first {truth['sample_id'][missing].iloc[0]}"
        )
    merged = truth[["sample_id", "target"]].merge(pred[["sample_id", "target"]], on="sample_id", suffixes=("", "_pred"))
    name = merged["sample_id"].str.split(SAMPLE_ID_SEP).str[-1]
    weight_of = dict(zip(TARGETS, TARGET_WEIGHTS))
    w = name.map(weight_of).to_numpy(dtype=np.float64)
    y = merged["target"].to_numpy(dtype=np.float64)
    p = merged["target_pred"].to_numpy(dtype=np.float64)
    mean = np.sum(w * y) / np.sum(w)
    return float(1.0 - np.sum(w * (y - p) ** 2) / np.sum(w * (y - mean) ** 2))
