"""The fold loop: a frozen stage and a finetune stage, mixup, stereo swap, validation, checkpoints, resume, DDP.

`fit()` is the one training loop: train.py, sweeps and test-time fine-tuning all call it. What it minimises
lives in `losses.py`, the files it writes in `checkpoint.py`, the weight averages in `averaging.py`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from src.averaging import average_state_dicts, ema_advice, ema_decay_for, keep_top_k, make_ema
from src.checkpoint import (
    check_resume,
    finish_last,
    prepare_run_dir,
    run_dir_for,
    save_best,
    save_resume_state,
    split_record,
    stage_of,
    target_stats,
    write_run_files,
)
from src.config import Config
from src.dataset import FeatureCacheDataset, image_dataset
from src.errors import BiomassError
from src.feature_cache import feature_cache
from src.folds import load_fold_table, split_fold
from src.io_utils import write_csv_atomic
from src.logs import get_logger, log_file, progress
from src.losses import AUX_WEIGHT_FIELDS, aux_bin_labels, aux_regression_labels, mixup, total_loss
from src.memory import apply_fit_memory
from src.metric import score
from src.model import BiomassModel, build_model
from src.runtime import (
    DistInfo,
    all_gather_objects,
    all_ranks_true,
    amp_dtype,
    autocast,
    barrier,
    enable_tf32,
    init_distributed,
    make_scaler,
    rank_seed,
    resolve_amp,
    seed_everything,
    worker_init,
)
from src.schema import SHORT_NAMES, TARGETS
from src.transforms import build_transform

log = get_logger(__name__)
FROZEN, FINETUNE = "frozen", "finetune"
STAGE_SEED = {FROZEN: 100, FINETUNE: 200}  # each stage's set-up is seeded apart (seed + offset)
# Called as observe(batch, mixed, mix, cached) for every training batch (`mixed` is what the model sees, `mix`
# = (lambda, permutation) or None): tests count mixup and stereo swaps in the real loop through it.
BATCH_OBSERVERS: list = []


@dataclass
class FitState:
    """What `last.pt` carries besides weights: enough to resume at the next epoch."""

    epoch: int = -1  # last completed epoch
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    stopped_epoch: int = -1  # the epoch patience ran out: best.pt is kept from then on, training goes on (why: fit)


@dataclass
class FitResult:
    best_metric: float
    best_epoch: int
    history: list[dict]
    oof: pd.DataFrame | None
    run_dir: Path | None
    swa_metric: float | None = None  # val score of the --swa-top-k average (None when off)
    model: BiomassModel | None = None  # the weights validated and saved (the EMA copy under --ema-decay)


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


def accum_steps(tc, world: int) -> int:
    """Batches per optimizer step: --accum, or what --global-batch needs at this many processes (same schedule)."""
    if tc.global_batch <= 0:
        return max(1, tc.accum)
    per_step = tc.batch_size * world
    if tc.global_batch % per_step:
        fit_to = max(1, round(tc.global_batch / per_step)) * per_step
        raise BiomassError(
            f"--global-batch {tc.global_batch}: not a multiple of --batch-size {tc.batch_size} x {world} process(es) "
            f"= {per_step}; use e.g. --global-batch {fit_to}"
        )
    return tc.global_batch // per_step


def steps_per_epoch(n_train: int, tc, world: int) -> int:
    """Optimizer steps of one epoch (DistributedSampler pads each rank to ceil(n / world) items)."""
    return math.ceil(math.ceil(math.ceil(n_train / world) / tc.batch_size) / accum_steps(tc, world))


def freeze_unused_heads(model: BiomassModel, cfg: Config) -> list[str]:
    """Aux heads whose loss weight is 0 take no gradient: DDP would refuse their unused parameters.

    The heads stay in the state_dict (checkpoints keep one layout per model config); they only leave training.
    """
    frozen = []
    for name, head in model.aux_heads.items():
        if getattr(cfg.train, AUX_WEIGHT_FIELDS[name]) <= 0:
            head.requires_grad_(False)
            frozen.append(name)
    if model.aux_bin_head is not None and cfg.train.aux_bins_weight <= 0:
        model.aux_bin_head.requires_grad_(False)
        frozen.append("bins")
    return frozen


def precision_note(device: torch.device, amp: bool) -> str:
    """What --amp means on this device, for the log and the run's config."""
    if not amp:
        return "fp32" + (" (TF32 matmuls)" if device.type == "cuda" else "")
    dtype = amp_dtype(device)
    return "bf16 autocast" if dtype == torch.bfloat16 else "fp16 autocast + GradScaler (no native bf16 here)"


