"""Fold schemes: month-grouped StratifiedGroupKFold by default, harsher ones for stress tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from src.config import DataConfig
from src.data import load_id_list, load_train
from src.errors import BiomassError
from src.io_utils import write_csv_atomic
from src.schema import TARGETS

SCHEMES = ("group_month", "group_date_state", "leave_state_out", "leave_month_out")


def strat_label(wide: pd.DataFrame, n_bins: int = 4) -> np.ndarray:
    """Composite stratum: quantile bin of Total x whether Clover is zero (the two things folds must share)."""
    total = wide["Dry_Total_g"].to_numpy()
    edges = np.quantile(total, np.linspace(0, 1, n_bins + 1)[1:-1])
    total_bin = np.digitize(total, edges)
    clover_zero = (wide["Dry_Clover_g"].to_numpy() <= 0).astype(int)
    return total_bin * 2 + clover_zero


def groups_for(wide: pd.DataFrame, scheme: str) -> np.ndarray:
    """The group label of each image under a scheme (images of one group never straddle folds)."""
    if scheme in ("group_month", "leave_month_out"):
        return wide["Sampling_Date"].dt.strftime("%Y-%m").to_numpy()
    if scheme == "group_date_state":
        return (wide["Sampling_Date"].dt.strftime("%Y-%m-%d") + "_" + wide["State"].astype(str)).to_numpy()
    if scheme == "leave_state_out":
        return wide["State"].astype(str).to_numpy()
    raise BiomassError(f"unknown fold scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def make_folds(wide: pd.DataFrame, scheme: str = "group_month", n_folds: int = 5, seed: int = 42) -> pd.DataFrame:
    """Assign every image one fold; returns `image_id,fold` in the order of `wide`."""
    groups = groups_for(wide, scheme)
    if scheme in ("leave_state_out", "leave_month_out"):
        # one fold per group, numbered in sorted group order so the mapping is stable
        names = sorted(set(groups))
        fold = np.array([names.index(g) for g in groups])
    else:
        n_groups = len(set(groups))
        if n_groups < n_folds:
            raise BiomassError(
                f"scheme {scheme} has {n_groups} groups, fewer than --n-folds {n_folds}; lower --n-folds"
            )
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        fold = np.full(len(wide), -1)
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(wide)), strat_label(wide), groups)):
            fold[val_idx] = k
    return pd.DataFrame({"image_id": wide["image_id"].to_numpy(), "fold": fold.astype(int)})


def fold_table(wide: pd.DataFrame, folds: pd.DataFrame, scheme: str = "group_month") -> pd.DataFrame:
    """Per-fold balance: images, groups, mean of each target, share of zero Clover / Dead."""
    merged = wide.merge(folds, on="image_id")
    merged["group"] = groups_for(merged, scheme)
    rows = []
    for k, part in merged.groupby("fold"):
        row = {"fold": int(k), "images": len(part), "groups": part["group"].nunique()}
        row.update({t: round(float(part[t].mean()), 2) for t in TARGETS})
        row["clover_zero"] = round(float((part["Dry_Clover_g"] <= 0).mean()), 3)
        row["dead_zero"] = round(float((part["Dry_Dead_g"] <= 0).mean()), 3)
        rows.append(row)
    return pd.DataFrame(rows)


def save_folds(folds: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write `image_id,fold` atomically."""
    return write_csv_atomic(folds, path)


