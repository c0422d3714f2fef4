"""Configuration as data: dataclasses resolved once (defaults < preset < YAML < flags) and saved per run.

Two configs: `Config` (train.py: data, model, train sections) and `InferConfig` (infer.py and the Kaggle
kernel). Each field becomes one command-line flag (`model.tile_size` -> `--tile-size`,
`pseudo_label.epochs` -> `--pseudo-label-epochs`), so the scripts and the YAML files can never drift apart;
an unknown YAML key is an error, never silently dropped. Every choice and range is checked here, when the
config is resolved, before any work starts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from src.errors import BiomassError
from src.schema import TARGET_WEIGHTS

DEFAULT_BACKBONE = "vit_base_patch14_reg4_dinov2.lvd142m"

# ---- the allowed values of every choice field, defined once (the code that acts on them imports these) -----
FEATURES = ("cls", "mean", "cls_mean")
FUSIONS = ("film", "concat", "cross-attn")
HEAD_LAYOUTS = ("five", "green-dead-clover", "clover-gdm-total")
TARGET_SPACES = ("log1p", "raw")
AUGMENT_STRENGTHS = ("default", "light", "none")
LOSSES = ("mse", "huber")
TTA_CHOICES = ("none", "flip", "full")
PHYSICS_CHOICES = ("none", "seed", "project")
ON_BAD_IMAGE = ("error", "fallback")
# frozen-feature heads (src/heads.py, train.py --regressor): "network" is the trained model of src/model.py
REGRESSORS = ("network", "ridge", "kernel-ridge", "hgb")
HEAD_FEATURES = ("backbone", "colour", "both")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    check: tuple[Callable[[Any], bool], str] | None = None,
    literal_none: bool = False,
):
    """A config field: its default, its --help text, and what values are allowed (checked when resolved).

    `literal_none`: the word `none` stays the string "none" (said on purpose), where null / unset is None.
    """
    meta: dict[str, Any] = {"help": help}
    if literal_none:
        meta["literal_none"] = True
    if choices is not None:
        meta["choices"] = choices
    if check is not None:
        meta["check"] = check
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _positive_number(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def available_workers() -> int:
    """DataLoader workers by default: the cores this process may use, less one for the main process (up to 16)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(16, cores - 1))


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low, f"must be >= {low:g}")


PROBABILITY = (lambda v: 0.0 <= v <= 1.0, "must be a probability in [0, 1]")
DEVICE = (lambda v: bool(DEVICE_RE.match(str(v))), "must be cpu, cuda, cuda:N or auto")
# infer.py: a comma-separated list runs one worker process per device (src/parallel.py)
DEVICES_RE = re.compile(r"^(auto|(cpu|cuda(:\d+)?)(,(cpu|cuda(:\d+)?))*)$")
DEVICES = (lambda v: bool(DEVICES_RE.match(str(v))), "must be cpu, cuda, cuda:N or auto, or a list like cuda:0,cuda:1")


@dataclass
class DataConfig:
    data_dir: str = _opt("data/synthetic", "competition-layout data directory")
    folds: str = _opt("data/folds.csv", "folds CSV written by folds.py")
    num_workers: int = _opt(
        -1, "DataLoader workers (-1 = the CPU cores this process may use, less one, up to 16)", check=_at_least(-1)
    )
    jpeg_reduce: bool = _opt(True, "decode JPEGs at reduced resolution when tiles are small")
    cache_images: bool = _opt(False, "keep decoded images in RAM after the first epoch (one copy per worker)")
    # data hygiene (docs/HYGIENE.md): the cleaning is saved with the run, so inference reads images the same way
    clean_stamps: bool = _opt(
        False, "detect the orange date stamp (bottom-right) and inpaint it, in training and inference"
    )
    crop_bottom: float = _opt(
        0.0,
        "drop this bottom fraction of the image before the view split (cardboard strip)",
        check=(lambda v: 0.0 <= v < 0.5, "must be a fraction in [0, 0.5), e.g. 0.05"),
    )
    aug_artifacts: float = _opt(
        0.0, "probability of painting synthetic date stamps / red flash dots on a training image", check=PROBABILITY
    )
    drop_ids: str | None = _opt(None, "file of image ids left out of training (validation still scores them)")

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            self.num_workers = available_workers()