def _to_device(batch: dict, device) -> dict:
    """The batch's tensors on the device (mixup then runs there, not on the CPU before the copy)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def stage_for_epoch(epoch: int, cfg: Config) -> str:
    """The frozen stage takes the first `freeze_epochs` epochs, the finetune stage the rest."""
    return FROZEN if epoch < cfg.train.freeze_epochs else FINETUNE


# ---- one epoch -----------------------------------------------------------------------------------------------
def batch_loss(model, batch, cfg: Config, device, cached: bool, mix) -> torch.Tensor:
    """Forward one (possibly mixed) batch and return its total loss (`cached`: the views are tile features)."""
    with autocast(device, cfg.train.amp, training=True):
        out = model(batch["left"].to(device), batch["right"].to(device), features=cached)
    return total_loss(out, batch, cfg, _unwrap(model), device, mix)


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    cfg: Config,
    device,
    cached: bool,
    dist_info: DistInfo,
    epoch: int,
    ema=None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """One pass over the loader: mixup, accumulation, clipping, non-finite-loss skipping, EMA update per step.

    A non-finite loss on any rank drops that micro-batch on every rank (one all-reduce), so no rank waits alone
    in DDP's gradient all-reduce; the gradient its accumulation partners left stays, and each optimizer step
    divides the summed gradient by the group's real count of finite micro-batches (an odd last group: by 1).
    Under DDP only the micro-batch that ends a group all-reduces (`no_sync()` on the others).
    Under fp16 the `scaler` skips an overflowing step and lowers its scale: that is
    counted as `overflow_steps`, not as a bad step.
    """
    model.train()
    rng = np.random.default_rng((cfg.train.seed, epoch, dist_info.rank, 7))
    total, count, bad_in_row, bad_total, overflow = 0.0, 0, 0, 0, 0
    scaling = scaler is not None and scaler.is_enabled()
    optimizer.zero_grad(set_to_none=True)
    accum = accum_steps(cfg.train, dist_info.world)
    good = 0  # finite micro-batches whose gradient is accumulated since the last optimizer step
    bar = progress(loader, desc=f"epoch {epoch}", leave=False, disable=not dist_info.is_main)
    for step, batch in enumerate(bar):
        boundary = (step + 1) % accum == 0 or step + 1 == len(loader)
        batch = _to_device(batch, device)
        mix, raw = None, batch
        if cfg.train.mixup_prob > 0 and rng.random() < cfg.train.mixup_prob and len(batch["targets"]) > 1:
            lam = float(rng.beta(cfg.train.mixup_alpha, cfg.train.mixup_alpha))
            perm = torch.from_numpy(rng.permutation(len(batch["targets"]))).to(device)
            batch, mix = mixup(batch, lam, perm), (lam, perm)
        for observe in BATCH_OBSERVERS:
            observe(raw, batch, mix, cached)
        # DDP all-reduces in backward: only the micro-batch that ends an accumulation group syncs (no_sync otherwise)
        with _sync_context(model, boundary):
            loss = batch_loss(model, batch, cfg, device, cached, mix)
            finite = all_ranks_true(bool(torch.isfinite(loss)), dist_info, device)
            if finite:
                # summed here, divided by the group's real count of finite micro-batches before the step
                (scaler.scale(loss) if scaling else loss).backward()
        if finite:
            good += 1
            bad_in_row = 0
            total += float(loss.detach()) * len(batch["targets"])
            count += len(batch["targets"])
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        else:  # only this micro-batch is dropped: its partners' accumulated gradient stays
            bad_in_row += 1
            bad_total += 1
            if bad_in_row >= cfg.train.max_bad_steps:
                raise BiomassError(
                    f"{bad_in_row} non-finite losses in a row (epoch {epoch}, step {step}); the last good checkpoint "
                    "is kept; lower --lr, check the input images, or try --no-amp"
                )
        if not boundary or good == 0:
            continue  # a group with no finite micro-batch takes no step (nor a scheduler step), as before
        if not finite and isinstance(model, DistributedDataParallel):
            _all_reduce_grads(model, dist_info.world)  # the syncing backward was the dropped one: average by hand
        if scaling:
            scaler.unscale_(optimizer)  # clip the true gradients
        _scale_grads(model, 1.0 / good)
        good = 0
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip)
        stepped = True
        if scaling:
            before = scaler.get_scale()
            scaler.step(optimizer)  # skipped when the gradients overflowed
            scaler.update()
            stepped = scaler.get_scale() >= before
            overflow += not stepped
        else:
            optimizer.step()
        scheduler.step()  # the schedule follows the step count either way (resumes stay exact)
        optimizer.zero_grad(set_to_none=True)
        if ema is not None and stepped:
            ema.update(_unwrap(model))
    return {"train_loss": total / max(count, 1), "bad_steps": bad_total, "overflow_steps": overflow}


def _sync_context(model, boundary: bool):
    """DDP's `no_sync()` on a micro-batch that does not end its accumulation group; a plain no-op otherwise."""
    if isinstance(model, DistributedDataParallel) and not boundary:
        return model.no_sync()
    return contextlib.nullcontext()


