"""Competition CSVs <-> wide frames, their validation, and image reading with the view split."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from src.errors import BiomassError
from src.logs import get_logger
from src.schema import (
    MONTHS,
    SAMPLE_ID_SEP,
    SPECIES_GROUPS,
    STATES,
    TARGETS,
    TEST_COLUMNS,
    TRAIN_COLUMNS,
    class_index,
    species_group,
)

log = get_logger(__name__)

META_COLUMNS = ("Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm")


def _line(index: int) -> int:
    """CSV line number (1-based, header is line 1) of a 0-based data row."""
    return int(index) + 2


def read_csv_checked(
    path: str | os.PathLike, columns: tuple[str, ...], hint: str, extra_columns: str = "error"
) -> pd.DataFrame:
    """Read a CSV and demand exactly `columns` (any order); errors name the file and the fix.

    `extra_columns="ignore"` keeps only `columns` and warns about the rest: for the files the hidden rerun
    supplies (test.csv), where a column more must not lose the submission; the user's own files stay exact.
    """
    path = Path(path)
    if not path.is_file():
        raise BiomassError(f"{path}: file not found; {hint}")
    try:
        frame = pd.read_csv(path, dtype={"sample_id": str, "image_path": str, "target_name": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise BiomassError(f"{path}: not a readable CSV ({str(err).splitlines()[0]}); {hint}") from err
    missing = [c for c in columns if c not in frame.columns]
    extra = [c for c in frame.columns if c not in columns]
    if extra and not missing and extra_columns == "ignore":
        log.warning(f"{path}: ignoring unexpected column(s) {', '.join(map(str, extra))}; reading {','.join(columns)}")
        extra = []
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected column(s) {', '.join(map(str, extra))}")
        raise BiomassError(f"{path}: {'; '.join(parts)}; expected exactly: {','.join(columns)}")
    if frame.empty:
        raise BiomassError(f"{path}: no data rows; {hint}")
    return frame[list(columns)]


def _check_long_rows(frame: pd.DataFrame, path: Path) -> pd.Series:
    """Shared checks of long files: known target names, sample_id = image_id__target, no duplicates.

    Returns the image_id of every row.
    """
    bad = ~frame["target_name"].isin(TARGETS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise BiomassError(
            f"{path} line {_line(i)}, column target_name: unknown value {frame['target_name'].iloc[i]!r}; "
            f"expected one of {', '.join(TARGETS)}"
        )
    dup = frame["sample_id"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise BiomassError(
            f"{path} line {_line(i)}, column sample_id: duplicate {frame['sample_id'].iloc[i]!r}; remove the "
            "repeated row"
        )
    image_id = frame["image_path"].map(lambda p: Path(str(p)).stem)
    expected = image_id + SAMPLE_ID_SEP + frame["target_name"]
    bad = frame["sample_id"] != expected
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise BiomassError(
            f"{path} line {_line(i)}, column sample_id: {frame['sample_id'].iloc[i]!r} does not match "
            f"image_path/target_name (expected {expected.iloc[i]!r})"
        )
    counts = image_id.value_counts()
    partial = counts[counts != len(TARGETS)]
    if len(partial):
        img = partial.index[0]
        have = set(frame.loc[image_id == img, "target_name"])
        lacking = [t for t in TARGETS if t not in have]
        raise BiomassError(
            f"{path}: image {img} has {partial.iloc[0]} of {len(TARGETS)} targets (missing {', '.join(lacking)}); "
            "every image needs one row per target"
        )
    return image_id


def validate_train(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Check a long train frame row by row; returns it with numeric targets."""
    frame = frame.copy()
    image_id = _check_long_rows(frame, path)
    values = pd.to_numeric(frame["target"], errors="coerce")
    bad = ~np.isfinite(values.to_numpy(dtype=np.float64)) | (values.to_numpy() < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BiomassError(
            f"{path} line {_line(i)}, column target: '{frame['target'].iloc[i]}' is not a finite non-negative "
            "number of grams; fix or drop that image's rows"
        )
    frame["target"] = values.astype(np.float64)
    frame["image_id"] = image_id
    dates = pd.to_datetime(frame["Sampling_Date"], format="%Y/%m/%d", errors="coerce")
    if dates.isna().any():
        i = int(np.flatnonzero(dates.isna().to_numpy())[0])
        raise BiomassError(
            f"{path} line {_line(i)}, column Sampling_Date: {frame['Sampling_Date'].iloc[i]!r} is not a YYYY/M/D date"
        )
    frame["Sampling_Date"] = dates
    return frame


def long_to_wide(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per image: image_id, image_path, metadata, derived labels and the 5 targets in order."""
    wide = frame.pivot(index="image_id", columns="target_name", values="target")[list(TARGETS)]
    meta_cols = [c for c in ("image_path", *META_COLUMNS) if c in frame.columns]
    meta = frame.drop_duplicates("image_id").set_index("image_id")[meta_cols]
    out = meta.join(wide).reset_index()
    # keep the order images first appear in the file: deterministic and matches the CSV
    order = pd.Index(frame["image_id"].drop_duplicates())
    out = out.set_index("image_id").loc[order].reset_index()
    if "Sampling_Date" in out:
        out["month"] = out["Sampling_Date"].dt.month
        out["state_idx"] = out["State"].map(lambda s: class_index(s, STATES))
        out["month_idx"] = out["month"].map(lambda m: class_index(int(m), MONTHS))
        out["species_group"] = out["Species"].map(species_group)
        out["species_idx"] = out["species_group"].map(lambda g: class_index(g, SPECIES_GROUPS))
    out.columns.name = None
    return out


def wide_to_long(image_ids, values: np.ndarray) -> pd.DataFrame:
    """(N, 5) predictions in TARGETS order -> long `sample_id,target` rows."""
    values = np.asarray(values, dtype=np.float64)
    ids = np.repeat(np.asarray(list(image_ids), dtype=object), len(TARGETS))
    names = np.tile(np.asarray(TARGETS, dtype=object), len(values))
    return pd.DataFrame({"sample_id": ids + SAMPLE_ID_SEP + names, "target": values.reshape(-1)})


def load_train(data_dir: str | os.PathLike, check_images: bool = False) -> pd.DataFrame:
    """Read and validate DIR/train.csv; return the wide frame (absolute image paths in `path`)."""
    data_dir = Path(data_dir)
    path = data_dir / "train.csv"
    frame = read_csv_checked(path, TRAIN_COLUMNS, "pass --data-dir DIR holding the competition files (make data)")
    wide = long_to_wide(validate_train(frame, path))
    wide["path"] = [str(data_dir / p) for p in wide["image_path"]]
    if check_images:
        check_image_files(wide, path)
    return wide


def read_test_csv(data_dir: str | os.PathLike) -> pd.DataFrame:
    """DIR/test.csv, long: the three needed columns (others are ignored with a warning), every row checked."""
    path = Path(data_dir) / "test.csv"
    frame = read_csv_checked(
        path, TEST_COLUMNS, "pass --data-dir DIR holding the competition files (make data)", extra_columns="ignore"
    )
    _check_long_rows(frame, path)
    return frame


def load_test(
    data_dir: str | os.PathLike, check_images: bool = False, test_long: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Read DIR/test.csv: one row per unique image (first-seen order) with `image_id, image_path, path`.

    `test_long` (from `read_test_csv`) saves a second read of the file.
    """
    data_dir = Path(data_dir)
    frame = read_test_csv(data_dir) if test_long is None else test_long
    image_id = frame["image_path"].map(lambda p: Path(str(p)).stem)
    images = pd.DataFrame({"image_id": image_id, "image_path": frame["image_path"]}).drop_duplicates("image_id")
    images["path"] = [str(data_dir / p) for p in images["image_path"]]
    images = images.reset_index(drop=True)
    if check_images:
        check_image_files(images, data_dir / "test.csv")
    return images


def load_sample_submission(data_dir: str | os.PathLike, test_long: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """DIR/sample_submission.csv if present and usable (it fixes the row order of submission.csv), else None.

    Only its `sample_id` column matters. The hidden rerun decides this file, so nothing about it is an
    error: missing, unreadable, without `sample_id`, with repeated ids or, given `test_long`, with other ids
    than test.csv: a warning, and the submission takes the rows and order of test.csv.
    """
    path = Path(data_dir) / "sample_submission.csv"
    fallback = "writing the rows in test.csv order"
    if not path.is_file():
        log.warning(f"{path}: not found; {fallback}")
        return None
    try:
        frame = pd.read_csv(path, dtype={"sample_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        log.warning(f"{path}: not a readable CSV ({str(err).splitlines()[0]}); {fallback}")
        return None
    if "sample_id" not in frame.columns:
        log.warning(f"{path}: no sample_id column (columns {','.join(map(str, frame.columns))}); {fallback}")
        return None
    ids = frame["sample_id"]
    if ids.isna().any() or ids.duplicated().any():
        log.warning(f"{path}: empty or repeated sample_id values; {fallback}")
        return None
    if test_long is not None:
        expected = set(test_long["sample_id"])
        lacking, extra = len(expected - set(ids)), len(set(ids) - expected)
        if lacking or extra:
            log.warning(f"{path}: ids differ from test.csv ({lacking} of test.csv missing, {extra} extra); {fallback}")
            return None
    return frame[["sample_id"]].assign(target=frame["target"] if "target" in frame.columns else 0.0)


def check_image_files(images: pd.DataFrame, csv_path: Path) -> None:
    """Every image named by the CSV exists (checked before hours of work start)."""
    missing = [p for p in images["path"] if not Path(p).is_file()]
    if missing:
        raise BiomassError(
            f"{csv_path}: {len(missing)} image file(s) not found, first {missing[0]}; check --data-dir and image_path"
        )


def _jpeg_is_truncated(path: Path) -> bool:
    """A JPEG whose last bytes lack the end-of-image marker FF D9 (cv2 would silently grey it)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
        if head != b"\xff\xd8":
            return False
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 64))
        tail = fh.read()
    return b"\xff\xd9" not in tail


def read_image(path: str | os.PathLike, reduce: int = 1) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3); grayscale and PNG are accepted.

    `reduce` in {1, 2, 4, 8} decodes a JPEG at reduced resolution (much faster when tiles are
    smaller than native). Missing, empty, truncated, non-image or portrait files raise BiomassError.
    """
    path = Path(path)
    if not path.is_file():
        raise BiomassError(f"{path}: image not found; check --data-dir and the image_path column")
    if path.stat().st_size == 0:
        raise BiomassError(f"{path}: empty file (0 bytes); re-download or replace the image")
    if _jpeg_is_truncated(path):
        raise BiomassError(f"{path}: truncated JPEG (no end marker); re-download or replace the image")
    flag = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }
    if reduce not in flag:
        raise ValueError(f"reduce must be one of {sorted(flag)}, got {reduce}")
    image = cv2.imread(str(path), flag[reduce])
    if image is None:
        raise BiomassError(f"{path}: not a readable image; replace it with the original JPEG")
    height, width = image.shape[:2]
    if width < height:
        raise BiomassError(
            f"{path}: portrait image {width}x{height}; expected two views side by side (width >= height), "
            "rotate it to landscape"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def jpeg_reduce_factor(image_size: tuple[int, int], view_size: tuple[int, int]) -> int:
    """Largest JPEG decode reduction that still leaves each view at least `view_size` (h, w)."""
    height, width = image_size
    factor = 1
    for f in (2, 4, 8):
        if height // f >= view_size[0] and (width // 2) // f >= view_size[1]:
            factor = f
    return factor


def split_views(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right halves of the same width; an odd middle column is dropped."""
    width = image.shape[1]
    half = width // 2
    return image[:, :half], image[:, width - half :]


def load_id_list(path: str | os.PathLike, known_ids) -> list[str]:
    """Image ids of a `--drop-ids` file: a CSV with an `image_id` column, or one id per line (`#` comments).

    An id that is not in train.csv is an error naming the line: a typo must not silently drop nothing.
    `known_ids=None` skips that check (the Kaggle fine-tune, where the rerun's train.csv decides).
    """
    path = Path(path)
    if not path.is_file():
        raise BiomassError(
            f"{path}: --drop-ids file not found; write one with python -m src.audit --write-drop-ids PATH"
        )
    lines = path.read_text().splitlines()
    header = lines[0].split(",") if lines else []
    if "image_id" in [h.strip() for h in header]:
        column = [h.strip() for h in header].index("image_id")
        entries = [(n, line.split(",")[column].strip()) for n, line in enumerate(lines[1:], start=2) if line.strip()]
    else:
        entries = [(n, line.split("#", 1)[0].strip()) for n, line in enumerate(lines, start=1)]
        entries = [(n, value) for n, value in entries if value]
    known = None if known_ids is None else set(known_ids)
    for line_no, image_id in entries:
        if known is not None and image_id not in known:
            raise BiomassError(
                f"{path} line {line_no}: image id {image_id!r} is not in train.csv; remove it or fix the id"
            )
    return list(dict.fromkeys(image_id for _, image_id in entries))
