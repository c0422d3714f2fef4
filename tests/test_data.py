"""Competition CSVs <-> wide frames, their validation messages, and image reading with the view split."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from src.data import (
    jpeg_reduce_factor,
    load_test,
    load_train,
    long_to_wide,
    read_csv_checked,
    read_image,
    split_views,
    validate_train,
    wide_to_long,
)
from src.errors import BiomassError
from src.schema import MONTHS, SPECIES_GROUPS, STATES, TARGETS, TRAIN_COLUMNS, species_group

SIZE = (400, 200)  # conftest's synthetic image size (W, H)


@pytest.fixture(scope="module")
def train_long(synthetic_dir: Path) -> pd.DataFrame:
    return pd.read_csv(synthetic_dir / "train.csv", dtype={"sample_id": str, "image_path": str, "target_name": str})


@pytest.fixture()
def data_copy(synthetic_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the synthetic CSVs; image folders are symlinked, not copied."""
    for name in ("train.csv", "test.csv", "sample_submission.csv"):
        shutil.copy(synthetic_dir / name, tmp_path / name)
    for split in ("train", "test"):
        (tmp_path / split).symlink_to(synthetic_dir / split, target_is_directory=True)
    return tmp_path


def _validate(path: Path) -> pd.DataFrame:
    return long_to_wide(validate_train(read_csv_checked(path, TRAIN_COLUMNS, "hint"), path))


# ---- wide <-> long ----
def test_long_to_wide_and_back_round_trip(train_long: pd.DataFrame, synthetic_dir: Path):
    path = synthetic_dir / "train.csv"
    wide = long_to_wide(validate_train(train_long, path))
    assert len(wide) == train_long["image_path"].nunique() == 40
    assert wide["image_id"].is_unique
    assert list(wide["image_id"]) == list(train_long["image_path"].str.slice(6, -4).drop_duplicates())
    assert list(wide.columns[wide.columns.isin(TARGETS)]) == list(TARGETS)
    back = wide_to_long(wide["image_id"], wide[list(TARGETS)].to_numpy())
    assert list(back.columns) == ["sample_id", "target"]
    assert list(back["sample_id"][:5]) == [f"{wide['image_id'][0]}__{t}" for t in TARGETS]
    merged = train_long.merge(back, on="sample_id", suffixes=("", "_back"), validate="one_to_one")
    assert len(merged) == len(train_long) == 200
    np.testing.assert_array_equal(merged["target"].to_numpy(), merged["target_back"].to_numpy())


def test_wide_frame_derived_columns(train_long: pd.DataFrame, synthetic_dir: Path):
    wide = long_to_wide(validate_train(train_long, synthetic_dir / "train.csv"))
    first = train_long.drop_duplicates("image_path").reset_index(drop=True)
    months = first["Sampling_Date"].str.split("/").str[1].astype(int)
    assert list(wide["month"]) == list(months)
    assert list(wide["state_idx"]) == [STATES.index(s) for s in first["State"]]
    assert list(wide["month_idx"]) == [MONTHS.index(m) for m in months]
    assert list(wide["species_group"]) == [species_group(s) for s in first["Species"]]
    assert list(wide["species_idx"]) == [SPECIES_GROUPS.index(species_group(s)) for s in first["Species"]]
    assert (wide["state_idx"] >= 0).all() and (wide["month_idx"] >= 0).all()


def test_load_train_on_synthetic_dir(synthetic_dir: Path, train_long: pd.DataFrame):
    wide = load_train(synthetic_dir, check_images=True)
    assert len(wide) == 40
    assert all(Path(p).is_file() and Path(p).parent == synthetic_dir / "train" for p in wide["path"])
    assert wide["Sampling_Date"].dtype.kind == "M"
    row = train_long.iloc[0]
    image_id = Path(row["image_path"]).stem
    assert wide.set_index("image_id").loc[image_id, row["target_name"]] == row["target"]


