"""Backbone FLOPs of a model config, counted by torch on a weightless (meta-device) copy: no weights, no time.

Inference never needs this count (nor a backbone build) for a checkpoint saved since issue 25: `save_best`
stores the resolved tile size, patch size and FLOPs per tile (`checkpoint_geometry`), because timm 1.0.19 (Kaggle's
image) cannot build a ViT on the meta device. Older checkpoints fall back to a CPU build here (cached per backbone).

The deadline's projection of a model's time (`inference`) and the kernel's budget planner (`kernels/build.py
--plan`) both scale measured or stated throughput by these counts, so the arithmetic lives in one place.
FLOPs are torch.utils.flop_counter's: 2 per multiply-add, matmuls and attention included.
"""

from __future__ import annotations

import functools
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from src.backbone import create_backbone
from src.config import ModelConfig
from src.model import default_tile_size, probe_patch_size

GEOMETRY_KEYS = ("tile_size", "patch_size", "tile_flops")  # what best.pt stores so inference builds nothing to know

N_VIEWS = 2  # each image holds two views, both go through the backbone
FLIPS_PER_TTA = {"none": 1, "flip": 3, "full": 3}  # backbone passes per view: the stereo swap reuses the features


def tile_size_of(cfg: ModelConfig) -> int:
    """The tile side the model is built with (the config's, else the native one for its grid and patch)."""
    if cfg.tile_size:
        return int(cfg.tile_size)
    return default_tile_size(tuple(cfg.grid), _patch(cfg.backbone, json.dumps(cfg.backbone_kwargs, sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _patch(backbone: str, kwargs_json: str) -> int:
    """Patch size of a backbone (one meta-device build per backbone, not per checkpoint)."""
    return probe_patch_size(ModelConfig(backbone=backbone, backbone_kwargs=json.loads(kwargs_json)))


@functools.lru_cache(maxsize=64)
def _tile_flops(backbone: str, tile: int, kwargs_json: str) -> float:
    kwargs = json.loads(kwargs_json)
    try:
        with torch.device("meta"):
            model = create_backbone(backbone, tile_size=tile, **kwargs)
    except RuntimeError:  # older timm (1.0.19) calls .item() while building: build on the CPU, then move to meta
        model = create_backbone(backbone, tile_size=tile, **kwargs).to("meta")
    with FlopCounterMode(display=False) as counter:
        model.forward_features(torch.empty(1, 3, tile, tile, device="meta"))
    return float(counter.get_total_flops())


def tile_flops(cfg: ModelConfig) -> float:
    """Backbone FLOPs of one tile's forward pass."""
    return _tile_flops(cfg.backbone, tile_size_of(cfg), json.dumps(cfg.backbone_kwargs, sort_keys=True))


def image_flops(cfg: ModelConfig, tta: str, per_tile: float | None = None) -> float:
    """Backbone FLOPs to predict one image: tiles x 2 views x TTA backbone passes x FLOPs per tile.

    `per_tile`: the count a checkpoint stored at save (no build); None counts it here.
    """
    tiles = int(cfg.grid[0]) * int(cfg.grid[1])
    return tiles * N_VIEWS * FLIPS_PER_TTA[tta] * (tile_flops(cfg) if per_tile is None else float(per_tile))


def checkpoint_geometry(model) -> dict:
    """What best.pt stores of a built model so inference never builds a backbone to learn it (timm 1.0.19 cannot
    build on the meta device): the resolved tile size, the patch size and the backbone FLOPs of one tile."""
    cfg = model.cfg
    kwargs = json.dumps(cfg.backbone_kwargs, sort_keys=True)
    return {
        "tile_size": int(model.tile_size),
        "patch_size": int(model.patch),
        "tile_flops": _tile_flops(cfg.backbone, int(model.tile_size), kwargs),
    }


# The stated GPU throughput of the kernel's projections (there is no GPU here: figures are FLOP counts over this).
# T4: 65 TFLOP/s fp16 tensor-core peak (datasheet); 30% of it assumed achieved by a ViT in eager PyTorch at fp16
# (a 70 W card whose clocks drop under sustained load), as bench/common.py's GPUS table assumes.
T4_FP16_PEAK = 65e12
T4_FP16_SHARE = 0.30
T4_FP16_FLOPS = T4_FP16_PEAK * T4_FP16_SHARE