def _scale_grads(model, factor: float) -> None:
    """Multiply every accumulated gradient by factor (1 / the group's finite micro-batches)."""
    if factor == 1.0:
        return
    for param in model.parameters():
        if param.grad is not None:
            param.grad.mul_(factor)


def _all_reduce_grads(model, world: int) -> None:
    """Average the gradients over the ranks by hand (what DDP's syncing backward would have done)."""
    for param in model.parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(world)


@torch.no_grad()
def predict_grams(
    model: BiomassModel, loader, device, amp: bool, cached: bool, dist_info: DistInfo
) -> tuple[np.ndarray, np.ndarray]:
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


# ---- the stages ------------------------------------------------------------------------------------------------
class Stage:
    """Optimizer, scheduler and loaders of one stage (frozen: cached features; finetune: images)."""

    def __init__(
        self,
        name: str,
        model: BiomassModel,
        train_frame,
        val_frame,
        cfg: Config,
        device,
        dist_info: DistInfo,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.dist_info = dist_info
        tc = cfg.train
        frozen = name == FROZEN
        if frozen:
            model.freeze_backbone()
        else:
            model.unfreeze_backbone(tc.freeze_blocks)
        self.cached = frozen and tc.cache_features
        self.val_set = None
        if self.cached:
            cache = (
                cache
                if cache is not None
                else feature_cache(model, train_frame, val_frame, cfg, device, dist_info.is_main, dist_info)
            )
            self.train_set = FeatureCacheDataset(cache["train"], train_frame, tc.stereo_swap_prob, tc.seed)
            if val_frame is not None:
                self.val_set = FeatureCacheDataset(cache["val"], val_frame, 0.0, tc.seed)
        else:
            # photometric augmentation only when the backbone sees the pixels (or the cache is off)
            transform = build_transform(model.view_size, train=True, strength=tc.augment)
            self.train_set = image_dataset(
                train_frame, model.view_size, cfg.data, transform, tc.stereo_swap_prob, train=True
            )
            if val_frame is not None:
                self.val_set = image_dataset(val_frame, model.view_size, cfg.data)
        self.model = model
        if dist_info.enabled:
            # re-wrapped per stage: DDP registers the parameters that require grad at construction
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        head_lr = tc.lr if frozen else tc.finetune_head_lr
        groups = model.param_groups(
            head_lr, tc.backbone_lr, tc.weight_decay, include_backbone=not frozen, layer_decay=tc.layer_decay
        )
        self.optimizer = torch.optim.AdamW(groups)
        self._loader: DataLoader | None = None
        steps = steps_per_epoch(len(self.train_set), tc, dist_info.world) * self.epochs
        # heads that come out of a frozen stage (with their Adam state) skip a second warm-up; the backbone warms up
        carried = not frozen and tc.freeze_epochs > 0
        lambdas = [
            _warmup_cosine(steps, 0.0 if carried and g["name"].startswith("head") else tc.warmup_frac)
            for g in self.optimizer.param_groups
        ]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)

    @property
    def epochs(self) -> int:
        tc = self.cfg.train
        frozen = min(tc.freeze_epochs, tc.epochs)
        return frozen if self.name == FROZEN else tc.epochs - frozen

    def train_loader(self, epoch: int) -> DataLoader:
        """A loader whose order and augmentation depend only on (seed, epoch, rank): resumes repeat epochs exactly.

        With workers the loader is built once per stage (`persistent_workers`: `--cache-images` survives the
        epochs); its workers were seeded at the stage's first epoch, so a resume is exact with 0 workers only.
        """
        tc, info = self.cfg.train, self.dist_info
        workers = 0 if self.cached else self.cfg.data.num_workers
        if isinstance(self.train_set, FeatureCacheDataset):
            self.train_set.set_epoch(epoch)
        if workers == 0 and hasattr(self.train_set, "set_random_seed"):
            self.train_set.set_random_seed(rank_seed(tc.seed, epoch, info.rank))
        if self._loader is not None:
            self._loader.sampler.set_epoch(epoch)
            return self._loader
        sampler = DistributedSampler(
            self.train_set, num_replicas=info.world, rank=info.rank, shuffle=True, seed=tc.seed
        )
        sampler.set_epoch(epoch)
        # the generator seeds the workers: distinct per rank, or every rank's augmentation stream would repeat
        generator = torch.Generator().manual_seed(rank_seed(tc.seed, epoch, info.rank))
        loader = DataLoader(
            self.train_set, batch_size=tc.batch_size, sampler=sampler, num_workers=workers, worker_init_fn=worker_init,
            generator=generator, pin_memory=torch.cuda.is_available(), drop_last=False,
            persistent_workers=workers > 0,
        )  # fmt: skip
        if workers > 0:
            self._loader = loader
        return loader

    def val_loader(self) -> DataLoader:
        """Each rank takes a strided shard of the validation set; predictions are gathered."""
        info = self.dist_info
        subset = torch.utils.data.Subset(self.val_set, list(range(info.rank, len(self.val_set), info.world)))
        workers = 0 if self.cached else self.cfg.data.num_workers
        return DataLoader(subset, batch_size=self.cfg.train.batch_size, num_workers=workers, worker_init_fn=worker_init)

    def lrs(self) -> dict[str, float]:
        """The head and (largest) backbone learning rate now, for metrics.csv."""
        groups = self.optimizer.param_groups
        return {
            "lr_head": next((g["lr"] for g in groups if g["name"] == "head"), float("nan")),
            "lr_backbone": max((g["lr"] for g in groups if g["name"].startswith("backbone")), default=0.0),
        }


