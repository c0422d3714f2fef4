"""Data hygiene: date-stamp detection and inpainting, bottom crop, artifact augmentation, --drop-ids, the audit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_script

from src import audit
from src.artifacts import (
    Cleaning,
    PaintArtifacts,
    artifact_transform,
    detection_summary,
    detection_table,
    orange_mask,
    remove_stamp,
    stamp_mask,
)
from src.config import Config
from src.data import load_id_list, load_train
from src.dataset import MultiSizeViewDataset, ViewPairDataset, image_dataset, input_key, load_views
from src.errors import BiomassError, run_cli
from src.folds import drop_training_ids
from src.synthetic import _stamp
from src.transforms import build_transform


@pytest.fixture(scope="module")
def stamp_data(stamp_dir: Path) -> Path:
    return stamp_dir


def _orange_share(image: np.ndarray) -> float:
    return float(np.count_nonzero(orange_mask(image))) / (image.shape[0] * image.shape[1])


def _grass(seed: int = 0, size=(400, 800)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([70, 120, 40], np.float32) + rng.normal(0, 12, (*size, 3)).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


# ---- detector and inpainting ----------------------------------------------------------------------------------
def test_detector_recall_and_false_positive_rate_on_synthetic_stamps(stamp_data: Path):
    """The generator's stamps.csv is the truth: every painted stamp found, no clean image flagged."""
    table = detection_table(stamp_data)
    summary = detection_summary(table)
    truth = pd.read_csv(stamp_data / "stamps.csv")
    assert summary["images"] == 42 and summary["stamped"] == len(truth) >= 5
    assert summary["recall"] >= 0.9  # 1.0 on this set when written; held-out sets: docs/HYGIENE.md
    assert summary["false_positive_rate"] <= 0.05
    assert summary["mean_iou"] > 0.4  # the box found overlaps the painted one
    assert summary["orange_left"] < 0.03  # inpainting leaves (almost) no stamp pixels


def test_artifacts_check_cli_prints_recall_and_writes_png(stamp_data: Path, tmp_path: Path, capsys):
    from src import artifacts

    png = tmp_path / "examples.png"
    assert run_cli(artifacts.main, ["check", "--data-dir", str(stamp_data), "--examples", str(png)]) == 0
    out = capsys.readouterr().out
    table = detection_summary(detection_table(stamp_data))
    assert f"recall={table['recall']:.3f}" in out and f"false_positive_rate={table['false_positive_rate']:.3f}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_cli(artifacts.main, ["check", "--data-dir", str(tmp_path)]) == 1
    assert "stamps.csv: not found" in capsys.readouterr().err


def test_remove_stamp_changes_only_the_stamp_region():
    image = _grass()
    stamped = image.copy()
    x0, y0, x1, y1 = _stamp(stamped, "2015/09/04", np.random.default_rng(0))
    assert _orange_share(stamped[y0:y1, x0:x1]) > 0.1
    cleaned, box = remove_stamp(stamped)
    assert box is not None and box[0] <= x0 + 3 and box[2] >= x1 - 3  # the box covers the painted text
    assert _orange_share(cleaned[y0:y1, x0:x1]) < 0.01
    mask = stamp_mask(stamped)
    outside = mask == 0
    assert np.array_equal(cleaned[outside], stamped[outside])  # nothing but the (dilated) stamp pixels changes
    assert np.abs(cleaned[y0:y1, x0:x1].astype(int) - image[y0:y1, x0:x1]).mean() < 25  # filled with grass, not orange


def test_image_without_stamp_is_returned_unchanged():
    image = _grass(1)
    cleaned, box = remove_stamp(image)
    assert box is None and cleaned is image
    soil = np.full((400, 800, 3), (150, 70, 45), np.uint8)  # orange-red soil filling the corner: not a line of text
    assert stamp_mask(soil) is None


