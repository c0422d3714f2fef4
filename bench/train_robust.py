"""Issue 21 on this CPU: EMA with and without warm-up and the bias-corrected grams (OOF weighted R2 over seeds),
mixup on the device vs on the CPU (step share), loader with persistent workers vs rebuilt every epoch.

EMA arms train every fold with `src.training.fit` (tiny preset, the same folds and seeds per arm, round-robin per
fold); each seed's OOF of the best epochs is scored with the competition metric and reported as the seed mean
with the seed spread (min-max) beside it. The bias correction multiplies the EMA-off ensemble's OOF grams by
per-target factors fitted on the other folds (`src/bias.py`, what `infer.py --oof` reports as `project+bias`;
here without the physics projection). A difference smaller than the seed spread is "can't tell".

Mixup: the cost of mixing one real-size batch (8 x 2 views x 3 x 1008 x 1008, uint8 -> float) on the CPU, which
is what leaves the host when the batch is mixed after the copy to the GPU; its GPU time is projected from
memory traffic (bytes read + written / bandwidth), not measured (no GPU here).

Loader: 3 epochs over cached images with 2 workers, one DataLoader per epoch vs one persistent loader.

    python bench/train_robust.py [--quick] [--images 60] [--folds 2] [--epochs 6] [--seeds 0 1 2]
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
from torch.utils.data import DataLoader  # noqa: E402

from bench import common  # noqa: E402
from src.bias import corrected, nested_factors  # noqa: E402
from src.dataset import image_dataset  # noqa: E402
from src.folds import make_folds  # noqa: E402
from src.losses import mixup  # noqa: E402
from src.metric import score  # noqa: E402
from src.runtime import worker_init  # noqa: E402
from src.schema import TARGETS  # noqa: E402
from src.training import fit  # noqa: E402

IMAGE_SIZE = (1000, 500)  # the repo's demo data size
# arm -> (ema_decay, ema_half_life, ema_warmup)
ARMS = {
    "EMA off": (0.0, 0.0, False),
    "EMA 0.999, no warm-up": (0.999, 0.0, False),
    "EMA 0.999 + warm-up": (0.999, 0.0, True),
    "EMA half-life 1 epoch": (0.0, 1.0, False),
}
GPU_BANDWIDTH = {"T4": 320e9, "A100 40GB": 1555e9}  # datasheet bytes/s; projections assume 60% of it


def _cfg(arm: str, seed: int, epochs: int, tile: int):
    decay, half_life, warmup = ARMS[arm]
    cfg = common.make_config("tiny", tile_size=tile)
    cfg.train.seed, cfg.train.device, cfg.train.epochs, cfg.train.amp = seed, "cpu", epochs, False
    cfg.train.ema_decay, cfg.train.ema_half_life, cfg.train.ema_warmup = decay, half_life, warmup
    cfg.data.num_workers = 0
    return cfg


def _oof_r2(frames: list[pd.DataFrame], bias: bool = False) -> float:
    pred = pd.concat(frames, ignore_index=True)
    truth = pred[[f"true_{t}" for t in TARGETS]].to_numpy(np.float64)
    values = pred[list(TARGETS)].to_numpy(np.float64)
    if bias:
        values = corrected(values, nested_factors(values, truth, pred["fold"].to_numpy()))
    return score(truth, values)["weighted_r2"]


def ema_and_bias(frame: pd.DataFrame, n_folds: int, seeds: list[int], epochs: int, tile: int) -> list[dict]:
    oof = {(a, s): [] for a in ARMS for s in seeds}
    seconds = dict.fromkeys(ARMS, 0.0)
    for seed in seeds:
        for fold in range(n_folds):
            train = frame[frame["fold"] != fold].reset_index(drop=True)
            val = frame[frame["fold"] == fold].reset_index(drop=True)
            for arm in ARMS:
                with common.quiet():
                    start = time.perf_counter()
                    result = fit(_cfg(arm, seed, epochs, tile), train, val, None, torch.device("cpu"), fold=fold)
                    seconds[arm] += time.perf_counter() - start
                oof[(arm, seed)].append(result.oof)
            print(f"seed {seed} fold {fold} done", flush=True)
    rows = []
    arms = [(a, False) for a in ARMS] + [("EMA off", True)]
    for arm, bias in arms:
        values = [_oof_r2(oof[(arm, s)], bias) for s in seeds]
        rows.append(
            {
                "arm": arm + (" + bias-corrected grams (nested factors)" if bias else ""),
                "OOF weighted R2, seed mean": f"{np.mean(values):.4f}",
                "seed spread (min-max)": f"{min(values):.4f} - {max(values):.4f}",
                "per seed": ", ".join(f"{v:.4f}" for v in values),
                "train s (all)": "-" if bias else f"{seconds[arm]:.0f}",
            }
        )
    return rows


def mixup_cost(repeats: int, size: int) -> list[dict]:
    """CPU seconds of mixing one batch of uint8 views (what moving mixup onto the GPU takes off the host)."""
    batch = {
        "left": torch.randint(0, 255, (8, 3, size, size), dtype=torch.uint8),
        "right": torch.randint(0, 255, (8, 3, size, size), dtype=torch.uint8),
        "targets": torch.rand(8, 5),
    }
    perm = torch.randperm(8)
    times = [common.timed(lambda: mixup(batch, 0.3, perm)) for _ in range(repeats)]
    # read uint8 (1 B), write float (4 B), read float twice for the mix, write float: ~ 1 + 4 + 8 + 4 bytes per value
    traffic = 2 * batch["left"].numel() * 17
    rows = [{"where": "CPU (measured, median)", "seconds per mixed batch": f"{common.median(times):.3f}"}]
    for name, bandwidth in GPU_BANDWIDTH.items():
        seconds = traffic / (0.6 * bandwidth)
        rows.append({"where": f"{name} (projected, 60% of bandwidth)", "seconds per mixed batch": f"{seconds:.4f}"})
    return rows


def loader_epochs(n_images: int, size: tuple[int, int], tile: int, epochs: int) -> list[dict]:
    """Seconds for `epochs` passes with 2 workers and --cache-images: rebuilt loaders vs one persistent loader."""
    cfg = common.make_config("tiny", tile_size=tile)
    cfg.data.cache_images, cfg.data.num_workers = True, 2
    frame = common.train_frame(n_images, size)
    view = (2 * tile, 2 * tile)
    out = []
    for persistent in (False, True):
        dataset = image_dataset(frame, view, cfg.data)

        def make(dataset=dataset, persistent=persistent):
            return DataLoader(
                dataset, batch_size=8, num_workers=2, worker_init_fn=worker_init, persistent_workers=persistent
            )

        start, loader, per_epoch = time.perf_counter(), None, []
        for _ in range(epochs):
            t0 = time.perf_counter()
            loader = loader if persistent and loader is not None else make()
            for _ in loader:
                pass
            per_epoch.append(time.perf_counter() - t0)
        out.append(
            {
                "loader": "persistent (built once)" if persistent else "rebuilt every epoch",
                f"total s ({epochs} epochs)": f"{time.perf_counter() - start:.2f}",
                "per epoch s": ", ".join(f"{v:.2f}" for v in per_epoch),
            }
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0], repeats=5)
    p.add_argument("--images", type=int, default=60, help="synthetic 1000x500 images (default 60)")
    p.add_argument("--folds", type=int, default=2, help="month-grouped folds (default 2)")
    p.add_argument("--epochs", type=int, default=6, help="total epochs (default 6)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--tile", type=int, default=28, help="tile size (default 28)")
    args = p.parse_args(argv)
    common.setup(args)
    info = common.machine()
    if args.quick:
        n, n_folds, epochs, seeds, size, mix_size, repeats = 12, 2, 2, [0], (256, 128), 112, 1
    else:
        n, n_folds, epochs, seeds, size = args.images, args.folds, args.epochs, args.seeds, IMAGE_SIZE
        mix_size, repeats = 1008, args.repeats or 5
    frame = common.train_frame(n, size)
    frame = frame.merge(make_folds(frame, "group_month", n_folds=n_folds, seed=0), on="image_id")
    ema_rows = ema_and_bias(frame, n_folds, seeds, epochs, args.tile)
    mix_rows = mixup_cost(repeats, mix_size)
    loader_rows = loader_epochs(n, size, args.tile, 3 if not args.quick else 2)
    lines = [
        f"Tiny preset (tile {args.tile}, {epochs} epochs, 1 frozen), {n} synthetic {size[0]}x{size[1]} JPEGs, "
        f"{n_folds} month-grouped folds, seeds {' '.join(map(str, seeds))}, `fit` per fold x arm x seed, CPU.",
        "",
        common.table(ema_rows),
        "",
        'A difference smaller than the seed spread is "can\'t tell"; on a run this short (~'
        f"{epochs * int(np.ceil(n / n_folds / 16))} optimizer steps) 0.999 without warm-up leaves most of the EMA "
        "on the initial weights (`src.averaging.initial_weight`).",
        "",
        f"Mixup of one batch (8 x 2 views x 3 x {mix_size} x {mix_size}, uint8 -> float):",
        "",
        common.table(mix_rows),
        "",
        "Loader with 2 workers and `--cache-images` (workers keep their image cache only when persistent):",
        "",
        common.table(loader_rows),
    ]
    title = "Training robustness: EMA warm-up, bias-corrected grams, mixup, loaders"
    common.report(args, argv, title, "\n".join(lines), info)
    return {"ema": ema_rows, "mixup": mix_rows, "loader": loader_rows}


if __name__ == "__main__":
    main()
