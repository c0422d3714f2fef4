"""The fold loop: two stages, log1p targets, mixup, stereo swap, validation, checkpoints, resume, DDP.

`fit()` is the one training loop: train.py, sweeps and test-time fine-tuning all call it.
"""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from src.artifacts import Cleaning, artifact_transform
from src.config import Config, save_config
from src.data import load_train
from src.dataset import (
    AUX_BIN_COLUMNS,
    AUX_REGRESSION_COLUMNS,
    FLIP_VARIANTS,
    FeatureCacheDataset,
    ViewPairDataset,
    flip_views,
)
from src.errors import BiomassError
from src.folds import check_fold_index, load_folds
from src.io_utils import make_dir, torch_save_atomic, write_csv_atomic, write_text_atomic
from src.metric import score
from src.model import AUX_REGRESSION, BiomassModel, build_model
from src.runtime import DistInfo, all_gather_objects, autocast, barrier, init_distributed, seed_everything, worker_init
from src.schema import SHORT_NAMES, TARGETS
from src.transforms import build_transform

CHECKPOINT_FORMAT = 1
AUX_WEIGHT_FIELDS = {"state": "aux_state_weight", "month": "aux_month_weight", "species": "aux_species_weight"}


# ---- losses and mixup ------------------------------------------------------------------------------
def _batch_mean(per_image: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch, each image's loss times its sample weight (pseudo-labels count W, real labels 1)."""
    if sample_weight is None:
        return per_image.mean()
    return (per_image * sample_weight.to(per_image.device, per_image.dtype)).mean()


def target_loss(
    pred: torch.Tensor, target_grams: torch.Tensor, weights, kind: str = "mse", delta: float = 1.0,
    space: str = "log1p", scale=None, beta: float = 5.0, sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-target weighted loss in the model's target space, normalized by the weight sum.

    log1p: MSE or Huber(delta) on log1p grams. raw: SmoothL1 on grams / scale with beta / scale per target,
    which is SmoothL1(beta) in grams divided by the scale (beta stays in grams whatever the target's size).
    `sample_weight` (B,) scales each image's term (test-time pseudo-labels); None = all 1.
    """
    if space == "raw":
        scale = torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float32, device=pred.device)
        err = (pred.float() - target_grams.float() / scale).abs()
        if beta > 0:
            b = (beta / scale).expand_as(err)
            per = torch.where(err < b, 0.5 * err**2 / b, err - 0.5 * b)
        else:
            per = err
        w = torch.as_tensor(weights, dtype=per.dtype, device=per.device)
        return _batch_mean((per * w).sum(dim=1), sample_weight) / w.sum()
    if space != "log1p":
        raise BiomassError(f"unknown --target-space {space!r}; choose log1p or raw")
    pred_log1p = pred
    target = torch.log1p(target_grams.clamp_min(0))
    if kind == "mse":
        per = F.mse_loss(pred_log1p.float(), target, reduction="none")
    elif kind == "huber":
        per = F.huber_loss(pred_log1p.float(), target, reduction="none", delta=delta)
    else:
        raise BiomassError(f"unknown --loss {kind!r}; choose mse or huber")
    w = torch.as_tensor(weights, dtype=per.dtype, device=per.device)
    return _batch_mean((per * w).sum(dim=1), sample_weight) / w.sum()


def aux_loss(logits: torch.Tensor, labels: torch.Tensor, mix: tuple[float, torch.Tensor] | None) -> torch.Tensor:
    """Cross-entropy ignoring label -1; under mixup lam*CE(a) + (1-lam)*CE(b) (= CE with soft labels)."""

    def ce(lab: torch.Tensor) -> torch.Tensor:
        if (lab >= 0).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), lab, ignore_index=-1)

    if mix is None:
        return ce(labels)
    lam, perm = mix
    return lam * ce(labels) + (1 - lam) * ce(labels[perm])


def regression_aux_loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """MSE on standardized labels, NaN labels (unknown) ignored; an all-unknown batch gives a differentiable 0."""
    keep = torch.isfinite(label)
    if not bool(keep.any()):
        return pred.sum() * 0.0
    return F.mse_loss(pred.float()[keep], label.float()[keep])


def aux_regression_labels(train_frame: pd.DataFrame, val_frame: pd.DataFrame | None, model_cfg) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Copies of the frames with `<name>_z` columns (metadata standardized by the training fold) for the regression heads in use."""
    names = [name for name, weight in AUX_REGRESSION.items() if getattr(model_cfg, weight) > 0]
    if not names:
        return train_frame, val_frame
    train_frame = train_frame.copy()
    val_frame = None if val_frame is None else val_frame.copy()
    for name in names:
        column = AUX_REGRESSION_COLUMNS[name]
        if column not in train_frame.columns:
            raise BiomassError(f"--{AUX_REGRESSION[name].replace('_', '-')} needs column {column} in the training data (train.csv)")
        values = pd.to_numeric(train_frame[column], errors="coerce")
        mean, std = float(values.mean()), float(values.std(ddof=0))
        std = std if std > 0 else 1.0
        for frame in (train_frame, val_frame):
            if frame is not None:
                frame[f"{name}_z"] = (pd.to_numeric(frame[column], errors="coerce") - mean) / std if column in frame.columns else np.nan
    return train_frame, val_frame


def quantile_bin_edges(grams: np.ndarray, n_bins: int) -> np.ndarray:
    """(N, 5) training-fold grams -> (5, n_bins - 1) inner edges at the 1/n ... (n-1)/n quantiles of each target."""
    return np.quantile(np.asarray(grams, dtype=np.float64), np.arange(1, n_bins) / n_bins, axis=0).T


def bin_labels(grams: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(N, 5) grams -> (N, 5) interval index in [0, n_bins): bin k holds edges[k-1] < g <= edges[k]; NaN -> -1.

    Closed on the right so the many zero Clover (or Dead) values fall in bin 0; the tied edges they cause
    leave some bins empty, whose logits are only pushed down.
    """
    grams = np.asarray(grams, dtype=np.float64)
    out = np.stack([np.searchsorted(edges[j], grams[:, j], side="left") for j in range(grams.shape[1])], axis=1)
    return np.where(np.isfinite(grams), out, -1).astype(np.int64)


def aux_bin_labels(train_frame: pd.DataFrame, val_frame: pd.DataFrame | None, n_bins: int) -> tuple[pd.DataFrame, pd.DataFrame | None, np.ndarray]:
    """Copies of the frames with the `--aux-bins` interval labels (edges from the training fold only), and the edges."""
    edges = quantile_bin_edges(train_frame[list(TARGETS)].to_numpy(dtype=np.float64), n_bins)
    frames = []
    for frame in (train_frame, val_frame):
        if frame is not None:
            frame = frame.copy()
            labels = bin_labels(frame[list(TARGETS)].to_numpy(dtype=np.float64), edges) if all(t in frame for t in TARGETS) else -1
            frame[list(AUX_BIN_COLUMNS)] = labels
        frames.append(frame)
    return frames[0], frames[1], edges


def mixup(batch: dict[str, torch.Tensor], lam: float, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mix both views with the same lambda and permutation, and the targets in grams.

    Targets mix in grams (then the loss takes log1p): grams are additive, so the mixed labels keep
    GDM = Green + Clover and Total = Green + Dead + Clover exactly; mixing log1p values would not.
    """
    out = dict(batch)
    for key in ("left", "right"):
        views = batch[key].float() / 255.0 if batch[key].dtype == torch.uint8 else batch[key]
        out[key] = lam * views + (1 - lam) * views[perm]
    out["targets"] = lam * batch["targets"] + (1 - lam) * batch["targets"][perm]
    if "weight" in batch:  # a mixed image counts as much as its two sources, in proportion
        out["weight"] = lam * batch["weight"] + (1 - lam) * batch["weight"][perm]
    for key in AUX_REGRESSION_COLUMNS:  # continuous labels mix like the targets
        if key in batch:
            out[key] = lam * batch[key] + (1 - lam) * batch[key][perm]
    return out


# ---- state of a run -----------------------------------------------------------------------------------
@dataclass
class FitState:
    """What `last.pt` carries besides weights: enough to resume at the next epoch."""

    epoch: int = -1  # last completed epoch
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class FitResult:
    best_metric: float
    best_epoch: int
    history: list[dict]
    oof: pd.DataFrame | None
    run_dir: Path | None
    swa_metric: float | None = None  # val score of the --swa-top-k average (None when off)
    model: BiomassModel | None = None  # the weights validated and saved (the EMA copy under --ema-decay)


def target_stats(frame: pd.DataFrame) -> dict[str, list[float]]:
    """Training-target statistics stored in checkpoints (clamp bounds, fallback values, head bias)."""
    values = frame[list(TARGETS)].to_numpy(dtype=np.float64)
    return {
        "max": values.max(axis=0).tolist(),
        "median": np.median(values, axis=0).tolist(),
        "mean_log1p": np.log1p(values).mean(axis=0).tolist(),
        "mean": values.mean(axis=0).tolist(),
        # raw target space: grams / scale (the std, at least 1 g so an all-zero target cannot divide by 0)
        "scale": np.maximum(values.std(axis=0), 1.0).tolist(),
    }


def _unwrap(model: torch.nn.Module) -> BiomassModel:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _warmup_cosine(total_steps: int, warmup_frac: float):
    warmup = max(1, int(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def image_dataset(
    frame: pd.DataFrame, view_size: tuple[int, int], cfg: Config, transform=None, stereo_swap_prob: float = 0.0, train: bool = False
) -> ViewPairDataset:
    """Images of a run, read with its cleaning (`--clean-stamps`, `--crop-bottom`); `--aug-artifacts` in training only.

    `transform` defaults to the eval transform (resize only).
    """
    transform = transform if transform is not None else build_transform(view_size, train=False)
    artifacts = artifact_transform(cfg.data.aug_artifacts) if train else None
    return ViewPairDataset(
        frame, view_size, transform, stereo_swap_prob, cfg.data.jpeg_reduce, cleaning=Cleaning.from_config(cfg.data),
        image_transform=artifacts, cache_images=cfg.data.cache_images,
    )


# ---- feature cache -------------------------------------------------------------------------------------
@torch.no_grad()
def compute_feature_cache(
    model: BiomassModel, frame: pd.DataFrame, cfg: Config, device: torch.device, variants=FLIP_VARIANTS, show: bool = True
) -> torch.Tensor:
    """Tile features of every image under each flip variant: (N, V, 2 views, tiles, F), float32 on CPU.

    Flips are applied to the already-decoded views, so each image is read once; all variants of a
    batch go through the backbone in one call.
    """
    dataset = image_dataset(frame, model.view_size, cfg)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, worker_init_fn=worker_init)
    model.eval()
    chunks = []
    for batch in tqdm(loader, desc="feature cache", leave=False, disable=not show):
        views = torch.cat([batch["left"], batch["right"]]).to(device)
        stacked = torch.cat([flip_views(views, h, v) for h, v in variants])
        with autocast(device, cfg.train.amp):
            feats = model.encode_tiles(stacked).float().cpu()
        b = len(batch["left"])
        feats = feats.reshape(len(variants), 2, b, *feats.shape[1:]).permute(2, 0, 1, 3, 4)
        chunks.append(feats)
    return torch.cat(chunks)


def feature_cache(model: BiomassModel, train_frame, val_frame, cfg: Config, device, show: bool = True) -> dict[str, torch.Tensor]:
    """Stage-1 cache of a frozen backbone: all flip variants of the training images, identity of the val ones.

    Computed once per fold; sweeps pass it to every `fit` call so the backbone runs once for all runs.
    """
    model.freeze_backbone()
    cache = {"train": compute_feature_cache(model, train_frame, cfg, device, show=show)}
    if val_frame is not None:
        cache["val"] = compute_feature_cache(model, val_frame, cfg, device, variants=FLIP_VARIANTS[:1], show=False)
    return cache


# ---- one epoch -----------------------------------------------------------------------------------------------
def _loss(model, batch, cfg: Config, device, cached: bool, mix) -> torch.Tensor:
    with autocast(device, cfg.train.amp, training=True):
        out = model(batch["left"].to(device), batch["right"].to(device), features=cached)
    net = _unwrap(model)
    tc = cfg.train
    loss = target_loss(
        out["targets"], batch["targets"].to(device), tc.target_weights, tc.loss, tc.huber_delta,
        net.cfg.target_space, net.target_scale, tc.huber_beta, batch.get("weight"),
    )
    for name, weight_field in AUX_WEIGHT_FIELDS.items():
        weight = getattr(cfg.train, weight_field)
        if weight > 0 and name in out:
            aux_mix = None if mix is None else (mix[0], mix[1].to(device))
            loss = loss + weight * aux_loss(out[name], batch[name].to(device), aux_mix)
    for name, weight_field in AUX_REGRESSION.items():
        weight = getattr(net.cfg, weight_field)
        if weight > 0 and name in out and name in batch:
            loss = loss + weight * regression_aux_loss(out[name], batch[name].to(device))
    if "bins" in out and "bins" in batch:  # (B, 5, N) logits -> CE over N, mean over images x targets
        bins_mix = None if mix is None else (mix[0], mix[1].to(device))
        loss = loss + tc.aux_bins_weight * aux_loss(out["bins"].transpose(1, 2), batch["bins"].to(device), bins_mix)
    return loss


def train_one_epoch(model, loader, optimizer, scheduler, cfg: Config, device, cached: bool, dist_info: DistInfo, epoch: int, ema=None) -> dict:
    """One pass over the loader with mixup, accumulation, clipping and non-finite-loss skipping (+ EMA update per step)."""
    model.train()
    rng = np.random.default_rng((cfg.train.seed, epoch, dist_info.rank, 7))
    total, count, bad_in_row, bad_total = 0.0, 0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    accum = max(1, cfg.train.accum)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not dist_info.is_main)
    for step, batch in enumerate(bar):
        mix = None
        if cfg.train.mixup_prob > 0 and rng.random() < cfg.train.mixup_prob and len(batch["targets"]) > 1:
            lam = float(rng.beta(cfg.train.mixup_alpha, cfg.train.mixup_alpha))
            perm = torch.from_numpy(rng.permutation(len(batch["targets"])))
            batch, mix = mixup(batch, lam, perm), (lam, perm)
        loss = _loss(model, batch, cfg, device, cached, mix)
        if not torch.isfinite(loss):
            bad_in_row += 1
            bad_total += 1
            optimizer.zero_grad(set_to_none=True)
            if bad_in_row >= cfg.train.max_bad_steps:
                raise BiomassError(
                    f"{bad_in_row} non-finite losses in a row (epoch {epoch}, step {step}); the last good checkpoint "
                    "is kept; lower --lr, check the input images, or try --no-amp"
                )
            continue
        bad_in_row = 0
        (loss / accum).backward()
        if (step + 1) % accum == 0 or step + 1 == len(loader):
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(_unwrap(model))
        total += float(loss.detach()) * len(batch["targets"])
        count += len(batch["targets"])
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    return {"train_loss": total / max(count, 1), "bad_steps": bad_total}


@torch.no_grad()
def predict_grams(model: BiomassModel, loader, device, amp: bool, cached: bool, dist_info: DistInfo) -> tuple[np.ndarray, np.ndarray]:
    """Predictions in grams for every item of the loader, gathered over ranks: (indices, (N, 5))."""
    model.eval()
    idx, preds = [], []
    for batch in loader:
        with autocast(device, amp):
            out = model(batch["left"].to(device), batch["right"].to(device), features=cached)
        preds.append(_unwrap(model).to_grams(out["targets"]).cpu().numpy())
        idx.append(batch["index"].numpy())
    local = (np.concatenate(idx) if idx else np.zeros(0, int), np.concatenate(preds) if preds else np.zeros((0, 5)))
    parts = all_gather_objects(local, dist_info)
    indices = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    order = np.argsort(indices, kind="stable")
    indices, values = indices[order], values[order]
    keep = np.concatenate([[True], indices[1:] != indices[:-1]]) if len(indices) else np.zeros(0, bool)
    return indices[keep], values[keep]


# ---- the loop ------------------------------------------------------------------------------------------------
class Stage:
    """Optimizer, scheduler and loaders of one stage (frozen: cached features; unfrozen: images)."""

    def __init__(
        self, number: int, model: BiomassModel, train_frame, val_frame, cfg: Config, device, dist_info: DistInfo,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.number = number
        self.cfg = cfg
        self.dist_info = dist_info
        tc = cfg.train
        frozen = number == 1
        if frozen:
            model.freeze_backbone()
        else:
            model.unfreeze_backbone(tc.freeze_blocks)
        self.cached = frozen and tc.cache_features
        view_size = model.view_size
        if self.cached:
            cache = cache if cache is not None else feature_cache(model, train_frame, val_frame, cfg, device, dist_info.is_main)
            self.train_set = FeatureCacheDataset(cache["train"], train_frame, tc.stereo_swap_prob, tc.seed)
            if val_frame is not None:
                val_feats = cache["val"]
                self.val_set = FeatureCacheDataset(val_feats, val_frame, 0.0, tc.seed)
        else:
            # photometric augmentation only when the backbone sees the pixels (or the cache is off)
            transform = build_transform(view_size, train=True, strength=tc.augment)
            self.train_set = image_dataset(train_frame, view_size, cfg, transform, tc.stereo_swap_prob, train=True)
            if val_frame is not None:
                self.val_set = image_dataset(val_frame, view_size, cfg)
        if val_frame is None:
            self.val_set = None
        self.model = model
        if dist_info.enabled:
            # re-wrapped per stage: DDP registers the parameters that require grad at construction
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        groups = model.param_groups(tc.lr, tc.backbone_lr, tc.weight_decay, include_backbone=not frozen, layer_decay=tc.layer_decay)
        self.optimizer = torch.optim.AdamW(groups)
        steps = math.ceil(len(self.train_loader(0)) / max(1, tc.accum)) * self.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_cosine(steps, tc.warmup_frac))

    @property
    def epochs(self) -> int:
        tc = self.cfg.train
        frozen = min(tc.freeze_epochs, tc.epochs)
        return frozen if self.number == 1 else tc.epochs - frozen

    def train_loader(self, epoch: int) -> DataLoader:
        """A loader whose order and augmentation depend only on (seed, epoch): resumes repeat epochs exactly."""
        tc, info = self.cfg.train, self.dist_info
        sampler = DistributedSampler(self.train_set, num_replicas=info.world, rank=info.rank, shuffle=True, seed=tc.seed)
        sampler.set_epoch(epoch)
        if isinstance(self.train_set, FeatureCacheDataset):
            self.train_set.set_epoch(epoch)
        generator = torch.Generator().manual_seed(tc.seed * 1000 + epoch)
        workers = 0 if self.cached else self.cfg.data.num_workers
        if workers == 0 and hasattr(self.train_set, "set_random_seed"):
            self.train_set.set_random_seed(tc.seed * 1000 + epoch + info.rank)
        return DataLoader(
            self.train_set, batch_size=tc.batch_size, sampler=sampler, num_workers=workers, worker_init_fn=worker_init,
            generator=generator, pin_memory=torch.cuda.is_available(), drop_last=False,
        )

    def val_loader(self) -> DataLoader:
        """Each rank takes a strided shard of the validation set; predictions are gathered."""
        info = self.dist_info
        subset = torch.utils.data.Subset(self.val_set, list(range(info.rank, len(self.val_set), info.world)))
        workers = 0 if self.cached else self.cfg.data.num_workers
        return DataLoader(subset, batch_size=self.cfg.train.batch_size, num_workers=workers, worker_init_fn=worker_init)


def fit(
    cfg: Config,
    train_frame: pd.DataFrame,
    val_frame: pd.DataFrame | None,
    run_dir: Path | None,
    device: torch.device,
    dist_info: DistInfo | None = None,
    resume: bool = False,
    model: BiomassModel | None = None,
    fold: int | None = None,
    cache: dict[str, torch.Tensor] | None = None,
) -> FitResult:
    """Train a model on train_frame, validating on val_frame each epoch; checkpoints go to run_dir.

    Reused by train.py (one fold), sweeps and test-time fine-tuning (pass `model` to start from trained
    weights; `run_dir=None` writes nothing; `cache` = a precomputed `feature_cache` of the same backbone).
    """
    tc = cfg.train
    dist_info = dist_info or DistInfo()
    seed_everything(tc.seed)
    stats = target_stats(train_frame)
    if model is None:
        model = build_model(cfg.model)
        model.init_from_stats(stats)
    check_options(cfg, model)
    train_frame, val_frame = aux_regression_labels(train_frame, val_frame, model.cfg)
    if model.cfg.aux_bins > 0:  # edges of the training fold, kept in the checkpoint for the record
        train_frame, val_frame, edges = aux_bin_labels(train_frame, val_frame, model.cfg.aux_bins)
        stats["bin_edges"] = edges.tolist()
    model.to(device)
    state = FitState()
    last_path = run_dir / "last.pt" if run_dir is not None else None
    saved = None
    if resume and last_path is not None:
        saved = check_resume(last_path, cfg)
    if saved is not None:
        model.load_state_dict(saved["model"])
        state = FitState(**saved["state"])
        if dist_info.is_main:
            print(f"resuming from {last_path} after epoch {state.epoch}")
    if model.cfg.target_space == "raw":  # the checkpoint records the scale the model actually divides by
        stats["scale"] = model.target_scale.tolist()
    # --ema-decay: a shadow copy of the weights is what gets validated, selected and saved
    ema = _make_ema(model, tc.ema_decay, saved, last_path)
    evaluated = ema.module if ema is not None else model
    top_k: list[dict] = list(saved.get("swa_top", [])) if saved is not None else []
    stage: Stage | None = None
    oof = _read_oof(run_dir) if saved is not None else None
    for epoch in range(state.epoch + 1, tc.epochs):
        number = 1 if epoch < tc.freeze_epochs else 2
        if stage is None or stage.number != number:
            seed_everything(tc.seed + 100 * number)
            stage = Stage(number, model, train_frame, val_frame, cfg, device, dist_info, cache if number == 1 else None)
            continuing = saved is not None and saved["stage"] == number
            if continuing:
                stage.optimizer.load_state_dict(saved["optimizer"])
                stage.scheduler.load_state_dict(saved["scheduler"])
            elif number == 2:
                state.bad_epochs = 0  # patience counts within the unfrozen stage
            saved = None
        seed_everything(tc.seed * 1000 + epoch + dist_info.rank)
        start = time.time()
        row = {"epoch": epoch, "stage": number}
        row.update(train_one_epoch(stage.model, stage.train_loader(epoch), stage.optimizer, stage.scheduler, cfg, device, stage.cached, dist_info, epoch, ema=ema))
        groups = stage.optimizer.param_groups
        row["lr_head"] = next((g["lr"] for g in groups if g["name"] == "head"), float("nan"))
        row["lr_backbone"] = max((g["lr"] for g in groups if g["name"].startswith("backbone")), default=0.0)
        improved = False
        if stage.val_set is not None:
            idx, preds = predict_grams(evaluated, stage.val_loader(), device, tc.amp, stage.cached, dist_info)
            truth = val_frame[list(TARGETS)].to_numpy(dtype=np.float64)[idx]
            scores = score(truth, preds)
            row.update(scores)
            improved = scores["weighted_r2"] > state.best_metric
            if improved:
                state.best_metric, state.best_epoch, state.bad_epochs = scores["weighted_r2"], epoch, 0
                oof = _oof_frame(val_frame.iloc[idx], preds, fold)
            elif number == 2:
                state.bad_epochs += 1
            if tc.swa_top_k > 0:
                keep_top_k(top_k, scores["weighted_r2"], epoch, evaluated, tc.swa_top_k)
        row["seconds"] = round(time.time() - start, 2)
        state.epoch = epoch
        state.history.append(row)
        if dist_info.is_main:
            _log_epoch(row)
            if run_dir is not None:
                if improved or stage.val_set is None:
                    save_best(run_dir / "best.pt", evaluated, cfg, stats, epoch, row.get("weighted_r2"), fold)
                    if oof is not None:
                        write_csv_atomic(oof, run_dir / "oof.csv")
                write_csv_atomic(pd.DataFrame(state.history), run_dir / "metrics.csv")
                last = {
                    "format": CHECKPOINT_FORMAT,
                    "model": model.state_dict(),
                    "stage": number,
                    "optimizer": stage.optimizer.state_dict(),
                    "scheduler": stage.scheduler.state_dict(),
                    "state": state.__dict__,
                    "config": cfg.to_dict(),
                }
                if ema is not None:
                    last["ema"] = ema.module.state_dict()
                if tc.swa_top_k > 0:
                    last["swa_top"] = top_k  # K weight copies: last.pt grows to (K + 1 or 2) x the model
                torch_save_atomic(last, last_path)
        barrier(dist_info)
        if number == 2 and tc.patience > 0 and state.bad_epochs >= tc.patience:
            if dist_info.is_main:
                print(f"early stop after epoch {epoch}: no improvement for {tc.patience} epochs")
            break
    swa_metric = None
    if tc.swa_top_k > 0 and val_frame is not None and len(top_k) >= 2:
        swa_metric, swa_oof = _finish_swa(top_k, evaluated, val_frame, cfg, stats, state, run_dir, device, dist_info, fold)
        if swa_oof is not None:
            oof = swa_oof
    return FitResult(state.best_metric, state.best_epoch, state.history, oof, run_dir, swa_metric, evaluated)


def check_options(cfg: Config, model: BiomassModel) -> None:
    """Refuse option values that would fail late (at stage 2 or fold end) or silently do nothing, before any work."""
    tc = cfg.train
    depth = len(getattr(model.backbone, "blocks", ()))
    if not 0 <= tc.freeze_blocks <= depth:
        raise BiomassError(f"--freeze-blocks {tc.freeze_blocks}: {model.cfg.backbone} has {depth} blocks; use 0 to {depth}")
    if not 0 < tc.layer_decay <= 1:
        raise BiomassError(f"--layer-decay {tc.layer_decay}: must be in (0, 1], e.g. 0.75; 1 turns it off")
    if not 0 <= tc.ema_decay < 1:
        raise BiomassError(f"--ema-decay {tc.ema_decay}: must be in (0, 1), e.g. 0.999; 0 turns EMA off")
    if tc.swa_top_k < 0 or tc.swa_top_k == 1:
        raise BiomassError(f"--swa-top-k {tc.swa_top_k}: an average needs K >= 2 epochs; 0 turns it off")
    if tc.huber_beta < 0:
        raise BiomassError(f"--huber-beta {tc.huber_beta}: must be >= 0 grams (0 = L1)")
    Cleaning.from_config(cfg.data)  # --crop-bottom out of range: now, not when the first image is read
    artifact_transform(cfg.data.aug_artifacts)  # --aug-artifacts out of range: now, not at stage 2


# ---- EMA and SWA of the K best epochs -----------------------------------------------------------------------
def _make_ema(model: BiomassModel, decay: float, saved: dict | None, last_path: Path | None) -> ModelEmaV3 | None:
    """timm's ModelEmaV3 of the model (decay 0 = off); on resume its weights come back from last.pt."""
    if decay <= 0:
        return None
    if decay >= 1:
        raise BiomassError(f"--ema-decay {decay}: must be in (0, 1), e.g. 0.999; 0 turns EMA off")
    ema = ModelEmaV3(model, decay=decay)
    ema.module.requires_grad_(False)
    if saved is not None:
        if "ema" not in saved:
            raise BiomassError(f"{last_path}: was trained without --ema-decay; resume with the same flags or pass --overwrite")
        ema.module.load_state_dict(saved["ema"])
    return ema


def keep_top_k(top: list[dict], metric: float, epoch: int, model: BiomassModel, k: int) -> None:
    """Keep the k best epochs' weights (CPU copies), best first: [{'metric', 'epoch', 'model'}]."""
    if not np.isfinite(metric) or (len(top) >= k and metric <= top[-1]["metric"]):
        return
    weights = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    top.append({"metric": float(metric), "epoch": int(epoch), "model": weights})
    top.sort(key=lambda item: -item["metric"])
    del top[k:]


def average_state_dicts(states: list[dict]) -> dict:
    """Element-wise mean of the float tensors of several state_dicts (other tensors from the first)."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(dim=0).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def _image_val_loader(model: BiomassModel, val_frame: pd.DataFrame, cfg: Config, dist_info: DistInfo) -> DataLoader:
    """Validation images (no cache: any backbone weights), a strided shard per rank."""
    dataset = image_dataset(val_frame, model.view_size, cfg)
    subset = torch.utils.data.Subset(dataset, list(range(dist_info.rank, len(dataset), dist_info.world)))
    return DataLoader(subset, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, worker_init_fn=worker_init)


def _finish_swa(top_k, evaluated, val_frame, cfg: Config, stats, state: FitState, run_dir, device, dist_info, fold):
    """Average the K best epochs' weights and validate them; swa.pt is always written, and the average
    replaces best.pt (and oof.csv) when it scores at least as well as the best single epoch.

    Returns (its val weighted R2, its OOF frame if it replaced the best, else None).
    """
    swa = copy.deepcopy(evaluated)
    swa.load_state_dict(average_state_dicts([item["model"] for item in top_k]))
    swa.to(device)
    idx, preds = predict_grams(swa, _image_val_loader(swa, val_frame, cfg, dist_info), device, cfg.train.amp, False, dist_info)
    metric = score(val_frame[list(TARGETS)].to_numpy(dtype=np.float64)[idx], preds)["weighted_r2"]
    epochs = sorted(item["epoch"] for item in top_k)
    wins = metric >= state.best_metric
    oof = _oof_frame(val_frame.iloc[idx], preds, fold) if wins else None
    if dist_info.is_main:
        verdict = "replaces best.pt" if wins else "best.pt kept"
        print(f"swa of epochs {epochs}: val weighted R2 {metric:.4f} vs best epoch {state.best_metric:.4f}: {verdict}", flush=True)
        if run_dir is not None:
            save_best(run_dir / "swa.pt", swa, cfg, stats, state.best_epoch, metric, fold, swa_epochs=epochs)
            if wins:
                save_best(run_dir / "best.pt", swa, cfg, stats, state.best_epoch, metric, fold, swa_epochs=epochs)
                write_csv_atomic(oof, run_dir / "oof.csv")
    if wins:
        state.best_metric = metric
    return metric, oof


def _oof_frame(frame: pd.DataFrame, preds: np.ndarray, fold: int | None) -> pd.DataFrame:
    """Wide held-out predictions in grams, with the truth beside them for reports."""
    out = pd.DataFrame({"image_id": frame["image_id"].to_numpy(), "fold": fold if fold is not None else -1})
    for j, name in enumerate(TARGETS):
        out[name] = preds[:, j]
    for name in TARGETS:
        out[f"true_{name}"] = frame[name].to_numpy()
    return out


def _read_oof(run_dir: Path | None) -> pd.DataFrame | None:
    path = run_dir / "oof.csv" if run_dir is not None else None
    return pd.read_csv(path, dtype={"image_id": str}) if path is not None and path.is_file() else None


def _log_epoch(row: dict) -> None:
    per = " ".join(f"{short}={row[f'r2_{name}']:.3f}" for short, name in zip(SHORT_NAMES, TARGETS) if f"r2_{name}" in row)
    val = f"val_wR2={row['weighted_r2']:.4f} " if "weighted_r2" in row else ""
    print(
        f"epoch {row['epoch']:3d} stage {row['stage']} loss={row['train_loss']:.4f} {val}{per} "
        f"lr={row['lr_head']:.2e}/{row['lr_backbone']:.2e} bad={row['bad_steps']} {row['seconds']:.1f}s",
        flush=True,
    )


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def save_best(path: Path, model: BiomassModel, cfg: Config, stats: dict, epoch: int, metric, fold, swa_epochs: list[int] | None = None) -> Path:
    """best.pt describes itself: weights + resolved config + target statistics, plain types only."""
    extra = {} if swa_epochs is None else {"swa_epochs": [int(e) for e in swa_epochs]}
    return torch_save_atomic(
        {
            **extra,
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "target_stats": stats,
            "targets": list(TARGETS),
            "epoch": int(epoch),
            "fold": None if fold is None else int(fold),
            "val_metric": None if metric is None else float(metric),
            "tile_size": int(model.tile_size),
            "grid": list(model.grid),
        },
        path,
    )


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True: a checkpoint holding pickled code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise BiomassError(f"{path}: checkpoint not found; train it with train.py or check --checkpoints")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only=True met a pickled class or function: never run it
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        detail = f" ({lines[0][:160]})" if lines else ""
        raise BiomassError(
            f"{path}: refused: it holds pickled Python objects, not only tensors{detail}; checkpoints are loaded with "
            "weights_only=True and this one would run code; re-train it or re-download it from a source you trust"
        ) from err
    except Exception as err:  # truncated zip, foreign formats: all mean "not ours"
        reason = str(err).strip().split(". ")[0].splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise BiomassError(f"{path}: not a loadable checkpoint ({reason}); truncated or corrupt? re-train or re-download it") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise BiomassError(f"{path}: not an image2biomass checkpoint (format {CHECKPOINT_FORMAT}); re-train it")
    return ckpt


def check_resume(last_path: Path, cfg: Config) -> dict | None:
    """last.pt of an interrupted run (None if there is none), refused if its model config differs from cfg."""
    if not last_path.is_file():
        return None
    saved = load_checkpoint(last_path)
    # keys added to ModelConfig after that run was saved count as their defaults (which keep the old model)
    defaults = Config().to_dict()["model"]
    ours, theirs = cfg.to_dict()["model"], {**defaults, **((saved.get("config") or {}).get("model") or {})}
    # the image cleaning decides what the model has seen, like the model config does
    data_defaults, saved_data = Config().to_dict()["data"], (saved.get("config") or {}).get("data") or {}
    for key in ("clean_stamps", "crop_bottom"):
        ours[key], theirs[key] = getattr(cfg.data, key), saved_data.get(key, data_defaults[key])
    if theirs != ours:
        diff = [f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs)) if theirs.get(k) != ours.get(k)]
        raise BiomassError(
            f"{last_path}: was trained with another model config ({'; '.join(diff[:3])}); resume with the same "
            "flags or pass --overwrite to start again"
        )
    return saved


# ---- a fold from the command line -------------------------------------------------------------------------------
def run_dir_for(cfg: Config, fold: int) -> Path:
    """checkpoints/<exp>/grid<R>x<C>/fold<K>/"""
    rows, cols = cfg.model.grid
    return Path(cfg.out_dir) / cfg.exp / f"grid{rows}x{cols}" / f"fold{fold}"


def _git_description() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout.strip()
        return f"{commit}{' (dirty)' if dirty else ''}\n"
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)\n"


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A fold directory that already holds a run needs --resume or --overwrite."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            for f in run_dir.iterdir():
                if f.is_file():
                    f.unlink()
        elif not resume:
            raise BiomassError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    make_dir(run_dir)


def drop_training_ids(train_frame: pd.DataFrame, val_frame: pd.DataFrame, path: str | None, known_ids) -> tuple[pd.DataFrame, str]:
    """`--drop-ids FILE`: the listed images leave the training set; validation keeps and scores them (said in the note)."""
    if not path:
        return train_frame, ""
    from src.data import load_id_list

    drop = set(load_id_list(path, known_ids))
    kept = train_frame[~train_frame["image_id"].isin(drop)].reset_index(drop=True)
    in_val = int(val_frame["image_id"].isin(drop).sum())
    note = f"--drop-ids {path}: {len(train_frame) - len(kept)} of {len(train_frame)} training images left out"
    if in_val:
        note += f"; {in_val} listed image(s) are in this fold's validation set and are still scored"
    if kept.empty:
        raise BiomassError(f"--drop-ids {path}: drops every training image of this fold; list fewer ids")
    return kept, note


def train_fold(cfg: Config, fold: int, resume: bool = False, overwrite: bool = False, command: str = "") -> FitResult:
    """Train one fold end to end: validate inputs, train, write the fold directory."""
    dist_info, device = init_distributed(cfg.train.device)
    wide = load_train(cfg.data.data_dir, check_images=True)
    folds = load_folds(cfg.data.folds, wide)
    check_fold_index(folds, fold, cfg.data.folds)
    wide = wide.merge(folds, on="image_id")
    train_frame = wide[wide["fold"] != fold].reset_index(drop=True)
    val_frame = wide[wide["fold"] == fold].reset_index(drop=True)
    train_frame, drop_note = drop_training_ids(train_frame, val_frame, cfg.data.drop_ids, wide["image_id"])
    run_dir = run_dir_for(cfg, fold)
    # Build the model (loading --backbone-weights) and check --resume before the run directory is touched:
    # a bad weights file or a mismatched last.pt leaves nothing behind. Same seed as fit's own build.
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    model.init_from_stats(target_stats(train_frame))
    check_options(cfg, model)
    if resume:
        check_resume(run_dir / "last.pt", cfg)
    if dist_info.is_main:
        prepare_run_dir(run_dir, resume, overwrite)
        save_config(cfg, run_dir / "config.yaml")
        write_text_atomic(run_dir / "git.txt", _git_description())
        if command:
            write_text_atomic(run_dir / "command.txt", command + "\n")
        print(f"fold {fold}: {len(train_frame)} train / {len(val_frame)} val images -> {run_dir}", flush=True)
        if drop_note:
            print(drop_note, flush=True)
    barrier(dist_info)
    result = fit(cfg, train_frame, val_frame, run_dir, device, dist_info, resume=resume, model=model, fold=fold)
    if dist_info.is_main:
        print(f"fold {fold}: best val weighted R2 {result.best_metric:.4f} at epoch {result.best_epoch}", flush=True)
    return result
