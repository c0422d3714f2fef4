"""Configuration as data: dataclasses resolved once (defaults < preset < YAML < flags) and saved per run.

Each field becomes one command-line flag (`model.tile_size` -> `--tile-size`), so train.py and the
YAML file can never drift apart; an unknown YAML key is an error, never silently dropped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.errors import BiomassError
from src.schema import TARGET_WEIGHTS

DEFAULT_BACKBONE = "vit_base_patch14_reg4_dinov2.lvd142m"


@dataclass
class DataConfig:
    data_dir: str = field(default="data/synthetic", metadata={"help": "competition-layout data directory"})
    folds: str = field(default="data/folds.csv", metadata={"help": "folds CSV written by folds.py"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers"})
    jpeg_reduce: bool = field(default=True, metadata={"help": "decode JPEGs at reduced resolution when tiles are small"})
    cache_images: bool = field(default=False, metadata={"help": "keep decoded images in RAM after the first epoch (one copy per worker)"})
    # data hygiene (docs/HYGIENE.md): the cleaning is saved with the run, so inference reads images the same way
    clean_stamps: bool = field(default=False, metadata={"help": "detect the orange date stamp (bottom-right) and inpaint it, in training and inference"})
    crop_bottom: float = field(default=0.0, metadata={"help": "drop this bottom fraction of the image before the view split (cardboard strip)"})
    aug_artifacts: float = field(default=0.0, metadata={"help": "probability of painting synthetic date stamps / red flash dots on a training image"})
    drop_ids: str | None = field(default=None, metadata={"help": "file of image ids left out of training (validation still scores them)"})


@dataclass
class ModelConfig:
    backbone: str = field(default=DEFAULT_BACKBONE, metadata={"help": "timm model name (any ViT)"})
    backbone_weights: str | None = field(default=None, metadata={"help": "local .pth/.safetensors file, or none"})
    backbone_kwargs: dict = field(default_factory=dict, metadata={"help": "extra timm.create_model kwargs (YAML only)"})
    grid: tuple[int, int] = field(default=(2, 2), metadata={"help": "tiles per view: rows cols"})
    tile_size: int | None = field(default=None, metadata={"help": "tile side in px (multiple of the patch); default native"})
    feature: str = field(default="cls_mean", metadata={"help": "per-tile feature: cls | mean | cls_mean"})
    fusion_dim: int = field(default=256, metadata={"help": "width of the fused tile tokens"})
    hidden_ratio: float = field(default=0.5, metadata={"help": "head MLP hidden width / fusion_dim"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the heads"})
    use_aux_heads: bool = field(default=True, metadata={"help": "State/Month/Species heads (training only)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing in the backbone"})
    max_tiles_per_call: int = field(default=64, metadata={"help": "backbone chunk size (memory limit)"})
    # options beyond the seed design (docs/OPTIONS.md); the defaults are the seed design
    target_space: str = field(
        default="log1p", metadata={"help": "log1p: log1p grams | raw: grams / training-fold std, SmoothL1", "choices": ("log1p", "raw")}
    )
    heads: str = field(
        default="five",
        metadata={"help": "five heads, or three softplus parts with the other two derived", "choices": ("five", "green-dead-clover", "clover-gdm-total")},
    )
    fusion: str = field(default="film", metadata={"help": "cross-view fusion", "choices": ("film", "concat", "cross-attn")})
    # loss weights that live here because a weight > 0 adds a head the checkpoint must rebuild
    aux_ndvi_weight: float = field(default=0.0, metadata={"help": "Pre_GSHH_NDVI regression head + loss weight (training only; 0 = no head)"})
    aux_height_weight: float = field(default=0.0, metadata={"help": "Height_Ave_cm regression head + loss weight (training only; 0 = no head)"})
    aux_bins: int = field(
        default=0, metadata={"help": "N quantile bins per target (training fold): interval-classification heads, training only (0 = no head)"}
    )


@dataclass
class TrainConfig:
    epochs: int = field(default=12, metadata={"help": "total epochs (both stages)"})
    freeze_epochs: int = field(default=3, metadata={"help": "stage-1 epochs with a frozen backbone"})
    lr: float = field(default=1e-3, metadata={"help": "head / fusion learning rate"})
    backbone_lr: float = field(default=1e-5, metadata={"help": "backbone learning rate in stage 2"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    warmup_frac: float = field(default=0.1, metadata={"help": "linear warmup share of each stage"})
    batch_size: int = field(default=8, metadata={"help": "images per step (per process)"})
    accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    mixup_prob: float = field(default=0.5, metadata={"help": "probability a batch is mixed"})
    mixup_alpha: float = field(default=0.4, metadata={"help": "Beta(alpha, alpha) of mixup"})
    stereo_swap_prob: float = field(default=0.5, metadata={"help": "probability of swapping left/right views"})
    augment: str = field(default="default", metadata={"help": "augmentation strength: default | light | none"})
    aux_state_weight: float = field(default=0.1, metadata={"help": "State CE weight"})
    aux_month_weight: float = field(default=0.1, metadata={"help": "Month CE weight"})
    aux_species_weight: float = field(default=0.1, metadata={"help": "Species group CE weight"})
    target_weights: tuple[float, float, float, float, float] = field(
        default=TARGET_WEIGHTS, metadata={"help": "loss weight per target (Green Dead Clover GDM Total)"}
    )
    loss: str = field(default="mse", metadata={"help": "mse | huber (on log1p targets; raw space always uses SmoothL1)"})
    huber_delta: float = field(default=1.0, metadata={"help": "Huber delta (log1p units)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm (0 = off)"})
    cache_features: bool = field(default=True, metadata={"help": "stage 1 trains heads from cached tile features"})
    amp: bool = field(default=False, metadata={"help": "autocast (bf16 on CPU, bf16/fp16 on CUDA)"})
    device: str = field(default="auto", metadata={"help": "cpu | cuda | auto"})
    seed: int = field(default=42, metadata={"help": "seed of python, numpy, torch, albumentations"})
    patience: int = field(default=6, metadata={"help": "early-stopping patience in epochs (0 = off)"})
    max_bad_steps: int = field(default=5, metadata={"help": "consecutive non-finite losses that stop the run"})
    huber_beta: float = field(default=5.0, metadata={"help": "SmoothL1 beta in grams (--target-space raw)"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the weights (timm ModelEmaV3): validated, selected and saved (0 = off)"})
    freeze_blocks: int = field(default=0, metadata={"help": "first N backbone blocks (and the patch embedding) stay frozen in stage 2"})
    layer_decay: float = field(default=1.0, metadata={"help": "layer-wise lr decay of the backbone in stage 2 (1 = off)"})
    swa_top_k: int = field(default=0, metadata={"help": "average the K best epochs' weights at fold end (0 = off)"})
    aux_bins_weight: float = field(default=0.1, metadata={"help": "CE weight of the --aux-bins heads (mean over targets)"})


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    exp: str = "default"
    out_dir: str = "checkpoints"

    def to_dict(self) -> dict:
        """Plain JSON/YAML-able dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> Config:
        """Build from a (possibly partial) nested dict; unknown keys raise."""
        cfg = cls()
        apply_overrides(cfg, data, source)
        return cfg


