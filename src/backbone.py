"""timm backbones by name, with offline weights from a local file (how a Kaggle kernel gets them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
from safetensors import safe_open
from torch import nn

from src.errors import BiomassError
from src.logs import get_logger

log = get_logger(__name__)
NORM_KEY = "pretrained_cfg"  # safetensors metadata key of the pretrained config (written by src.weights export)


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


def file_norm_constants(weights: str | os.PathLike | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Mean/std of a weights file's own pretrained config (safetensors metadata), None when it carries none.

    A .pth holds only the state_dict (timm would refuse an extra key), so only safetensors files carry one.
    """
    if weights is None or not str(weights).endswith(".safetensors") or not Path(weights).is_file():
        return None
    try:
        with safe_open(str(weights), "pt") as handle:
            raw = (handle.metadata() or {}).get(NORM_KEY)
        cfg = json.loads(raw) if raw else {}
    except (OSError, ValueError, json.JSONDecodeError):  # an unreadable file is create_backbone's error to report
        return None
    if not isinstance(cfg, dict) or "mean" not in cfg or "std" not in cfg:
        return None
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def resolve_norm(
    name: str, backbone: nn.Module, weights: str | os.PathLike | None, mean=None, std=None
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """Mean/std: given values (a checkpoint's config), else the weights file's config, else the name's; + source.

    A file whose constants differ from the name's is a warning naming both: the file's are used.
    """
    by_name = norm_constants(backbone)
    if mean is not None and std is not None:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std), "config"
    from_file = file_norm_constants(weights)
    if from_file is None:
        return (*by_name, "name")
    if not all(abs(a - b) < 1e-6 for a, b in zip(from_file[0] + from_file[1], by_name[0] + by_name[1])):
        log.warning(
            f"{weights}: its pretrained config has mean {list(from_file[0])} std {list(from_file[1])}, but {name} "
            f"implies mean {list(by_name[0])} std {list(by_name[1])}: using the file's (saved with the run)"
        )
    return (*from_file, "file")
