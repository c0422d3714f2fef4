"""Weight averages of a run: the EMA shadow model and the average of the K best epochs (SWA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3

from src.errors import BiomassError


def make_ema(model: torch.nn.Module, decay: float, saved: dict | None, last_path: Path | None) -> ModelEmaV3 | None:
    """timm's ModelEmaV3 of the model (decay 0 = off; the config checked the range); on resume its weights come back."""
    if decay <= 0:
        return None
    ema = ModelEmaV3(model, decay=decay)
    ema.module.requires_grad_(False)
    if saved is not None:
        if "ema" not in saved:
            raise BiomassError(
                f"{last_path}: was trained without --ema-decay; resume with the same flags or pass --overwrite"
            )
        ema.module.load_state_dict(saved["ema"])
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