# ---- train.csv validation: file, line (1-based, header = line 1), column ----
def _edit_and_expect(path: Path, edit, *patterns: str) -> str:
    """Rewrite path with edit(frame) (in place, or returning a new frame); the error must name path + patterns."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    edited = edit(frame)
    (frame if edited is None else edited).to_csv(path, index=False)
    with pytest.raises(BiomassError) as info:
        _validate(path)
    message = str(info.value)
    assert str(path) in message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


def test_missing_column_named(data_copy: Path):
    _edit_and_expect(data_copy / "train.csv", lambda f: f.drop(columns="Height_Ave_cm", inplace=True),
                     r"missing column\(s\) Height_Ave_cm")  # fmt: skip


def test_extra_column_named(data_copy: Path):
    _edit_and_expect(data_copy / "train.csv", lambda f: f.insert(3, "Notes", "x"), r"unexpected column\(s\) Notes")


def test_unknown_target_name(data_copy: Path):
    def edit(f):
        f.loc[6, "target_name"] = "Dry_Weed_g"
        f.loc[6, "sample_id"] = f.loc[6, "sample_id"].split("__")[0] + "__Dry_Weed_g"

    _edit_and_expect(data_copy / "train.csv", edit, r"line 8, column target_name", "'Dry_Weed_g'")


def test_image_with_four_of_five_targets_names_the_missing_one(data_copy: Path):
    path = data_copy / "train.csv"
    frame = pd.read_csv(path, dtype=str)
    i = int(np.flatnonzero(frame["target_name"] == "Dry_Dead_g")[3])
    image = frame["sample_id"][i].split("__")[0]
    _edit_and_expect(path, lambda f: f.drop(index=i, inplace=True), image, "4 of 5 targets", r"missing Dry_Dead_g\)")


@pytest.mark.parametrize("value", ["-1.5", "", "abc", "nan", "inf"])
def test_bad_target_value_names_line_and_column(data_copy: Path, value: str):
    def edit(f):
        f.loc[11, "target"] = value

    _edit_and_expect(data_copy / "train.csv", edit, r"line 13, column target", "finite non-negative")


def test_duplicate_sample_id(data_copy: Path):
    def edit(f):
        # a copy of data row 4 right after it: the copy is data row 5 = CSV line 7
        return pd.concat([f.iloc[:5], f.iloc[[4]], f.iloc[5:]], ignore_index=True)

    message = _edit_and_expect(data_copy / "train.csv", edit, r"line 7, column sample_id", "duplicate")
    assert pd.read_csv(data_copy / "train.csv")["sample_id"][4] in message


def test_sample_id_not_matching_image_path(data_copy: Path):
    def edit(f):
        f.loc[2, "sample_id"] = "ID0000000001__" + f.loc[2, "target_name"]

    _edit_and_expect(data_copy / "train.csv", edit, r"line 4, column sample_id", "does not match", "ID0000000001")


def test_sample_id_not_matching_target_name(data_copy: Path):
    def edit(f):
        image = f.loc[0, "sample_id"].split("__")[0]
        f.loc[0, "target_name"], f.loc[1, "target_name"] = f.loc[1, "target_name"], f.loc[0, "target_name"]
        assert f.loc[0, "sample_id"].startswith(image)

    _edit_and_expect(data_copy / "train.csv", edit, r"line 2, column sample_id", "does not match")


def test_bad_date_names_line_and_column(data_copy: Path):
    def edit(f):
        f.loc[9, "Sampling_Date"] = "15/9/2015x"

    _edit_and_expect(data_copy / "train.csv", edit, r"line 11, column Sampling_Date")


def test_missing_train_csv(tmp_path: Path):
    with pytest.raises(BiomassError, match=re.escape(str(tmp_path / "train.csv")) + ": file not found"):
        load_train(tmp_path)


def test_check_images_reports_a_deleted_image(synthetic_dir: Path, tmp_path: Path):
    shutil.copy(synthetic_dir / "train.csv", tmp_path / "train.csv")
    shutil.copytree(synthetic_dir / "train", tmp_path / "train")
    victim = sorted((tmp_path / "train").iterdir())[5]
    victim.unlink()
    assert len(load_train(tmp_path)) == 40  # without the check the CSV alone is fine
    with pytest.raises(BiomassError) as info:
        load_train(tmp_path, check_images=True)
    assert str(tmp_path / "train.csv") in str(info.value) and str(victim) in str(info.value)
    assert "1 image file(s) not found" in str(info.value)


def test_load_test_unique_images_in_order(synthetic_dir: Path):
    test_long = pd.read_csv(synthetic_dir / "test.csv")
    images = load_test(synthetic_dir, check_images=True)
    assert list(images.columns) == ["image_id", "image_path", "path"]
    assert list(images["image_path"]) == list(test_long["image_path"].drop_duplicates())
    assert list(images["image_id"]) == [Path(p).stem for p in test_long["image_path"].drop_duplicates()]
    assert len(images) == 6 and list(images.index) == list(range(6))
    assert all(Path(p).is_file() for p in images["path"])


# ---- read_image ----
def _write(path: Path, image_bgr: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image_bgr)
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_read_image_is_rgb(tmp_path: Path, suffix: str):
    bgr = np.zeros((64, 128, 3), np.uint8)
    bgr[:, :64] = (0, 0, 255)  # pure red on the left in OpenCV's BGR order
    bgr[:, 64:] = (255, 0, 0)  # pure blue on the right
    image = read_image(_write(tmp_path / f"red{suffix}", bgr))
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8
    left, right = image[8:-8, 8:56].reshape(-1, 3).mean(0), image[8:-8, 72:-8].reshape(-1, 3).mean(0)
    assert left[0] > 240 and left[1] < 15 and left[2] < 15
    assert right[2] > 240 and right[0] < 15 and right[1] < 15


def test_read_image_grayscale_jpeg_gives_three_channels(tmp_path: Path):
    gray = np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (64, 1))
    image = read_image(_write(tmp_path / "gray.jpg", gray))
    assert image.shape == (64, 128, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def _bad_file(kind: str, tmp_path: Path, synthetic_dir: Path) -> tuple[Path, str]:
    real = next((synthetic_dir / "train").glob("*.jpg"))
    if kind == "missing":
        return tmp_path / "nope.jpg", "not found"
    if kind == "empty":
        (tmp_path / "empty.jpg").write_bytes(b"")
        return tmp_path / "empty.jpg", "empty file"
    if kind.startswith("truncated"):
        data = real.read_bytes()
        cut = {"truncated_eoi": 2, "truncated_tail": 300, "truncated_half": len(data) // 2}[kind]
        (tmp_path / "cut.jpg").write_bytes(data[: len(data) - cut])
        return tmp_path / "cut.jpg", "truncated JPEG"
    if kind == "text":
        (tmp_path / "notes.jpg").write_text("this is not an image\n" * 20)
        return tmp_path / "notes.jpg", "not a readable image"
    if kind == "portrait":
        return _write(tmp_path / "portrait.jpg", np.full((200, 100, 3), 90, np.uint8)), "portrait image 100x200"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "empty", "truncated_eoi", "truncated_tail", "truncated_half", "text", "portrait"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_read_image_bad_files_name_the_path(kind: str, tmp_path: Path, synthetic_dir: Path):
    path, what = _bad_file(kind, tmp_path, synthetic_dir)
    with pytest.raises(BiomassError) as info:
        read_image(path)
    assert str(path) in str(info.value) and what in str(info.value)


def test_truncated_check_only_flags_cut_files(synthetic_dir: Path):
    for path in sorted((synthetic_dir / "train").glob("*.jpg"))[:5]:
        assert read_image(path).shape == (SIZE[1], SIZE[0], 3)


def test_read_image_rejects_unknown_reduce(synthetic_dir: Path):
    with pytest.raises(ValueError, match="reduce"):
        read_image(next((synthetic_dir / "train").glob("*.jpg")), reduce=3)


# ---- views and reduced decoding ----
def test_split_views_odd_width_drops_the_middle_column():
    image = np.tile(np.arange(1999, dtype=np.int32)[None, :, None], (4, 1, 3))
    left, right = split_views(image)
    assert left.shape == right.shape == (4, 999, 3)
    assert left[0, 0, 0] == 0 and left[0, -1, 0] == 998
    assert right[0, 0, 0] == 1000 and right[0, -1, 0] == 1998


def test_split_views_even_width():
    image = np.arange(2 * 10 * 3).reshape(2, 10, 3)
    left, right = split_views(image)
    np.testing.assert_array_equal(np.concatenate([left, right], 1), image)


@pytest.mark.parametrize(
    "view_size, factor",
    [((1000, 1000), 1), ((518, 518), 1), ((500, 500), 2), ((448, 448), 2), ((250, 250), 4), ((224, 224), 4),
     ((126, 126), 4), ((125, 125), 8), ((112, 112), 8), ((10, 10), 8), ((120, 260), 2), ((260, 120), 2)],
)  # fmt: skip
def test_jpeg_reduce_factor(view_size, factor):
    # a 2000x1000 image holds two 1000x1000 views; the factor is the largest that keeps each view >= view_size
    assert jpeg_reduce_factor((1000, 2000), view_size) == factor


@pytest.mark.parametrize("reduce", [2, 4, 8])
def test_reduced_decode_divides_the_size(synthetic_dir: Path, reduce: int):
    path = sorted((synthetic_dir / "train").glob("*.jpg"))[0]
    full = read_image(path)
    small = read_image(path, reduce=reduce)
    assert full.shape == (SIZE[1], SIZE[0], 3)
    assert small.shape == (SIZE[1] // reduce, SIZE[0] // reduce, 3)
    # same picture: the reduced decode is close to an area downscale of the full one
    area = cv2.resize(full, small.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(area.astype(int) - small.astype(int)).mean() < 12


def test_cached_images_are_read_once_and_give_the_same_views(synthetic_dir, monkeypatch):
    """--cache-images: the second epoch decodes nothing, views are unchanged, and augmentation cannot edit the cache."""
    import src.dataset as dataset
    from src.transforms import build_transform

    frame = load_train(synthetic_dir).head(3)
    view = (28, 56)
    plain = dataset.ViewPairDataset(frame, view, build_transform(view, train=False))
    cached = dataset.ViewPairDataset(frame, view, build_transform(view, train=False), cache_images=True)
    reads = []
    real_read = dataset.read_image
    monkeypatch.setattr(dataset, "read_image", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    first = [cached[i]["left"] for i in range(3)]
    second = [cached[i]["left"] for i in range(3)]
    assert len(reads) == 3  # one decode per image, none in the second pass
    for a, b, c in zip(first, second, (plain[i]["left"] for i in range(3))):
        assert torch.equal(a, b) and torch.equal(a, c)
    snapshot = {i: img.copy() for i, img in cached._images.items()}
    cached.transform = build_transform(view, train=True)  # flips, affine, photometric, dropout on the cached pixels
    cached.set_random_seed(0)
    for _ in range(4):
        for i in range(3):
            cached[i]
    assert all(np.array_equal(cached._images[i], snapshot[i]) for i in snapshot)