def test_cleaning_crop_bottom_and_its_checks():
    image = np.arange(100 * 40 * 3, dtype=np.int64).reshape(100, 40, 3).astype(np.uint8)
    out = Cleaning(crop_bottom=0.1)(image)
    assert out.shape == (90, 40, 3) and np.array_equal(out, image[:90])
    assert Cleaning().key == "" and not Cleaning().active
    assert Cleaning(True, 0.05).key == "stamps+crop0.05"
    assert Cleaning(clean_stamps=True).max_reduce(1000) == 4 and Cleaning(clean_stamps=True).max_reduce(400) == 1
    assert Cleaning().max_reduce(1000) == 8
    with pytest.raises(BiomassError, match="--crop-bottom 0.6"):
        Cleaning(crop_bottom=0.6)
    cfg = Config()
    cfg.data.clean_stamps, cfg.data.crop_bottom = True, 0.05
    assert Cleaning.from_config(cfg.data) == Cleaning(True, 0.05)


# ---- artifact augmentation ---------------------------------------------------------------------------------
def test_paint_artifacts_is_seeded_and_paints_a_detectable_stamp_and_red_dots():
    image = _grass(2)
    paint = PaintArtifacts(stamp_p=1.0, dots_p=1.0, p=1.0)
    paint.set_random_seed(3)
    first = paint(image=image)["image"]
    paint.set_random_seed(3)
    again = paint(image=image)["image"]
    assert np.array_equal(first, again) and not np.array_equal(first, image)
    assert stamp_mask(first) is not None  # what --clean-stamps would remove
    red = (first[..., 0] > 200) & (first[..., 1] < 60) & (first[..., 2] < 60)
    assert red.sum() > 0
    none = PaintArtifacts(stamp_p=0.0, dots_p=0.0, p=1.0)
    assert np.array_equal(none(image=image)["image"], image)
    assert artifact_transform(0.0) is None
    with pytest.raises(BiomassError, match="--aug-artifacts 1.5"):
        artifact_transform(1.5)


def test_artifacts_are_painted_in_training_only(stamp_data: Path):
    cfg = Config()
    cfg.data.aug_artifacts = 1.0
    frame = load_train(stamp_data).head(2)
    train_set = image_dataset(frame, (56, 112), cfg.data, build_transform((56, 112), train=False), train=True)
    eval_set = image_dataset(frame, (56, 112), cfg.data)
    assert train_set.image_transform is not None and eval_set.image_transform is None
    train_set.set_random_seed(0)
    assert not torch.equal(train_set[0]["right"], eval_set[0]["right"])


# ---- one reading path for training and inference --------------------------------------------------------
def test_training_and_inference_read_the_same_cleaned_views(stamp_data: Path):
    wide = load_train(stamp_data)
    stamped = set(pd.read_csv(stamp_data / "stamps.csv")["image_path"])
    frame = wide[wide["image_path"].isin(stamped)].head(2).reset_index(drop=True)
    view = (56, 56)
    cleaning = Cleaning(clean_stamps=True, crop_bottom=0.05)
    train_views = ViewPairDataset(frame, view, build_transform(view, train=False), cleaning=cleaning)
    plain_views = ViewPairDataset(frame, view, build_transform(view, train=False))
    infer_views = MultiSizeViewDataset(frame, [view, view], cleanings=[cleaning, Cleaning()])
    item = infer_views[0]
    assert set(item) == {"index", "ok", input_key(view), input_key(view, cleaning)}
    assert torch.equal(item[input_key(view, cleaning)][1], train_views[0]["right"])
    assert torch.equal(item[input_key(view)][1], plain_views[0]["right"])
    assert not torch.equal(train_views[0]["right"], plain_views[0]["right"])  # the stamp sits in the right view
    left, right = load_views(frame.at[0, "path"], view, cleaning=cleaning)
    assert left.shape[0] == 400 - 20  # crop before the split: both views lose the bottom strip


# ---- --drop-ids ---------------------------------------------------------------------------------------------------
def test_drop_ids_file_formats_and_errors(tmp_path: Path):
    known = ["ID1", "ID2", "ID3"]
    txt = tmp_path / "drop.txt"
    txt.write_text("# audit output\nID2\n\nID3  # a comment\nID2\n")
    assert load_id_list(txt, known) == ["ID2", "ID3"]
    csv = tmp_path / "drop.csv"
    csv.write_text("check,image_id\nx,ID1\n")
    assert load_id_list(csv, known) == ["ID1"]
    txt.write_text("ID2\nID9\n")
    with pytest.raises(
        BiomassError, match=r"drop.txt line 2: image id 'ID9' is not in train.csv; remove it or fix the id"
    ):
        load_id_list(txt, known)
    with pytest.raises(BiomassError, match="--drop-ids file not found"):
        load_id_list(tmp_path / "nope.txt", known)