@dataclass
class ModelConfig:
    backbone: str = _opt(DEFAULT_BACKBONE, "timm model name (any ViT)")
    backbone_weights: str | None = _opt(
        None,
        "local .pth/.safetensors file; none = random init on purpose (a pretrained-size backbone needs one of the two)",
        literal_none=True,
    )
    backbone_kwargs: dict = _opt({}, "extra timm.create_model kwargs (YAML only)")
    grid: tuple[int, int] = _opt(
        (2, 2), "tiles per view: rows cols", check=(lambda v: min(v) >= 1, "needs rows, cols >= 1")
    )
    tile_size: int | None = _opt(None, "tile side in px (multiple of the patch); default native")
    feature: str = _opt("cls_mean", "per-tile feature", choices=FEATURES)
    fusion_dim: int = _opt(256, "width of the fused tile tokens", check=_at_least(1))
    hidden_ratio: float = _opt(0.5, "head MLP hidden width / fusion_dim")
    dropout: float = _opt(0.1, "dropout in the heads", check=PROBABILITY)
    use_aux_heads: bool = _opt(True, "State/Month/Species heads (training only)")
    grad_checkpointing: bool = _opt(False, "activation checkpointing in the backbone")
    max_tiles_per_call: int = _opt(64, "backbone chunk size (memory limit)", check=_at_least(1))
    # options beyond the seed design (docs/OPTIONS.md); the defaults are the seed design
    target_space: str = _opt(
        "log1p", "log1p: log1p grams | raw: grams / training-fold std, SmoothL1", choices=TARGET_SPACES
    )
    heads: str = _opt("five", "five heads, or three softplus parts with the other two derived", choices=HEAD_LAYOUTS)
    fusion: str = _opt("film", "cross-view fusion", choices=FUSIONS)
    # loss weights that live here because a weight > 0 adds a head the checkpoint must rebuild
    aux_ndvi_weight: float = _opt(
        0.0, "Pre_GSHH_NDVI regression head + loss weight (training only; 0 = no head)", check=_at_least(0)
    )
    aux_height_weight: float = _opt(
        0.0, "Height_Ave_cm regression head + loss weight (training only; 0 = no head)", check=_at_least(0)
    )
    norm_mean: list[float] | None = _opt(
        None,
        "input mean (RGB in [0, 1]); default: the weights file's pretrained config, else the backbone name's",
        check=(lambda v: v is None or len(v) == 3, "needs 3 values (R G B)"),
    )
    norm_std: list[float] | None = _opt(
        None,
        "input std (RGB); default: the weights file's pretrained config, else the backbone name's",
        check=(lambda v: v is None or (len(v) == 3 and min(v) > 0), "needs 3 values > 0 (R G B)"),
    )
    aux_bins: int = _opt(
        0,
        "N quantile bins per target (training fold): interval-classification heads, training only (0 = no head)",
        check=(lambda v: v == 0 or v >= 2, "needs at least 2 bins per target (0 = no bin heads)"),
    )


