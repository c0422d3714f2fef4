"""The fold loop: two stages, log1p targets, mixup, stereo swap, validation, checkpoints, resume, DDP.

`fit()` is the one training loop: train.py, sweeps and test-time fine-tuning all call it.
"""

from __future__ import annotations

import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from src.config import Config, save_config
from src.data import load_train
from src.dataset import FLIP_VARIANTS, FeatureCacheDataset, ViewPairDataset, flip_views
from src.errors import BiomassError
from src.folds import check_fold_index, load_folds
from src.io_utils import torch_save_atomic, write_csv_atomic, write_text_atomic
from src.metric import score
from src.model import BiomassModel, build_model, log1p_to_grams
from src.runtime import DistInfo, all_gather_objects, autocast, barrier, init_distributed, seed_everything, worker_init
from src.schema import SHORT_NAMES, TARGETS
from src.transforms import build_transform

CHECKPOINT_FORMAT = 1
AUX_WEIGHT_FIELDS = {"state": "aux_state_weight", "month": "aux_month_weight", "species": "aux_species_weight"}


# ---- losses and mixup ------------------------------------------------------------------------------
def target_loss(pred_log1p: torch.Tensor, target_grams: torch.Tensor, weights, kind: str = "mse", delta: float = 1.0) -> torch.Tensor:
    """Per-target weighted loss on log1p targets, normalized by the weight sum."""
    target = torch.log1p(target_grams.clamp_min(0))
    if kind == "mse":
        per = F.mse_loss(pred_log1p.float(), target, reduction="none")
    elif kind == "huber":
        per = F.huber_loss(pred_log1p.float(), target, reduction="none", delta=delta)
    else:
        raise BiomassError(f"unknown --loss {kind!r}; choose mse or huber")
    w = torch.as_tensor(weights, dtype=per.dtype, device=per.device)
    return (per * w).sum(dim=1).mean() / w.sum()


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