def test_drop_training_ids_keeps_validation_whole(tmp_path: Path):
    train = pd.DataFrame({"image_id": ["a", "b", "c"]})
    val = pd.DataFrame({"image_id": ["d", "e"]})
    path = tmp_path / "drop.txt"
    path.write_text("b\nd\n")
    kept, note = drop_training_ids(train, val, str(path), ["a", "b", "c", "d", "e"])
    assert kept["image_id"].tolist() == ["a", "c"]
    assert (
        "1 of 3 training images left out" in note
        and "1 listed image(s) are in this fold's validation set and are still scored" in note
    )
    assert drop_training_ids(train, val, None, [])[0] is train
    path.write_text("a\nb\nc\n")
    with pytest.raises(BiomassError, match="drops every training image"):
        drop_training_ids(train, val, str(path), ["a", "b", "c"])


def test_train_py_with_drop_ids_and_clean_stamps(clean_exp: tuple[Path, str], stamp_dir: Path, tmp_path: Path):
    """End to end: dropped images are not trained on but are scored; the cleaning is saved and used by infer.py."""
    from src.folds import load_folds
    from src.inference import Predictor

    exp, stdout = clean_exp
    folds = load_folds(exp.parent.parent / "folds.csv", load_train(stamp_dir))
    val_ids = folds.loc[folds["fold"] == 0, "image_id"].tolist()
    n_train = int((folds["fold"] != 0).sum())
    assert f"fold 0: {n_train - 2} train / {len(val_ids)} val images" in stdout
    assert f"2 of {n_train} training images left out; 1 listed image(s) are in this fold's validation set" in stdout
    run_dir = exp / "grid2x2" / "fold0"
    oof = pd.read_csv(run_dir / "oof.csv")
    assert sorted(oof["image_id"]) == sorted(val_ids)  # the dropped validation image is still scored
    predictor = Predictor(run_dir / "best.pt")
    assert predictor.cleaning == Cleaning(True, 0.05) and predictor.input_key.endswith("|stamps+crop0.05")
    sub = tmp_path / "sub.csv"
    run_script("infer.py", "--data-dir", str(stamp_dir), "--checkpoints", str(exp), "--out", str(sub))
    assert len(pd.read_csv(sub)) == 5 * 12


# ---- the audit --------------------------------------------------------------------------------------------------
def _wide(rows: list[tuple]) -> pd.DataFrame:
    cols = [
        "image_id",
        "Sampling_Date",
        "State",
        "Species",
        "Dry_Green_g",
        "Dry_Dead_g",
        "Dry_Clover_g",
        "GDM_g",
        "Dry_Total_g",
    ]
    frame = pd.DataFrame(rows, columns=cols)
    frame["path"] = "missing.jpg"
    return frame


def test_audit_checks_flag_exactly_the_planted_images():
    wide = _wide([
        ("g0", "2015/5/1", "Tas", "Ryegrass", 0.0, 5.0, 3.0, 3.0, 8.0),        # grass species, Green 0
        ("z1", "2015/8/21", "WA", "Clover", 0.0, 0.0, 9.0, 9.0, 9.0),          # a date x state group of Green 0
        ("z2", "2015/8/21", "WA", "Clover", 0.0, 1.0, 7.0, 7.0, 8.0),
        ("z3", "2015/8/21", "WA", "Clover", 2.0, 1.0, 7.0, 9.0, 10.0),
        ("i1", "2015/6/1", "Vic", "Phalaris", 10.0, 2.0, 1.0, 11.0, 13.31),    # Total 0.31 g off
        ("d1", "2015/6/2", "Vic", "Phalaris", 10.0, 2.0, 1.0, 11.0, 13.0),     # d1 = d2
        ("d2", "2015/6/2", "Vic", "Phalaris", 10.0, 2.0, 1.0, 11.0, 13.0),
    ])  # fmt: skip
    found = audit.audit(wide, images=False)
    by_check = found.groupby("check")["image_id"].apply(sorted).to_dict()
    assert by_check == {
        "green_zero_grass": ["g0"], "zero_green_group": ["z1", "z2"], "identity_violation": ["i1"],
        "duplicate_labels": ["d1", "d2"],
    }  # fmt: skip
    assert found.loc[found["check"] == "identity_violation", "score"].item() == pytest.approx(0.31)
    assert "2 of 3 images have Dry_Green_g = 0" in found.loc[found["image_id"] == "z1", "detail"].item()