def load_folds(path: str | os.PathLike, wide: pd.DataFrame) -> pd.DataFrame:
    """Read a folds CSV and check it covers exactly the images of train.csv."""
    path = Path(path)
    if not path.is_file():
        raise BiomassError(
            f"{path}: folds file not found; create it with `python folds.py --data-dir DIR --out {path}`"
        )
    try:
        folds = pd.read_csv(path, dtype={"image_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise BiomassError(
            f"{path}: not a readable CSV ({str(err).splitlines()[0]}); regenerate it with folds.py"
        ) from err
    if list(folds.columns) != ["image_id", "fold"]:
        raise BiomassError(f"{path}: expected columns image_id,fold, got {','.join(map(str, folds.columns))}")
    fold_values = pd.to_numeric(folds["fold"], errors="coerce")
    bad = fold_values.isna() | (fold_values < 0) | (fold_values % 1 != 0)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise BiomassError(f"{path} line {i + 2}, column fold: '{folds['fold'].iloc[i]}' is not a fold index >= 0")
    folds["fold"] = fold_values.astype(int)
    n_folds = folds["fold"].nunique()
    out_of_range = folds["fold"] >= n_folds  # folds must be 0..K-1: a gap means a typo (11 for 1) or a lost fold
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range.to_numpy())[0])
        raise BiomassError(
            f"{path} line {i + 2}, column fold: {folds['fold'].iloc[i]} is out of range: {n_folds} distinct "
            "folds must be "
            f"numbered 0..{n_folds - 1}; fix the value or regenerate with folds.py"
        )
    dup = folds["image_id"].duplicated()
    if dup.any():
        raise BiomassError(f"{path}: image {folds['image_id'][dup].iloc[0]} appears twice; regenerate with folds.py")
    unknown = sorted(set(folds["image_id"]) - set(wide["image_id"]))
    if unknown:
        raise BiomassError(
            f"{path}: {len(unknown)} image(s) not in train.csv, first {unknown[0]}; regenerate with folds.py"
        )
    missing = sorted(set(wide["image_id"]) - set(folds["image_id"]))
    if missing:
        raise BiomassError(
            f"{path}: {len(missing)} train image(s) have no fold, first {missing[0]}; regenerate with folds.py"
        )
    return folds


def check_fold_index(folds: pd.DataFrame, fold: int, path: str | os.PathLike) -> None:
    """A requested fold must exist in the folds file."""
    available = sorted(folds["fold"].unique())
    if fold not in available:
        raise BiomassError(
            f"fold {fold} is not in {path} (folds {available[0]}..{available[-1]}); pass --fold in that range"
        )


# ---- the one fold split of training, sweeps and train.py ----------------------------------------------------------
@dataclass
class FoldSplit:
    """The training and validation images of one fold, and what `--drop-ids` left out (a line for the log)."""

    fold: int
    train: pd.DataFrame
    val: pd.DataFrame
    note: str = ""


def load_fold_table(data_cfg: DataConfig, check_images: bool = True) -> pd.DataFrame:
    """train.csv as a wide frame with each image's fold from the folds file (both validated)."""
    wide = load_train(data_cfg.data_dir, check_images=check_images)
    return wide.merge(load_folds(data_cfg.folds, wide), on="image_id")


def fold_numbers(table: pd.DataFrame) -> list[int]:
    """The folds of a fold table, ascending (what `--fold all` trains)."""
    return [int(k) for k in sorted(table["fold"].unique())]


def split_fold(table: pd.DataFrame, fold: int, data_cfg: DataConfig) -> FoldSplit:
    """Fold `fold` of a fold table: its images validate, the others train (less `--drop-ids`)."""
    check_fold_index(table, fold, data_cfg.folds)
    train = table[table["fold"] != fold].reset_index(drop=True)
    val = table[table["fold"] == fold].reset_index(drop=True)
    train, note = drop_training_ids(train, val, data_cfg.drop_ids, table["image_id"])
    return FoldSplit(int(fold), train, val, note)


def drop_training_ids(
    train_frame: pd.DataFrame, val_frame: pd.DataFrame, path: str | None, known_ids
) -> tuple[pd.DataFrame, str]:
    """`--drop-ids FILE`: the listed images leave the training set; validation keeps and scores them (see the note)."""
    if not path:
        return train_frame, ""
    drop = set(load_id_list(path, known_ids))
    kept = train_frame[~train_frame["image_id"].isin(drop)].reset_index(drop=True)
    in_val = int(val_frame["image_id"].isin(drop).sum())
    note = f"--drop-ids {path}: {len(train_frame) - len(kept)} of {len(train_frame)} training images left out"
    if in_val:
        note += f"; {in_val} listed image(s) are in this fold's validation set and are still scored"
    if kept.empty:
        raise BiomassError(f"--drop-ids {path}: drops every training image of this fold; list fewer ids")
    return kept, note
