"""What training minimises: the target loss, the auxiliary losses and their labels, and mixup.

Pure functions of tensors and frames: nothing here reads files or knows about stages or optimizers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from src.config import Config
from src.dataset import AUX_BIN_COLUMNS, AUX_REGRESSION_COLUMNS
from src.errors import BiomassError
from src.model import AUX_REGRESSION
from src.schema import TARGETS

# aux classification head -> the TrainConfig field holding its loss weight
AUX_WEIGHT_FIELDS = {"state": "aux_state_weight", "month": "aux_month_weight", "species": "aux_species_weight"}
Mix = tuple[float, torch.Tensor]  # (lambda, permutation) of a mixed batch


def _batch_mean(per_image: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch, each image's loss times its sample weight (pseudo-labels count W, real labels 1)."""
    if sample_weight is None:
        return per_image.mean()
    return (per_image * sample_weight.to(per_image.device, per_image.dtype)).mean()


def target_loss(
    pred: torch.Tensor,
    target_grams: torch.Tensor,
    weights,
    kind: str = "mse",
    delta: float = 1.0,
    space: str = "log1p",
    scale=None,
    beta: float = 5.0,
    sample_weight: torch.Tensor | None = None,
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
    else:
        target = torch.log1p(target_grams.clamp_min(0))
        if kind == "mse":
            per = F.mse_loss(pred.float(), target, reduction="none")
        else:  # huber (the config allows nothing else)
            per = F.huber_loss(pred.float(), target, reduction="none", delta=delta)
    w = torch.as_tensor(weights, dtype=per.dtype, device=per.device)
    return _batch_mean((per * w).sum(dim=1), sample_weight) / w.sum()


def aux_loss(logits: torch.Tensor, labels: torch.Tensor, mix: Mix | None) -> torch.Tensor:
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


def total_loss(out: dict, batch: dict, cfg: Config, model, device: torch.device, mix: Mix | None) -> torch.Tensor:
    """Target loss plus every auxiliary loss in use, for one batch's model outputs (`model` = the unwrapped net)."""
    tc = cfg.train
    loss = target_loss(
        out["targets"], batch["targets"].to(device), tc.target_weights, tc.loss, tc.huber_delta,
        model.cfg.target_space, model.target_scale, tc.huber_beta, batch.get("weight"),
    )  # fmt: skip
    device_mix = None if mix is None else (mix[0], mix[1].to(device))
    for name, weight_field in AUX_WEIGHT_FIELDS.items():
        weight = getattr(tc, weight_field)
        if weight > 0 and name in out:
            loss = loss + weight * aux_loss(out[name], batch[name].to(device), device_mix)
    for name, weight_field in AUX_REGRESSION.items():
        weight = getattr(model.cfg, weight_field)
        if weight > 0 and name in out and name in batch:
            loss = loss + weight * regression_aux_loss(out[name], batch[name].to(device))
    if "bins" in out and "bins" in batch:  # (B, 5, N) logits -> CE over N, mean over images x targets
        loss = loss + tc.aux_bins_weight * aux_loss(out["bins"].transpose(1, 2), batch["bins"].to(device), device_mix)
    return loss


# ---- labels of the auxiliary losses ----------------------------------------------------------------------------
def aux_regression_labels(
    train_frame: pd.DataFrame, val_frame: pd.DataFrame | None, model_cfg
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Copies of the frames with `<name>_z` columns (metadata standardized by the training fold)."""
    names = [name for name, weight in AUX_REGRESSION.items() if getattr(model_cfg, weight) > 0]
    if not names:
        return train_frame, val_frame
    train_frame = train_frame.copy()
    val_frame = None if val_frame is None else val_frame.copy()
    for name in names:
        column = AUX_REGRESSION_COLUMNS[name]
        if column not in train_frame.columns:
            flag = "--" + AUX_REGRESSION[name].replace("_", "-")
            raise BiomassError(f"{flag} needs column {column} in the training data (train.csv)")
        values = pd.to_numeric(train_frame[column], errors="coerce")
        mean, std = float(values.mean()), float(values.std(ddof=0))
        std = std if std > 0 else 1.0
        for frame in (train_frame, val_frame):
            if frame is not None:
                known = column in frame.columns
                frame[f"{name}_z"] = (pd.to_numeric(frame[column], errors="coerce") - mean) / std if known else np.nan
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


def aux_bin_labels(
    train_frame: pd.DataFrame, val_frame: pd.DataFrame | None, n_bins: int
) -> tuple[pd.DataFrame, pd.DataFrame | None, np.ndarray]:
    """Copies of the frames with the `--aux-bins` interval labels (edges from the training fold only), and the edges."""
    edges = quantile_bin_edges(train_frame[list(TARGETS)].to_numpy(dtype=np.float64), n_bins)
    frames = []
    for frame in (train_frame, val_frame):
        if frame is not None:
            frame = frame.copy()
            known = all(t in frame for t in TARGETS)
            labels = bin_labels(frame[list(TARGETS)].to_numpy(dtype=np.float64), edges) if known else -1
            frame[list(AUX_BIN_COLUMNS)] = labels
        frames.append(frame)
    return frames[0], frames[1], edges


def mixup(batch: dict[str, torch.Tensor], lam: float, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mix both views with the same lambda and permutation, and the targets in grams.

    Targets mix in grams (then the loss takes log1p): grams are additive, so the mixed labels keep
    GDM = Green + Clover and Total = Green + Dead + Clover exactly; mixing log1p values would not.
    In the frozen stage the "views" are the cached tile features, which mix the same way.
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
