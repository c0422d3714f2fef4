"""Benchmark 4: decoded-and-tiled images/s of one loader worker on full-resolution 2000x1000 JPEGs (full vs
reduced JPEG decode, eval and training transforms, the inference item that serves both grids from one
decode) against the model's images/s; is the loader the bottleneck at the default num_workers?

Per image a worker does what the datasets' `__getitem__` does (header read, decode, view split, transform,
CHW uint8 tensors) plus the model's `tile_views` of both views, in this process (= one worker). The
model side is measured in the same run: the tiny preset's training step and forward at its view size,
and the ViT-B/14 tile encoder at 518 (fp32 and bf16 autocast) turned into images/s (2 views x 4 tiles
per image). GPU rates are FLOP-count estimates (common.GPUS), never measurements.

Default num_workers: tiny preset 0 (loading is serial with the step), base config 2, infer.py 0.

    python bench/data_pipeline.py [--quick] [--images 12] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.backbone_flops import analytic_vit_flops, build_encoder, encoder_throughput  # noqa: E402
from src.data import jpeg_reduce_factor  # noqa: E402
from src.dataset import (  # noqa: E402
    MultiSizeViewDataset,
    ViewPairDataset,
)
from src.losses import target_loss  # noqa: E402
from src.model import (  # noqa: E402
    build_model,
    tile_views,
)
from src.transforms import build_transform  # noqa: E402

FULL_RES = (2000, 1000)
BASE_WORKERS, INFER_WORKERS = 2, 0  # DataConfig.num_workers (base preset) and infer.py --num-workers
TTA_PASSES = 3  # full TTA: 3 flip passes through the backbone (the stereo swap reuses them)


def loader_fn(frame, view_size, grid, tile, jpeg_reduce: bool, train: bool = False, cache_images: bool = False):
    """One pass over the images as one worker: dataset item (eval or default-augment transform) + tiling.

    cache_images: the dataset keeps decoded images in RAM (`--cache-images`); it is primed with one untimed
    pass here, so the timed passes are what epochs 2+ cost.
    """

    transform = build_transform(view_size, train=train)
    if train:
        transform.set_random_seed(0)
    dataset = ViewPairDataset(frame, view_size, transform, jpeg_reduce=jpeg_reduce, cache_images=cache_images)
    if cache_images:
        for i in range(len(dataset)):
            dataset[i]

    def run():
        for i in range(len(dataset)):
            item = dataset[i]
            tile_views(torch.stack([item["left"], item["right"]]).float(), grid, tile)

    return run


def multi_size_fn(frame, views: list[tuple[tuple[int, int], int]]):
    """The inference item: one decode per image, resized for every grid's view (MultiSizeViewDataset) + tiling."""

    sizes = {(g[0] * t, g[1] * t): (g, t) for g, t in views}
    dataset = MultiSizeViewDataset(frame, list(sizes))

    def run():
        for i in range(len(dataset)):
            item = dataset[i]
            for (h, w), (grid, tile) in sizes.items():
                tile_views(item[f"{h}x{w}"].float(), grid, tile)

    return run


def decode_fns(frame) -> dict:
    """Plain cv2.imread of every image at reduce 1/2/4/8 (the decode alone)."""
    flags = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }
    paths = list(frame["path"])
    return {
        f"cv2.imread reduce {r}": (lambda flag=flag: [cv2.imread(p, flag) for p in paths]) for r, flag in flags.items()
    }


