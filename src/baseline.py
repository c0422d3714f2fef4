"""`python -m src.baseline [--colour]`: out-of-fold scores of the peers every model must beat, on the same folds.

- train mean: each held-out image gets its training fold's per-target means (the metric's floor);
- colour ridge (`--colour`): ridge regression of log1p grams on `src.colour.colour_features` of each image
  (green and straw pixel fractions, channel means, hue histogram; per view and whole image), fitted per fold on
  the training images only (the ridge penalty by its own leave-one-out CV inside them), predictions clamped to
  the training fold's log1p range, then expm1'd. A network trained on these images should learn at least what
  the colour fractions tell.

`--out DIR` writes `DIR/baselines.csv` (per fold and pooled weighted R²) and `DIR/oof_<name>.csv` (held-out
predictions, the layout of a fold's oof.csv), which `python -m src.docs demo` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from src.colour import colour_table
from src.data import load_train
from src.errors import run_cli
from src.folds import load_folds
from src.io_utils import write_csv_atomic
from src.logs import get_logger
from src.metric import score
from src.schema import TARGETS

log = get_logger(__name__)
RIDGE_ALPHAS = np.logspace(-2, 4, 13)


def mean_baseline_oof(wide: pd.DataFrame, folds: pd.DataFrame) -> np.ndarray:
    """Each held-out image gets the per-target mean of its fold's training images: (N, 5) in wide order."""
    merged = wide[["image_id", *TARGETS]].merge(folds, on="image_id")
    oof = np.zeros((len(merged), len(TARGETS)))
    for fold in merged["fold"].unique():
        held = (merged["fold"] == fold).to_numpy()
        oof[held] = merged.loc[~held, list(TARGETS)].mean().to_numpy()
    order = pd.Index(merged["image_id"]).get_indexer(wide["image_id"])
    return oof[order]


def colour_ridge_oof(wide: pd.DataFrame, folds: pd.DataFrame, features: np.ndarray | None = None) -> np.ndarray:
    """Held-out predictions (N, 5) of a ridge on log1p targets, one fit per fold on its training images only."""
    features = colour_table(wide) if features is None else features
    fold_of = wide[["image_id"]].merge(folds, on="image_id", how="left")["fold"].to_numpy()
    y = np.log1p(wide[list(TARGETS)].to_numpy(dtype=np.float64))
    oof = np.zeros_like(y)
    for fold in np.unique(fold_of):
        held = fold_of == fold
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
        model.fit(features[~held], y[~held])
        # a linear model extrapolates without bound and expm1 makes that explode: clamp to the training range
        low, high = y[~held].min(axis=0), y[~held].max(axis=0)
        oof[held] = np.expm1(np.clip(model.predict(features[held]), low, high))
    return oof


def oof_frame(wide: pd.DataFrame, folds: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    """Held-out predictions in the layout of a fold's oof.csv (image_id, fold, predictions, true_ columns)."""
    out = wide[["image_id"]].merge(folds, on="image_id", how="left")[["image_id", "fold"]]
    for j, name in enumerate(TARGETS):
        out[name] = pred[:, j]
    for name in TARGETS:
        out[f"true_{name}"] = wide[name].to_numpy()
    return out


def fold_scores(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Weighted R² of each fold's held-out images and of all of them pooled."""
    rows = []
    parts = [(str(int(k)), part) for k, part in frame.groupby("fold", sort=True)] + [("pooled", frame)]
    for fold, part in parts:
        truth = part[[f"true_{t}" for t in TARGETS]].to_numpy(np.float64)
        pred = part[list(TARGETS)].to_numpy(np.float64)
        rows.append({"baseline": name, "fold": fold, "images": len(part), **score(truth, pred)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/synthetic")
    parser.add_argument("--folds", default="data/folds.csv")
    parser.add_argument("--colour", action="store_true", help="also the colour-feature ridge, fitted per fold")
    parser.add_argument("--out", default=None, help="directory for baselines.csv and oof_<name>.csv")
    args = parser.parse_args(argv)
    wide = load_train(args.data_dir)
    folds = load_folds(args.folds, wide)
    frames = {"train_mean": oof_frame(wide, folds, mean_baseline_oof(wide, folds))}
    if args.colour:
        frames["colour_ridge"] = oof_frame(wide, folds, colour_ridge_oof(wide, folds))
    table = pd.concat([fold_scores(frame, name) for name, frame in frames.items()], ignore_index=True)
    for name in frames:
        part = table[table["baseline"] == name].set_index("fold")
        per_fold = " ".join(f"{k}={v:.4f}" for k, v in part["weighted_r2"].items() if k != "pooled")
        label = {"train_mean": "train-mean baseline", "colour_ridge": "colour-ridge baseline"}[name]
        print(f"{label} OOF: weighted_r2={part.loc['pooled', 'weighted_r2']:.4f} (per fold {per_fold})")
    if args.out is not None:
        out = Path(args.out)
        write_csv_atomic(table, out / "baselines.csv")
        for name, frame in frames.items():
            write_csv_atomic(frame, out / f"oof_{name}.csv")
        print(f"wrote {out / 'baselines.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
