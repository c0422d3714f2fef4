"""The frozen stage's feature cache: tile features of every image, computed once with the backbone frozen.

Sweeps build it once per fold and hand it to every `fit` call, so the backbone runs once for all runs.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch.utils.data import DataLoader

from src.config import Config
from src.dataset import image_dataset
from src.logs import progress
from src.model import FLIP_VARIANTS, BiomassModel
from src.runtime import autocast, worker_init


@torch.no_grad()
def compute_feature_cache(
    model: BiomassModel,
    frame: pd.DataFrame,
    cfg: Config,
    device: torch.device,
    variants=FLIP_VARIANTS,
    show: bool = True,
) -> torch.Tensor:
    """Tile features of every image under each flip variant: (N, V, 2 views, tiles, F), float32 on CPU.

    Flips are applied to the already-decoded views, so each image is read once; all variants of a
    batch go through the backbone in one call (`BiomassModel.encode_flips`).
    """
    dataset = image_dataset(frame, model.view_size, cfg.data)
    loader = DataLoader(
        dataset, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, worker_init_fn=worker_init
    )
    model.eval()
    chunks = []
    for batch in progress(loader, desc="feature cache", leave=False, disable=not show):
        with autocast(device, cfg.train.amp):
            feats = model.encode_flips(batch["left"].to(device), batch["right"].to(device), variants).float().cpu()
        chunks.append(feats.permute(2, 0, 1, 3, 4))  # (V, 2, B, T, F) -> (B, V, 2, T, F)
    return torch.cat(chunks)


def feature_cache(
    model: BiomassModel, train_frame, val_frame, cfg: Config, device, show: bool = True
) -> dict[str, torch.Tensor]:
    """Frozen-stage cache: all flip variants of the training images, identity of the validation ones."""
    model.freeze_backbone()
    cache = {"train": compute_feature_cache(model, train_frame, cfg, device, show=show)}
    if val_frame is not None:
        cache["val"] = compute_feature_cache(model, val_frame, cfg, device, variants=FLIP_VARIANTS[:1], show=False)
    return cache
