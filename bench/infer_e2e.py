"""Benchmark 5: wall time and peak RSS of the full inference path (`predict_ensemble` over checkpoints,
full TTA, bf16 autocast), and the projection to 5 folds x 2 grids on 100 images and on a 1,000-image
test set, on this CPU and on Kaggle's T4 / P100 from the FLOP count.

ViT-B over 5 folds x (2x2, 3x3) x full TTA is far too slow for 2 CPU cores, so this measures ONE
random-init ViT-B/14 reg4 checkpoint per grid (2x2 at tile 518, 3x3 at tile 336; written with
`build_model` + `save_best` to <tmp>/grid<R>x<C>/fold0/best.pt and loaded through `find_checkpoints` +
`load_predictors`, as infer.py does) on a few full-resolution synthetic images, and projects the rest.
Bar: the 1,000-image test set on a Kaggle GPU under 25% of the 9-hour limit.

    python bench/infer_e2e.py [--quick] [--images 3] [--folds 5] [--test-images 1000]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

GPUS = {  # name: (peak FLOP/s used, assumed achieved share, note)
    "Kaggle T4": (65e12, 0.40, "fp16 tensor cores 65 TFLOP/s x 40%"),
    "Kaggle P100": (9.3e12, 0.50, "fp32 9.3 TFLOP/s (no tensor cores) x 50%"),
}
FULL_RES = (2000, 1000)
TTA_PASSES = 3  # full TTA: 3 flips through the backbone; the stereo swap reuses the original features


def make_experiment(root: Path, grids: list[tuple[tuple[int, int], int]], kind: str) -> Path:
    """<root>/exp/grid<R>x<C>/fold0/best.pt for each (grid, tile), random init."""
    exp = root / "exp"
    for grid, tile in grids:
        cfg = common.make_config(kind, grid=grid, tile_size=tile)
        common.save_random_checkpoint(cfg, exp / f"grid{grid[0]}x{grid[1]}" / "fold0" / "best.pt")
    return exp


def tile_flops(predictor) -> int:
    """FLOPs of one tile through the encoder (FlopCounterMode + CPU SDPA), batch 1."""
    from bench.backbone_flops import count_flops, random_tiles

    tiles = random_tiles(predictor.model, 1)
    return count_flops(lambda: predictor.model.tile_features(tiles))["total"]


def host_seconds(frame, view_sizes) -> float:
    """Per image: read + decode + split + resize for every model's view size (what the loader does)."""
    from src.dataset import MultiSizeViewDataset

    dataset = MultiSizeViewDataset(frame, view_sizes)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return (time.perf_counter() - start) / len(dataset)


