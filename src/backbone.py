"""timm backbones by name, with offline weights from a local file (how a Kaggle kernel gets them)."""

from __future__ import annotations

import os
from pathlib import Path

import timm
from torch import nn

from src.errors import BiomassError


def _base_name(name: str) -> str:
    return name.split(".", 1)[0]


def check_backbone_name(name: str) -> None:
    """Unknown timm model names fail before any work starts."""
    if not timm.is_model(_base_name(name)):
        close = timm.list_models(f"*{_base_name(name).split('_')[0]}*")[:5]
        raise BiomassError(
            f"unknown backbone {name!r}; use a timm model name such as "
            f"{', '.join(close) or 'vit_small_patch14_reg4_dinov2'}"
        )


def create_backbone(
    name: str,
    tile_size: int,
    weights: str | os.PathLike | None = None,
    grad_checkpointing: bool = False,
    **kwargs,
) -> nn.Module:
    """A timm ViT without classifier, taking square tiles of `tile_size` (any multiple of its patch).

    `weights` is a local .pth/.safetensors file loaded through timm's pretrained-file path, which also
    resamples the position embedding to `tile_size`; None means random init. Never touches the network.
    """
    check_backbone_name(name)
    common = dict(num_classes=0, img_size=tile_size, dynamic_img_size=True, **kwargs)
    if weights is None:
        model = timm.create_model(name, pretrained=False, **common)
    else:
        path = Path(weights)
        if not path.is_file():
            raise BiomassError(f"{path}: backbone weights file not found; pass --backbone-weights PATH or none")
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **common)
        except RuntimeError as err:
            if "loading state_dict" not in str(err) and "size mismatch" not in str(err):
                raise BiomassError(
                    f"{path}: cannot load backbone weights ({str(err).strip().splitlines()[0][:200]})"
                ) from err
            raise BiomassError(f"{path}: does not fit backbone {name}: {_summarize_load_error(err)}") from err
        except Exception as err:  # unreadable/corrupt files surface as many exception types
            raise BiomassError(f"{path}: cannot load backbone weights ({type(err).__name__}: {err})") from err
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _summarize_load_error(err: RuntimeError) -> str:
    """Shorten torch's load_state_dict message to the mismatched keys (first few)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keys = [ln for ln in lines if ln.startswith(("Missing key", "Unexpected key", "size mismatch"))]
    text = "; ".join(keys or lines[:2])
    return text[:600] + ("..." if len(text) > 600 else "")


def patch_size(backbone: nn.Module) -> int:
    """Patch side read from the model (14 for DINOv2, 16 for DINOv3): never assumed."""
    size = backbone.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def norm_constants(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from the backbone's pretrained config (timm), not typed by hand."""
    cfg = timm.data.resolve_data_config(model=backbone)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
