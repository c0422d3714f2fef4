"""submission.csv: row order, the guard that refuses what Kaggle would reject, and the atomic write."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.data import load_sample_submission, load_test
from src.errors import BiomassError
from src.postprocess import project_physics
from src.schema import TARGETS
from src.submission import build_submission, guard, write_submission


@pytest.fixture(scope="module")
def test_data(synthetic_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(test.csv long frame, its unique images, sample_submission.csv)."""
    return pd.read_csv(synthetic_dir / "test.csv"), load_test(synthetic_dir), load_sample_submission(synthetic_dir)


@pytest.fixture()
def preds(test_data) -> np.ndarray:
    """Physically consistent predictions, one row per test image, distinct values everywhere."""
    _, images, _ = test_data
    rng = np.random.default_rng(0)
    return project_physics(rng.uniform(1, 60, (len(images), 5)))


@pytest.fixture()
def sub(test_data, preds) -> pd.DataFrame:
    test_long, images, sample = test_data
    return build_submission(images["image_id"], preds, test_long, sample)


def test_build_submission_follows_sample_order(test_data, preds):
    test_long, images, sample = test_data
    shuffled = sample.sample(frac=1.0, random_state=1).reset_index(drop=True)
    assert list(shuffled["sample_id"]) != list(sample["sample_id"])
    sub = build_submission(images["image_id"], preds, test_long, shuffled)
    assert list(sub.columns) == ["sample_id", "target"]
    assert list(sub["sample_id"]) == list(shuffled["sample_id"])
    # each row carries the prediction of its own image and target
    row_of = {image: i for i, image in enumerate(images["image_id"])}
    for sample_id, value in zip(sub["sample_id"], sub["target"], strict=True):
        image, target = sample_id.split("__")
        assert value == preds[row_of[image], TARGETS.index(target)]
    # without sample_submission.csv the order of test.csv is used
    no_sample = build_submission(images["image_id"], preds, test_long, None)
    assert list(no_sample["sample_id"]) == list(test_long["sample_id"])


def test_build_submission_missing_image_raises(test_data, preds):
    test_long, images, sample = test_data
    with pytest.raises(BiomassError, match=rf"no prediction for sample_id {images['image_id'][5]}__\w+ \(5 in all\)"):
        build_submission(images["image_id"][:5], preds[:5], test_long, sample)


def test_guard_accepts_a_good_submission(sub, test_data):
    test_long, _, sample = test_data
    guard(sub, test_long, sample, physics=True)
    guard(sub, test_long)


def _refused(sub: pd.DataFrame, test_long: pd.DataFrame, pattern: str, **kwargs) -> None:
    with pytest.raises(BiomassError, match=pattern):
        guard(sub, test_long, **kwargs)


def test_guard_missing_id(sub, test_data):
    _refused(sub.drop(index=7).reset_index(drop=True), test_data[0], rf"1 missing, e.g. \['{sub['sample_id'][7]}'\]")


def test_guard_extra_id(sub, test_data):
    extra = pd.concat([sub, pd.DataFrame({"sample_id": ["ID0000000001__GDM_g"], "target": [1.0]})], ignore_index=True)
    _refused(extra, test_data[0], r"1 extra, e.g. \['ID0000000001__GDM_g'\]")


def test_guard_duplicate_id(sub, test_data):
    dup = pd.concat([sub, sub.iloc[[3]]], ignore_index=True)
    _refused(dup, test_data[0], f"repeats sample_id {sub['sample_id'][3]}")
    # a duplicate that replaces a row keeps the length right; still refused
    swapped = sub.copy()
    swapped.loc[4, "sample_id"] = sub["sample_id"][3]
    _refused(swapped, test_data[0], f"repeats sample_id {sub['sample_id'][3]}")


@pytest.mark.parametrize("value, what", [(np.nan, "non-finite"), (np.inf, "non-finite"), (-0.5, "negative")])
def test_guard_bad_values(sub, test_data, value, what):
    bad = sub.copy()
    bad.loc[11, "target"] = value
    _refused(bad, test_data[0], f"{what} target at sample_id {sub['sample_id'][11]}")


def test_guard_wrong_columns(sub, test_data):
    _refused(sub.rename(columns={"target": "prediction"}), test_data[0], "expected sample_id,target")
    _refused(sub[["target", "sample_id"]], test_data[0], "expected sample_id,target")
    _refused(sub.assign(fold=0), test_data[0], "expected sample_id,target")


def test_guard_physics_identity(sub, test_data):
    test_long, _, sample = test_data
    broken = sub.copy()
    i = int(np.flatnonzero(broken["sample_id"].str.endswith("__Dry_Total_g"))[2])
    broken.loc[i, "target"] += 0.5
    image = broken["sample_id"][i].split("__")[0]
    guard(broken, test_long, sample)  # identities are only checked when asked
    _refused(broken, test_long, rf"image {image} breaks GDM/Total identities by 0.500 g", sample=sample, physics=True)
    within = sub.copy()
    within.loc[i, "target"] += 0.005  # inside the 0.01 g tolerance of the labels themselves
    guard(within, test_long, sample, physics=True)


def test_guard_sample_submission_mismatch(sub, test_data):
    test_long, _, sample = test_data
    _refused(sub, test_long, "sample_submission.csv ids differ from test.csv", sample=sample.iloc[:-1])


# ---- atomic write ----
def test_write_submission_writes_csv(sub, tmp_path: Path):
    path = write_submission(sub, tmp_path / "out" / "submission.csv")
    assert path.read_text().splitlines()[0] == "sample_id,target"
    pd.testing.assert_frame_equal(pd.read_csv(path), sub)
    assert sorted(p.name for p in path.parent.iterdir()) == ["submission.csv"]


def test_write_submission_is_atomic(sub, tmp_path: Path, monkeypatch):
    path = tmp_path / "submission.csv"
    path.write_text("sample_id,target\nprevious,1.0\n")
    before = path.read_bytes()

    def failing_to_csv(self, target, *args, **kwargs):
        # write a few bytes, then fail as a full disk would
        with open(target, "w") as fh:
            fh.write("sample_id,tar")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    with pytest.raises(BiomassError, match=r"submission.csv: write failed \(No space left on device\); the previous"):
        write_submission(sub, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]  # no temp file left behind
    monkeypatch.undo()
    write_submission(sub, path)  # and the next write goes through
    assert pd.read_csv(path).equals(sub)
