"""Projected GPU memory and time per fold of each recipe in configs/, and the kernel ensembles that fit in 9 h.

No GPU here: every figure is FLOP and byte arithmetic from the recipe's resolved config and its backbone's shape
(built on the meta device: no weights, no memory), at an assumed share of each GPU's dense fp16/bf16 peak.
Writes docs/recipes.csv (one row per recipe x device) and docs/recipes_kernel.csv (one row per recipe x ensemble);
`python -m src.docs` renders them into docs/RECIPES.md and README.md. `--check` exits 1 when the committed CSVs differ
from a fresh computation (a recipe or an assumption changed and the docs were not regenerated).

    python bench/recipes.py [--check]
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import GPUS  # noqa: E402
from src.config import Config, add_config_flags, check_recipe, load_yaml, resolve_config  # noqa: E402
from src.errors import BiomassError, run_cli  # noqa: E402
from src.io_utils import write_csv_atomic  # noqa: E402
from src.memory import fit_to_memory, projected_peak_bytes  # noqa: E402
from src.model import default_tile_size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RECIPES = sorted((REPO / "configs").glob("*.yaml"))

# the competition: 357 training images (train.csv has 1785 rows = 357 x 5 targets), folds.py's 5 folds
N_IMAGES, N_FOLDS = 357, 5
N_VAL = round(N_IMAGES / N_FOLDS)
N_TRAIN = N_IMAGES - N_VAL
# the kernel: 1000 hidden test images, host decode + resize 0.062 s / image and TTA full = 3 backbone passes
# (orig, h, v; the stereo swap reuses them) as in docs/BENCHMARKS.md's kernel projection; 9 h limit
N_TEST, HOST_S, TTA_PASSES, KERNEL_S = 1000, 0.062, 3, 9 * 3600
FLIP_VARIANTS = 4  # the frozen stage caches train tiles under 4 flips, val under 1 (src/feature_cache.py)
# (dense fp16/bf16 peak FLOP/s, assumed share of it, memory GB); A100/H100 datasheet peaks at an assumed 40%.
# T4: a RANGE, assumed (no T4 was measured): 10-15 TFLOP/s sustained of its 65 fp16 peak, because sm_75 has no
# FlashAttention-2 (SDPA falls back to the memory-efficient kernel), attention adds ~37% FLOPs at 2,309 tokens,
# and eager PyTorch with LayerNorm / GELU / softmax between the matmuls rarely sustains more on Turing. The
# kernel projection of docs/BENCHMARKS.md (bench/common.py: 30% of 65 = 19.5 TFLOP/s) is above this range; the
# issue-29 GPU check replaces it with a measured figure.
T4_PEAK = GPUS["Kaggle T4"]["fp16 autocast"][0]
T4_RATE = (10e12, 15e12)  # assumed sustained FLOP/s: (low, high); minutes are given at both, the low one first
DEVICES = {
    "T4": (T4_PEAK, T4_RATE[0] / T4_PEAK, 16),
    "A100": (312e12, 0.40, 80),
    "H100": (989e12, 0.40, 80),
}
FIT_CARDS = {"T4": 15.64e9, "A100": 85.1e9, "H100": 85.1e9}  # bytes CUDA reports for the 16 / 80 GB cards


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def backbone_shape(cfg: Config, tile: int) -> dict:
    """Depth, width, tokens per tile, parameters and forward FLOPs per tile of cfg's backbone (meta device)."""
    return dict(_shape(cfg.model.backbone.split(".", 1)[0], tile, tuple(sorted(cfg.model.backbone_kwargs.items()))))