# ---- the loop ----------------------------------------------------------------------------------------------------
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
    dist_info = dist_info or DistInfo()
    if cfg.train.amp is None:  # --amp unset: on for CUDA; the resolved choice is what the run records
        cfg = copy.deepcopy(cfg)
        cfg.train.amp = resolve_amp(None, device)
    tc = cfg.train
    enable_tf32(device)
    seed_everything(tc.seed)
    stats = target_stats(train_frame)
    split = split_record(train_frame, val_frame)  # kept in best.pt: infer.py --oof checks its folds file against it
    if model is None:
        model = build_model(cfg.model)
        model.init_from_stats(stats)
    check_options(cfg, model)
    unused = freeze_unused_heads(model, cfg)
    train_frame, val_frame = aux_regression_labels(train_frame, val_frame, model.cfg)
    if model.cfg.aux_bins > 0:  # edges of the training fold, kept in the checkpoint for the record
        train_frame, val_frame, edges = aux_bin_labels(train_frame, val_frame, model.cfg.aux_bins)
        stats["bin_edges"] = edges.tolist()
    model.to(device)
    last_path = run_dir / "last.pt" if run_dir is not None else None
    saved = check_resume(last_path, cfg) if resume and last_path is not None else None
    state = FitState()
    if saved is not None:
        model.load_state_dict(saved["model"])
        state = FitState(**saved["state"])
        if dist_info.is_main:
            log.info(f"resuming from {last_path} after epoch {state.epoch}")
    if model.cfg.target_space == "raw":  # the checkpoint records the scale the model actually divides by
        stats["scale"] = model.target_scale.tolist()
    per_epoch = steps_per_epoch(len(train_frame), tc, dist_info.world)
    # --ema-decay / --ema-half-life: a shadow copy of the weights is what gets validated, selected and saved
    decay = ema_decay_for(tc, per_epoch)
    ema = make_ema(model, decay, saved, last_path, tc.ema_warmup)
    scaler = make_scaler(device, tc.amp)
    if saved is not None and "scaler" in saved and scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])
    if dist_info.is_main and (decay > 0 or unused or scaler.is_enabled()):
        log.info(
            f"precision {precision_note(device, tc.amp)}; {per_epoch} optimizer steps an epoch"
            + (f"; EMA decay {decay:.5f}{' with warm-up' if tc.ema_warmup else ''}" if decay > 0 else "")
            + (f"; aux heads without loss weight left out of training: {', '.join(unused)}" if unused else "")
        )
        advice = ema_advice(decay, tc.ema_warmup, per_epoch * tc.epochs, per_epoch) if decay > 0 else None
        if advice:
            log.warning(advice)
    evaluated = ema.module if ema is not None else model
    top_k: list[dict] = list(saved.get("swa_top", [])) if saved is not None else []
    oof = _read_oof(run_dir) if saved is not None else None
    # every validated epoch's held-out predictions: a fold can then be scored at an epoch chosen without its labels
    epoch_oof = _read_epoch_oof(run_dir, state.epoch) if saved is not None else []
    stage: Stage | None = None
    for epoch in range(state.epoch + 1, tc.epochs):
        name = stage_for_epoch(epoch, cfg)
        if stage is None or stage.name != name:
            previous = stage.optimizer if stage is not None else None
            stage = _start_stage(
                name, model, train_frame, val_frame, cfg, device, dist_info, cache, saved, state, previous
            )
            saved = None
        seed_everything(rank_seed(tc.seed, epoch, dist_info.rank))
        start = time.time()
        row = {"epoch": epoch, "stage": name, "after_stop": state.stopped_epoch >= 0}  # after_stop: not selectable
        args = (stage.optimizer, stage.scheduler, cfg, device, stage.cached, dist_info, epoch)
        row.update(train_one_epoch(stage.model, stage.train_loader(epoch), *args, ema=ema, scaler=scaler))
        row.update(stage.lrs())
        improved = False
        if stage.val_set is not None:
            idx, preds = predict_grams(evaluated, stage.val_loader(), device, tc.amp, stage.cached, dist_info)
            scores = score(val_frame[list(TARGETS)].to_numpy(dtype=np.float64)[idx], preds)
            row.update(scores)
            selecting = state.stopped_epoch < 0  # past an early stop nothing is selected any more
            improved = selecting and scores["weighted_r2"] > state.best_metric
            epoch_oof.append(_oof_frame(val_frame.iloc[idx], preds, fold).assign(epoch=epoch))
            if improved:
                state.best_metric, state.best_epoch, state.bad_epochs = scores["weighted_r2"], epoch, 0
                oof = _oof_frame(val_frame.iloc[idx], preds, fold)
            elif name == FINETUNE and selecting:
                state.bad_epochs += 1
            if tc.swa_top_k > 0 and selecting:
                keep_top_k(top_k, scores["weighted_r2"], epoch, evaluated, tc.swa_top_k)
        row["seconds"] = round(time.time() - start, 2)
        state.epoch = epoch
        state.history.append(row)
        if dist_info.is_main:
            _log_epoch(row)
            if run_dir is not None:
                if improved or stage.val_set is None:
                    metric = row.get("weighted_r2")
                    save_best(run_dir / "best.pt", evaluated, cfg, stats, epoch, metric, fold, split=split)
                    if oof is not None:
                        write_csv_atomic(oof, run_dir / "oof.csv")
                if epoch_oof:
                    write_csv_atomic(pd.concat(epoch_oof, ignore_index=True), run_dir / "oof_epochs.csv")
                write_csv_atomic(pd.DataFrame(state.history), run_dir / "metrics.csv")
                swa_top = top_k if tc.swa_top_k > 0 else None
                extra = {"scaler": scaler.state_dict()} if scaler.is_enabled() else None
                save_resume_state(
                    last_path, model, cfg, name, stage.optimizer, stage.scheduler, state.__dict__, ema, swa_top, extra
                )
        barrier(dist_info)
        if name == FINETUNE and tc.patience > 0 and state.bad_epochs >= tc.patience and state.stopped_epoch < 0:
            # An early stop keeps best.pt (and oof.csv, the SWA pool) as they are but trains on to the last epoch:
            # the fixed-schedule OOF scores this fold at the other folds' median best epoch, which may lie past
            # this stop; cutting the run short would let the fold's own labels choose the epoch it is scored at.
            state.stopped_epoch = epoch
            if dist_info.is_main and epoch < tc.epochs - 1:
                log.info(
                    f"early stop after epoch {epoch}: no improvement for {tc.patience} epochs; best.pt kept from "
                    f"epoch {state.best_epoch}, training on to epoch {tc.epochs - 1} for the fixed-schedule OOF"
                )
    swa_metric = None
    if tc.swa_top_k > 0 and val_frame is not None and len(top_k) >= 2:
        swa_metric, swa_oof = _finish_swa(
            top_k, evaluated, val_frame, cfg, stats, state, run_dir, device, dist_info, fold, split
        )
        if swa_oof is not None:
            oof = swa_oof
    if dist_info.is_main and last_path is not None:  # the fold is done: its optimizer state is dead weight on disk
        freed = finish_last(last_path, tc.keep_last)
        if freed:
            log.info(f"last.pt {'removed' if tc.keep_last == 'none' else 'slimmed'}: {freed / 1e6:.0f} MB freed")
    return FitResult(state.best_metric, state.best_epoch, state.history, oof, run_dir, swa_metric, evaluated)


