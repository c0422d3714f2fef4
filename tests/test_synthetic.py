"""Synthetic data: competition layout, label identities and statistics, determinism, pixels that carry labels."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from src import synthetic
from src.errors import BiomassError, run_cli
from src.schema import SPECIES_TO_GROUP, TARGETS, TEST_COLUMNS, TRAIN_COLUMNS

REAL_TRAIN = Path(__file__).parents[1].parent / "shared/data/csiro/train.csv"
SIZE = (400, 200)
CSVS = ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv", "stamps.csv")


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("syn") / "a", 14, 4, seed=7, size=SIZE, workers=1)


def _wide(long: pd.DataFrame) -> pd.DataFrame:
    return long.pivot(index="image_path", columns="target_name", values="target")


def _orange(img_rgb: np.ndarray) -> np.ndarray:
    r, g, b = (img_rgb[..., i].astype(int) for i in range(3))
    return (r > 170) & (r - g > 70) & (r - b > 140)


def test_layout_and_columns(data: Path):
    train, test = pd.read_csv(data / "train.csv"), pd.read_csv(data / "test.csv")
    sub, labels = pd.read_csv(data / "sample_submission.csv"), pd.read_csv(data / "test_labels.csv")
    assert tuple(train.columns) == TRAIN_COLUMNS and tuple(labels.columns) == TRAIN_COLUMNS
    assert tuple(test.columns) == TEST_COLUMNS and list(sub.columns) == ["sample_id", "target"]
    assert list(pd.read_csv(data / "stamps.csv").columns) == ["image_path", "x0", "y0", "x1", "y1"]
    assert (sub["target"] == 0.0).all()
    assert list(test["sample_id"]) == list(sub["sample_id"]) == list(labels["sample_id"])
    for split, frame, n in (("train", train, 14), ("test", labels, 4)):
        assert len(frame) == 5 * n and frame.groupby("image_path").size().eq(5).all()
        assert frame.groupby("image_path")["target_name"].apply(set).map(lambda s: s == set(TARGETS)).all()
        image_id = frame["image_path"].str.extract(rf"^{split}/(ID\d{{10}})\.jpg$")[0]
        assert image_id.notna().all()
        assert (frame["sample_id"] == image_id + "__" + frame["target_name"]).all()
        assert sorted(p.name for p in (data / split).iterdir()) == sorted(f"{i}.jpg" for i in image_id.unique())
    assert train["Sampling_Date"].map(lambda d: bool(re.fullmatch(r"2015/[1-9]\d?/[1-9]\d?", d))).all()
    assert not set(train["image_path"].str[6:]) & set(labels["image_path"].str[5:])  # ids unique across splits
    assert set(train["Species"]) <= set(SPECIES_TO_GROUP)


def test_identities_and_ranges(data: Path):
    for name in ("train.csv", "test_labels.csv"):
        long = pd.read_csv(data / name)
        w = _wide(long)
        assert (long["target"] >= 0).all()
        assert np.allclose(w["GDM_g"], w["Dry_Green_g"] + w["Dry_Clover_g"], atol=0.01)
        assert np.allclose(w["Dry_Total_g"], w["Dry_Green_g"] + w["Dry_Dead_g"] + w["Dry_Clover_g"], atol=0.01)
        assert long["Pre_GSHH_NDVI"].between(0, 1).all() and (long["Height_Ave_cm"] > 0).all()


def test_image_size(data: Path):
    for path in [*(data / "train").glob("*.jpg"), *(data / "test").glob("*.jpg")]:
        assert cv2.imread(str(path)).shape == (SIZE[1], SIZE[0], 3)


def test_deterministic_across_workers_and_seed_sensitive(data: Path, tmp_path: Path):
    again = synthetic.generate(tmp_path / "b", 14, 4, seed=7, size=SIZE, workers=2)
    other = synthetic.generate(tmp_path / "c", 14, 4, seed=8, size=SIZE, workers=1)
    for name in CSVS:
        assert (data / name).read_bytes() == (again / name).read_bytes(), name
    assert (data / "train.csv").read_bytes() != (other / "train.csv").read_bytes()
    for path in (data / "train").glob("*.jpg"):
        assert np.array_equal(cv2.imread(str(path)), cv2.imread(str(again / "train" / path.name)))
    row = synthetic.sample_labels(1, np.random.default_rng(0)).iloc[0]
    a, _ = synthetic.render_image(row, np.random.default_rng(1), SIZE)
    b, _ = synthetic.render_image(row, np.random.default_rng(1), SIZE)
    c, _ = synthetic.render_image(row, np.random.default_rng(2), SIZE)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_stamps_inside_image_and_orange(data: Path):
    stamps = pd.read_csv(data / "stamps.csv")
    assert len(stamps) > 0  # seed 7 paints some; P(none of 18) < 1%
    for s in stamps.itertuples():
        assert 0 <= s.x0 < s.x1 <= SIZE[0] and 0 <= s.y0 < s.y1 <= SIZE[1]
        assert s.x0 > SIZE[0] / 2 and s.y0 > SIZE[1] / 2  # bottom-right corner
        img = cv2.cvtColor(cv2.imread(str(data / s.image_path)), cv2.COLOR_BGR2RGB)
        inside = _orange(img[s.y0 : s.y1, s.x0 : s.x1]).mean()
        outside = _orange(img).sum() - _orange(img[s.y0 : s.y1, s.x0 : s.x1]).sum()
        assert inside > 0.05 and outside / img[..., 0].size < 0.01


def test_label_statistics():
    w = synthetic.sample_labels(2000, np.random.default_rng(0))
    assert list(w.columns) == list(synthetic.WIDE_COLUMNS) and w["image_id"].is_unique
    assert 0.30 <= (w["Dry_Clover_g"] == 0).mean() <= 0.46
    assert 0.06 <= (w["Dry_Dead_g"] == 0).mean() <= 0.17
    assert 38 <= w["Dry_Total_g"].mean() <= 53
    assert w["Dry_Total_g"].corr(w["Height_Ave_cm"]) > 0.3 and w["Dry_Total_g"].corr(w["Pre_GSHH_NDVI"]) > 0.2
    clover_species = w["Species"].map(SPECIES_TO_GROUP).str.contains("clover")
    assert (w.loc[~clover_species, "Dry_Clover_g"] == 0).mean() > (w.loc[clover_species, "Dry_Clover_g"] == 0).mean()
    assert set(w["Species"]) == set(SPECIES_TO_GROUP)
    exact = synthetic.sample_labels(357, np.random.default_rng(3))["State"].value_counts().to_dict()
    assert exact == {"Tas": 138, "Vic": 112, "NSW": 75, "WA": 32}


def test_green_pixels_follow_green_mass():
    w = synthetic.sample_labels(40, np.random.default_rng(11))
    fractions = []
    for i, row in enumerate(w.to_dict("records")):
        img, _ = synthetic.render_image(row, np.random.default_rng([11, i]), (200, 100))
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        fractions.append(((hsv[..., 0] >= 30) & (hsv[..., 0] <= 55) & (hsv[..., 1] > 60)).mean())
    assert pd.Series(fractions).corr(w["Dry_Green_g"], method="spearman") > 0.5


def test_shift_changes_only_test_images(data: Path, tmp_path: Path):
    shifted = synthetic.generate(tmp_path / "s", 14, 4, seed=7, size=SIZE, shift="soil", workers=1)
    assert (shifted / "train.csv").read_bytes() == (data / "train.csv").read_bytes()
    assert (shifted / "test_labels.csv").read_bytes() == (data / "test_labels.csv").read_bytes()
    for split, same in (("train", True), ("test", False)):
        for path in (data / split).glob("*.jpg"):
            assert (path.read_bytes() == (shifted / split / path.name).read_bytes()) == same
    with pytest.raises(BiomassError, match="unknown"):
        synthetic.generate(tmp_path / "x", 2, 1, size=SIZE, shift="weather")


def test_cli_guards_and_stats(data: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert run_cli(synthetic.main, ["--out", str(out), "--n-train", "2", "--n-test", "1", "--size", "128x64"]) == 0
    assert cv2.imread(str(next((out / "test").glob("*.jpg")))).shape == (64, 128, 3)
    assert run_cli(synthetic.main, ["--out", str(out), "--n-train", "2"]) == 1  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(synthetic.main, ["stats", "--synthetic", str(data / "train.csv")]) == 0
    printed = capsys.readouterr().out
    assert "not given" in printed and "| corr(Total, height) |" in printed
    missing_real = ["stats", "--synthetic", str(data / "train.csv"), "--real", str(tmp_path / "no.csv")]
    assert run_cli(synthetic.main, missing_real) == 1


@pytest.mark.skipif(not REAL_TRAIN.is_file(), reason="real train.csv not available")
def test_marginals_match_real_file():
    real = pd.read_csv(REAL_TRAIN)
    meta = ["State", "Species", "Sampling_Date", "Height_Ave_cm", "Pre_GSHH_NDVI"]
    rw = _wide(real).join(real.groupby("image_path")[meta].first())
    sw = synthetic.sample_labels(5000, np.random.default_rng(0))
    for t in TARGETS:
        assert abs(sw[t].mean() - rw[t].mean()) < 0.12 * rw[t].mean() + 0.5, t
        assert abs(sw[t].std() - rw[t].std()) < 0.25 * rw[t].std(), t
        assert abs((sw[t] == 0).mean() - (rw[t] == 0).mean()) < 0.04, t
    state_shares = sw["State"].value_counts(normalize=True) - rw["State"].value_counts(normalize=True)
    assert state_shares.abs().max() < 0.03
    assert set(sw["Species"]) == set(rw["Species"]) and set(sw["Sampling_Date"]) == set(rw["Sampling_Date"])
    for col in ("Height_Ave_cm", "Pre_GSHH_NDVI"):
        assert abs(sw["Dry_Total_g"].corr(sw[col]) - rw["Dry_Total_g"].corr(rw[col])) < 0.1, col
    table = synthetic.compare_stats(REAL_TRAIN, REAL_TRAIN)
    assert "not given" not in table and table.count("|---") == 3
