"""Classical regression heads on frozen per-image features: ridge, kernel ridge, histogram gradient boosting.

Each head is fitted on one fold's training images and becomes plain arrays (`HeadModel.arrays`) plus JSON
(`HeadModel.meta`): saved as `head.npz` + `head.json` and loaded with `allow_pickle=False`, so a head file can
never run code (the same rule as `torch.load(weights_only=True)` for networks). Prediction is numpy only, on
those arrays: ridge and kernel ridge are a matrix product, boosting walks the saved tree nodes (the tested twin
of sklearn's own predict).

Targets (`to_fit_space` / `to_grams`): log1p grams or raw grams; the five targets, or three parts
(`--heads green-dead-clover | clover-gdm-total`) with the other two derived exactly, like the network's heads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.kernel_ridge import KernelRidge
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.model_selection import KFold

from src.errors import BiomassError
from src.io_utils import atomic_path, write_text_atomic
from src.schema import TARGETS

HEAD_FORMAT = 1
ALPHAS = np.logspace(-3, 5, 17)  # ridge / kernel ridge penalties tried by the inner CV
INNER_FOLDS = 5
# the fitted targets of each --heads layout (indices into TARGETS: Green Dead Clover GDM Total)
FITTED = {"five": (0, 1, 2, 3, 4), "green-dead-clover": (0, 1, 2), "clover-gdm-total": (2, 3, 4)}


# ---- targets ----------------------------------------------------------------------------------------------------
def to_fit_space(grams: np.ndarray, layout: str, space: str) -> np.ndarray:
    """(N, 5) grams -> (N, k) what the head fits: the layout's targets, log1p or raw grams."""
    y = np.asarray(grams, dtype=np.float64)[:, FITTED[layout]]
    return np.log1p(y) if space == "log1p" else y


