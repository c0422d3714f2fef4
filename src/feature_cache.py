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
from src.runtime import DistInfo, all_gather_objects, autocast, worker_init


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


def sharded_feature_cache(
    model: BiomassModel,
    frame: pd.DataFrame,
    cfg: Config,
    device,
    info: DistInfo | None,
    variants=FLIP_VARIANTS,
    show: bool = True,
) -> torch.Tensor:
    """`compute_feature_cache` with the images split over the ranks (rank r: images r, r + W, ...), then gathered:
    each image goes through the backbone once in the whole job, and every rank ends with the full cache."""
    if info is None or not info.enabled or len(frame) < info.world:
        return compute_feature_cache(model, frame, cfg, device, variants, show)
    part = frame.iloc[info.rank :: info.world].reset_index(drop=True)
    parts = all_gather_objects(compute_feature_cache(model, part, cfg, device, variants, show), info)
    out = torch.empty((len(frame), *parts[0].shape[1:]), dtype=parts[0].dtype)
    for rank, chunk in enumerate(parts):
        out[rank :: info.world] = chunk
    return out


def feature_cache(
    model: BiomassModel, train_frame, val_frame, cfg: Config, device, show: bool = True, info: DistInfo | None = None
) -> dict[str, torch.Tensor]:
    """Frozen-stage cache: all flip variants of the training images, identity of the validation ones."""
    model.freeze_backbone()
    cache = {"train": sharded_feature_cache(model, train_frame, cfg, device, info, show=show)}
    if val_frame is not None:
        cache["val"] = sharded_feature_cache(model, val_frame, cfg, device, info, FLIP_VARIANTS[:1], show=False)
    return cache