def _start_stage(
    name: str, model, train_frame, val_frame, cfg: Config, device, dist_info, cache, saved, state: FitState, previous
) -> Stage:
    """Build a stage; a resumed run in the same stage gets its optimizer and scheduler back.

    Entering the finetune stage, the heads keep the frozen stage's Adam moments (`previous`, or the frozen
    optimizer of a `last.pt` saved at the boundary), so they do not restart cold as the backbone starts moving.
    """
    seed_everything(cfg.train.seed + STAGE_SEED[name])
    stage = Stage(name, model, train_frame, val_frame, cfg, device, dist_info, cache if name == FROZEN else None)
    if saved is not None and stage_of(saved) == name and "optimizer" in saved:  # a slim last.pt has none
        stage.optimizer.load_state_dict(saved["optimizer"])
        stage.scheduler.load_state_dict(saved["scheduler"])
        return stage
    if name == FINETUNE:
        state.bad_epochs = 0  # patience counts within the finetune stage
        if saved is not None and stage_of(saved) == FROZEN and "optimizer" in saved:
            previous = torch.optim.AdamW(
                model.param_groups(cfg.train.lr, cfg.train.backbone_lr, cfg.train.weight_decay, include_backbone=False)
            )
            previous.load_state_dict(saved["optimizer"])
        if previous is not None:
            carry_head_state(previous, stage.optimizer)
    return stage


