"""Test-time adaptation: pseudo-label fine-tuning inside `infer.py` (and so inside the offline kernel).

    python infer.py ... --pseudo-label-epochs N [--pseudo-label-weight W] [--pseudo-label-blend B]
                        [--pseudo-label-fold best|K] [--time-budget MIN]

After the ensemble has predicted the test images, one checkpoint per grid (the fold with the best
validation score, or fold K) is fine-tuned for N epochs on the training images plus the test images
labelled with the ensemble's post-processed predictions (each weighing W in the loss), by the same
`training.fit` that train.py runs; it then predicts the test images again, and the submission is
B * adapted + (1 - B) * ensemble (8th place used B = 0.8). The fine-tuned weights stay in memory: nothing
is written next to the checkpoints or into the data directory (Kaggle's /kaggle/input is read-only).

The fine-tune is skipped, with a warning, when its estimated time exceeds `--time-budget` minutes: the
plain ensemble is then submitted. The estimate comes from the ensemble pass just measured (seconds per
image per model forward) times the fine-tune's image passes (forward + backward counted as 3 forwards).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from src.config import InferConfig
from src.data import load_id_list, load_train, long_to_wide, read_csv_checked, validate_train
from src.dataset import AUX_COLUMNS
from src.errors import BiomassError
from src.inference import TTA_MODES, Predictor, predict_ensemble, upper_bounds
from src.logs import get_logger
from src.metric import score
from src.postprocess import apply_physics
from src.schema import TARGETS, TRAIN_COLUMNS
from src.training import fit

log = get_logger(__name__)

AUX_INDEX_COLUMNS = tuple(AUX_COLUMNS.values())  # state, month and species labels: unknown (-1) for test images
BACKWARD_FACTOR = 3.0  # a training step costs about a forward and two for the backward pass


class FineTuneStopped(Exception):
    """Raised inside the fine-tune's forward when `should_stop()` (the deadline) says so: the plain ensemble stays."""


def stop_hook(should_stop: Callable[[], bool]) -> Callable:
    """A forward pre-hook that checks the clock at every step (training and re-prediction alike)."""

    def hook(module, args):
        if should_stop():
            raise FineTuneStopped("the deadline came")

    return hook


def pick_predictors(predictors: list[Predictor], fold: str = "best") -> list[Predictor]:
    """One predictor per grid: the fold with the best recorded validation score, or the given fold."""
    by_grid: dict[tuple[int, int], list] = {}
    for p in predictors:
        by_grid.setdefault(p.grid, []).append(p)
    chosen = []
    for grid, members in sorted(by_grid.items()):
        if fold == "best":
            chosen.append(max(members, key=lambda p: -np.inf if p.val_metric is None else float(p.val_metric)))
            continue
        hits = [p for p in members if p.fold is not None and int(p.fold) == int(fold)]
        if not hits:
            have = sorted(int(p.fold) for p in members if p.fold is not None)
            raise BiomassError(
                f"--pseudo-label-fold {fold}: grid {grid[0]}x{grid[1]} has no checkpoint of that fold (folds {have})"
            )
        chosen.append(hits[0])
    return chosen


def estimate_seconds(
    ensemble_seconds: float, n_models: int, n_flips: int, n_test: int, n_train: int, epochs: int, n_chosen: int
) -> float:
    """Fine-tune + re-predict time, from the measured ensemble pass (seconds per image per model per flip view)."""
    per_forward = ensemble_seconds / max(1, n_test * n_models * n_flips)
    train = epochs * (n_train + n_test) * BACKWARD_FACTOR * per_forward
    predict = n_test * n_flips * per_forward
    return n_chosen * (train + predict)


def pseudo_label_frame(test_images: pd.DataFrame, values: np.ndarray, ok: np.ndarray, weight: float) -> pd.DataFrame:
    """Readable test images with the ensemble's predictions as targets, weight W, and unknown aux labels (-1)."""
    frame = test_images.loc[ok, ["image_id", "path"]].reset_index(drop=True)
    for j, name in enumerate(TARGETS):
        frame[name] = np.asarray(values, dtype=np.float64)[ok, j]
    for column in AUX_INDEX_COLUMNS:
        frame[column] = -1
    frame["sample_weight"] = float(weight)
    return frame


# The training run's files that kernels/build.py ships beside each best.pt: on Kaggle the paths in the
# checkpoint's config point at the training machine.
RUN_FILES = {"drop_ids": "drop_ids.txt", "folds": "folds.csv"}


