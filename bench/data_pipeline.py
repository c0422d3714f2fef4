"""Benchmark 4: decoded-and-tiled images/s of one loader worker on full-resolution 2000x1000 JPEGs, full
vs reduced JPEG decode, against the model's images/s; is the loader the bottleneck at the default
num_workers (tiny preset: 0, base: 2)?

Per image a worker does what `ViewPairDataset.__getitem__` does with the eval transform (header read,
decode, view split, INTER_AREA resize, CHW tensors) plus the model's `tile_views` of both views, in
this process (= one worker). The model side is measured in the same run: the tiny preset's training
step and forward at its view size, and the ViT-B/14 tile encoder at 518 (benchmark 3's code, fewer
repeats) turned into images/s (2 views x 4 tiles per image).

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

FULL_RES = (2000, 1000)
T4_EFFECTIVE = 65e12 * 0.4  # fp16 tensor-core peak x assumed efficiency (benchmark 5 uses the same)


def loader_fn(frame, view_size, grid, tile, jpeg_reduce: bool):
    """One pass over the images as one worker: dataset item (eval transform) + tiling of both views."""
    from src.dataset import ViewPairDataset
    from src.model import tile_views
    from src.transforms import build_transform

    dataset = ViewPairDataset(frame, view_size, build_transform(view_size, train=False), jpeg_reduce=jpeg_reduce)

    def run():
        for i in range(len(dataset)):
            item = dataset[i]
            tile_views(torch.stack([item["left"], item["right"]]).float(), grid, tile)

    return run


def decode_fns(frame) -> dict:
    """Plain cv2.imread of every image at reduce 1/2/4/8 (the decode alone)."""
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
    paths = list(frame["path"])
    return {f"cv2.imread reduce {r}": (lambda flag=flag: [cv2.imread(p, flag) for p in paths]) for r, flag in flags.items()}


def tiny_model_fns(kind: str, batch: int):
    """Training step (forward + backward + AdamW, backbone trainable: stage 2) and eval forward of the tiny preset."""
    from src.model import build_model
    from src.training import target_loss

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


def main(argv: list[str] | None = None) -> list[dict]:
    from bench.backbone_flops import analytic_vit_flops, build_encoder, encoder_throughput
    from src.data import jpeg_reduce_factor

    p = common.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--images", type=int, default=12, help="synthetic full-resolution JPEGs (default 12)")
    args = p.parse_args(argv)
    common.setup(args)
    info = common.machine()
    size = (512, 256) if args.quick else FULL_RES
    n = 3 if args.quick else args.images
    repeats = args.repeats or (1 if args.quick else 3)
    frame = common.train_frame(n, size)
    tiny_kind, vitb_kind, vitb_tile = ("tiny_quick", "tiny_quick", 28) if args.quick else ("tiny", "vit_b", 518)
    tiny_tile = common.make_config(tiny_kind).model.tile_size
    views = [  # (label, grid, tile); the base view last
        (f"tiny preset 2x2 x {tiny_tile}", (2, 2), tiny_tile),
        ("ViT-S 2x2 x 224", (2, 2), 224),
        ("ViT-B 3x3 x 336", (3, 3), 336),
        ("ViT-B 2x2 x 518", (2, 2), 518),
    ]
    if args.quick:
        views = [views[0], (f"quick base 2x2 x {2 * tiny_tile}", (2, 2), 2 * tiny_tile)]
    fns, meta = {}, {}
    for label, grid, tile in views:
        view = (grid[0] * tile, grid[1] * tile)
        factor = jpeg_reduce_factor((size[1], size[0]), view)
        fns[f"{label} | full decode"] = loader_fn(frame, view, grid, tile, jpeg_reduce=False)
        meta[f"{label} | full decode"] = (label, view, 1)
        if factor > 1:
            fns[f"{label} | reduced decode"] = loader_fn(frame, view, grid, tile, jpeg_reduce=True)
            meta[f"{label} | reduced decode"] = (label, view, factor)
    fns.update(decode_fns(frame))
    loader_times = common.interleaved(fns, repeats)
    tiny_batch = common.make_config(tiny_kind).train.batch_size
    tiny_model, model_fns = tiny_model_fns(tiny_kind, tiny_batch)
    model_times = common.interleaved(model_fns, repeats if args.quick else max(repeats, 3))
    threads = torch.get_num_threads()
    if threads > 1 and not args.quick:
        # one thread is immune to OpenMP spin-waiting when other jobs share the cores: the model's rate
        # on a quiet machine is at least this
        torch.set_num_threads(1)
        one = common.interleaved(model_fns, max(repeats, 3))
        torch.set_num_threads(threads)
        model_times.update({f"{k} (1 thread)": v for k, v in one.items()})
    vitb_batch = 2
    vitb_times = encoder_throughput(vitb_kind, vitb_tile, vitb_batch, max(1, repeats - 1))

    # ---- loader table
    rows, per_image = [], {}
    for name, values in loader_times.items():
        sec = common.median(values) / n
        if name in meta:
            label, view, factor = meta[name]
            per_image[name] = sec
            rows.append({"worker task": label, "view (px)": f"{view[0]}x{view[1]}", "JPEG reduce": factor,
                         "ms / image": f"{1e3 * sec:.1f}", "images/s per worker": f"{1 / sec:.1f}",
                         "pass time": common.spread(values)})
        else:
            rows.append({"worker task": name + " (decode only)", "view (px)": f"image {size[0]}x{size[1]}", "JPEG reduce": name[-1],
                         "ms / image": f"{1e3 * sec:.1f}", "images/s per worker": f"{1 / sec:.1f}", "pass time": common.spread(values)})

    # ---- model side
    step_s = min(common.median(v) for k, v in model_times.items() if k.startswith("tiny train step")) / tiny_batch
    fwd_s = min(common.median(v) for k, v in model_times.items() if k.startswith("tiny forward")) / tiny_batch
    encoder = build_encoder(vitb_kind, vitb_tile)
    tile_flops = analytic_vit_flops(encoder.backbone, vitb_tile)
    tiles_per_image = 2 * 4
    vitb = {mode: vitb_batch / common.median(v) / tiles_per_image for mode, v in vitb_times.items()}
    t4_fwd = T4_EFFECTIVE / (tile_flops * tiles_per_image)
    model_rows = [
        {"model": f"{name} (batch {tiny_batch}, view {tiny_model.view_size[0]}, {'1 thread' if '1 thread' in name else f'{threads} threads'})",
         "images/s": f"{tiny_batch / common.median(v):.1f}", "source": "measured: " + common.spread(v)}
        for name, v in model_times.items()
    ] + [
        {"model": f"{vitb_kind} 2x2 x {vitb_tile} forward fp32", "images/s": f"{vitb['fp32']:.3f}", "source": f"measured, {vitb_batch} tiles/call"},
        {"model": f"{vitb_kind} 2x2 x {vitb_tile} forward bf16 autocast", "images/s": f"{vitb['bf16 autocast']:.3f}", "source": f"measured, {vitb_batch} tiles/call"},
        {"model": f"{vitb_kind} 2x2 x {vitb_tile} train step bf16 (est.)", "images/s": f"{vitb['bf16 autocast'] / 3:.3f}", "source": "forward / 3 (backward ~2x forward)"},
        {"model": f"{vitb_kind} 2x2 x {vitb_tile} forward on a T4 (est.)", "images/s": f"{t4_fwd:.1f}", "source": f"{tile_flops / 1e9:.0f} GFLOP/tile x 8 tiles at 26 TFLOP/s"},
        {"model": f"{vitb_kind} 2x2 x {vitb_tile} train step on a T4 (est.)", "images/s": f"{t4_fwd / 3:.1f}", "source": "T4 forward / 3"},
    ]

    # ---- verdicts
    tiny_label = views[0][0]
    tiny_loader = per_image.get(f"{tiny_label} | reduced decode", per_image[f"{tiny_label} | full decode"])
    share = tiny_loader / (tiny_loader + step_s)
    base_label = views[-1][0]
    base_loader = 2 / per_image.get(f"{base_label} | reduced decode", per_image[f"{base_label} | full decode"])  # 2 workers
    base_bound = base_loader < t4_fwd
    lines = [
        f"Synthetic {size[0]}x{size[1]} JPEGs (quality 90), {n} images per pass, round-robin repeats in one process "
        "(pass time: median (min-max, n)); 'full decode' = `jpeg_reduce=False`, 'reduced decode' = the factor "
        "`jpeg_reduce_factor` picks (largest that keeps each view >= the model's view size).",
        "",
        common.table(rows),
        "",
        "Model side, same run:",
        "",
        common.table(model_rows),
        "",
        f"- **Tiny preset, num_workers 0** (loading runs in the training process, serially with the step): "
        f"{1e3 * tiny_loader:.1f} ms to load an image vs {1e3 * step_s:.1f} ms of training step per image (the faster "
        f"thread setting) -> the loader "
        f"is {share:.0%} of the step time: {'the loader IS the bottleneck' if share > 0.5 else 'the model is the bottleneck'}"
        f" (on {size[0]}x{size[1]} images).",
        f"- **Base ({base_label}), num_workers 2**: 2 workers deliver ~{base_loader:.1f} images/s (a 1036 px view needs "
        f"the full 1000 px of a view: no decode reduction) vs {vitb['bf16 autocast']:.3f} images/s forward bf16 on this "
        f"CPU and ~{t4_fwd:.1f} forward-only / ~{t4_fwd / 3:.1f} training images/s estimated on a T4: "
        + ("**the loader IS the bottleneck** on a T4 for forward-only passes (feature-cache building, inference)"
           if base_bound else f"the loader is not the bottleneck ({base_loader / t4_fwd:.1f}x the T4's forward-only rate)")
        + "; on this 2-core box the workers share the cores with the model, so the CPU run is model-bound.",
        "- GPU: not measured (no GPU lent to this session); T4 rows are FLOP-count estimates.",
    ]
    common.report(args, argv, "Data pipeline: loader images/s per worker vs model", "\n".join(lines), info)
    return rows + model_rows


if __name__ == "__main__":
    main()