def main(argv: list[str] | None = None) -> dict:
    from src.inference import find_checkpoints, grid_weight_map, load_predictors, predict_ensemble

    p = common.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--images", type=int, default=3, help="images to time (default 3)")
    p.add_argument("--batch-size", type=int, default=8, help="predict_ensemble batch size (infer.py default 8)")
    p.add_argument("--folds", type=int, default=5, help="folds in the projected ensemble")
    p.add_argument("--test-images", type=int, default=1000, help="projected hidden test set size")
    p.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    args = p.parse_args(argv)
    common.setup(args)
    info = common.machine()
    amp = not args.no_amp
    if args.quick:
        kind, grids, size, n = "tiny_quick", [((2, 2), 28), ((3, 3), 28)], (512, 256), 2
    else:
        kind, grids, size, n = "vit_b", [((2, 2), 518), ((3, 3), 336)], FULL_RES, args.images
    frame = common.train_frame(max(n, 12) if not args.quick else n, size).iloc[:n].reset_index(drop=True)
    common.reset_peak_rss()
    mem = {"baseline (imports, data frame)": common.peak_rss_mb()}
    with tempfile.TemporaryDirectory() as tmp:
        exp = make_experiment(Path(tmp), grids, kind)
        common.reset_peak_rss()
        paths = find_checkpoints([exp])
        with common.quiet():
            predictors = load_predictors(paths, torch.device("cpu"), "full", amp)
        mem["after loading the checkpoints"] = common.peak_rss_mb()
        ckpt_mb = sum(path.stat().st_size for path in paths) / len(paths) / 2**20
    per_grid = {}
    for pred in predictors:
        label = f"{pred.grid[0]}x{pred.grid[1]}"
        with common.quiet():
            predict_ensemble([pred], frame.iloc[:1], args.batch_size, show=False)  # warm-up (oneDNN primitives)
            common.reset_peak_rss()
            seconds = predict_ensemble([pred], frame, args.batch_size, show=False).seconds
        mem[f"predict {label} (1 model)"] = common.peak_rss_mb()
        per_grid[label] = {"seconds": seconds, "tile_flops": tile_flops(pred), "tiles": pred.grid[0] * pred.grid[1], "tile": pred.model.tile_size}
    common.reset_peak_rss()
    with common.quiet():
        ensemble = predict_ensemble(predictors, frame, args.batch_size, grid_weight_map(predictors, None), show=False)
    mem["predict_ensemble, both grids"] = common.peak_rss_mb()
    host = host_seconds(frame, [pr.view_size for pr in predictors])
    final = common.peak_rss_mb()

    # ---- measured table
    rows = []
    for label, g in per_grid.items():
        flops_img = TTA_PASSES * 2 * g["tiles"] * g["tile_flops"]
        g["flops_image"] = flops_img
        rows.append({
            "model": f"{kind} grid {label}, tile {g['tile']}",
            "backbone tiles / image (full TTA)": TTA_PASSES * 2 * g["tiles"],
            "GFLOP / tile": f"{g['tile_flops'] / 1e9:.1f}",
            "TFLOP / image": f"{flops_img / 1e12:.2f}",
            f"wall s ({n} images)": f"{g['seconds']:.1f}",
            "s / image": f"{g['seconds'] / n:.2f}",
            "s / 100 images": f"{100 * g['seconds'] / n:.0f}",
            "achieved GFLOP/s": f"{flops_img * n / g['seconds'] / 1e9:.0f}",
        })
    rows.append({
        "model": "predict_ensemble, both grids (1 fold each)", f"wall s ({n} images)": f"{ensemble.seconds:.1f}",
        "s / image": f"{ensemble.seconds / n:.2f}", "s / 100 images": f"{100 * ensemble.seconds / n:.0f}",
        "TFLOP / image": f"{sum(g['flops_image'] for g in per_grid.values()) / 1e12:.2f}",
    })
    mem_rows = [
        {"phase": k, "VmHWM peak since reset (MiB)": f"{v.get('vmhwm_mb', float('nan')):.0f}", "VmRSS now (MiB)": f"{v.get('vmrss_mb', float('nan')):.0f}",
         "ru_maxrss so far (MiB)": f"{v['ru_maxrss_mb']:.0f}"}
        for k, v in mem.items()
    ]
    model_mb = (mem["after loading the checkpoints"].get("vmrss_mb", 0) - mem["baseline (imports, data frame)"].get("vmrss_mb", 0)) / len(predictors)

    # ---- projection
    flops_fold = sum(g["flops_image"] for g in per_grid.values())  # one fold, both grids, one image
    cpu_fold = sum(g["seconds"] / n for g in per_grid.values())
    models = args.folds * len(per_grid)
    proj, verdicts = [], []
    for images in (100, args.test_images):
        total_flops = images * args.folds * flops_fold
        proj.append({"device": "this CPU (measured rate)", "images": images, "models": models,
                     "arithmetic": f"{images} x {args.folds} folds x {cpu_fold:.1f} s (both grids, 1 fold)",
                     "seconds": f"{images * args.folds * cpu_fold:.0f}", "share of 9 h": f"{images * args.folds * cpu_fold / common.KAGGLE_LIMIT_S:.1%}"})
        for name, (peak, eff, note) in GPUS.items():
            compute = total_flops / (peak * eff)
            total = compute + images * host
            share = total / common.KAGGLE_LIMIT_S
            proj.append({"device": f"{name} ({note})", "images": images, "models": models,
                         "arithmetic": f"{images} x {args.folds} x {flops_fold / 1e12:.2f} TFLOP = {total_flops / 1e15:.2f} PFLOP / {peak * eff / 1e12:.2f} TFLOP/s = {compute:.0f} s + host {images} x {host:.3f} s",
                         "seconds": f"{total:.0f}", "share of 9 h": f"{share:.1%}"})
            if images == args.test_images:
                verdicts.append(common.bar_line(f"{name}: {images} images x {models} models x full TTA ~ {total / 60:.0f} min = {share:.1%} of 9 h (bar < 25%)", share < 0.25))
    cpu_test = args.test_images * args.folds * cpu_fold
    verdicts.append(f"For comparison, this CPU (2 cores, not a bar): {args.test_images} images would take ~{cpu_test / 3600:.1f} h = "
                    f"{cpu_test / common.KAGGLE_LIMIT_S:.0%} of 9 h with {kind}.")
    lines = [
        f"{n} synthetic {size[0]}x{size[1]} JPEGs, random-init checkpoints, tta full, {'bf16 autocast' if amp else 'fp32'}, "
        f"batch {args.batch_size}, num_workers 0 (infer.py defaults). Each model was warmed up on 1 image first; one timed "
        f"run per row (each run is many backbone calls; the load average below says how contended it was). "
        f"Checkpoint size {ckpt_mb:.0f} MiB each. FLOPs: FlopCounterMode with the CPU SDPA formula added (see the "
        "FLOP/s benchmark), per image = 3 flip passes x 2 views x tiles x GFLOP/tile (heads are negligible).",
        "",
        common.table(rows, list(rows[0].keys())),
        "",
        "Peak memory (VmHWM reset through /proc/self/clear_refs before each phase; ru_maxrss cannot be reset):",
        "",
        common.table(mem_rows),
        "",
        f"Resident memory per loaded model ~{model_mb:.0f} MiB, and `load_predictors` holds every checkpoint at once: "
        f"{models} models ~ {models * model_mb / 1024:.1f} GiB of weights on the host (and on the GPU). Process peak "
        f"ru_maxrss {final['ru_maxrss_mb']:.0f} MiB.",
        "",
        f"Projection ({args.folds} folds x {len(per_grid)} grids x full TTA; host = measured decode+resize per image "
        f"({host:.3f} s), serial with the GPU at num_workers 0; 9 h = {common.KAGGLE_LIMIT_S} s):",
        "",
        common.table(proj),
        "",
        *[f"- {v}" for v in verdicts],
        "- GPU rows are FLOP-count projections with the stated efficiency, not measurements (no GPU lent to this session).",
    ]
    common.report(args, argv, f"Inference end to end: {kind} ensemble, time and peak RSS", "\n".join(lines), info)
    return {"rows": rows, "projection": proj, "memory": mem}


if __name__ == "__main__":
    main()