@functools.cache
def _shape(name: str, tile: int, kwargs: tuple) -> dict:
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False, num_classes=0, img_size=tile, **dict(kwargs))
    patch = net.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    width, depth = int(net.embed_dim), len(net.blocks)
    tokens = (tile // patch) ** 2 + int(net.num_prefix_tokens)
    block = 2 * _linear_weights(net.blocks[0]) * tokens + 4 * tokens * tokens * width  # matmuls + QK^T and AV
    embed = 2 * 3 * patch * patch * width * (tile // patch) ** 2
    params = sum(p.numel() for p in net.parameters())
    shape = {"depth": depth, "width": width, "tokens": tokens, "params": params, "block": block, "embed": embed}
    return {**shape, "patch": patch}


def project(path: Path) -> tuple[list[dict], list[dict]]:
    """(one row per device, one row per kernel ensemble) of one recipe."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    cfg = resolve_config(parser.parse_args(["--config", str(path)]))
    recipe = check_recipe(load_yaml(path).get("recipe", {}), str(path))
    grids = recipe["grids"] or [tuple(cfg.model.grid)]
    folds = N_FOLDS if recipe["folds"] == "all" else len(recipe["folds"])
    seeds = len(recipe["seeds"] or [None])
    tc, rows, ensembles = cfg.train, [], []
    runs = []  # per grid: (FLOPs of one fold, peak memory bytes, shape)
    for grid in grids:
        tiles = grid[0] * grid[1]
        tile = cfg.model.tile_size or _native_tile(cfg, grid)
        shape = backbone_shape(cfg, tile)
        fwd_image = 2 * tiles * (shape["depth"] * shape["block"] + shape["embed"])  # two views
        frozen = min(tc.freeze_blocks, shape["depth"]) / shape["depth"]
        trainable_fwd = 1 - frozen  # share of the backbone forward that also runs backward
        # backward = 2x forward of the trainable part; grad checkpointing recomputes its forward once more
        step_factor = 1 + trainable_fwd * (2 + (1 if cfg.model.grad_checkpointing else 0))
        finetune = tc.epochs - tc.freeze_epochs
        cache = (N_TRAIN * FLIP_VARIANTS + N_VAL) * fwd_image if tc.freeze_epochs > 0 and tc.cache_features else 0
        per_epoch = N_TRAIN * fwd_image * step_factor + N_VAL * fwd_image
        flops = cache + finetune * per_epoch
        # memory: src/memory.py's projection from the CPU-measured bytes per block (docs/memory_constants.csv)
        grid_cfg = copy.deepcopy(cfg)
        grid_cfg.model.grid = list(grid)
        plain = projected_peak_bytes(grid_cfg, grad_checkpointing=False)
        ckpt_parts = projected_peak_bytes(grid_cfg, grad_checkpointing=True)
        memory = (ckpt_parts if cfg.model.grad_checkpointing else plain)["total"]
        weights = plain["weights"] + plain["grads_optimizer"]
        acts = (ckpt_parts if cfg.model.grad_checkpointing else plain)["activations"]
        ckpt = ckpt_parts["total"]
        fitted = {d: _fit(grid_cfg, FIT_CARDS[d]) for d in DEVICES}
        disk = _disk_gb(shape["params"], plain, cfg, folds * seeds)
        parts = (memory, weights, acts, ckpt, fitted, disk)
        runs.append((grid, tile, shape, fwd_image, step_factor, cache, finetune, flops, *parts))
    for device, (peak, share, mem_gb) in DEVICES.items():
        rate = peak * share
        for grid, tile, shape, fwd, factor, cache, finetune, flops, memory, weights, acts, ckpt, fitted, disk in runs:
            seconds = flops / rate
            arithmetic = (
                f"fwd {fwd / 1e12:.2f} TFLOP/img (2 views x {grid[0] * grid[1]} tiles x {shape['tokens']} tokens); "
                f"cache {cache / 1e15:.2f} PFLOP + {finetune} ep x ({N_TRAIN} x {factor:.2f} + {N_VAL}) x fwd = "
                f"{flops / 1e15:.2f} PFLOP / "
                + (
                    f"{T4_RATE[0] / 1e12:.0f}-{T4_RATE[1] / 1e12:.0f} TFLOP/s (assumed range)"
                    if device == "T4"
                    else f"({peak / 1e12:.0f} TFLOP/s x {share:.0%}, assumed)"
                )
            )
            rows.append(
                {
                    "recipe": path.stem,
                    "backbone": cfg.model.backbone,
                    "grid": f"{grid[0]}x{grid[1]}",
                    "tile": tile,
                    "device": device,
                    "pflop_per_fold": round(flops / 1e15, 2),
                    "minutes_per_fold": round(seconds / 60, 1),
                    "memory_gb": round(memory / 1e9, 1),
                    "weights_optimizer_gb": round(weights / 1e9, 1),
                    "activations_gb": round(acts / 1e9, 1),
                    "memory_gb_grad_checkpointing": round(ckpt / 1e9, 1),
                    "fits": memory / 1e9 <= mem_gb,
                    "device_gb": mem_gb,
                    "fit_memory_choice": fitted[device],
                    "minutes_per_fold_fast": round(flops / (T4_RATE[1] if device == "T4" else rate) / 60, 1),
                    "disk_gb_slim": disk["slim"],
                    "disk_gb_none": disk["none"],
                    "disk_gb_full": disk["full"],
                    "runs": folds * seeds,
                    "hours_all_runs": round(seconds * folds * seeds / 3600, 1),
                    "arithmetic": arithmetic,
                }
            )
    # kernel: the first grid's folds, then every grid; T4 fp16 (Kaggle's accelerator), one GPU
    options = [("fold 0 of " + _g(grids[0]), [(grids[0], 1)])]
    if folds > 1:
        options.append((f"{folds} folds of {_g(grids[0])}", [(grids[0], folds)]))
    if len(grids) > 1:
        options.append((f"{folds} folds x {' + '.join(_g(g) for g in grids)}", [(g, folds) for g in grids]))
    by_grid = {run[0]: run[3] for run in runs}  # grid -> forward FLOPs per image
    for label, parts in options:
        models = sum(n * seeds for _, n in parts)
        flops = sum(N_TEST * TTA_PASSES * by_grid[g] * n * seeds for g, n in parts)
        seconds = flops / T4_RATE[0] + N_TEST * HOST_S * len(parts)
        ensembles.append(
            {
                "recipe": path.stem,
                "ensemble": label + (f" x {seeds} seeds" if seeds > 1 else ""),
                "models": models,
                "pflop": round(flops / 1e15, 2),
                "minutes_t4": round(seconds / 60, 1),
                "share_of_9h": round(seconds / KERNEL_S, 3),
                "fits_9h": seconds <= KERNEL_S,
                "arithmetic": (
                    f"{N_TEST} img x {TTA_PASSES} TTA x {models} models x fwd = {flops / 1e15:.2f} PFLOP / "
                    f"{T4_RATE[0] / 1e12:.0f} TFLOP/s (assumed, the low end) "
                    f"+ host {N_TEST} x {HOST_S} s x {len(parts)} grid"
                ),
            }
        )
    return rows, ensembles


def _fit(cfg: Config, card: float) -> str:
    """What train.py --fit-memory auto chooses on a card of `card` bytes, in a few words."""
    try:
        fitted, note = fit_to_memory(cfg, card)
    except BiomassError:
        return "does not fit"
    tc = fitted.train
    accum = tc.global_batch // tc.batch_size if tc.global_batch > 0 else tc.accum
    kept = "kept" in note
    return f"{'as is' if kept else 'fitted'}: ckpt {'on' if fitted.model.grad_checkpointing else 'off'}, " + (
        f"batch {tc.batch_size} x {accum}"
    )


def _disk_gb(params: int, plain: dict, cfg: Config, runs: int) -> dict:
    """Checkpoint disk of all runs: best.pt (fp32 weights) per run + last.pt per run after its fold (slim: the
    weights; none: nothing; full: weights, EMA, AdamW moments) + one full last.pt of the fold in progress."""
    best = 4.0 * params
    full = plain["weights"] + 8.0 * (plain["grads_optimizer"] / 12.0)  # weights (+ EMA) + AdamW m and v
    kept = {"slim": best, "none": 0.0, "full": full}
    return {k: round((runs * (best + v) + full) / 1e9, 1) for k, v in kept.items()}


def _g(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def _native_tile(cfg: Config, grid: tuple[int, int]) -> int:
    """The tile train.py uses without --tile-size: the native one rounded to the backbone's patch."""
    return default_tile_size(grid, backbone_shape(cfg, 224)["patch"])


def compute() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, ensembles = [], []
    for path in RECIPES:
        r, e = project(path)
        rows += r
        ensembles += e
    return pd.DataFrame(rows), pd.DataFrame(ensembles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/recipes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/recipes*.csv differ from a fresh run")
    args = parser.parse_args(argv)
    table, kernel = compute()
    targets = {DOCS / "recipes.csv": table, DOCS / "recipes_kernel.csv": kernel}
    if args.check:
        stale = [
            p.name
            for p, frame in targets.items()
            if not p.is_file() or not pd.read_csv(p).astype(str).equals(frame.astype(str))
        ]
        if stale:
            raise BiomassError(f"{', '.join(stale)} differ from the recipes; run python bench/recipes.py")
        print("docs/recipes.csv and docs/recipes_kernel.csv up to date")
        return 0
    for path, frame in targets.items():
        write_csv_atomic(frame, path, index=False)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
