"""Mixed precision: does bf16 autocast (`--amp`) keep the metric? OOF weighted R2 of the tiny preset trained on
synthetic data with and without it (same folds, same seed), beside the seed-to-seed spread of fp32, and the
wall time of each.

Every arm trains every fold with `src.training.fit` (the tiny preset as train.py runs it: frozen stage from the
feature cache, then end to end, mixup, augmentation, validation each epoch; num_workers 0); the OOF
predictions of the best epoch of each fold are scored together with the competition metric. Arms run
round-robin per fold in one process. 'Keeps the metric' = the bf16 OOF R2 is within the fp32 seed-to-seed
difference of the fp32 one, or within 0.01, whichever is larger (a difference smaller than a change of
seed is not a property of the precision).

    python bench/amp.py [--quick] [--images 120] [--folds 3] [--epochs 16]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from src.folds import make_folds  # noqa: E402
from src.metric import score  # noqa: E402
from src.schema import TARGETS  # noqa: E402
from src.training import fit  # noqa: E402

IMAGE_SIZE = (1000, 500)  # the repo's demo data size
MIN_TOLERANCE = 0.01
ARMS = {"fp32 (seed 42)": (False, 42), "bf16 autocast (seed 42)": (True, 42), "fp32 (seed 43)": (False, 43)}


def _cfg(amp: bool, seed: int, epochs: int | None, tile: int | None):
    cfg = common.make_config("tiny", **({"tile_size": tile} if tile else {}))
    cfg.train.amp, cfg.train.seed, cfg.train.device = amp, seed, "cpu"
    cfg.data.num_workers = 0
    if epochs:
        cfg.train.epochs = epochs
    return cfg


def main(argv: list[str] | None = None) -> dict:

    p = common.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--images", type=int, default=120, help="synthetic 1000x500 images (default 120)")
    p.add_argument("--folds", type=int, default=3, help="month-grouped folds (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs (default: the tiny preset's 16)")
    args = p.parse_args(argv)
    common.setup(args)
    info = common.machine()
    if args.quick:
        n, n_folds, epochs, size, tile = 12, 2, 2, (256, 128), 28
    else:
        n, n_folds, epochs, size, tile = args.images, args.folds, args.epochs, IMAGE_SIZE, None
    frame = common.train_frame(n, size)
    frame = frame.merge(make_folds(frame, "group_month", n_folds=n_folds, seed=0), on="image_id")
    oof: dict[str, list[pd.DataFrame]] = {a: [] for a in ARMS}
    seconds: dict[str, float] = dict.fromkeys(ARMS, 0.0)
    best: dict[str, list[float]] = {a: [] for a in ARMS}
    for fold in range(n_folds):
        train = frame[frame["fold"] != fold].reset_index(drop=True)
        val = frame[frame["fold"] == fold].reset_index(drop=True)
        for arm, (amp, seed) in ARMS.items():
            cfg = _cfg(amp, seed, epochs, tile)
            with common.quiet():
                start = time.perf_counter()
                result = fit(cfg, train, val, None, torch.device("cpu"), fold=fold)
                seconds[arm] += time.perf_counter() - start
            oof[arm].append(result.oof)
            best[arm].append(result.best_metric)
        print(f"fold {fold}: " + ", ".join(f"{a} {best[a][-1]:.4f}" for a in ARMS), flush=True)
    rows, r2 = [], {}
    for arm in ARMS:
        pred = pd.concat(oof[arm], ignore_index=True)
        truth = pred[[f"true_{t}" for t in TARGETS]].to_numpy(np.float64)
        r2[arm] = score(truth, pred[list(TARGETS)].to_numpy(np.float64))["weighted_r2"]
        rows.append(
            {
                "arm": arm,
                "OOF weighted R2": f"{r2[arm]:.4f}",
                "per-fold best val R2": ", ".join(f"{v:.3f}" for v in best[arm]),
                "train + validate s (all folds)": f"{seconds[arm]:.1f}",
            }
        )
    delta_amp = abs(r2["bf16 autocast (seed 42)"] - r2["fp32 (seed 42)"])
    delta_seed = abs(r2["fp32 (seed 43)"] - r2["fp32 (seed 42)"])
    tolerance = max(delta_seed, MIN_TOLERANCE)
    speed = seconds["fp32 (seed 42)"] / seconds["bf16 autocast (seed 42)"]
    cfg = _cfg(False, 42, epochs, tile)
    lines = [
        f"Tiny preset ({cfg.model.backbone} depth {cfg.model.backbone_kwargs.get('depth')}, tile "
        f"{cfg.model.tile_size}, "
        f"{cfg.train.epochs} epochs, {cfg.train.freeze_epochs} frozen), {n} synthetic {size[0]}x{size[1]} JPEGs, "
        f"{n_folds} month-grouped folds (seed 0), `fit` per fold per arm, num_workers 0, CPU.",
        "",
        common.table(rows),
        "",
        "- "
        + common.bar_line(
            f"bf16 autocast changes the OOF weighted R2 by {delta_amp:.4f}; a change of seed changes it by "
            f"{delta_seed:.4f} "
            f"(tolerance max(seed difference, {MIN_TOLERANCE}) = {tolerance:.4f})",
            delta_amp <= tolerance,
        ),
        f"- Speed: fp32 / bf16 wall time = {speed:.2f}x on this tiny model (139k parameters: overhead-bound, so bf16 "
        f"{'buys little' if speed >= 1 else 'is slower (autocast casts cost more than its matmuls save)'} here; "
        "the ViT-B "
        "encoder gains ~3-4x, see the FLOP/s benchmark).",
        "- Whole-model autocast (training's `_loss`, `Predictor.predict_views`) also runs the heads in bf16, whose "
        "log1p output then carries bf16 rounding (up to 1.6% in grams; tests/test_bench.py measures it); autocast on "
        "the backbone alone keeps predictions within ~0.1-0.2% of fp32.",
    ]
    common.report(args, argv, "Mixed precision: OOF metric with and without bf16 autocast", "\n".join(lines), info)
    return {"rows": rows, "r2": r2, "seconds": seconds}


if __name__ == "__main__":
    main()
