"""The measuring stages of `make gpu-check` (bench/gpu_check.py starts each as a child process with its budget).

  memory  peak CUDA memory of two real finetune-stage training steps per recipe grid (random weights, the recipe's
          batch, AdamW, EMA, autocast, grad checkpointing off and on) against bench/recipes.py's memory model
  flops   sustained TFLOP/s of each recipe backbone at one training step's sequences, fwd+bwd and fwd only, bf16 and
          fp16 autocast, as a share of the card's datasheet peak (FLOPs: bench/recipes.py's per-tile count)
  infer   python infer.py end to end (--device cuda --amp), 10 random ViT-B/14 checkpoints on full-size images, against
          the tile encoder alone in the same precision

Each writes its rows as JSON to --part; a stage stops starting new measurements after --deadline (epoch seconds).

    python bench/gpu_measure.py memory|flops|infer --part PATH [--deadline EPOCH_SECONDS]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common, recipes  # noqa: E402
from bench.gpu_check import (  # noqa: E402
    INFER_BATCH,
    INFER_FOLDS,
    INFER_GRIDS,
    INFER_IMAGES,
    INFER_KIND,
    REPO,
    child_env,
    memory_projection,
    peak_flops,
    recipe_shapes,
    resolve_recipe,
    run_limited,
)
from bench.infer_e2e import TTA_PASSES, make_experiment  # noqa: E402
from src import training  # noqa: E402
from src.averaging import ema_decay_for, make_ema  # noqa: E402
from src.config import Config  # noqa: E402
from src.errors import BiomassError, run_cli  # noqa: E402
from src.io_utils import write_text_atomic  # noqa: E402
from src.model import build_model, default_tile_size  # noqa: E402
from src.runtime import DistInfo, make_scaler  # noqa: E402

FLOP_SECONDS = 1.0  # timed seconds per throughput figure (after two warm-up calls)
STAGES = ("memory", "flops", "infer")


def _synced() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def build_on(model_cfg, device: torch.device):
    """build_model (random weights) with its tensors created on `device`: timm's init of a ViT-L takes seconds of
    CPU otherwise. Where building under the device context fails, the CPU build is moved instead (printed)."""
    try:
        with device:
            return build_model(model_cfg, load_backbone_weights=False)
    except RuntimeError as err:
        print(f"building on {device} failed ({str(err).splitlines()[0][:120]}); built on the CPU and moved")
        return build_model(model_cfg, load_backbone_weights=False).to(device)


def training_batch(view_size: tuple[int, int], batch: int, seed: int = 0) -> dict:
    """A batch as the image datasets give it (uint8 views, grams, aux labels), random values."""
    gen = torch.Generator().manual_seed(seed)
    parts = torch.rand(batch, 3, generator=gen) * 50
    targets = torch.stack([parts[:, 0], parts[:, 1], parts[:, 2], parts[:, 0] + parts[:, 2], parts.sum(1)], dim=1)
    return {
        "left": torch.randint(0, 256, (batch, 3, *view_size), dtype=torch.uint8, generator=gen),
        "right": torch.randint(0, 256, (batch, 3, *view_size), dtype=torch.uint8, generator=gen),
        "targets": targets,
        "index": torch.arange(batch),
        "state": torch.randint(0, 4, (batch,), generator=gen),
        "month": torch.randint(0, 10, (batch,), generator=gen),
        "species": torch.randint(0, 8, (batch,), generator=gen),
    }


def step_peak(cfg: Config, grid: tuple[int, int], grad_checkpointing: bool, device: torch.device) -> dict:
    """Peak CUDA memory of building the model on the GPU and two finetune-stage steps, as `training.fit` runs them."""

    cfg.model.grid, cfg.model.grad_checkpointing = list(grid), grad_checkpointing
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build_on(cfg.model, device)
    model.unfreeze_backbone(cfg.train.freeze_blocks)
    tc = cfg.train
    groups = model.param_groups(tc.finetune_head_lr, tc.backbone_lr, tc.weight_decay, layer_decay=tc.layer_decay)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = make_ema(model, ema_decay_for(tc, training.steps_per_epoch(recipes.N_TRAIN, tc, 1)), None, None, True)
    scaler = make_scaler(device, True)
    batches = [training_batch(model.view_size, tc.batch_size, seed) for seed in (0, 1)]
    start = _synced()
    stats = training.train_one_epoch(
        model, batches, optimizer, scheduler, cfg, device, False, DistInfo(), 0, ema, scaler
    )
    seconds = _synced() - start
    row = {
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
        "step_seconds": round(seconds / 2, 3),
        "finite": bool(stats["bad_steps"] == 0),
    }
    del model, optimizer, scheduler, ema, batches
    torch.cuda.empty_cache()
    return row


def measure_memory(deadline: float) -> list[dict]:
    """Per distinct recipe grid, grad checkpointing off and on: measured peak vs bench/recipes.py's projection."""
    device = torch.device("cuda")
    rows, done = [], {}
    for path in recipes.RECIPES:
        model_gb = {False: memory_projection(path, False), True: memory_projection(path, True)}
        cfg, recipe = resolve_recipe(path)
        for grid in recipe["grids"] or [tuple(cfg.model.grid)]:
            grid = tuple(int(g) for g in grid)
            tc = cfg.train
            for ckpt in (False, True):
                key = (cfg.model.backbone, grid, cfg.model.tile_size, tc.batch_size, tc.freeze_blocks,
                       tc.ema_decay > 0 or tc.ema_half_life > 0, ckpt)  # fmt: skip
                base = {"recipe": path.stem, "backbone": cfg.model.backbone, "grid": f"{grid[0]}x{grid[1]}",
                        "batch_size": tc.batch_size, "grad_checkpointing": ckpt,
                        "model_gb": model_gb[ckpt][f"{grid[0]}x{grid[1]}"]}  # fmt: skip
                if key in done:
                    rows.append({**base, **done[key], "same_as": done[key]["recipe"]})
                    continue
                if time.time() > deadline:
                    rows.append({**base, "status": "skipped: stage budget spent"})
                    continue
                try:
                    measured = step_peak(resolve_recipe(path)[0], grid, ckpt, device)
                    measured["status"] = "ok"
                except torch.cuda.OutOfMemoryError as err:
                    torch.cuda.empty_cache()
                    measured = {"status": f"OOM on this card: {str(err).splitlines()[0][:160]}"}
                measured["ratio_to_model"] = (
                    round(measured["peak_gb"] / base["model_gb"], 3) if "peak_gb" in measured else None
                )
                done[key] = {**measured, "recipe": path.stem}
                rows.append({**base, **measured})
    return rows