def tiny_model_fns(kind: str, batch: int):
    """Training step (forward + backward + AdamW, backbone trainable: stage 2) and eval forward of the tiny preset."""

    cfg = common.make_config(kind)
    model = build_model(cfg.model, load_backbone_weights=False)
    left, right = common.random_views(batch, model.view_size)
    targets = torch.rand(batch, 5) * 50
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        model.train()
        loss = target_loss(model(left, right)["targets"], targets, cfg.train.target_weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward():
        model.eval()
        with torch.inference_mode():
            model(left, right)

    return model, {"tiny train step": train_step, "tiny forward": forward}


def _gflop(value: float) -> str:
    """GFLOP with enough digits for tiny models too (never '0')."""
    return f"{value / 1e9:.3g}"


def main(argv: list[str] | None = None) -> list[dict]:

    p = common.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--images", type=int, default=12, help="synthetic full-resolution JPEGs (default 12)")
    p.add_argument(
        "--folds", type=int, default=5, help="folds of the inference ensemble (model side of the infer.py case)"
    )
    args = p.parse_args(argv)
    common.setup(args)
    info = common.machine()
    size = (512, 256) if args.quick else FULL_RES
    n = 3 if args.quick else args.images
    repeats = args.repeats or (1 if args.quick else 3)
    frame = common.train_frame(n, size)
    tiny_kind, enc_kind = ("tiny_quick", "tiny_quick") if args.quick else ("tiny", "vit_b")
    tiny_tile = common.make_config(tiny_kind).model.tile_size
    base_grid, base_tile, grid3_tile = ((2, 2), 56, 28) if args.quick else ((2, 2), 518, 336)
    tiny_label, base_label = f"tiny 2x2 x {tiny_tile}", f"{'quick base' if args.quick else 'ViT-B'} 2x2 x {base_tile}"
    views = [(tiny_label, (2, 2), tiny_tile)]  # (label, grid, tile); the base view last
    if not args.quick:
        views += [("ViT-S 2x2 x 224", (2, 2), 224), ("ViT-B 3x3 x 336", (3, 3), 336)]
    views.append((base_label, base_grid, base_tile))
    infer_views = [(base_grid, base_tile), ((3, 3), grid3_tile)]
    infer_label = f"inference item: 2x2 x {base_tile} + 3x3 x {grid3_tile} from one decode"

    fns, meta = {}, {}
    for label, grid, tile in views:
        view = (grid[0] * tile, grid[1] * tile)
        factor = jpeg_reduce_factor((size[1], size[0]), view)
        fns[f"{label} | eval, full decode"] = loader_fn(frame, view, grid, tile, jpeg_reduce=False)
        meta[f"{label} | eval, full decode"] = (label, "eval", view, 1)
        if factor > 1:
            fns[f"{label} | eval, reduced decode"] = loader_fn(frame, view, grid, tile, jpeg_reduce=True)
            meta[f"{label} | eval, reduced decode"] = (label, "eval", view, factor)
        if label in (tiny_label, base_label):
            fns[f"{label} | train"] = loader_fn(frame, view, grid, tile, jpeg_reduce=True, train=True)
            meta[f"{label} | train"] = (label, "train (augment default)", view, factor)
        if label == tiny_label:
            fns[f"{label} | train, cached images"] = loader_fn(
                frame, view, grid, tile, jpeg_reduce=True, train=True, cache_images=True
            )
            meta[f"{label} | train, cached images"] = (label, "train, --cache-images (epochs 2+)", view, factor)
    big = max((g[0] * t, g[1] * t) for g, t in infer_views)
    fns[infer_label] = multi_size_fn(frame, infer_views)
    meta[infer_label] = (
        "inference (MultiSizeViewDataset)",
        "eval, both grids",
        big,
        jpeg_reduce_factor((size[1], size[0]), big),
    )
    fns.update(decode_fns(frame))
    # one torch thread while the worker's work is timed: PyTorch sets 1 thread in every DataLoader worker
    # process, and the small per-item torch ops (stack, float, tile reshape) stall badly with 2 OpenMP
    # threads on a 2-core box that other jobs share (measured 32-55 ms vs 9-13 ms per tiny item at load ~4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader_times = common.interleaved(fns, repeats)
    finally:
        torch.set_num_threads(threads)

    tiny_batch = common.make_config(tiny_kind).train.batch_size
    tiny_model, model_fns = tiny_model_fns(tiny_kind, tiny_batch)
    model_times = common.interleaved(model_fns, repeats if args.quick else max(repeats, 3))
    if threads > 1 and not args.quick:
        # one thread is immune to OpenMP spin-waiting when other jobs share the cores: the model's rate
        # on a quiet machine is at least this
        torch.set_num_threads(1)
        one = common.interleaved(model_fns, max(repeats, 3))
        torch.set_num_threads(threads)
        model_times.update({f"{k} (1 thread)": v for k, v in one.items()})
    enc_batch = 2
    enc_times = encoder_throughput(enc_kind, base_tile, enc_batch, max(1, repeats - 1))

    # ---- loader table
    rows, per_image = [], {}
    for name, values in loader_times.items():
        sec = common.median(values) / n
        if name in meta:
            label, task, view, factor = meta[name]
            per_image[name] = sec
            rows.append(
                {
                    "worker task": label,
                    "transform": task,
                    "view (px)": f"{view[0]}x{view[1]}",
                    "JPEG reduce": factor,
                    "ms / image": f"{1e3 * sec:.1f}",
                    "images/s per worker": f"{1 / sec:.1f}",
                    "pass time": common.spread(values),
                }
            )
        else:
            rows.append(
                {
                    "worker task": name,
                    "transform": "decode only",
                    "view (px)": f"image {size[0]}x{size[1]}",
                    "JPEG reduce": name[-1],
                    "ms / image": f"{1e3 * sec:.1f}",
                    "images/s per worker": f"{1 / sec:.1f}",
                    "pass time": common.spread(values),
                }
            )

    # ---- model side
    step_s = min(common.median(v) for k, v in model_times.items() if k.startswith("tiny train step")) / tiny_batch
    tiles_per_image = 2 * base_grid[0] * base_grid[1]
    enc_img_s = {mode: enc_batch / common.median(v) / tiles_per_image for mode, v in enc_times.items()}
    encoder = build_encoder(enc_kind, base_tile)
    base_tile_flops = analytic_vit_flops(encoder.backbone, base_tile)
    model_rows = [
        {
            "model": f"{name} (batch {tiny_batch}, view {tiny_model.view_size[0]}, "
            f"{'1 thread' if '1 thread' in name else f'{threads} threads'})",
            "images/s": f"{tiny_batch / common.median(v):.1f}",
            "source": "measured: " + common.spread(v),
        }
        for name, v in model_times.items()
    ]
    for mode, rate in enc_img_s.items():
        model_rows.append(
            {
                "model": f"{enc_kind} 2x2 x {base_tile} forward {mode} (this CPU)",
                "images/s": f"{rate:.3g}",
                "source": f"measured, {enc_batch} tiles/call: {common.spread(enc_times[mode])}",
            }
        )
    model_rows.append(
        {
            "model": f"{enc_kind} 2x2 x {base_tile} train step bf16 (this CPU, est.)",
            "images/s": f"{enc_img_s['bf16 autocast'] / 3:.3g}",
            "source": "forward / 3 (backward ~2x forward)",
        }
    )

    gpu = None
    if not args.quick:
        tile3_flops = analytic_vit_flops(build_encoder(enc_kind, grid3_tile).backbone, grid3_tile)
        peak, share = common.GPUS["Kaggle T4"]["fp16 autocast"]
        eff = peak * share
        fwd_flops = tiles_per_image * base_tile_flops
        ens_flops = args.folds * TTA_PASSES * 2 * (base_grid[0] * base_grid[1] * base_tile_flops + 9 * tile3_flops)
        gpu = {
            "fwd": eff / fwd_flops,
            "train": eff / fwd_flops / 3,
            "cache": eff / fwd_flops / 4,
            "ens_s": ens_flops / eff,
            "eff": eff,
            "ens_flops": ens_flops,
        }
        note = f"{_gflop(base_tile_flops)} GFLOP/tile x {tiles_per_image} tiles at {eff / 1e12:.1f} TFLOP/s "
        note += f"(T4 fp16 {share:.0%} of peak)"
        model_rows += [
            {
                "model": f"ViT-B 2x2 x {base_tile} forward, Kaggle T4 fp16 (est.)",
                "images/s": f"{gpu['fwd']:.1f}",
                "source": note,
            },
            {
                "model": f"ViT-B 2x2 x {base_tile} train step, T4 fp16 (est.)",
                "images/s": f"{gpu['train']:.1f}",
                "source": "T4 forward / 3",
            },
            {
                "model": f"ViT-B 2x2 x {base_tile} feature-cache build, T4 fp16 (est.)",
                "images/s": f"{gpu['cache']:.1f}",
                "source": "T4 forward / 4 flip variants per decoded image",
            },
            {
                "model": f"infer.py ensemble ({args.folds} folds x 2x2+3x3 x full TTA), T4 fp16 (est.)",
                "images/s": f"{1 / gpu['ens_s']:.3f}",
                "source": f"{ens_flops / 1e12:.1f} TFLOP / image at {eff / 1e12:.1f} TFLOP/s",
            },
        ]

    # ---- verdicts: one per default-workers situation
    def rate(name: str) -> float:
        return 1.0 / per_image[name]

    tiny_cached = bool(getattr(common.make_config(tiny_kind).data, "cache_images", False))  # the preset's default
    tiny_first = per_image[f"{tiny_label} | train"]
    tiny_load = per_image[f"{tiny_label} | train, cached images"] if tiny_cached else tiny_first
    tiny_share = tiny_load / (tiny_load + step_s)
    first_share = tiny_first / (tiny_first + step_s)
    base_train = BASE_WORKERS * rate(f"{base_label} | train")
    base_eval = BASE_WORKERS * rate(f"{base_label} | eval, full decode")
    infer_load = per_image[infer_label]
    cpu_train = enc_img_s["bf16 autocast"] / 3
    lines_v = [
        common.bar_line(
            f"tiny preset training (num_workers 0: loading is serial with the step; at 1 torch thread, as above; "
            f"cache_images {'on' if tiny_cached else 'off'} in the preset): {1e3 * tiny_load:.1f} ms to load a "
            f"{size[0]}x{size[1]} image (train "
            f"transform{', decoded image from RAM: epochs 2+' if tiny_cached else ''}) vs "
            f"{1e3 * step_s:.1f} ms of training step per image -> the loader is "
            f"{tiny_share:.0%} of the time "
            f"({'the loader IS the bottleneck' if tiny_share > 0.5 else 'the model is the bottleneck'})"
            + (f"; the first epoch decodes: {1e3 * tiny_first:.1f} ms, {first_share:.0%}" if tiny_cached else ""),
            tiny_share <= 0.5,
        ),
    ]
    if gpu is None:
        lines_v.append(
            common.bar_line(
                f"quick base view, num_workers {BASE_WORKERS}: {base_train:.1f} training images/s from the loader vs "
                f"{cpu_train:.3g} on this CPU (quick settings: GPU cases skipped)",
                base_train >= cpu_train,
            )
        )
    else:
        lines_v += [
            common.bar_line(
                f"base training, stage 2 (num_workers {BASE_WORKERS}, train transform): {BASE_WORKERS} workers x "
                f"{rate(f'{base_label} | train'):.1f} = {base_train:.1f} images/s vs ~{gpu['train']:.1f} "
                "images/s a T4 trains "
                f"(est.) and {cpu_train:.3g} on this CPU -> loader {base_train / gpu['train']:.1f}x faster than "
                "the T4 needs",
                base_train >= gpu["train"],
            ),
            common.bar_line(
                f"base feature-cache build, stage 1 (num_workers {BASE_WORKERS}, eval transform, 4 flip "
                "variants per decode): "
                f"{base_eval:.1f} images/s vs ~{gpu['cache']:.1f} images/s a T4 encodes (est.) -> "
                f"{base_eval / gpu['cache']:.1f}x",
                base_eval >= gpu["cache"],
            ),
            common.bar_line(
                f"infer.py (num_workers {INFER_WORKERS}: decode serial with the GPU, one decode per image for "
                "both grids): "
                f"{1e3 * infer_load:.0f} ms per image vs ~{gpu['ens_s']:.1f} s of T4 compute per image for the "
                f"{args.folds}-fold x 2-grid x full-TTA ensemble -> loading adds {infer_load / gpu['ens_s']:.1%}",
                infer_load <= 0.1 * gpu["ens_s"],
            ),
        ]
    lines = [
        f"Synthetic {size[0]}x{size[1]} JPEGs (quality 90), {n} images per pass, round-robin repeats in one process "
        "(pass time: median (min-max, n)), timed with 1 torch thread as in a DataLoader worker (cv2 threads left at "
        "their default); 'full decode' = `jpeg_reduce=False`, 'reduced decode' = the factor "
        "`jpeg_reduce_factor` picks (largest that keeps each view >= the model's view size). Views of 1008 / "
        "1036 px need "
        "the full 1000 px of a view, so base-size items cannot use a reduced decode; 'train' = "
        "`build_transform(train=True)` "
        "(augment default: flips, affine, crop, colour, noise, blur, dropout), reduced decode where it applies.",
        "",
        common.table(rows),
        "",
        "Model side, same run:",
        "",
        common.table(model_rows),
        "",
        *[f"- {v}" for v in lines_v],
        "- A worker here is one process on this 2-core machine; on Kaggle (2-4 slower vCPUs beside the GPU) a "
        "worker is "
        "slower, which the margins above have to absorb. On this CPU the workers share the 2 cores with the model, so "
        "CPU training is model-bound whatever num_workers is.",
        "- GPU: not measured (no GPU lent to this session); T4 rows are FLOP-count estimates with the share of peak "
        "stated in bench/common.py (GPUS).",
    ]
    common.report(args, argv, "Data pipeline: loader images/s per worker vs model", "\n".join(lines), info)
    return rows + model_rows


if __name__ == "__main__":
    main()
