"""Fold schemes on synthetic and (when present) real labels: coverage, group purity, determinism, the folds file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_script

from src.data import load_train, long_to_wide, read_csv_checked, validate_train
from src.errors import BiomassError
from src.folds import SCHEMES, check_fold_index, fold_table, load_folds, make_folds, save_folds
from src.schema import STATES, TARGETS, TRAIN_COLUMNS

# 40 synthetic images leave some strata with a single member; sklearn says so once per split
pytestmark = pytest.mark.filterwarnings("ignore:The least populated class in y:UserWarning")


@pytest.fixture(scope="module")
def syn_wide(synthetic_dir: Path) -> pd.DataFrame:
    return load_train(synthetic_dir)


@pytest.fixture(scope="module")
def real_wide(real_train_csv: Path) -> pd.DataFrame:
    # the images are not shipped with the label file, so no load_train (it only needs the CSV anyway)
    frame = read_csv_checked(real_train_csv, TRAIN_COLUMNS, "real label file")
    return long_to_wide(validate_train(frame, real_train_csv))


def _group(wide: pd.DataFrame, scheme: str) -> pd.Series:
    """The grouping each scheme promises, computed here independently of src.folds."""
    date = wide["Sampling_Date"]
    return {
        "group_month": date.dt.month.astype(str),
        "leave_month_out": date.dt.month.astype(str),
        "group_date_state": date.dt.date.astype(str) + "/" + wide["State"],
        "leave_state_out": wide["State"],
    }[scheme]


def _partition(folds: pd.DataFrame) -> set[frozenset]:
    """Fold assignment up to renumbering."""
    return {frozenset(part["image_id"]) for _, part in folds.groupby("fold")}


def _check_scheme(wide: pd.DataFrame, scheme: str, n_folds: int) -> pd.DataFrame:
    folds = make_folds(wide, scheme, n_folds, seed=42)
    assert list(folds.columns) == ["image_id", "fold"]
    assert list(folds["image_id"]) == list(wide["image_id"])  # every image once, in the order of wide
    assert folds["fold"].dtype.kind == "i" and folds["fold"].min() == 0
    groups = _group(wide, scheme)
    folds_per_group = folds.groupby(groups.to_numpy())["fold"].nunique()
    assert (folds_per_group == 1).all(), (
        f"{scheme}: groups in two folds: {list(folds_per_group[folds_per_group > 1].index)}"
    )
    if scheme == "leave_state_out":
        states = sorted(wide["State"].unique())
        assert folds["fold"].nunique() == len(states)
        assert list(folds["fold"]) == [states.index(s) for s in wide["State"]]  # numbered in sorted state order
    elif scheme == "leave_month_out":
        assert folds["fold"].nunique() == wide["Sampling_Date"].dt.month.nunique()
    else:
        assert sorted(folds["fold"].unique()) == list(range(n_folds))
    # same seed, same folds
    pd.testing.assert_frame_equal(folds, make_folds(wide, scheme, n_folds, seed=42))
    return folds


@pytest.mark.parametrize("scheme, n_folds", [("group_month", 3), ("group_date_state", 5), ("leave_state_out", 5),
                                             ("leave_month_out", 5)])  # fmt: skip
def test_schemes_on_synthetic(syn_wide: pd.DataFrame, scheme: str, n_folds: int):
    _check_scheme(syn_wide, scheme, n_folds)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_schemes_on_real_labels(real_wide: pd.DataFrame, scheme: str):
    folds = _check_scheme(real_wide, scheme, 5)
    assert len(folds) == 357
    if scheme == "leave_state_out":
        assert folds["fold"].nunique() == len(STATES) == 4
    if scheme == "leave_month_out":
        assert folds["fold"].nunique() == 10
    if scheme in ("group_month", "group_date_state"):
        sizes = folds["fold"].value_counts()
        assert sizes.between(0.75 * 357 / 5, 1.25 * 357 / 5).all(), sizes.to_dict()


def test_real_fold_balance_table(real_wide: pd.DataFrame):
    for scheme in ("group_month", "group_date_state"):
        table = fold_table(real_wide, make_folds(real_wide, scheme, 5, 42), scheme)
        distinct = len({frozenset(_partition(make_folds(real_wide, scheme, 5, seed))) for seed in range(10)})
        print(f"\nreal train.csv, {scheme}, 5 folds, seed 42 ({distinct} distinct partition(s) over seeds 0..9):")
        print(table.to_string(index=False))
        folds = make_folds(real_wide, scheme, 5, 42)
        for k, part in _group(real_wide, scheme).groupby(folds["fold"].to_numpy()):
            print(f"  fold {k}: {' '.join(sorted(part.unique(), key=lambda g: int(g) if g.isdigit() else g))}")
        assert table["images"].sum() == 357
        assert table["groups"].sum() == _group(real_wide, scheme).nunique()


def test_seeds_change_the_partition(syn_wide: pd.DataFrame):
    # sklearn's StratifiedGroupKFold uses the seed only to break ties between groups of equal label spread;
    # the synthetic set has many one-image groups (ties), so seeds differ here (on the real file they do not)
    partitions = [_partition(make_folds(syn_wide, "group_date_state", 5, seed)) for seed in range(5)]
    assert len({frozenset(p) for p in partitions}) > 1
    # leave-one-out schemes have one possible partition: the seed must not matter
    assert make_folds(syn_wide, "leave_state_out", seed=0).equals(make_folds(syn_wide, "leave_state_out", seed=1))


def test_too_few_groups_and_unknown_scheme(syn_wide: pd.DataFrame):
    n_months = syn_wide["Sampling_Date"].dt.month.nunique()
    with pytest.raises(BiomassError, match=f"group_month has {n_months} groups, fewer than --n-folds {n_months + 1}"):
        make_folds(syn_wide, "group_month", n_months + 1)
    with pytest.raises(BiomassError, match="unknown fold scheme 'by_colour'"):
        make_folds(syn_wide, "by_colour")


def test_fold_table_columns_and_values(syn_wide: pd.DataFrame):
    folds = make_folds(syn_wide, "group_date_state", 4, seed=3)
    table = fold_table(syn_wide, folds, "group_date_state")
    expected_cols = ["fold", "images", "groups", *TARGETS, "clover_zero", "dead_zero"]
    assert list(table.columns) == expected_cols
    assert list(table["fold"]) == [0, 1, 2, 3]
    assert table["images"].sum() == len(syn_wide) == 40
    merged = syn_wide.merge(folds, on="image_id")
    by_fold = merged.groupby("fold")
    np.testing.assert_array_equal(table["images"], by_fold.size().to_numpy())
    np.testing.assert_allclose(table[list(TARGETS)].to_numpy(), by_fold[list(TARGETS)].mean().to_numpy(), atol=0.005)
    groups = _group(merged, "group_date_state")
    np.testing.assert_array_equal(table["groups"], groups.groupby(merged["fold"]).nunique().to_numpy())
    assert table["groups"].sum() == groups.nunique()
    zero = by_fold["Dry_Clover_g"].apply(lambda x: (x <= 0).mean()).to_numpy()
    np.testing.assert_allclose(table["clover_zero"], zero, atol=5e-4)


# ---- the folds file ----
@pytest.fixture()
def folds_frame(syn_wide: pd.DataFrame) -> pd.DataFrame:
    return make_folds(syn_wide, "group_month", 3, seed=0)


def test_save_and_load_round_trip(syn_wide: pd.DataFrame, folds_frame: pd.DataFrame, tmp_path: Path):
    path = save_folds(folds_frame, tmp_path / "sub" / "folds.csv")
    assert path.read_text().splitlines()[0] == "image_id,fold"
    pd.testing.assert_frame_equal(load_folds(path, syn_wide), folds_frame)


def test_conftest_folds_file_loads(syn_wide: pd.DataFrame, folds_csv: Path):
    folds = load_folds(folds_csv, syn_wide)
    assert sorted(folds["fold"].unique()) == [0, 1, 2]


def _load_error(frame: pd.DataFrame, wide: pd.DataFrame, path: Path) -> str:
    frame.to_csv(path, index=False)
    with pytest.raises(BiomassError) as info:
        load_folds(path, wide)
    assert str(path) in str(info.value)
    return str(info.value)


def test_load_folds_missing_file(syn_wide: pd.DataFrame, tmp_path: Path):
    with pytest.raises(BiomassError, match="folds file not found; create it with `python folds.py"):
        load_folds(tmp_path / "folds.csv", syn_wide)


def test_load_folds_unknown_image(syn_wide, folds_frame, tmp_path: Path):
    extra = pd.concat([folds_frame, pd.DataFrame({"image_id": ["ID0000000007"], "fold": [1]})])
    message = _load_error(extra, syn_wide, tmp_path / "f.csv")
    assert "1 image(s) not in train.csv, first ID0000000007" in message


def test_load_folds_missing_train_image(syn_wide, folds_frame, tmp_path: Path):
    message = _load_error(folds_frame.drop(index=5), syn_wide, tmp_path / "f.csv")
    assert f"1 train image(s) have no fold, first {folds_frame['image_id'][5]}" in message


def test_load_folds_negative_fold(syn_wide, folds_frame, tmp_path: Path):
    bad = folds_frame.copy()
    bad.loc[3, "fold"] = -1
    message = _load_error(bad, syn_wide, tmp_path / "f.csv")
    assert "line 5, column fold:" in message and "-1" in message and "not a fold index >= 0" in message


def test_load_folds_duplicate_and_columns(syn_wide, folds_frame, tmp_path: Path):
    dup = pd.concat([folds_frame, folds_frame.iloc[[2]]])
    assert f"image {folds_frame['image_id'][2]} appears twice" in _load_error(dup, syn_wide, tmp_path / "d.csv")
    renamed = folds_frame.rename(columns={"fold": "k"})
    assert "expected columns image_id,fold" in _load_error(renamed, syn_wide, tmp_path / "c.csv")


def test_check_fold_index(folds_frame: pd.DataFrame):
    for k in (0, 1, 2):
        check_fold_index(folds_frame, k, "folds.csv")
    for k in (3, -1, 10):
        with pytest.raises(BiomassError, match=rf"fold {k} is not in folds.csv \(folds 0..2\)"):
            check_fold_index(folds_frame, k, "folds.csv")


def test_folds_script_writes_csv_and_prints_table(synthetic_dir: Path, syn_wide: pd.DataFrame, tmp_path: Path):
    out = tmp_path / "out" / "folds.csv"
    proc = run_script("folds.py", "--data-dir", str(synthetic_dir), "--out", str(out), "--n-folds", "3", "--seed", "5")
    written = load_folds(out, syn_wide)
    pd.testing.assert_frame_equal(written, make_folds(syn_wide, "group_month", 3, seed=5))
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["fold", "images", "groups", *TARGETS, "clover_zero", "dead_zero"]
    assert [int(line.split()[1]) for line in lines[1:4]] == list(written["fold"].value_counts().sort_index())
    assert lines[-1] == f"wrote {out}: 40 images in 3 folds (group_month)"
    assert not list(out.parent.glob(".*.tmp"))