def run_file(checkpoint: str | Path | None, configured: str | None, kind: str) -> Path | None:
    """The run's `--drop-ids` / `--folds` file: the copy shipped beside the checkpoint, else the configured path."""
    if checkpoint is not None and (Path(checkpoint).parent / RUN_FILES[kind]).is_file():
        return Path(checkpoint).parent / RUN_FILES[kind]
    if configured and Path(configured).is_file():
        return Path(configured)
    return None


def training_frame(data_dir: str | Path, cfg, checkpoint: str | Path | None = None) -> pd.DataFrame:
    """The run's training images (those of its folds file, when here), weight 1, less the run's --drop-ids.

    The files are the ones shipped beside `checkpoint` (kernels/build.py), else the paths of the run's config.
    train.csv comes from the rerun, so ids it does not have are ignored with a warning, never an error.
    """
    wide = load_train(data_dir, check_images=True)
    known = set(wide["image_id"])
    notes = []
    folds_path = run_file(checkpoint, cfg.data.folds, "folds")
    if folds_path is not None:
        run_ids = set(load_folds_ids(folds_path))
        new, gone = len(known - run_ids), len(run_ids - known)
        if new or gone:
            log.warning(
                f"{folds_path}: {new} train.csv image(s) were not in the run and are left out; {gone} image(s) of "
                "the run are not in train.csv"
            )
        wide = wide[wide["image_id"].isin(run_ids)]
        notes.append(f"the run's images from {folds_path}")
    drop_path = run_file(checkpoint, cfg.data.drop_ids, "drop_ids")
    if drop_path is not None:
        drop = load_id_list(drop_path, None)
        unknown = [i for i in drop if i not in known]
        if unknown:
            log.warning(f"{drop_path}: {len(unknown)} id(s) not in train.csv ignored, e.g. {unknown[0]}")
        before = len(wide)
        wide = wide[~wide["image_id"].isin(set(drop))]
        notes.append(f"{before - len(wide)} left out by {drop_path}")
    elif cfg.data.drop_ids:
        log.warning(
            f"the run was trained with --drop-ids {cfg.data.drop_ids}, which is not here: fine-tuning on every "
            "training image"
        )
    log.info(f"fine-tune training set: {len(wide)} of {len(known)} train.csv images" + "".join(f"; {n}" for n in notes))
    return wide.assign(sample_weight=1.0).reset_index(drop=True)


