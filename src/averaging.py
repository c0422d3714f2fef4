"""Weight averages of a run: the EMA shadow model and the average of the K best epochs (SWA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3

from src.errors import BiomassError


class StepEma(ModelEmaV3):
    """timm's ModelEmaV3 that counts its own updates, so the warm-up continues where a resumed run left off."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool, steps: int = 0) -> None:
        super().__init__(model, decay=decay, use_warmup=warmup)
        self.steps = steps

    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        self.steps += 1
        super().update(model, step=self.steps if self.use_warmup else None)  # timm: a step count means warm-up


def half_life_decay(half_life_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay whose weight on the weights of `half_life_epochs` ago is 1/2."""
    return 0.5 ** (1.0 / max(1e-9, half_life_epochs * max(1, steps_per_epoch)))


def initial_weight(decay: float, steps: int, warmup: bool) -> float:
    """The EMA's weight on the initial parameters after `steps` updates (timm's warm-up puts 0 on them)."""
    return 0.0 if warmup and steps >= 1 else decay**steps


def ema_decay_for(train_cfg, steps_per_epoch: int) -> float:
    """--ema-half-life (epochs) -> decay at this run's steps per epoch; else --ema-decay (0 = off)."""
    if train_cfg.ema_half_life > 0:
        return half_life_decay(train_cfg.ema_half_life, steps_per_epoch)
    return train_cfg.ema_decay


def ema_advice(decay: float, warmup: bool, total_steps: int, steps_per_epoch: int) -> str | None:
    """A warning when the EMA would still lean on the initial weights at the end of the run (None when fine)."""
    left = initial_weight(decay, total_steps, warmup)
    if left <= 0.05:
        return None
    one_epoch = half_life_decay(1.0, steps_per_epoch)
    return (
        f"--ema-decay {decay:g} without warm-up over {total_steps} optimizer steps leaves {left:.0%} of the EMA on the "
        f"initial weights; use --ema-warmup, --ema-half-life 1 (decay {one_epoch:.4f} at {steps_per_epoch} steps an "
        f"epoch) or --ema-decay <= {0.05 ** (1 / max(1, total_steps)):.4f}"
    )


def make_ema(
    model: torch.nn.Module, decay: float, saved: dict | None, last_path: Path | None, warmup: bool = True
) -> StepEma | None:
    """EMA of the model (decay 0 = off; the config checked the range); on resume its weights and step count return."""
    if decay <= 0:
        return None
    ema = StepEma(model, decay=decay, warmup=warmup)
    ema.module.requires_grad_(False)
    if saved is not None:
        if "ema" not in saved:
            raise BiomassError(
                f"{last_path}: was trained without --ema-decay; resume with the same flags or pass --overwrite"
            )
        ema.module.load_state_dict(saved["ema"])
        ema.steps = int(saved.get("ema_steps", 0))
    return ema


def keep_top_k(top: list[dict], metric: float, epoch: int, model: torch.nn.Module, k: int) -> None:
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
