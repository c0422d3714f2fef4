"""`python -m src.baseline`: out-of-fold score of the train-mean predictor, the floor every model must beat."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from src.data import load_train
from src.errors import run_cli
from src.folds import load_folds
from src.metric import score
from src.schema import TARGETS


def mean_baseline_oof(wide: pd.DataFrame, folds: pd.DataFrame) -> np.ndarray:
    """Each held-out image gets the per-target mean of its fold's training images: (N, 5) in wide order."""
    merged = wide[["image_id", *TARGETS]].merge(folds, on="image_id")
    oof = np.zeros((len(merged), len(TARGETS)))
    for fold in merged["fold"].unique():
        held = (merged["fold"] == fold).to_numpy()
        oof[held] = merged.loc[~held, list(TARGETS)].mean().to_numpy()
    order = pd.Index(merged["image_id"]).get_indexer(wide["image_id"])
    return oof[order]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="data/synthetic")
    parser.add_argument("--folds", default="data/folds.csv")
    args = parser.parse_args(argv)
    wide = load_train(args.data_dir)
    scores = score(wide[list(TARGETS)].to_numpy(), mean_baseline_oof(wide, load_folds(args.folds, wide)))
    print("train-mean baseline OOF: " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
