"""The kernel's time budget, projected: backbone FLOPs per tile x tiles x TTA views x images / stated fp16 rate.

    python kernels/build.py --checkpoints checkpoints/<exp> --plan [--plan-images 1000]   # (also every build)
    python kernels/plan.py                            # the docs/KAGGLE.md table of reference ensembles

A projection, not a measurement (no GPU here): FLOPs are torch's count on a weightless copy of each backbone
(`src.flops`), the throughput is `src.flops.T4_FP16_FLOPS` (65 TFLOP/s fp16 peak x 30% assumed achieved) per
GPU, and the two GPUs of Kaggle's T4 x2 split the models (`src.parallel`), so the time halves when the models
split evenly. Decoding, checkpoint loading and the pseudo-label fine-tune are not counted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python kernels/plan.py`: `src` and `kernels` live in the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.config import ModelConfig  # noqa: E402
from src.flops import T4_FP16_FLOPS, T4_FP16_PEAK, T4_FP16_SHARE, image_flops, tile_size_of  # noqa: E402

DEFAULT_DEADLINE_MIN = 495.0  # of the 9-hour (540 min) limit: 45 min kept for start-up, writing and slack
DEFAULT_IMAGES = 1000
N_GPUS = 2  # Kaggle's T4 x2


@dataclass
class Projection:
    """One ensemble's projected kernel time on T4 x2 and the arithmetic behind it."""

    gflop_per_image: float  # summed over the ensemble's models
    models: int
    images: int
    seconds: float

    def minutes(self) -> float:
        return self.seconds / 60


def project(model_cfgs: list[ModelConfig], tta: str, images: int = DEFAULT_IMAGES, gpus: int = N_GPUS) -> Projection:
    """Seconds for `images` hidden-test images: sum over models of FLOPs/image x images / (rate x gpus)."""
    flops = sum(image_flops(cfg, tta) for cfg in model_cfgs)
    return Projection(flops / 1e9, len(model_cfgs), images, flops * images / (T4_FP16_FLOPS * gpus))


def describe(model_cfgs: list[ModelConfig], tta: str, images: int, deadline_min: float) -> list[str]:
    """The plan's lines: per distinct model, the arithmetic, the total against the deadline (warning when over)."""
    lines = []
    seen: dict[tuple, int] = {}
    for cfg in model_cfgs:
        key = (cfg.backbone, tuple(cfg.grid), tile_size_of(cfg))
        seen[key] = seen.get(key, 0) + 1
    for (backbone, grid, tile), count in seen.items():
        cfg = next(c for c in model_cfgs if (c.backbone, tuple(c.grid), tile_size_of(c)) == (backbone, grid, tile))
        lines.append(
            f"{count} x {backbone} grid {grid[0]}x{grid[1]} tile {tile}: {image_flops(cfg, tta) / 1e9:.0f} GFLOP per "
            f"image (tiles x 2 views x TTA '{tta}' backbone passes x FLOPs per tile)"
        )
    p = project(model_cfgs, tta, images)
    lines.append(
        f"projected on T4 x2: {p.gflop_per_image:.0f} GFLOP/image x {images} images / ({T4_FP16_PEAK / 1e12:.0f} "
        f"TFLOP/s fp16 x {T4_FP16_SHARE:.0%} assumed x {N_GPUS} GPUs) = {p.minutes():.1f} min against a deadline "
        f"of {deadline_min:g} min (compute only: decoding, loading and the fine-tune come on top)"
    )
    if p.minutes() > deadline_min:
        lines.append(
            f"warning: over the deadline by {p.minutes() - deadline_min:.0f} min: the kernel will skip the models "
            "projected past it (fewer folds or less TTA would fit)"
        )
    return lines


REFERENCE = {  # the docs/KAGGLE.md table: backbone, grid, tile
    "DINOv2 ViT-B/14 2x2": ModelConfig(backbone="vit_base_patch14_reg4_dinov2", grid=(2, 2)),
    "DINOv2 ViT-B/14 3x3": ModelConfig(backbone="vit_base_patch14_reg4_dinov2", grid=(3, 3)),
    "DINOv3 ViT-L/16 1x1 1024": ModelConfig(backbone="vit_large_patch16_dinov3", grid=(1, 1), tile_size=1024),
    "DINOv3 ViT-H+/16 1x1 1024": ModelConfig(backbone="vit_huge_plus_patch16_dinov3", grid=(1, 1), tile_size=1024),
}


def reference_table(folds: int = 5, images: int = DEFAULT_IMAGES, deadline_min: float = DEFAULT_DEADLINE_MIN) -> str:
    """Markdown: minutes on T4 x2 of `folds` models of each reference backbone, per TTA, and whether they fit."""
    rows = [
        "| ensemble (5 folds) | tile | GFLOP/image/model (none / flip-full) | none | flip | full | fits the deadline |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cfg in REFERENCE.items():
        minutes = {tta: project([cfg] * folds, tta, images).minutes() for tta in ("none", "flip", "full")}
        fits = ", ".join(t for t, m in minutes.items() if m <= deadline_min) or "none"
        gflop = f"{image_flops(cfg, 'none') / 1e9:.0f} / {image_flops(cfg, 'full') / 1e9:.0f}"
        cells = [name, str(tile_size_of(cfg)), gflop, *(f"{minutes[t]:.0f} min" for t in minutes), fits]
        rows.append("| " + " | ".join(cells) + " |")
    both = project([REFERENCE["DINOv2 ViT-B/14 2x2"]] * folds + [REFERENCE["DINOv2 ViT-B/14 3x3"]] * folds, "full")
    rows.append(f"| ViT-B 2x2 + 3x3 (10 models) | - | - | - | - | {both.minutes():.0f} min | - |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"{DEFAULT_IMAGES} images, T4 x2, deadline {DEFAULT_DEADLINE_MIN:g} min (python kernels/plan.py)\n")
    print(reference_table())