def to_grams(pred: np.ndarray, layout: str, space: str, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(N, k) head output -> (N, 5) grams: clamped to the training range (a linear head extrapolates without bound and
    expm1 makes that explode), back to grams, parts at least 0, the derived targets from the parts."""
    pred = np.clip(np.asarray(pred, dtype=np.float64), low, high)
    parts = np.maximum(np.expm1(pred) if space == "log1p" else pred, 0.0)
    out = np.zeros((len(parts), len(TARGETS)))
    out[:, FITTED[layout]] = parts
    if layout == "green-dead-clover":
        out[:, 3] = out[:, 0] + out[:, 2]
        out[:, 4] = out[:, 3] + out[:, 1]
    elif layout == "clover-gdm-total":
        out[:, 0] = np.maximum(out[:, 3] - out[:, 2], 0.0)
        out[:, 1] = np.maximum(out[:, 4] - out[:, 3], 0.0)
    return out


# ---- the saved head -----------------------------------------------------------------------------------------------
@dataclass
class HeadModel:
    """A fitted head: `kind`, its arrays (npz) and its JSON metadata (alphas, layout, space, clamp range...)."""

    kind: str
    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N, k) in the fitted space (pure numpy on the saved arrays)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.arrays["mean"]):
            raise BiomassError(
                f"head expects {len(self.arrays['mean'])} features per image, got {x.shape[1:]}; "
                "the features differ from the ones it was trained on"
            )
        z = (x - self.arrays["mean"]) / self.arrays["scale"]
        if self.kind == "ridge":
            return z @ self.arrays["coef"].T + self.arrays["intercept"]
        if self.kind == "kernel-ridge":
            kernel = rbf_kernel(z, self.arrays["x_fit"], gamma=float(self.meta["gamma"]))
            return kernel @ self.arrays["dual"].T + self.arrays["intercept"]
        if self.kind == "hgb":
            return _predict_trees(self.arrays, z)
        raise BiomassError(f"unknown head kind {self.kind!r}")

    def predict_grams(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> (N, 5) grams (clamped to the training range of the fitted targets, derived targets added)."""
        m = self.meta
        return to_grams(self.predict(features), m["layout"], m["space"], self.arrays["low"], self.arrays["high"])


def save_head(head: HeadModel, directory: Path) -> Path:
    """head.npz (arrays only) + head.json (kind, format, metadata); both atomic."""
    with atomic_path(directory / "head.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **head.arrays)
    meta = {"format": HEAD_FORMAT, "kind": head.kind, **head.meta}
    write_text_atomic(directory / "head.json", json.dumps(meta, indent=1) + "\n")
    return directory / "head.json"


def load_head(directory: Path) -> HeadModel:
    """The head of a run directory, read with allow_pickle=False (an object array is refused, never unpickled)."""
    meta_path, npz = Path(directory) / "head.json", Path(directory) / "head.npz"
    if not meta_path.is_file() or not npz.is_file():
        raise BiomassError(f"{directory}: no head.json + head.npz; train it with train.py --regressor ...")
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:  # ValueError: an object array (pickle) or a corrupt file
        raise BiomassError(f"{directory}: unreadable or pickled head file ({str(err)[:160]}); re-train it") from err
    if meta.get("format") != HEAD_FORMAT:
        raise BiomassError(f"{meta_path}: not an image2biomass head (format {HEAD_FORMAT}); re-train it")
    kind = meta.pop("kind")
    meta.pop("format")
    return HeadModel(kind, arrays, meta)


# ---- fitting ------------------------------------------------------------------------------------------------------
def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and scale (a constant column gets scale 1, so it stays 0 instead of dividing by 0)."""
    mean = np.nanmean(x, axis=0)  # boosting takes missing values; the linear heads never see any
    scale = np.nanstd(x, axis=0)
    return mean, np.where(scale > 1e-12, scale, 1.0)


def ridge_coef(z: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on centred z for each alpha at once: coef (A, k, F) and intercept (k,) via one SVD."""
    zm, ym = z.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(z - zm, full_matrices=False)
    uty = u.T @ (y - ym)  # (r, k)
    shrink = s[None, :] / (s[None, :] ** 2 + np.asarray(alphas)[:, None])  # (A, r)
    coef = np.einsum("fr,ar,rk->akf", vt.T, shrink, uty)
    return coef, ym - np.einsum("akf,f->ak", coef, zm)


def inner_cv_alpha(z: np.ndarray, y: np.ndarray, alphas: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per target, the alpha with the least inner-CV squared error (K-fold on the training images only)."""
    errors = np.zeros((len(alphas), y.shape[1]))
    splits = KFold(min(INNER_FOLDS, len(z)), shuffle=True, random_state=seed).split(z)
    for tr, te in splits:
        coef, intercept = ridge_coef(z[tr], y[tr], alphas)
        pred = np.einsum("nf,akf->ank", z[te], coef) + intercept[:, None, :]
        errors += ((pred - y[te][None]) ** 2).sum(axis=1)
    return np.asarray(alphas)[errors.argmin(axis=0)]


def fit_ridge(x: np.ndarray, y: np.ndarray, seed: int = 0) -> HeadModel:
    """Standardized ridge per target, alpha by inner CV; the arrays reproduce sklearn's Ridge on the scaled x."""
    mean, scale = standardize(x)
    z = (x - mean) / scale
    alphas = inner_cv_alpha(z, y, ALPHAS, seed)
    coef = np.zeros((y.shape[1], x.shape[1]))
    intercept = np.zeros(y.shape[1])
    for j, alpha in enumerate(alphas):
        c, b = ridge_coef(z, y[:, [j]], np.asarray([alpha]))
        coef[j], intercept[j] = c[0, 0], b[0, 0]
    arrays = {"mean": mean, "scale": scale, "coef": coef, "intercept": intercept}
    return HeadModel("ridge", arrays, {"alphas": alphas.tolist()})


def fit_kernel_ridge(x: np.ndarray, y: np.ndarray, seed: int = 0) -> HeadModel:
    """RBF kernel ridge (gamma = 1 / features on standardized x) per target, alpha by inner CV, centred targets."""
    mean, scale = standardize(x)
    z = (x - mean) / scale
    gamma = 1.0 / z.shape[1]
    kernel = rbf_kernel(z, z, gamma=gamma)
    errors = np.zeros((len(ALPHAS), y.shape[1]))
    for tr, te in KFold(min(INNER_FOLDS, len(z)), shuffle=True, random_state=seed).split(z):
        ym = y[tr].mean(axis=0)
        for a, alpha in enumerate(ALPHAS):
            model = KernelRidge(alpha=alpha, kernel="precomputed").fit(kernel[np.ix_(tr, tr)], y[tr] - ym)
            errors[a] += ((model.predict(kernel[np.ix_(te, tr)]) + ym - y[te]) ** 2).sum(axis=0)
    alphas = ALPHAS[errors.argmin(axis=0)]
    ym = y.mean(axis=0)
    dual = np.stack(
        [
            KernelRidge(alpha=a, kernel="precomputed").fit(kernel, y[:, j] - ym[j]).dual_coef_
            for j, a in enumerate(alphas)
        ]
    )
    arrays = {"mean": mean, "scale": scale, "x_fit": z, "dual": dual, "intercept": ym}
    return HeadModel("kernel-ridge", arrays, {"alphas": alphas.tolist(), "gamma": gamma})


TREE_FIELDS = ("value", "feature_idx", "num_threshold", "missing_go_to_left", "left", "right", "is_leaf")


def fit_hgb(x: np.ndarray, y: np.ndarray, max_iter: int = 100, seed: int = 0) -> HeadModel:
    """sklearn HistGradientBoostingRegressor per target (no early stopping: deterministic), its trees as arrays."""
    mean, scale = standardize(x)
    z = (x - mean) / scale
    nodes, tree_start, tree_target, baseline = [], [], [], []
    offset = 0
    for j in range(y.shape[1]):
        model = HistGradientBoostingRegressor(
            max_iter=max_iter, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=5, early_stopping=False,
            random_state=seed,
        )  # fmt: skip
        model.fit(z, y[:, j])
        baseline.append(float(np.ravel(model._baseline_prediction)[0]))  # no public accessor for the trees
        for (tree,) in model._predictors:
            tree_start.append(offset)
            tree_target.append(j)
            nodes.append(tree.nodes)
            offset += len(tree.nodes)
    flat = np.concatenate(nodes)
    arrays = {"mean": mean, "scale": scale, "baseline": np.asarray(baseline)}
    arrays |= {f"node_{name}": np.asarray(flat[name]) for name in TREE_FIELDS}
    arrays |= {"tree_start": np.asarray(tree_start, np.int64), "tree_target": np.asarray(tree_target, np.int64)}
    return HeadModel("hgb", arrays, {"max_iter": max_iter})


def _predict_trees(a: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    """Sum of the saved trees' leaf values (sklearn's rule: NaN follows missing_go_to_left, else x <= threshold)."""
    out = np.tile(a["baseline"], (len(z), 1))
    rows = np.arange(len(z))
    for start, target in zip(a["tree_start"], a["tree_target"]):
        node = np.full(len(z), start, dtype=np.int64)
        while True:
            inner = ~a["node_is_leaf"][node].astype(bool)
            if not inner.any():
                break
            x = z[rows, a["node_feature_idx"][node]]
            left = np.where(
                np.isnan(x), a["node_missing_go_to_left"][node].astype(bool), x <= a["node_num_threshold"][node]
            )
            child = np.where(left, a["node_left"][node], a["node_right"][node]) + start
            node = np.where(inner, child, node)
        out[:, target] += a["node_value"][node]
    return out


def fit_head(kind: str, x: np.ndarray, y: np.ndarray, seed: int = 0, hgb_max_iter: int = 100) -> HeadModel:
    """One head of `kind` on (N, F) features and (N, k) targets in the fitted space."""
    if kind == "ridge":
        return fit_ridge(x, y, seed)
    if kind == "kernel-ridge":
        return fit_kernel_ridge(x, y, seed)
    if kind == "hgb":
        return fit_hgb(x, y, hgb_max_iter, seed)
    raise BiomassError(f"unknown --regressor {kind!r} for a frozen-feature head")