@dataclass
class TrainConfig:
    epochs: int = _opt(12, "total epochs (both stages)", check=_at_least(1))
    freeze_epochs: int = _opt(3, "frozen-stage epochs (backbone frozen, heads on cached features)", check=_at_least(0))
    lr: float = _opt(1e-3, "head / fusion learning rate")
    backbone_lr: float = _opt(1e-5, "backbone learning rate in the finetune stage")
    weight_decay: float = _opt(1e-2, "AdamW weight decay")
    warmup_frac: float = _opt(0.1, "linear warmup share of each stage", check=PROBABILITY)
    batch_size: int = _opt(8, "images per step (per process)", check=_at_least(1))
    accum: int = _opt(1, "gradient accumulation steps", check=_at_least(1))
    mixup_prob: float = _opt(0.5, "probability a batch is mixed", check=PROBABILITY)
    mixup_alpha: float = _opt(0.4, "Beta(alpha, alpha) of mixup", check=(lambda v: v > 0, "must be > 0"))
    stereo_swap_prob: float = _opt(0.5, "probability of swapping left/right views", check=PROBABILITY)
    augment: str = _opt("default", "augmentation strength", choices=AUGMENT_STRENGTHS)
    aux_state_weight: float = _opt(0.1, "State CE weight", check=_at_least(0))
    aux_month_weight: float = _opt(0.1, "Month CE weight", check=_at_least(0))
    aux_species_weight: float = _opt(0.1, "Species group CE weight", check=_at_least(0))
    target_weights: tuple[float, float, float, float, float] = _opt(
        TARGET_WEIGHTS, "loss weight per target (Green Dead Clover GDM Total)"
    )
    loss: str = _opt("mse", "loss on log1p targets (raw space always uses SmoothL1)", choices=LOSSES)
    huber_delta: float = _opt(1.0, "Huber delta (log1p units)")
    grad_clip: float = _opt(1.0, "max grad norm (0 = off)", check=_at_least(0))
    cache_features: bool = _opt(True, "the frozen stage trains heads from cached tile features")
    amp: bool | None = _opt(
        None, "autocast: bf16 on CPU and bf16-native GPUs, fp16 + GradScaler on T4/P100/V100 (default: on for CUDA)"
    )
    device: str = _opt("auto", "cpu | cuda | cuda:N | auto", check=DEVICE)
    seed: int = _opt(42, "seed of python, numpy, torch, albumentations")
    patience: int = _opt(6, "early-stopping patience in epochs (0 = off)", check=_at_least(0))
    max_bad_steps: int = _opt(5, "consecutive non-finite losses that stop the run", check=_at_least(1))
    huber_beta: float = _opt(
        5.0, "SmoothL1 beta in grams (--target-space raw)", check=(lambda v: v >= 0, "must be >= 0 grams (0 = L1)")
    )
    ema_decay: float = _opt(
        0.0,
        "EMA of the weights (timm ModelEmaV3): validated, selected and saved (0 = off)",
        check=(
            lambda v: 0 <= v < 1,
            "must be in [0, 1), e.g. 0.98 (~36 steps an epoch), or use --ema-half-life 1; 0 = off",
        ),
    )
    freeze_blocks: int = _opt(
        0, "first N backbone blocks (and the patch embedding) stay frozen in the finetune stage", check=_at_least(0)
    )
    layer_decay: float = _opt(
        1.0,
        "layer-wise lr decay of the backbone in the finetune stage (1 = off)",
        check=(lambda v: 0 < v <= 1, "must be in (0, 1], e.g. 0.75; 1 turns it off"),
    )
    swa_top_k: int = _opt(
        0,
        "average the K best epochs' weights at fold end (0 = off)",
        check=(lambda v: v == 0 or v >= 2, "an average needs K >= 2 epochs; 0 turns it off"),
    )
    aux_bins_weight: float = _opt(0.1, "CE weight of the --aux-bins heads (mean over targets)", check=_at_least(0))
    # issue 21: training that holds up on real GPUs
    ema_warmup: bool = _opt(
        True, "EMA decay ramps up from 0 (timm use_warmup: 1 - (1 + step)^-2/3, capped at the decay)"
    )
    ema_half_life: float = _opt(
        0.0,
        "EMA half-life in epochs: sets the decay from the run's optimizer steps per epoch (0 = use --ema-decay)",
        check=_at_least(0),
    )
    finetune_head_lr: float = _opt(
        1e-4, "head / fusion learning rate in the finetune stage (their Adam state carries over from the frozen stage)"
    )
    global_batch: int = _opt(
        0,
        "images per optimizer step over all processes: accumulation = global / (batch x processes) (0 = off)",
        check=_at_least(0),
    )
    keep_last: str = _opt(
        "full",
        "last.pt once the fold has finished: full (resumable as it was), slim (weights + loop state, no optimizer) "
        "or none (removed; last.json still says the fold finished)",
        choices=("full", "slim", "none"),
    )
    fit_memory: str = _opt(
        "auto",
        "fit grad checkpointing / batch / accumulation to GPU memory: GB, auto (the detected GPU) or off; "
        "the global batch is kept and a recipe that fits is left as it is (src/memory.py)",
        check=(lambda v: str(v).strip().lower() in ("auto", "off") or _positive_number(v), "must be GB, auto or off"),
    )