SECTIONS = ("data", "model", "train")

PRESETS: dict[str, dict] = {
    # the real thing: DINOv2 ViT-B/14 reg4, native-resolution tiles; needs a GPU
    "base": {},
    # CPU demo/test setting: 139k-parameter random-init ViT that must learn end to end, so its
    # backbone gets a head-sized lr (1e-5 is right for pretrained DINOv2, useless for random init)
    "tiny": {
        "model": {
            "backbone": "vit_small_patch14_reg4_dinov2",
            "backbone_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2},
            "tile_size": 56,
            "fusion_dim": 64,
            "dropout": 0.0,
        },
        "train": {
            "epochs": 16,
            "freeze_epochs": 1,
            "lr": 2e-3,
            "backbone_lr": 1e-3,
            "batch_size": 16,
            "mixup_prob": 0.3,
        },
        # images are tiny: worker start-up would cost more than decoding in the main process, and
        # decoding is most of a step (docs/BENCHMARKS.md): decode each image once, keep it in RAM
        "data": {"num_workers": 0, "cache_images": True},
    },
}


def _merged(base: dict, extra: dict) -> dict:
    """base with extra merged in, section by section (a preset built on another one)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


# The tiny preset with a DINOv3-shaped backbone (timm Eva: patch 16, RoPE, 4 registers), same depth/width:
# checks the patch-16 path end to end on a CPU. 64 px tiles = 4x4 patches, like tiny's 56 = 4x4 of 14.
PRESETS["tiny-dinov3"] = _merged(PRESETS["tiny"], {"model": {"backbone": "vit_small_patch16_dinov3", "tile_size": 64}})


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _field_types(section) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _choices(section, name: str) -> tuple | None:
    """The allowed values of a field (metadata 'choices'), None when any value of its type goes."""
    return next(f.metadata.get("choices") for f in dataclasses.fields(section) if f.name == name)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce a YAML/flag value to the field's declared type (tuples from lists, none -> None)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise BiomassError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise BiomassError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            return hint(value)
        except (TypeError, ValueError) as err:
            raise BiomassError(f"{where}: expected {hint.__name__}, got {value!r}") from err
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise BiomassError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def apply_overrides(cfg: Config, data: dict, source: str) -> Config:
    """Merge a nested dict into cfg in place; unknown sections/keys raise naming the source."""
    for key, value in (data or {}).items():
        if key in SECTIONS:
            section = getattr(cfg, key)
            types_ = _field_types(section)
            if not isinstance(value, dict):
                raise BiomassError(f"{source}: section {key!r} must be a mapping")
            for name, sub in value.items():
                if name not in types_:
                    raise BiomassError(
                        f"{source}: unknown key {key}.{name}; valid keys: {', '.join(sorted(types_))}"
                    )
                value_ = _coerce(sub, types_[name], f"{source}: {key}.{name}")
                choices = _choices(section, name)
                if choices and value_ not in choices:
                    raise BiomassError(f"{source}: {key}.{name}: {value_!r} is not one of {', '.join(choices)}")
                setattr(section, name, value_)
        elif key in ("exp", "out_dir"):
            setattr(cfg, key, str(value))
        else:
            raise BiomassError(f"{source}: unknown key {key!r}; valid: {', '.join(SECTIONS)}, exp, out_dir, preset")
    return cfg


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file; a missing or malformed file is a BiomassError."""
    path = Path(path)
    if not path.is_file():
        raise BiomassError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise BiomassError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise BiomassError(f"{path}: expected a mapping at the top level")
    return data


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (default None = not given, so YAML/preset values survive)."""
    for section_name in SECTIONS:
        section = getattr(Config(), section_name)
        group = parser.add_argument_group(section_name)
        for f in dataclasses.fields(section):
            hint = _field_types(section)[f.name]
            if hint is dict:
                continue
            flag = "--" + f.name.replace("_", "-")
            helptext = f.metadata.get("help", "") + f" (default {getattr(section, f.name)!r})"
            dest = f"{section_name}.{f.name}"
            if hint is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            elif typing.get_origin(hint) is tuple:
                group.add_argument(flag, dest=dest, nargs=len(typing.get_args(hint)), default=None, help=helptext)
            else:
                group.add_argument(flag, dest=dest, default=None, choices=f.metadata.get("choices"), help=helptext)
    parser.add_argument("--exp", default=None, help="experiment name (checkpoints/<exp>)")
    parser.add_argument("--out-dir", dest="out_dir", default=None, help="root of the experiment directories")
    parser.add_argument("--config", default=None, help="YAML file with config values (flags override it)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="named preset (YAML and flags override it)")


def resolve_config(args: argparse.Namespace) -> Config:
    """defaults < preset < YAML < flags."""
    cfg = Config()
    yaml_data = load_yaml(args.config) if getattr(args, "config", None) else {}
    yaml_preset = yaml_data.pop("preset", None)
    preset = getattr(args, "preset", None) or yaml_preset
    if preset is not None:
        if preset not in PRESETS:
            raise BiomassError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        apply_overrides(cfg, PRESETS[preset], f"preset {preset}")
    apply_overrides(cfg, yaml_data, str(getattr(args, "config", None) or "yaml"))
    flags: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if value is None:
            continue
        if "." in dest:
            section, name = dest.split(".", 1)
            flags.setdefault(section, {})[name] = value
        elif dest in ("exp", "out_dir"):
            flags[dest] = value
    apply_overrides(cfg, flags, "command line")
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    from src.io_utils import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
