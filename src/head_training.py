"""`train.py --regressor ridge|kernel-ridge|hgb --features backbone|colour|both`: frozen-feature heads per fold.

The features of every image are computed once (`src.embeddings`, cached), then each fold's head is fitted on
that fold's training images (`folds.split_fold`: the networks' folds and `--drop-ids`) and scored on its held-out
ones. A fold directory gets what a network's gets, so `report.py`, `report.py --compare`, `src.blend` and
`infer.py` treat a head experiment like any other: config.yaml, git.txt, command.txt, train.log, oof.csv,
metrics.csv (one row, epoch 1, stage `head`), and the head itself as head.npz + head.json (no best.pt).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from src.checkpoint import prepare_run_dir, run_dir_for, split_record, target_stats, write_run_files
from src.config import Config
from src.embeddings import embedding_key, image_features
from src.folds import load_fold_table, split_fold
from src.heads import FITTED, fit_head, save_head, to_fit_space
from src.io_utils import write_csv_atomic
from src.logs import get_logger, log_file
from src.metric import score
from src.schema import TARGETS

log = get_logger(__name__)


def oof_frame(frame: pd.DataFrame, preds: np.ndarray, fold: int) -> pd.DataFrame:
    """Held-out predictions in grams in the layout of a network fold's oof.csv (truth beside them)."""
    out = pd.DataFrame({"image_id": frame["image_id"].to_numpy(), "fold": int(fold)})
    for j, name in enumerate(TARGETS):
        out[name] = preds[:, j]
    for name in TARGETS:
        out[f"true_{name}"] = frame[name].to_numpy()
    return out


def train_head_fold(cfg: Config, table: pd.DataFrame, features: np.ndarray, names: list[str], fold: int, **run) -> dict:
    """Fit one fold's head on its training images' features and write its run directory; returns its metrics row."""
    split = split_fold(table, fold, cfg.data)
    run_dir = run_dir_for(cfg, fold, run.get("seed_dir", False))
    prepare_run_dir(run_dir, run.get("resume", False), run.get("overwrite", False))
    write_run_files(run_dir, cfg, run.get("command", ""))
    index = pd.Index(table["image_id"])
    train_rows, val_rows = index.get_indexer(split.train["image_id"]), index.get_indexer(split.val["image_id"])
    layout, space = cfg.model.heads, cfg.model.target_space
    with log_file(run_dir / "train.log"):
        start = time.time()
        y = to_fit_space(split.train[list(TARGETS)].to_numpy(np.float64), layout, space)
        head = fit_head(cfg.head.regressor, features[train_rows], y, cfg.train.seed, cfg.head.hgb_max_iter)
        head.arrays |= {"low": y.min(axis=0), "high": y.max(axis=0)}
        head.meta |= {
            "layout": layout,
            "space": space,
            "fitted": [TARGETS[j] for j in FITTED[layout]],
            "features": cfg.head.features,
            "feature_names": names,
            "embedding_key": embedding_key(cfg) if cfg.head.features != "colour" else None,
            "fold": int(fold),
            "seed": int(cfg.train.seed),
            "split": split_record(split.train, split.val),
            "target_stats": target_stats(split.train),
        }
        preds = head.predict_grams(features[val_rows])
        scores = score(split.val[list(TARGETS)].to_numpy(np.float64), preds)
        head.meta["val_metric"] = float(scores["weighted_r2"])
        save_head(head, run_dir)
        write_csv_atomic(oof_frame(split.val, preds, fold), run_dir / "oof.csv")
        row = {"epoch": 1, "stage": "head", "train_loss": float("nan"), **scores, "seconds": time.time() - start}
        write_csv_atomic(pd.DataFrame([row]), run_dir / "metrics.csv")
        log.info(
            f"fold {fold}: {cfg.head.regressor} on {cfg.head.features} features ({features.shape[1]}), "
            f"{len(split.train)} train / {len(split.val)} val images: val weighted R2 {scores['weighted_r2']:.4f} "
            f"-> {run_dir}"
        )
    return row


def train_heads(cfg: Config, folds: list[int], seeds: list[int | None], **run) -> list[dict]:
    """Every (seed, fold) head of one experiment on features computed once for all of them."""
    table = load_fold_table(cfg.data)
    features, names = image_features(table, cfg)
    rows = []
    for seed in seeds:
        if seed is not None:
            cfg.train.seed = seed
        for fold in folds:
            rows.append(train_head_fold(cfg, table, features, names, fold, **run, seed_dir=seed is not None))
    return rows


def is_head_run(run_dir: Path) -> bool:
    """A run directory written by a frozen-feature head (head.json), not by the network (best.pt)."""
    return (Path(run_dir) / "head.json").is_file()