def measure_flops(deadline: float, peak: float | None) -> list[dict]:
    """Sustained TFLOP/s of each recipe backbone at one training step's sequences: fwd+bwd and fwd only, bf16, fp16."""

    device = torch.device("cuda")
    rows, seen = [], set()
    for shape in recipe_shapes():
        key = (shape["backbone"], shape["tile"], shape["sequences_per_step"])
        if key in seen:
            continue
        seen.add(key)
        cfg, _ = resolve_recipe(REPO / "configs" / f"{shape['recipe']}.yaml", tile_size=shape["tile"])
        cfg.model.grad_checkpointing = False  # exactly one forward per backward: FLOPs = 3 x forward
        model = build_on(cfg.model, device)
        n = shape["sequences_per_step"]
        tiles = torch.randn(n, 3, shape["tile"], shape["tile"], device=device).contiguous(
            memory_format=torch.channels_last
        )
        flops_fwd = shape["fwd_gflop_per_tile"] * 1e9 * n
        for dtype in (torch.bfloat16, torch.float16):
            for mode in ("fwd+bwd", "fwd"):
                base = {**{k: shape[k] for k in ("backbone", "tile", "sequences_per_step")}, "mode": mode,
                        "dtype": str(dtype).replace("torch.", "")}  # fmt: skip
                if time.time() > deadline:
                    rows.append({**base, "status": "skipped: stage budget spent"})
                    continue
                seconds = _time_calls(model, tiles, dtype, mode == "fwd+bwd")
                rate = flops_fwd * (3 if mode == "fwd+bwd" else 1) / seconds
                rows.append({**base, "status": "ok", "seconds_per_call": round(seconds, 4),
                             "tflops": round(rate / 1e12, 1),
                             "share_of_peak": round(rate / peak, 3) if peak else None})  # fmt: skip
        del model, tiles
        torch.cuda.empty_cache()
    return rows


def _time_calls(model, tiles: torch.Tensor, dtype: torch.dtype, backward: bool) -> float:
    """Mean seconds per call of the backbone (tile_features) over about FLOP_SECONDS, after two warm-up calls."""

    def call() -> None:
        with torch.autocast("cuda", dtype=dtype):
            feats = model.tile_features(tiles)
        if backward:
            feats.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    model.train(backward)
    model.backbone.requires_grad_(backward)
    context = torch.enable_grad() if backward else torch.inference_mode()
    with context:
        for _ in range(2):
            call()
        calls, start = 0, _synced()
        while calls < 3 or time.perf_counter() - start < FLOP_SECONDS:
            call()
            calls += 1
            if calls % 2 == 0:
                torch.cuda.synchronize()
        return (_synced() - start) / calls