def target_stats(frame: pd.DataFrame) -> dict[str, list[float]]:
    """Training-target statistics stored in checkpoints (clamp bounds, fallback values, head bias)."""
    values = frame[list(TARGETS)].to_numpy(dtype=np.float64)
    return {
        "max": values.max(axis=0).tolist(),
        "median": np.median(values, axis=0).tolist(),
        "mean_log1p": np.log1p(values).mean(axis=0).tolist(),
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


# ---- feature cache -------------------------------------------------------------------------------------
@torch.no_grad()
def compute_feature_cache(
    model: BiomassModel, frame: pd.DataFrame, cfg: Config, device: torch.device, variants=FLIP_VARIANTS, show: bool = True
) -> torch.Tensor:
    """Tile features of every image under each flip variant: (N, V, 2 views, tiles, F), float32 on CPU.

    Flips are applied to the already-decoded views, so each image is read once; all variants of a
    batch go through the backbone in one call.
    """
    dataset = ViewPairDataset(frame, model.view_size, build_transform(model.view_size, train=False), jpeg_reduce=cfg.data.jpeg_reduce)
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
    with autocast(device, cfg.train.amp):
        out = model(batch["left"].to(device), batch["right"].to(device), features=cached)
    loss = target_loss(out["targets"], batch["targets"].to(device), cfg.train.target_weights, cfg.train.loss, cfg.train.huber_delta)
    for name, weight_field in AUX_WEIGHT_FIELDS.items():
        weight = getattr(cfg.train, weight_field)
        if weight > 0 and name in out:
            aux_mix = None if mix is None else (mix[0], mix[1].to(device))
            loss = loss + weight * aux_loss(out[name], batch[name].to(device), aux_mix)
    return loss


def train_one_epoch(model, loader, optimizer, scheduler, cfg: Config, device, cached: bool, dist_info: DistInfo, epoch: int) -> dict:
    """One pass over the loader with mixup, accumulation, clipping and non-finite-loss skipping."""
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
        preds.append(log1p_to_grams(out["targets"].float()).cpu().numpy())
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
            model.unfreeze_backbone()
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
            self.train_set = ViewPairDataset(train_frame, view_size, transform, tc.stereo_swap_prob, cfg.data.jpeg_reduce)
            if val_frame is not None:
                self.val_set = ViewPairDataset(val_frame, view_size, build_transform(view_size, train=False), 0.0, cfg.data.jpeg_reduce)
        if val_frame is None:
            self.val_set = None
        self.model = model
        if dist_info.enabled:
            # re-wrapped per stage: DDP registers the parameters that require grad at construction
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        groups = model.param_groups(tc.lr, tc.backbone_lr, tc.weight_decay, include_backbone=not frozen)
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
        if workers == 0 and hasattr(self.train_set, "transform"):
            self.train_set.transform.set_random_seed(tc.seed * 1000 + epoch + info.rank)
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
    dist_info: DistInfo = DistInfo(),
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
    seed_everything(tc.seed)
    stats = target_stats(train_frame)
    if model is None:
        model = build_model(cfg.model)
        model.init_target_bias(stats["mean_log1p"])
    model.to(device)
    state = FitState()
    last_path = run_dir / "last.pt" if run_dir is not None else None
    saved = None
    if resume and last_path is not None and last_path.is_file():
        saved = load_checkpoint(last_path)
        if saved.get("config", {}).get("model") != cfg.to_dict()["model"]:
            raise BiomassError(
                f"{last_path}: was trained with another model config (backbone/grid/tile); resume with the same "
                "flags or pass --overwrite to start again"
            )
        model.load_state_dict(saved["model"])
        state = FitState(**saved["state"])
        if dist_info.is_main:
            print(f"resuming from {last_path} after epoch {state.epoch}")
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
        row.update(train_one_epoch(stage.model, stage.train_loader(epoch), stage.optimizer, stage.scheduler, cfg, device, stage.cached, dist_info, epoch))
        lrs = {g["name"]: g["lr"] for g in stage.optimizer.param_groups}
        row["lr_head"] = lrs.get("head", float("nan"))
        row["lr_backbone"] = lrs.get("backbone", 0.0)
        improved = False
        if stage.val_set is not None:
            idx, preds = predict_grams(model, stage.val_loader(), device, tc.amp, stage.cached, dist_info)
            truth = val_frame[list(TARGETS)].to_numpy(dtype=np.float64)[idx]
            scores = score(truth, preds)
            row.update(scores)
            improved = scores["weighted_r2"] > state.best_metric
            if improved:
                state.best_metric, state.best_epoch, state.bad_epochs = scores["weighted_r2"], epoch, 0
                oof = _oof_frame(val_frame.iloc[idx], preds, fold)
            elif number == 2:
                state.bad_epochs += 1
        row["seconds"] = round(time.time() - start, 2)
        state.epoch = epoch
        state.history.append(row)
        if dist_info.is_main:
            _log_epoch(row)
            if run_dir is not None:
                if improved or stage.val_set is None:
                    save_best(run_dir / "best.pt", model, cfg, stats, epoch, row.get("weighted_r2"), fold)
                    if oof is not None:
                        write_csv_atomic(oof, run_dir / "oof.csv")
                write_csv_atomic(pd.DataFrame(state.history), run_dir / "metrics.csv")
                torch_save_atomic(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "model": model.state_dict(),
                        "stage": number,
                        "optimizer": stage.optimizer.state_dict(),
                        "scheduler": stage.scheduler.state_dict(),
                        "state": state.__dict__,
                        "config": cfg.to_dict(),
                    },
                    last_path,
                )
        barrier(dist_info)
        if number == 2 and tc.patience > 0 and state.bad_epochs >= tc.patience:
            if dist_info.is_main:
                print(f"early stop after epoch {epoch}: no improvement for {tc.patience} epochs")
            break
    return FitResult(state.best_metric, state.best_epoch, state.history, oof, run_dir)


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
def save_best(path: Path, model: BiomassModel, cfg: Config, stats: dict, epoch: int, metric, fold) -> Path:
    """best.pt describes itself: weights + resolved config + target statistics, plain types only."""
    return torch_save_atomic(
        {
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
    except Exception as err:  # truncated zip, pickled objects, foreign formats: all mean "not ours"
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise BiomassError(f"{path}: not a loadable checkpoint ({reason}); re-train or re-download it") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise BiomassError(f"{path}: not an image2biomass checkpoint (format {CHECKPOINT_FORMAT}); re-train it")
    return ckpt


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
    run_dir.mkdir(parents=True, exist_ok=True)


def train_fold(cfg: Config, fold: int, resume: bool = False, overwrite: bool = False, command: str = "") -> FitResult:
    """Train one fold end to end: validate inputs, train, write the fold directory."""
    dist_info, device = init_distributed(cfg.train.device)
    wide = load_train(cfg.data.data_dir, check_images=True)
    folds = load_folds(cfg.data.folds, wide)
    check_fold_index(folds, fold, cfg.data.folds)
    wide = wide.merge(folds, on="image_id")
    train_frame = wide[wide["fold"] != fold].reset_index(drop=True)
    val_frame = wide[wide["fold"] == fold].reset_index(drop=True)
    run_dir = run_dir_for(cfg, fold)
    if dist_info.is_main:
        prepare_run_dir(run_dir, resume, overwrite)
        save_config(cfg, run_dir / "config.yaml")
        write_text_atomic(run_dir / "git.txt", _git_description())
        if command:
            write_text_atomic(run_dir / "command.txt", command + "\n")
        print(f"fold {fold}: {len(train_frame)} train / {len(val_frame)} val images -> {run_dir}", flush=True)
    barrier(dist_info)
    result = fit(cfg, train_frame, val_frame, run_dir, device, dist_info, resume=resume, fold=fold)
    if dist_info.is_main:
        print(f"fold {fold}: best val weighted R2 {result.best_metric:.4f} at epoch {result.best_epoch}", flush=True)
    return result
