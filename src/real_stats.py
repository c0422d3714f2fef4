"""Figures the docs take from the real label file, which is never copied into the repo.

    python -m src.real_stats --real ../shared/data/csiro/train.csv    # -> docs/real_labels.json, then the docs

`docs/real_labels.json` holds the label statistics of docs/SYNTHETIC.md (the synthetic labels of seed 0 beside the
real ones, as many images) and how far the real labels lie from the physics set that `--physics project`
projects onto (README "Physics"). `python -m src.docs` renders both from that file, so the docs need the real file
only when these figures are measured again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from src.data import long_to_wide, read_csv_checked, validate_train
from src.errors import BiomassError, run_cli
from src.io_utils import write_text_atomic
from src.postprocess import physics_gap, project_physics
from src.schema import TARGET_WEIGHTS, TARGETS, TRAIN_COLUMNS
from src.synthetic import label_stats, sample_labels, to_long

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "real_labels.json"
ON_SET_G = 1e-9  # a label this close to the set is on it (the projection leaves it where it is)


def physics_distance(truth: np.ndarray, image_ids: list[str]) -> dict:
    """How far true labels lie from {GDM = Green + Clover, Total = Green + Dead + Clover, all >= 0}.

    The projection is non-expansive, so it can raise an image's weighted error norm by at most its label's own
    weighted distance from the set: zero for a label on the set, at most `max_weighted_distance_g` for any image.
    """
    truth = np.asarray(truth, dtype=np.float64)
    moved = project_physics(truth) - truth
    weighted = np.sqrt((np.asarray(TARGET_WEIGHTS) * moved**2).sum(axis=1))
    gap = physics_gap(truth)
    worst = int(np.argmax(weighted))
    return {
        "images": int(len(truth)),
        "on_set": int((np.abs(moved).max(axis=1) <= ON_SET_G).sum()),
        "gap_over_0.01_g": int((gap > 0.01 + 1e-9).sum()),
        "max_identity_gap_g": float(gap.max()),
        "max_weighted_distance_g": float(weighted[worst]),
        "max_move_g": float(np.abs(moved).max()),
        "worst_image": str(image_ids[worst]),
    }


def collect(real: Path, seed: int = 0) -> dict:
    """The real file's figures: label statistics beside the synthetic labels of `seed`, and the physics distance."""
    raw = read_csv_checked(real, TRAIN_COLUMNS, "real label file")
    wide = long_to_wide(validate_train(raw.copy(), real))
    synthetic = to_long(sample_labels(len(wide), np.random.default_rng([seed, 0])), "train")  # as generate() draws
    return {
        "source": "python -m src.real_stats --real <real train.csv>",
        "synthetic_seed": seed,
        "label_stats": {"synthetic": label_stats(synthetic), "real": label_stats(raw)},
        "physics": physics_distance(wide[list(TARGETS)].to_numpy(), wide["image_id"].astype(str).tolist()),
    }


def stats_table(record: dict) -> str:
    """The markdown table of docs/SYNTHETIC.md: one row per statistic, synthetic beside real."""
    cols = record["label_stats"]
    lines = ["| statistic | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(c[k] for c in cols.values()) + " |" for k in cols["synthetic"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.real_stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", required=True, help="the real competition train.csv (never copied into the repo)")
    parser.add_argument("--out", default=str(OUT), help=f"JSON written (default {OUT.relative_to(REPO)})")
    args = parser.parse_args(argv)
    real = Path(args.real)
    if not real.is_file():
        raise BiomassError(f"{real}: real label file not found; pass --real PATH of the competition's train.csv")
    record = collect(real)
    write_text_atomic(Path(args.out), json.dumps(record, indent=2) + "\n")  # key order = the table row order
    print(stats_table(record))
    print(json.dumps(record["physics"], indent=2))
    print(f"wrote {args.out}; run `python -m src.docs` to render it into the docs")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
