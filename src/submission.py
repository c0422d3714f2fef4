"""submission.csv: long format, the guard that must pass before anything is written, atomic write."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from src.data import wide_to_long
from src.errors import BiomassError
from src.io_utils import write_csv_atomic
from src.postprocess import physics_gap
from src.schema import TARGETS


def build_submission(
    image_ids, preds: np.ndarray, test_long: pd.DataFrame, sample: pd.DataFrame | None
) -> pd.DataFrame:
    """Wide predictions -> `sample_id,target` for every test row, in sample_submission order if given."""
    long = wide_to_long(image_ids, preds).set_index("sample_id")
    order = sample["sample_id"] if sample is not None else test_long["sample_id"]
    missing = [s for s in order if s not in long.index]
    if missing:
        raise BiomassError(
            f"no prediction for sample_id {missing[0]} ({len(missing)} in all); was every test image predicted?"
        )
    return pd.DataFrame({"sample_id": list(order), "target": long.loc[list(order), "target"].to_numpy()})


def guard(
    sub: pd.DataFrame,
    test_long: pd.DataFrame,
    sample: pd.DataFrame | None = None,
    physics: bool = False,
    tolerance: float = 0.01,
) -> None:
    """Refuse a submission Kaggle would reject or score as garbage; says why in one line."""
    if list(sub.columns) != ["sample_id", "target"]:
        raise BiomassError(f"submission columns are {list(sub.columns)}; expected sample_id,target")
    ids, expected = set(sub["sample_id"]), set(test_long["sample_id"])
    if sub["sample_id"].duplicated().any():
        raise BiomassError(f"submission repeats sample_id {sub['sample_id'][sub['sample_id'].duplicated()].iloc[0]}")
    if ids != expected:
        extra, lacking = sorted(ids - expected), sorted(expected - ids)
        raise BiomassError(
            f"submission ids differ from test.csv ({len(lacking)} missing, e.g. {lacking[:1]}; {len(extra)} "
            f"extra, e.g. {extra[:1]})"
        )
    if sample is not None:
        if set(sample["sample_id"]) != expected:
            raise BiomassError("sample_submission.csv ids differ from test.csv; re-download the competition files")
    per_image = sub["sample_id"].str.rsplit("__", n=1).str[0].value_counts()
    if (per_image != 5).any():
        raise BiomassError(
            f"image {per_image[per_image != 5].index[0]} has {per_image[per_image != 5].iloc[0]} rows; expected 5"
        )
    values = sub["target"].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise BiomassError(
            f"submission has a non-finite target at sample_id {sub['sample_id'][~np.isfinite(values)].iloc[0]}"
        )
    if np.any(values < 0):
        raise BiomassError(f"submission has a negative target at sample_id {sub['sample_id'][values < 0].iloc[0]}")
    if physics:
        wide = sub.assign(
            image=sub["sample_id"].str.rsplit("__", n=1).str[0], name=sub["sample_id"].str.rsplit("__", n=1).str[1]
        ).pivot(index="image", columns="name", values="target")
        gap = physics_gap(wide[list(TARGETS)].to_numpy())
        if np.any(gap > tolerance):
            raise BiomassError(f"image {wide.index[np.argmax(gap)]} breaks GDM/Total identities by {gap.max():.3f} g")


def write_submission(sub: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Atomic: the previous submission.csv survives any failure."""
    return write_csv_atomic(sub, path)
