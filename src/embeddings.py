"""Per-image frozen features for the classical heads: backbone embeddings and colour / vegetation features.

Backbone embeddings: every image's two views are tiled like the model's (`--grid`, `--tile-size`), each tile
goes through the frozen timm backbone (no gradients, chunks of `--max-tiles-per-call` tiles, autocast on with
`--amp`), and an image's vector is [left mean over tiles, right mean over tiles] of the per-tile `--feature`,
optionally averaged over the four flips of both views. They are cached on disk under a content key of what
decides them (backbone, its weights file, kwargs, tile size, grid, feature, flips, image cleaning), one `.npz`
chunk of `--embed-chunk` images at a time, so a killed run resumes at its last finished chunk and another
experiment with the same key reuses it. Colour features (`src.colour`, vegetation indices on) are cheap and not
cached.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from src.colour import colour_table, feature_names
from src.config import Config
from src.dataset import image_dataset
from src.errors import BiomassError
from src.io_utils import atomic_path, make_dir, write_text_atomic
from src.logs import get_logger, progress
from src.model import FLIP_VARIANTS, build_model
from src.runtime import autocast, resolve_device, seed_everything

log = get_logger(__name__)


def embedding_key(cfg: Config) -> dict:
    """What decides an image's backbone embedding (the cache's content key, stored beside it as key.json)."""
    weights = cfg.model.backbone_weights
    # a random-init backbone (tests, the tiny demo) is decided by the seed it is built with
    weights_id: dict = {"random_init_seed": cfg.train.seed}
    if weights:
        path = Path(weights)
        # name and size identify a weights file without hashing gigabytes (a 7B file is 28 GB)
        weights_id = {"name": path.name, "bytes": path.stat().st_size if path.is_file() else None}
    return {
        "backbone": cfg.model.backbone,
        "weights": weights_id,
        "backbone_kwargs": cfg.model.backbone_kwargs,
        "tile_size": cfg.model.tile_size,
        "grid": list(cfg.model.grid),
        "feature": cfg.model.feature,
        "flips": bool(cfg.head.embed_flips),
        "clean_stamps": cfg.data.clean_stamps,
        "crop_bottom": cfg.data.crop_bottom,
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.head.embed_cache) / key_hash(embedding_key(cfg))


def _read_chunks(directory: Path) -> dict[str, np.ndarray]:
    """image id -> embedding of every finished chunk (a chunk is written atomically: it is whole or absent)."""
    found: dict[str, np.ndarray] = {}
    for part in sorted(directory.glob("chunk-*.npz")):
        try:
            with np.load(part, allow_pickle=False) as z:
                found.update(zip(z["ids"].tolist(), z["features"]))
        except (OSError, ValueError, KeyError) as err:
            raise BiomassError(
                f"{part}: unreadable embedding chunk ({err}); delete it and re-run to recompute"
            ) from err
    return found


@torch.no_grad()
def backbone_embeddings(frame: pd.DataFrame, cfg: Config, show: bool = True) -> np.ndarray:
    """(N, 2 F) frozen backbone embeddings of `frame`'s images in its order, from the cache where present."""
    directory = cache_dir(cfg)
    make_dir(directory)
    write_text_atomic(directory / "key.json", json.dumps(embedding_key(cfg), indent=1, sort_keys=True) + "\n")
    have = _read_chunks(directory)
    ids = frame["image_id"].astype(str).tolist()
    missing = [i for i, image_id in enumerate(ids) if image_id not in have]
    if missing:
        log.info(f"embedding {len(missing)} of {len(ids)} images with {cfg.model.backbone} -> {directory}")
        device = resolve_device(cfg.train.device)
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model).to(device).eval()  # loads --backbone-weights: the weights dataset's file
        dataset = image_dataset(frame.reset_index(drop=True), model.view_size, cfg.data)
        variants = FLIP_VARIANTS if cfg.head.embed_flips else FLIP_VARIANTS[:1]
        start = 1 + max((int(p.stem.split("-")[1]) for p in directory.glob("chunk-*.npz")), default=-1)
        chunk = cfg.head.embed_chunk
        for n, first in enumerate(progress(range(0, len(missing), chunk), desc="embeddings", disable=not show)):
            part = missing[first : first + chunk]
            loader = DataLoader(Subset(dataset, part), batch_size=cfg.train.batch_size, num_workers=0)
            feats = []
            for batch in loader:
                with autocast(device, cfg.train.amp):
                    out = model.encode_flips(batch["left"].to(device), batch["right"].to(device), variants)
                # (V, 2, B, T, F) -> mean over flips and tiles -> (B, 2, F) -> (B, 2 F)
                feats.append(out.float().mean(dim=(0, 3)).permute(1, 0, 2).flatten(1).cpu().numpy())
            values = np.concatenate(feats).astype(np.float32)
            chunk_ids = np.asarray([ids[i] for i in part])
            with atomic_path(directory / f"chunk-{start + n:05d}.npz") as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, ids=chunk_ids, features=values)
            have.update(zip(chunk_ids.tolist(), values))
    return np.stack([have[i] for i in ids]).astype(np.float64)


def image_features(frame: pd.DataFrame, cfg: Config, show: bool = True) -> tuple[np.ndarray, list[str]]:
    """(N, F) features of `--features` (backbone, colour or both, concatenated) and their names."""
    blocks, names = [], []
    if cfg.head.features in ("colour", "both"):
        grid = tuple(cfg.model.grid)
        blocks.append(colour_table(frame, grid, vegetation=True, show=show))
        names += list(feature_names(grid, vegetation=True))
    if cfg.head.features in ("backbone", "both"):
        emb = backbone_embeddings(frame, cfg, show=show)
        blocks.append(emb)
        half = emb.shape[1] // 2
        names += [f"{view}_emb{k}" for view in ("left", "right") for k in range(half)]
    return np.concatenate(blocks, axis=1), names