def encoder_rates(grids: list[tuple[tuple[int, int], int]]) -> dict[int, tuple[float, float]]:
    """tile -> (FLOPs per tile, FLOP/s) of the ViT-B encoder alone in bf16 autocast, at infer.py's tiles per call.

    infer.py's backbone calls hold one batch's tiles (3 flips x 2 views x batch x tiles) cut into chunks of the
    model's `max_tiles_per_call`; the encoder is timed on calls of that size.
    """
    device, out = torch.device("cuda"), {}
    for grid, tile in grids:
        cfg = common.make_config(INFER_KIND, grid=grid, tile_size=tile)
        model = build_on(cfg.model, device).eval()
        per_call = min(TTA_PASSES * 2 * INFER_BATCH * grid[0] * grid[1], cfg.model.max_tiles_per_call)
        tiles = torch.randn(per_call, 3, tile, tile, device=device).contiguous(memory_format=torch.channels_last)
        seconds = _time_calls(model, tiles, torch.bfloat16, backward=False)
        shape = recipes.backbone_shape(cfg, tile)
        flops_tile = shape["depth"] * shape["block"] + shape["embed"]
        out[tile] = (flops_tile, per_call * flops_tile / seconds)
        del model, tiles
        torch.cuda.empty_cache()
    return out


def measure_infer(deadline: float, peak: float | None) -> dict:
    """infer.py end to end on the GPU for the 10-checkpoint ViT-B ensemble vs the encoder alone (same precision).

    The encoder is timed first (bounded), then infer.py gets what is left of the stage's budget.
    """
    grids = [(g, default_tile_size(g, 14)) for g in INFER_GRIDS]
    rates = encoder_rates(grids)
    data_dir = common.synthetic_test_set(INFER_IMAGES, (2000, 1000))
    with tempfile.TemporaryDirectory() as tmp:
        exp, ckpt_mb = make_experiment(Path(tmp), grids, INFER_KIND, INFER_FOLDS)
        cmd = [sys.executable, str(REPO / "infer.py"), "--data-dir", str(data_dir), "--checkpoints", str(exp),
               "--out", str(Path(tmp) / "submission.csv"), "--device", "cuda", "--amp",
               "--batch-size", str(INFER_BATCH)]  # fmt: skip
        run = run_limited(cmd, max(deadline - time.time(), 1), env=child_env(None), tail=200_000)
    if run["status"] != "ok":
        return {"status": run["status"], "output": run["output"][-1500:]}
    found = _predicted(run["output"])
    if found is None:
        return {"status": "failed: no 'predicted N images with M models in Xs' line", "output": run["output"][-1500:]}
    images, models, predict_s = found
    work = {tile: INFER_FOLDS * images * TTA_PASSES * 2 * g[0] * g[1] * rates[tile][0] for g, tile in grids}
    total = sum(work.values())
    encoder_s = sum(work[tile] / rates[tile][1] for tile in work)  # the same backbone work at the encoder's rate
    return {
        "status": "ok",
        "models": models,
        "images": images,
        "checkpoint_mb": round(ckpt_mb),
        "wall_s": run["seconds"],
        "predict_s": predict_s,
        "fixed_s": round(run["seconds"] - predict_s, 1),
        "e2e_tflops": round(total / predict_s / 1e12, 1),
        "encoder_tflops": round(total / encoder_s / 1e12, 1),
        "share_of_encoder": round(encoder_s / predict_s, 3),
        "share_of_peak": round(total / predict_s / peak, 3) if peak else None,
        "command": "python infer.py --data-dir <tmp> --checkpoints <tmp>/exp --device cuda --amp "
        f"--batch-size {INFER_BATCH}",
    }


def _predicted(output: str) -> tuple[int, int, float] | None:
    """(images, models, seconds) of infer.py's 'predicted N images with M models in Xs' line."""
    match = re.search(r"predicted (\d+) images with (\d+) models in ([0-9.]+)s", output)
    return (int(match[1]), int(match[2]), float(match[3])) if match else None


def run_stage(name: str, part: Path, deadline: float) -> None:
    """One measuring stage, its rows written as JSON to `part`."""
    peak = peak_flops(torch.cuda.get_device_name(0))
    if name == "memory":
        data = {"memory": measure_memory(deadline)}
    elif name == "flops":
        data = {"flops": measure_flops(deadline, peak)}
    elif name == "infer":
        data = {"infer": measure_infer(deadline, peak)}
    else:
        raise BiomassError(f"--stage {name!r}: choose memory, flops or infer")
    write_text_atomic(part, json.dumps(data, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_measure.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--part", required=True, help="JSON file the stage's rows are written to")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds after which nothing new starts")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise BiomassError(f"no CUDA device visible (torch {torch.__version__}): the {args.stage} stage measures a GPU")
    run_stage(args.stage, Path(args.part), args.deadline or time.time() + 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