@dataclass
class PseudoLabelConfig:
    """Test-time pseudo-label fine-tune (src/adapt.py); flags `--pseudo-label-<field>`."""

    epochs: int = _opt(
        0, "fine-tune one model per grid on train + pseudo-labelled test images (0 = off)", check=_at_least(0)
    )
    weight: float = _opt(
        1.0,
        "loss weight of a pseudo-labelled test image (a training image weighs 1)",
        check=(lambda v: v >= 0, "must be >= 0 (1 = a test image counts like a training image)"),
    )
    blend: float = _opt(
        0.8,
        "submission = B * adapted + (1 - B) * ensemble",
        check=(lambda v: 0 <= v <= 1, "must be in [0, 1] (the adapted model's share)"),
    )
    lr_scale: float = _opt(
        0.1,
        "the fine-tune's learning rates = the run's finetune-stage lrs x this (a converged model moves gently)",
        check=(lambda v: v > 0, "must be > 0, e.g. 0.1"),
    )
    fold: str = _opt(
        "best",
        "which fold's checkpoint of each grid is fine-tuned: best (by val score) or K",
        check=(lambda v: v == "best" or str(v).isdigit(), "must be 'best' or a fold number"),
    )

    @property
    def enabled(self) -> bool:
        return self.epochs > 0


class _Configurable:
    """to_dict / from_dict / to_yaml for the two top-level configs."""

    def to_dict(self) -> dict:
        """Plain JSON/YAML-able dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config"):
        """Build from a (possibly partial) nested dict; unknown keys and bad values raise."""
        cfg = cls()
        apply_overrides(cfg, data, source)
        check_config(cfg, source)
        return cfg


@dataclass
class HeadConfig:
    """Frozen-feature heads instead of the network (src/heads.py, docs/OPTIONS.md); flags without a prefix.

    They reuse --backbone/--backbone-weights/--grid/--tile-size/--feature (the embedding), --target-space (log1p
    or raw targets) and --heads (five, or three parts with GDM and Total derived) of the model section.
    """

    regressor: str = _opt(
        "network", "network (the model) | ridge | kernel-ridge | hgb on frozen features", choices=REGRESSORS
    )
    features: str = _opt("both", "what the head regresses on (--regressor other than network)", choices=HEAD_FEATURES)
    embed_flips: bool = _opt(False, "backbone features averaged over the 4 flips of both views (4x the cost)")
    embed_cache: str = _opt("cache/embeddings", "directory of the content-keyed, resumable embedding cache")
    embed_chunk: int = _opt(64, "images per cache chunk (a killed run loses at most one)", check=_at_least(1))
    hgb_max_iter: int = _opt(
        100, "boosting rounds per target of --regressor hgb (no early stopping)", check=_at_least(1)
    )


@dataclass
class Config(_Configurable):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    head: HeadConfig = field(default_factory=HeadConfig, metadata={"flag_prefix": ""})
    exp: str = _opt("default", "experiment name (checkpoints/<exp>)")
    out_dir: str = _opt("checkpoints", "root of the experiment directories")


@dataclass
class InferConfig(_Configurable):
    """What infer.py runs (and the Kaggle kernel, which passes it as --config): the ensemble and how it predicts."""

    data_dir: str = _opt("data/synthetic", "competition-layout data directory")
    checkpoints: list[str] = _opt(["checkpoints/default"], "experiment dirs or best.pt files")
    out: str = _opt("submission.csv", "submission file to write (its resolved config goes beside it as .yaml)")
    tta: str = _opt("full", "none | flip (orig+h+v) | full (+stereo swap)", choices=TTA_CHOICES)
    physics: str = _opt("project", "post-processing of the 5 targets", choices=PHYSICS_CHOICES)
    structural_zeros: bool = _opt(
        False,
        "Dead x (1 - p(WA)), Clover x (1 - p(NSW)) from the State head, then --physics (--oof: scored on and off)",
    )
    grid_weights: list[str] | None = _opt(None, "RxC=W per grid, e.g. 2x2=1 3x3=0.5 (default equal)")
    batch_size: int = _opt(8, "images per batch", check=_at_least(1))
    device: str = _opt(
        "auto",
        "cpu | cuda | cuda:N | a list (cuda:0,cuda:1 or cpu,cpu: a worker each) | auto (every usable GPU)",
        check=DEVICES,
    )
    amp: bool = _opt(False, "autocast (bf16 on CPU and Ampere+, fp16 on older GPUs)")
    num_workers: int = _opt(0, "DataLoader workers for decoding", check=_at_least(0))
    oof: bool = _opt(False, "score the checkpoints out of fold instead of writing a submission")
    folds: str | None = _opt(None, "folds CSV for --oof (default: the one the checkpoints were trained with)")
    on_bad_image: str = _opt("error", "fallback: training-median prediction + warning", choices=ON_BAD_IMAGE)
    time_budget: float | None = _opt(
        None,
        "minutes the pseudo-label fine-tune may take; over the estimate it is skipped with a warning",
        check=(lambda v: v is None or v > 0, "must be > 0 minutes"),
    )
    deadline: float | None = _opt(
        None,
        "minutes from process start: models projected past it are skipped, the fine-tune stops at it "
        "(the kernel passes what is left of --time-budget)",
        check=(lambda v: v is None or v > 0, "must be > 0 minutes"),
    )
    pseudo_label: PseudoLabelConfig = field(
        default_factory=PseudoLabelConfig, metadata={"flag_prefix": "pseudo_label_"}
    )


# ---- presets ---------------------------------------------------------------------------------------------------
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
            "finetune_head_lr": 2e-3,  # random-init heads keep learning at the head lr (1e-4 is for a converged start)
            "batch_size": 16,
            "mixup_prob": 0.3,
            # no early stop: a random-init net's validation curve swings by +-0.15 wR2 from epoch to epoch at these
            # lrs (issue 26), so patience stopped folds on a dip, before the cosine schedule's low-lr end where the
            # stable epochs are (docs/ABLATION.md)
            "patience": 0,
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


def overlay(base: dict, extra: dict) -> dict:
    """A config dict with another merged over it, section by section (a recipe and its override, like presets)."""
    return _merged(base, extra)


# The tiny preset with a DINOv3-shaped backbone (timm Eva: patch 16, RoPE, 4 registers), same depth/width:
# checks the patch-16 path end to end on a CPU. 64 px tiles = 4x4 patches, like tiny's 56 = 4x4 of 14.
PRESETS["tiny-dinov3"] = _merged(PRESETS["tiny"], {"model": {"backbone": "vit_small_patch16_dinov3", "tile_size": 64}})

# InferConfig presets: `kaggle` is what the generated kernel runs unless kernels/build.py is told otherwise.
INFER_PRESETS: dict[str, dict] = {
    "local": {},
    # the hidden rerun must end with a submission: unreadable images get the counted fallback; fp16 on a T4
    "kaggle": {"amp": True, "on_bad_image": "fallback", "device": "auto"},
}


# ---- fields, values and checks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Leaf:
    """One settable field: where it lives (path of attribute names), its flag, type and metadata."""

    path: tuple[str, ...]
    flag: str
    hint: Any
    meta: Any

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def leaves(cfg: Any, prefix: tuple[str, ...] = (), flag_prefix: str = "") -> Iterator[Leaf]:
    """Every leaf field of a config, depth first; a nested dataclass is a section (its flag prefix from metadata)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, (*prefix, f.name), f.metadata.get("flag_prefix", ""))
        else:
            yield Leaf((*prefix, f.name), "--" + (flag_prefix + f.name).replace("_", "-"), hints[f.name], f.metadata)