def load_folds_ids(path: Path) -> list[str]:
    """The image ids of a folds file (its image_id column); a file without one is an error naming it."""
    try:
        frame = pd.read_csv(path, dtype={"image_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise BiomassError(f"{path}: not a readable folds CSV ({str(err).splitlines()[0]})") from err
    if "image_id" not in frame.columns:
        raise BiomassError(f"{path}: no image_id column; expected the folds file of the training run")
    return frame["image_id"].dropna().tolist()


def finetune(
    predictor,
    train: pd.DataFrame,
    pseudo: pd.DataFrame,
    epochs: int,
    device: torch.device,
    amp: bool,
    num_workers: int,
    show: bool = True,
    lr_scale: float = 0.1,
    should_stop: Callable[[], bool] | None = None,
):
    """A copy of `predictor` whose model was trained `epochs` more epochs on train + pseudo-labelled test images.

    A gentle continuation of a converged model, not a restart of stage 2: the backbone unfrozen, the run's
    finetune-stage learning rates x `lr_scale`, no warm-up, no mixup, no fresh EMA, no validation, no SWA, nothing
    saved; activation checkpointing in the backbone (memory), and the precision of `amp` (bf16, or fp16 + scaler).
    """
    cfg = copy.deepcopy(predictor.cfg)
    cfg.train.epochs, cfg.train.freeze_epochs, cfg.train.swa_top_k, cfg.train.patience = epochs, 0, 0, 0
    cfg.train.amp, cfg.data.num_workers = amp, num_workers
    tc = cfg.train
    tc.finetune_head_lr, tc.backbone_lr, tc.lr = (v * lr_scale for v in (tc.finetune_head_lr, tc.backbone_lr, tc.lr))
    tc.warmup_frac, tc.mixup_prob, tc.ema_decay, tc.ema_half_life = 0.0, 0.0, 0.0, 0.0
    model = copy.deepcopy(predictor.model)
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "set_grad_checkpointing"):  # timm ViTs: same gradients, a fraction of the memory
        backbone.set_grad_checkpointing(True)
    if should_stop is not None:
        model.register_forward_pre_hook(stop_hook(should_stop))
    frame = pd.concat([train, pseudo], ignore_index=True)
    if show:
        grid = f"{predictor.grid[0]}x{predictor.grid[1]}"
        log.info(
            f"pseudo-label fine-tune of {predictor.path} (grid {grid}): {len(train)} train + {len(pseudo)} test "
            f"images, {epochs} epoch(s)"
        )
    result = fit(cfg, frame, None, None, device, model=model)
    backbone = getattr(result.model, "backbone", None)
    if hasattr(backbone, "set_grad_checkpointing"):  # back to the plain forward for predicting
        backbone.set_grad_checkpointing(bool(cfg.model.grad_checkpointing))
    return predictor.with_model(result.model)


def blend(plain: np.ndarray, adapted: np.ndarray, share: float) -> np.ndarray:
    """share * adapted + (1 - share) * plain: a convex mix, so physics-consistent inputs stay consistent."""
    return share * np.asarray(adapted, dtype=np.float64) + (1.0 - share) * np.asarray(plain, dtype=np.float64)


def score_against_truth(data_dir: str | Path, image_ids, named: dict[str, np.ndarray]) -> dict[str, float] | None:
    """Synthetic data only: weighted R2 of each named prediction on `test_labels.csv`, when that file is there."""
    path = Path(data_dir) / "test_labels.csv"
    if not path.is_file():
        return None
    labels = validate_train(read_csv_checked(path, TRAIN_COLUMNS, "regenerate it with python -m src.synthetic"), path)
    truth = long_to_wide(labels).set_index("image_id").loc[list(image_ids), list(TARGETS)].to_numpy(dtype=np.float64)
    return {name: score(truth, pred)["weighted_r2"] for name, pred in named.items()}


def run_pseudo_label(
    cfg: InferConfig,
    predictors: list[Predictor],
    test_images: pd.DataFrame,
    values: np.ndarray,
    ensemble,
    grid_weights: dict,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """The submission values after pseudo-label adaptation (or `values` unchanged when skipped or stopped).

    `should_stop` is checked at every forward step of the fine-tune and its re-prediction (the deadline).
    """
    try:
        return _run_pseudo_label(cfg, predictors, test_images, values, ensemble, grid_weights, should_stop)
    except FineTuneStopped:
        log.warning("pseudo-label fine-tune stopped by the deadline; submitting the plain ensemble")
        return values


def _run_pseudo_label(cfg, predictors, test_images, values, ensemble, grid_weights, should_stop) -> np.ndarray:
    settings = cfg.pseudo_label
    ok = ensemble.ok
    chosen = pick_predictors(predictors, settings.fold)
    train = training_frame(cfg.data_dir, chosen[0].cfg, chosen[0].path)
    n_flips = min(TTA_MODES[cfg.tta], 3)
    estimate = estimate_seconds(
        ensemble.seconds, len(predictors), n_flips, len(test_images), len(train), settings.epochs, len(chosen)
    )
    if cfg.time_budget is not None and estimate > 60 * cfg.time_budget:
        log.warning(
            f"pseudo-label fine-tune skipped: estimated {estimate / 60:.1f} min > --time-budget "
            f"{cfg.time_budget:g} min; "
            "submitting the plain ensemble"
        )
        return values
    if not ok.any():
        log.warning("pseudo-label fine-tune skipped: no readable test image")
        return values
    start = time.time()
    pseudo = pseudo_label_frame(test_images, values, ok, settings.weight)
    device = chosen[0].device
    adapted = [
        finetune(
            p,
            train,
            pseudo,
            settings.epochs,
            device,
            p.amp,
            cfg.num_workers,
            lr_scale=settings.lr_scale,
            should_stop=should_stop,
        )
        for p in chosen
    ]
    used = {p.grid for p in adapted}
    weights = {g: w for g, w in grid_weights.items() if g in used}
    total = sum(weights.values())
    weights = {g: w / total for g, w in weights.items()} if total > 0 else None
    readable = test_images[ok].reset_index(drop=True)
    again = predict_ensemble(adapted, readable, cfg.batch_size, weights, num_workers=cfg.num_workers, show=False)
    adapted_values = apply_physics(again.mean(cfg.tta), cfg.physics, upper_bounds(predictors))
    out = np.array(values, dtype=np.float64, copy=True)
    out[ok] = blend(values[ok], adapted_values, settings.blend)
    log.info(
        f"pseudo-label adaptation: {len(adapted)} model(s), {settings.epochs} epoch(s), blend "
        f"{settings.blend:g} adapted + "
        f"{1 - settings.blend:g} ensemble, {time.time() - start:.1f}s (estimated {estimate:.1f}s)"
    )
    named = {"plain": values[ok], "adapted": adapted_values, "blend": out[ok]}
    truth = score_against_truth(cfg.data_dir, readable["image_id"], named)
    if truth:
        log.info(
            "test_labels.csv (synthetic truth) weighted R2: " + ", ".join(f"{k} {v:.4f}" for k, v in truth.items())
        )
    return out