def test_audit_oof_residual_flags_the_outlier():
    rng = np.random.default_rng(0)
    truth = rng.uniform(10, 60, (40, 5))
    pred = truth + rng.normal(0, 2, truth.shape)
    pred[7, 4] += 80  # one image's Total is far off
    oof = pd.DataFrame({"image_id": [f"I{i}" for i in range(40)]})
    for j, name in enumerate(audit.TARGETS):
        oof[name], oof[f"true_{name}"] = pred[:, j], truth[:, j]
    found = audit.oof_residuals(oof, z=3.5)
    assert found["image_id"].tolist() == ["I7"] and "worst Dry_Total_g" in found["detail"].item()


def test_audit_duplicate_image_bytes(stamp_data: Path, tmp_path: Path):
    data = Path(shutil.copytree(stamp_data, tmp_path / "data"))
    wide = load_train(data)
    shutil.copy(wide.at[0, "path"], wide.at[1, "path"])
    found = audit.duplicate_images(load_train(data))
    assert sorted(found["image_id"]) == sorted(wide["image_id"].iloc[:2])


def test_audit_cli_writes_findings_and_a_drop_ids_file_train_py_accepts(
    trained_exp: Path, synthetic_dir: Path, tmp_path: Path, capsys
):
    out, drop = tmp_path / "audit.csv", tmp_path / "drop.txt"
    argv = [
        "--data-dir",
        str(synthetic_dir),
        "--oof",
        str(trained_exp),
        "--z",
        "2",
        "--out",
        str(out),
        "--write-drop-ids",
        str(drop),
        "--drop-checks",
        "oof_residual",
    ]
    assert run_cli(audit.main, argv) == 0
    printed = capsys.readouterr().out
    found = pd.read_csv(out)
    flagged = found.loc[found["check"] == "oof_residual", "image_id"].tolist()
    assert f"oof_residual         {len(flagged):4d} image(s)" in printed
    assert load_id_list(drop, load_train(synthetic_dir)["image_id"]) == list(dict.fromkeys(flagged))


def test_audit_on_the_real_label_file(real_train_csv: Path):
    """The real file: the WA dates whose clover swards have Dry_Green_g = 0, and the one image 0.31 g off."""
    from src.data import long_to_wide, validate_train

    frame = validate_train(pd.read_csv(real_train_csv, dtype={"sample_id": str}), real_train_csv)
    wide = long_to_wide(frame).assign(path="missing.jpg")
    found = audit.audit(wide, images=False)
    groups = found[found["check"] == "zero_green_group"]
    assert len(groups) == 16 and groups["detail"].str.contains(" WA: ").all()
    assert (groups["detail"].str.contains("2015-08-21 WA: 8 of 8")).sum() == 8
    assert found.loc[found["check"] == "identity_violation", "score"].round(2).tolist() == [0.31]
    assert not (found["check"] == "green_zero_grass").any()


def test_resume_refuses_another_image_cleaning(tmp_path: Path):
    """A run trained on raw images must not continue on cleaned ones (the model would see two inputs)."""
    from src.checkpoint import CHECKPOINT_FORMAT, check_resume

    cfg = Config()
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "config": cfg.to_dict()}, tmp_path / "last.pt")
    assert check_resume(tmp_path / "last.pt", cfg) is not None
    cfg.data.clean_stamps = True
    with pytest.raises(BiomassError, match=r"another model config \(clean_stamps False -> True\)"):
        check_resume(tmp_path / "last.pt", cfg)