def _get(cfg: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def _set(cfg: Any, path: tuple[str, ...], value: Any) -> None:
    setattr(_get(cfg, path[:-1]), path[-1], value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise BiomassError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
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


def _leaf_problem(leaf: Leaf, value: Any) -> str | None:
    """Why `value` is not allowed for `leaf`, naming its flag and the allowed values (None when it is allowed)."""
    choices = leaf.meta.get("choices")
    if choices and value not in choices:
        return f"unknown {leaf.flag} {value!r}; choose one of {', '.join(choices)}"
    check = leaf.meta.get("check")
    if check is not None and value is not None and not check[0](value):
        shown = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        return f"{leaf.flag} {shown}: {check[1]}"
    return None


def check_config(cfg: Any, source: str = "config") -> Any:
    """Every choice and range of a resolved config, before any work: one line naming the flag and the allowed values."""
    for leaf in leaves(cfg):
        problem = _leaf_problem(leaf, _get(cfg, leaf.path))
        if problem:
            raise BiomassError(f"{source}: {problem}")
    if isinstance(cfg, Config) and cfg.data.num_workers < 0:  # -1: this machine's cores, as the run records it
        cfg.data.num_workers = available_workers()
    if isinstance(cfg, Config) and cfg.train.ema_half_life > 0 and cfg.train.ema_decay > 0:
        raise BiomassError(
            f"{source}: --ema-half-life {cfg.train.ema_half_life:g} and --ema-decay {cfg.train.ema_decay:g}: give one "
            "(the half-life sets the decay from the run's steps per epoch)"
        )
    if isinstance(cfg, Config) and cfg.train.freeze_epochs > cfg.train.epochs:
        raise BiomassError(
            f"{source}: --freeze-epochs {cfg.train.freeze_epochs} exceeds --epochs {cfg.train.epochs}; "
            "the frozen stage is part of the epochs"
        )
    return cfg


# backbone_kwargs keys that reshape a timm ViT: no pretrained file fits such a model, random init is its only start
RESHAPING_KWARGS = ("depth", "embed_dim", "num_heads")


def weights_file(model: ModelConfig) -> str | None:
    """The backbone weights file to load, or None for random init (`--backbone-weights none` or unset)."""
    return None if model.backbone_weights in (None, "none") else model.backbone_weights


def check_backbone_weights(cfg: Config) -> Config:
    """Training never starts a pretrained-size backbone from random weights unless told so (`--backbone-weights none`).

    Its backbone lr (1e-5) is meant for pretrained weights: a silent random init trains a model that cannot learn.
    A backbone reshaped by `backbone_kwargs` (the tiny presets) has no pretrained weights, so random is its only start.
    A colour-feature head (`--regressor ridge|kernel-ridge|hgb --features colour`) builds no backbone at all.
    """
    model = cfg.model
    reshaped = any(k in model.backbone_kwargs for k in RESHAPING_KWARGS)
    no_backbone = cfg.head.regressor != "network" and cfg.head.features == "colour"
    if model.backbone_weights is None and not reshaped and not no_backbone:
        name = model.backbone
        raise BiomassError(
            f"--backbone {name} would start from random weights: pass --backbone-weights "
            f"weights/{name}.safetensors (made once with `python -m src.weights export --name {name} --out weights/`), "
            "or --backbone-weights none to train from random init on purpose"
        )
    return cfg


def apply_overrides(cfg: Any, data: dict, source: str) -> Any:
    """Merge a nested dict into cfg in place; unknown sections/keys raise naming the source."""
    by_path = {leaf.path: leaf for leaf in leaves(cfg)}
    sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    top = sorted({leaf.path[0] for leaf in by_path.values()})

    def merge(values: dict, prefix: tuple[str, ...]) -> None:
        for key, value in (values or {}).items():
            path = (*prefix, key)
            if path in by_path:
                leaf = by_path[path]
                if leaf.meta.get("literal_none") and isinstance(value, str) and value.lower() == "none":
                    _set(cfg, path, "none")
                    continue
                value = _coerce(value, leaf.hint, f"{source}: {leaf.dotted}")
                problem = _leaf_problem(leaf, value) if leaf.meta.get("choices") else None
                if problem:
                    raise BiomassError(f"{source}: {leaf.dotted}: {problem}")  # a YAML key names its place
                _set(cfg, path, value)
            elif len(path) == 1 and key in sections:
                if not isinstance(value, dict):
                    raise BiomassError(f"{source}: section {key!r} must be a mapping")
                merge(value, path)
            elif len(path) == 1:
                raise BiomassError(f"{source}: unknown key {key!r}; valid: {', '.join(top)}, preset, recipe")
            else:
                valid = sorted(p[-1] for p in by_path if p[:-1] == prefix)
                raise BiomassError(f"{source}: unknown key {'.'.join(path)}; valid keys: {', '.join(valid)}")

    merge(data, ())
    return cfg


# ---- recipes (configs/*.yaml): a train.py config plus a `recipe:` section for `make real` --------------------------
RECIPE_KEYS = ("grids", "folds", "seeds")


def check_recipe(section: Any, source: str) -> dict:
    """The `recipe:` section of a config file, normalised: grids [(R, C)], folds 'all' or [K], seeds None or [S].

    train.py trains the one grid of `model.grid` and reads nothing here; `real.py` trains every grid x fold (x seed).
    """
    if not isinstance(section, dict):
        raise BiomassError(f"{source}: section 'recipe' must be a mapping with keys {', '.join(RECIPE_KEYS)}")
    unknown = sorted(set(section) - set(RECIPE_KEYS))
    if unknown:
        raise BiomassError(f"{source}: unknown key recipe.{unknown[0]}; valid keys: {', '.join(RECIPE_KEYS)}")
    grids = section.get("grids", [])
    if not isinstance(grids, list) or not all(
        isinstance(g, list) and len(g) == 2 and all(isinstance(v, int) and v >= 1 for v in g) for g in grids
    ):
        raise BiomassError(f"{source}: recipe.grids must be a list of [rows, cols] pairs >= 1, got {grids!r}")
    folds = section.get("folds", "all")
    if folds != "all" and not (isinstance(folds, list) and folds and all(isinstance(k, int) and k >= 0 for k in folds)):
        raise BiomassError(f"{source}: recipe.folds must be 'all' or a list of fold numbers, got {folds!r}")
    seeds = section.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(isinstance(v, int) for v in seeds)):
        raise BiomassError(f"{source}: recipe.seeds must be a list of integers (or absent), got {seeds!r}")
    return {"grids": [tuple(g) for g in grids], "folds": folds, "seeds": seeds}


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


# ---- command line ------------------------------------------------------------------------------------------------
def add_flags(
    parser: argparse.ArgumentParser, template: Any, presets: dict[str, dict], only: set[str] | None = None
) -> None:
    """One flag per config field (default None = not given, so YAML/preset values survive), grouped by section.

    `only` limits the flags to these dotted field names (kernels/build.py takes the kernel's share of infer.py's).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for leaf in leaves(template):
        if leaf.hint is dict or (only is not None and leaf.dotted not in only):
            continue
        section = leaf.path[0] if len(leaf.path) > 1 else "options"
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
        default = _get(template, leaf.path)
        helptext = leaf.meta.get("help", "") + f" (default {default!r})"
        kwargs: dict[str, Any] = {"dest": leaf.dotted, "default": None, "help": helptext}
        origin = typing.get_origin(leaf.hint)
        list_hint = origin is list or any(typing.get_origin(a) is list for a in typing.get_args(leaf.hint))
        if leaf.hint is bool or set(typing.get_args(leaf.hint)) == {bool, type(None)}:  # bool | None: auto
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            kwargs["nargs"] = len(typing.get_args(leaf.hint))
        elif list_hint:
            kwargs["nargs"] = "*" if type(None) in typing.get_args(leaf.hint) else "+"
        else:
            kwargs["choices"] = leaf.meta.get("choices")
        group.add_argument(leaf.flag, **kwargs)
    if only is None:
        parser.add_argument("--config", default=None, help="YAML file with config values (flags override it)")
        parser.add_argument(
            "--preset", default=None, choices=sorted(presets), help="named preset (YAML and flags override it)"
        )


def resolve(cls: type, args: argparse.Namespace, presets: dict[str, dict], preset: str | None = None) -> Any:
    """defaults < preset < YAML < flags, then every check. `preset` is the caller's default preset."""
    cfg = cls()
    yaml_data = load_yaml(args.config) if getattr(args, "config", None) else {}
    yaml_preset = yaml_data.pop("preset", None)
    if "recipe" in yaml_data:  # what `make real` trains (real.py); checked here, so a typo is never ignored
        check_recipe(yaml_data.pop("recipe"), str(args.config))
    name = getattr(args, "preset", None) or yaml_preset or preset
    if name is not None:
        if name not in presets:
            raise BiomassError(f"unknown preset {name!r}; choose one of {', '.join(sorted(presets))}")
        apply_overrides(cfg, presets[name], f"preset {name}")
    apply_overrides(cfg, yaml_data, str(getattr(args, "config", None) or "yaml"))
    flags: dict[str, Any] = {}
    known = {leaf.dotted: leaf.path for leaf in leaves(cfg)}
    for dest, value in vars(args).items():
        if value is not None and dest in known:
            target = flags
            *parents, last = known[dest]
            for part in parents:
                target = target.setdefault(part, {})
            target[last] = value
    apply_overrides(cfg, flags, "command line")
    return check_config(cfg, "command line")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """train.py's flags: one per `Config` field."""
    add_flags(parser, Config(), PRESETS)


def resolve_config(args: argparse.Namespace) -> Config:
    """train.py's config: defaults < preset < YAML < flags."""
    return resolve(Config, args, PRESETS)


def add_infer_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """infer.py's flags: one per `InferConfig` field."""
    add_flags(parser, InferConfig(), INFER_PRESETS, only)


def resolve_infer_config(args: argparse.Namespace, preset: str | None = None) -> InferConfig:
    """infer.py's config: defaults < preset < YAML < flags."""
    return resolve(InferConfig, args, INFER_PRESETS, preset)
