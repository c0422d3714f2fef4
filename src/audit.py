"""`python -m src.audit`: suspicious training images, from the labels and (optionally) out-of-fold predictions.

    python -m src.audit --data-dir DIR [--oof checkpoints/<exp>] [--out audit.csv] [--write-drop-ids drop.txt]

Several top teams removed a handful of noisy training images for about +0.01 (10th place: eight WA images
of one date with Dry_Green_g = 0). This lists candidates with the evidence; removing them is a decision,
made with `train.py --drop-ids FILE` and checked against the default in `report.py --compare`.

Checks (one row per image and check):
  oof_residual         the image's metric-weighted squared error in the OOF predictions is an outlier
                       (robust z-score of its root > --z; needs --oof)
  green_zero_grass     Dry_Green_g = 0 although the Species names a grass (ryegrass, phalaris, fescue, ...)
  zero_green_group     Dry_Green_g = 0 in a sampling date x state group where most images have Green = 0
  identity_violation   GDM != Green + Clover or Total != Green + Dead + Clover by more than --tolerance grams
  duplicate_labels     the same five targets, date, state and species as another image
  duplicate_image      the same image file bytes as another image
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from src.data import load_train
from src.errors import run_cli
from src.io_utils import write_csv_atomic, write_text_atomic
from src.report import load_runs, per_image_predictions
from src.schema import TARGET_WEIGHTS, TARGETS

CHECKS = (
    "oof_residual",
    "green_zero_grass",
    "zero_green_group",
    "identity_violation",
    "duplicate_labels",
    "duplicate_image",
)
GRASS = re.compile(r"grass|phalaris|fescue", re.IGNORECASE)
COLUMNS = ["image_id", "check", "score", "detail"]


def _rows(frame: pd.DataFrame, check: str, score, detail) -> pd.DataFrame:
    return pd.DataFrame({"image_id": frame["image_id"].to_numpy(), "check": check, "score": score, "detail": detail})


def oof_residuals(oof: pd.DataFrame, z: float = 3.5) -> pd.DataFrame:
    """Images whose weighted squared error (metric weights, grams) is an outlier: robust z of its root > z."""
    truth = oof[[f"true_{t}" for t in TARGETS]].to_numpy(dtype=np.float64)
    pred = oof[list(TARGETS)].to_numpy(dtype=np.float64)
    err = np.sqrt(((truth - pred) ** 2 * np.asarray(TARGET_WEIGHTS)).sum(axis=1))
    mad = np.median(np.abs(err - np.median(err))) * 1.4826
    robust_z = (err - np.median(err)) / max(mad, 1e-9)
    hit = robust_z > z
    frame = oof[hit]
    worst = [TARGETS[j] for j in np.argmax(np.abs(truth - pred)[hit] * np.asarray(TARGET_WEIGHTS), axis=1)]
    detail = [
        f"weighted error {e:.1f} g (robust z {rz:.1f}); worst {name}: true {truth[i, TARGETS.index(name)]:.1f} "
        f"vs pred {pred[i, TARGETS.index(name)]:.1f}"
        for e, rz, name, i in zip(err[hit], robust_z[hit], worst, np.flatnonzero(hit))
    ]
    return _rows(frame, "oof_residual", robust_z[hit], detail)


def green_zero_grass(wide: pd.DataFrame) -> pd.DataFrame:
    """Green = 0 where the species says grass grows: the grass was probably weighed with another part."""
    hit = wide[(wide["Dry_Green_g"] <= 0) & wide["Species"].astype(str).str.contains(GRASS)]
    return _rows(hit, "green_zero_grass", 1.0, [f"Species {s} but Dry_Green_g = 0" for s in hit["Species"]])


def zero_green_groups(wide: pd.DataFrame, min_share: float = 0.5, min_images: int = 3) -> pd.DataFrame:
    """Green = 0 images of a date x state group where at least `min_share` of the images have Green = 0."""
    date = wide["Sampling_Date"].astype(str).str[:10]
    group = date + " " + wide["State"].astype(str)
    zero = wide["Dry_Green_g"] <= 0
    share = zero.groupby(group).transform("mean")
    size = zero.groupby(group).transform("size")
    hit = zero & (share >= min_share) & (size >= min_images)
    frame = wide[hit]
    detail = [
        f"{g}: {int(round(s * n))} of {n} images have Dry_Green_g = 0"
        for g, s, n in zip(group[hit], share[hit], size[hit])
    ]
    return _rows(frame, "zero_green_group", share[hit].to_numpy(), detail)


def identity_violations(wide: pd.DataFrame, tolerance: float = 0.05) -> pd.DataFrame:
    """Labels that break GDM = Green + Clover or Total = Green + Dead + Clover by more than `tolerance` grams."""
    gdm_gap = (wide["GDM_g"] - wide["Dry_Green_g"] - wide["Dry_Clover_g"]).abs()
    total_gap = (wide["Dry_Total_g"] - wide["Dry_Green_g"] - wide["Dry_Dead_g"] - wide["Dry_Clover_g"]).abs()
    gap = np.maximum(gdm_gap, total_gap)
    hit = gap > tolerance
    detail = [f"GDM off by {g:.2f} g, Total off by {t:.2f} g" for g, t in zip(gdm_gap[hit], total_gap[hit])]
    return _rows(wide[hit], "identity_violation", gap[hit].to_numpy(), detail)


def _duplicates(wide: pd.DataFrame, key: pd.Series, check: str, what: str) -> pd.DataFrame:
    dup = key.duplicated(keep=False)
    frame = wide[dup]
    others = frame.groupby(key[dup])["image_id"].transform(lambda ids: " ".join(ids))
    detail = [f"{what} as {' '.join(i for i in o.split() if i != me)}" for me, o in zip(frame["image_id"], others)]
    return _rows(frame, check, 1.0, detail)


def duplicate_labels(wide: pd.DataFrame) -> pd.DataFrame:
    """The same five targets, date, state and species as another image (a copied row)."""
    cols = [*TARGETS, "Sampling_Date", "State", "Species"]
    key = wide[cols].astype(str).agg("|".join, axis=1)
    return _duplicates(wide, key, "duplicate_labels", "same labels")


def duplicate_images(wide: pd.DataFrame) -> pd.DataFrame:
    """The same image bytes as another image (sha1 of the file)."""

    def digest(path: str) -> str:
        p = Path(path)
        return hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else f"missing:{path}"

    key = wide["path"].map(digest)
    key = key.where(~key.str.startswith("missing:"), wide["image_id"])  # a missing file is nobody's duplicate
    return _duplicates(wide, key, "duplicate_image", "same file bytes")


def audit(
    wide: pd.DataFrame, oof: pd.DataFrame | None = None, z: float = 3.5, tolerance: float = 0.05, images: bool = True
) -> pd.DataFrame:
    """Every finding, one row per (image, check), most suspicious first within a check."""
    parts = [
        green_zero_grass(wide),
        zero_green_groups(wide),
        identity_violations(wide, tolerance),
        duplicate_labels(wide),
    ]
    if images:
        parts.append(duplicate_images(wide))
    if oof is not None:
        parts.insert(0, oof_residuals(oof, z))
    found = (
        pd.concat([p for p in parts if len(p)], ignore_index=True)
        if any(len(p) for p in parts)
        else pd.DataFrame(columns=COLUMNS)
    )
    order = {c: i for i, c in enumerate(CHECKS)}
    found["_order"] = found["check"].map(order)
    return (
        found.sort_values(["_order", "score"], ascending=[True, False])
        .drop(columns="_order")
        .reset_index(drop=True)[COLUMNS]
    )


def load_oof(exp_dir: str | Path) -> tuple[pd.DataFrame, str]:
    """Per-image OOF predictions of an experiment (the ensemble's if infer.py --oof ran) and where they come from."""
    exp_dir = Path(exp_dir)
    return per_image_predictions(exp_dir, load_runs(exp_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="data/synthetic", help="competition-layout data directory (train.csv)")
    parser.add_argument(
        "--oof", default=None, help="experiment directory (checkpoints/<exp>) for the OOF residual check"
    )
    parser.add_argument("--z", type=float, default=3.5, help="robust z-score above which an OOF residual is flagged")
    parser.add_argument("--tolerance", type=float, default=0.05, help="grams a label may break the identities by")
    parser.add_argument("--no-images", action="store_true", help="skip the duplicate-image check (reads every file)")
    parser.add_argument("--out", default=None, help="CSV of all findings (image_id,check,score,detail)")
    parser.add_argument(
        "--write-drop-ids", default=None, help="write the flagged image ids (of --drop-checks) as a --drop-ids file"
    )
    parser.add_argument(
        "--drop-checks",
        nargs="+",
        default=["oof_residual", "zero_green_group"],
        choices=CHECKS,
        help="checks whose images go to --write-drop-ids",
    )
    args = parser.parse_args(argv)
    wide = load_train(args.data_dir)
    oof, source = (None, "") if args.oof is None else load_oof(args.oof)
    found = audit(wide, oof, args.z, args.tolerance, images=not args.no_images)
    counts = found["check"].value_counts()
    print(
        f"audited {len(wide)} training images"
        + (f"; OOF from {source}" if source else " (no --oof: residual check skipped)")
    )
    for check in CHECKS:
        if check == "oof_residual" and oof is None:
            continue
        print(f"  {check:20s} {int(counts.get(check, 0)):4d} image(s)")
    if len(found):
        with pd.option_context("display.max_colwidth", 100, "display.width", 200):
            print(found.head(30).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.out:
        write_csv_atomic(found, args.out)
        print(f"wrote {args.out}")
    if args.write_drop_ids:
        ids = list(dict.fromkeys(found.loc[found["check"].isin(args.drop_checks), "image_id"]))
        if args.oof is None and "oof_residual" in args.drop_checks:
            print("note: --drop-checks names oof_residual but no --oof was given")
        checks = " ".join(args.drop_checks)
        header = f"# python -m src.audit --drop-checks {checks}: {len(ids)} image(s); "
        header += f"train with --drop-ids {args.write_drop_ids}\n"
        write_text_atomic(args.write_drop_ids, header + "".join(f"{i}\n" for i in ids))
        print(f"wrote {args.write_drop_ids}: {len(ids)} image id(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