def carry_head_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Copy the per-parameter state (Adam moments, step) of the head groups from `old` to `new`; returns the count."""
    carried = 0
    for group in new.param_groups:
        if not group["name"].startswith("head"):
            continue
        for param in group["params"]:
            if param in old.state and old.state[param]:
                new.state[param] = {k: v.clone() if torch.is_tensor(v) else v for k, v in old.state[param].items()}
                carried += 1
    return carried


def check_options(cfg: Config, model: BiomassModel) -> None:
    """What the config alone cannot check: option values that depend on the model (before any work)."""
    depth = len(getattr(model.backbone, "blocks", ()))
    if cfg.train.freeze_blocks > depth:
        raise BiomassError(
            f"--freeze-blocks {cfg.train.freeze_blocks}: {model.cfg.backbone} has {depth} blocks; use 0 to {depth}"
        )


# ---- SWA of the K best epochs ---------------------------------------------------------------------------------
def _image_val_loader(model: BiomassModel, val_frame: pd.DataFrame, cfg: Config, dist_info: DistInfo) -> DataLoader:
    """Validation images (no cache: any backbone weights), a strided shard per rank."""
    dataset = image_dataset(val_frame, model.view_size, cfg.data)
    subset = torch.utils.data.Subset(dataset, list(range(dist_info.rank, len(dataset), dist_info.world)))
    return DataLoader(
        subset, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, worker_init_fn=worker_init
    )


def _finish_swa(
    top_k, evaluated, val_frame, cfg: Config, stats, state: FitState, run_dir, device, dist_info, fold, split=None
):
    """Average the K best epochs' weights and validate them; swa.pt is always written, and the average
    replaces best.pt (and oof.csv) when it scores at least as well as the best single epoch.

    Returns (its val weighted R2, its OOF frame if it replaced the best, else None).
    """
    swa = copy.deepcopy(evaluated)
    swa.load_state_dict(average_state_dicts([item["model"] for item in top_k]))
    swa.to(device)
    loader = _image_val_loader(swa, val_frame, cfg, dist_info)
    idx, preds = predict_grams(swa, loader, device, cfg.train.amp, False, dist_info)
    metric = score(val_frame[list(TARGETS)].to_numpy(dtype=np.float64)[idx], preds)["weighted_r2"]
    epochs = sorted(item["epoch"] for item in top_k)
    wins = metric >= state.best_metric
    oof = _oof_frame(val_frame.iloc[idx], preds, fold) if wins else None
    if dist_info.is_main:
        verdict = "replaces best.pt" if wins else "best.pt kept"
        log.info(
            f"swa of epochs {epochs}: val weighted R2 {metric:.4f} vs best epoch {state.best_metric:.4f}: {verdict}"
        )
        if run_dir is not None:
            args = (cfg, stats, state.best_epoch, metric, fold)
            save_best(run_dir / "swa.pt", swa, *args, swa_epochs=epochs, split=split)
            if wins:
                save_best(run_dir / "best.pt", swa, *args, swa_epochs=epochs, split=split)
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


def _read_epoch_oof(run_dir: Path | None, last_epoch: int) -> list[pd.DataFrame]:
    """oof_epochs.csv of a resumed run, up to its last completed epoch (later rows belong to a lost epoch)."""
    path = run_dir / "oof_epochs.csv" if run_dir is not None else None
    if path is None or not path.is_file():
        return []
    frame = pd.read_csv(path, dtype={"image_id": str})
    return [frame[frame["epoch"] <= last_epoch]]


def _log_epoch(row: dict) -> None:
    names = zip(SHORT_NAMES, TARGETS)
    per = " ".join(f"{short}={row[f'r2_{name}']:.3f}" for short, name in names if f"r2_{name}" in row)
    val = f"val_wR2={row['weighted_r2']:.4f} " if "weighted_r2" in row else ""
    log.info(
        f"epoch {row['epoch']:3d} {row['stage']:8s} loss={row['train_loss']:.4f} {val}{per} "
        f"lr={row['lr_head']:.2e}/{row['lr_backbone']:.2e} bad={row['bad_steps']} {row['seconds']:.1f}s"
    )


# ---- a fold from the command line -------------------------------------------------------------------------------
def train_fold(
    cfg: Config, fold: int, resume: bool = False, overwrite: bool = False, command: str = "", seed_dir: bool = False
) -> FitResult:
    """Train one fold end to end: validate inputs, train, write the fold directory (with its train.log).

    `seed_dir` writes into fold<K>/seed<S>/ (seeds as an axis of the experiment) instead of fold<K>/.
    """
    dist_info, device = init_distributed(cfg.train.device)
    if cfg.train.amp is None:  # resolved before config.yaml is written: the run records what it trained in
        cfg = copy.deepcopy(cfg)
        cfg.train.amp = resolve_amp(None, device)
    cfg, fitted = apply_fit_memory(cfg, dist_info.world, device)  # before config.yaml: the run records the fit
    split = split_fold(load_fold_table(cfg.data), fold, cfg.data)
    run_dir = run_dir_for(cfg, fold, seed_dir)
    # Build the model (loading --backbone-weights) and check --resume before the run directory is touched:
    # a bad weights file or a mismatched last.pt leaves nothing behind. Same seed as fit's own build.
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    model.init_from_stats(target_stats(split.train))
    check_options(cfg, model)
    if resume:
        check_resume(run_dir / "last.pt", cfg)
    if dist_info.is_main:
        prepare_run_dir(run_dir, resume, overwrite)
        write_run_files(run_dir, cfg, command)
    barrier(dist_info)
    with log_file(run_dir / "train.log", enabled=dist_info.is_main):
        if dist_info.is_main:
            log.info(
                f"fold {fold}: {len(split.train)} train / {len(split.val)} val images -> {run_dir} "
                f"(--amp {cfg.train.amp}: {precision_note(device, cfg.train.amp)})"
            )
            if split.note:
                log.info(split.note)
            if fitted:
                log.info(fitted)
        result = fit(cfg, split.train, split.val, run_dir, device, dist_info, resume=resume, model=model, fold=fold)
        if dist_info.is_main:
            log.info(f"fold {fold}: best val weighted R2 {result.best_metric:.4f} at epoch {result.best_epoch}")
    return result
