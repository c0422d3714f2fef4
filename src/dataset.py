"""torch Datasets: image files -> paired view tensors; cached tile features for the frozen stage."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from src.data import jpeg_reduce_factor, read_image, split_views
from src.errors import BiomassError
from src.schema import TARGETS

AUX_COLUMNS = {"state": "state_idx", "month": "month_idx", "species": "species_idx"}
# regression aux labels: batch key -> metadata column; training adds `<key>_z` (standardized by the training fold)
AUX_REGRESSION_COLUMNS = {"ndvi": "Pre_GSHH_NDVI", "height": "Height_Ave_cm"}


def _labels(frame: pd.DataFrame, i: int) -> dict[str, torch.Tensor]:
    """Targets in grams (zeros when unknown, e.g. test) and aux class indices (-1 = ignore)."""
    row = frame.iloc[i]
    has_targets = all(t in frame.columns for t in TARGETS)
    targets = row[list(TARGETS)].to_numpy(dtype=np.float32) if has_targets else np.zeros(len(TARGETS), np.float32)
    out = {"targets": torch.from_numpy(targets), "index": torch.tensor(i)}
    for name, col in AUX_COLUMNS.items():
        out[name] = torch.tensor(int(row[col]) if col in frame.columns else -1)
    for name in AUX_REGRESSION_COLUMNS:
        if f"{name}_z" in frame.columns:  # NaN = unknown, ignored by the loss
            out[name] = torch.tensor(float(row[f"{name}_z"]), dtype=torch.float32)
    return out


def load_views(path: str, view_size: tuple[int, int], jpeg_reduce: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Decode (at reduced JPEG resolution when views of `view_size` need less than native) and split."""
    reduce = 1
    if jpeg_reduce and str(path).lower().endswith((".jpg", ".jpeg")):
        try:
            width, height = Image.open(path).size  # header only
            reduce = jpeg_reduce_factor((height, width), view_size)
        except (OSError, ValueError):
            reduce = 1  # let read_image produce the precise error
    return split_views(read_image(path, reduce=reduce))


def _to_chw(view: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(view.transpose(2, 0, 1)))


class ViewPairDataset(Dataset):
    """Reads an image (once per access, OpenCV), splits the views, applies the paired transform.

    Returns uint8 CHW views (4x less IPC than float); the model normalizes. With
    on_bad_image='fallback' an unreadable file yields zero views and ok=False instead of raising.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        view_size: tuple[int, int],
        transform,
        stereo_swap_prob: float = 0.0,
        jpeg_reduce: bool = True,
        on_bad_image: str = "error",
    ) -> None:
        self.frame = frame.reset_index(drop=True)
        self.labels = [_labels(self.frame, i) for i in range(len(self.frame))]  # pandas once, not per item
        self.view_size = tuple(view_size)
        self.transform = transform
        self.stereo_swap_prob = stereo_swap_prob
        self.jpeg_reduce = jpeg_reduce
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path = self.frame.at[i, "path"]
        ok = True
        try:
            left, right = load_views(path, self.view_size, self.jpeg_reduce)
            out = self.transform(image=left, image2=right)
            left, right = out["image"], out["image2"]
        except BiomassError as err:
            if self.on_bad_image != "fallback":
                raise
            warnings.warn(f"{err}; using the fallback prediction for this image", stacklevel=2)
            ok = False
            left = right = np.zeros((*self.view_size, 3), np.uint8)
        if self.stereo_swap_prob > 0 and random.random() < self.stereo_swap_prob:
            left, right = right, left
        return {"left": _to_chw(left), "right": _to_chw(right), "ok": torch.tensor(ok), **self.labels[i]}


class MultiSizeViewDataset(Dataset):
    """Inference: decode each image once and resize its views for every model's view size.

    Uses the eval transform of training (same resize), so train/infer preprocessing cannot drift.
    """

    def __init__(self, frame: pd.DataFrame, view_sizes, jpeg_reduce: bool = True, on_bad_image: str = "error") -> None:
        from src.transforms import build_transform

        self.frame = frame.reset_index(drop=True)
        self.view_sizes = sorted({tuple(v) for v in view_sizes})
        self.transforms = {v: build_transform(v, train=False) for v in self.view_sizes}
        # per side: the decode reduction must keep every model's height AND width (a (28, 112) view
        # must not be upscaled because a (56, 56) one sorts higher)
        self.largest = (max(h for h, _ in self.view_sizes), max(w for _, w in self.view_sizes))
        self.jpeg_reduce = jpeg_reduce
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> dict:
        path = self.frame.at[i, "path"]
        out: dict = {"index": torch.tensor(i), "ok": torch.tensor(True)}
        try:
            left, right = load_views(path, self.largest, self.jpeg_reduce)
        except BiomassError as err:
            if self.on_bad_image != "fallback":
                raise
            warnings.warn(f"{err}; using the fallback prediction for this image", stacklevel=2)
            out["ok"] = torch.tensor(False)
            left = right = None
        for size, transform in self.transforms.items():
            if left is None:
                pair = (torch.zeros(3, *size, dtype=torch.uint8),) * 2
            else:
                res = transform(image=left, image2=right)
                pair = (_to_chw(res["image"]), _to_chw(res["image2"]))
            out[f"{size[0]}x{size[1]}"] = torch.stack(pair)
        return out


# geometric variants cached per image: identity, hflip, vflip, both (the same flip on both views)
FLIP_VARIANTS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))


def flip_views(views: torch.Tensor, hflip: bool, vflip: bool) -> torch.Tensor:
    """Flip a (B, 3, H, W) batch of views."""
    dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
    return views.flip(dims) if dims else views


class FeatureCacheDataset(Dataset):
    """Stage-1 training items from cached tile features (N, variants, 2 views, tiles, F).

    The flip variant and stereo swap of item i in an epoch come from a hash of (seed, epoch, i), not a
    process RNG, so single-process and DDP runs see the same items (and resumes repeat them).
    """

    def __init__(self, features: torch.Tensor, frame: pd.DataFrame, stereo_swap_prob: float, seed: int) -> None:
        self.features = features
        self.frame = frame.reset_index(drop=True)
        # labels read from pandas once: per-item row access was ~1.5 ms, most of a cached epoch
        self.labels = [_labels(self.frame, i) for i in range(len(self.frame))]
        self.stereo_swap_prob = stereo_swap_prob
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        variant = int(rng.integers(self.features.shape[1]))
        left, right = self.features[i, variant, 0], self.features[i, variant, 1]
        if rng.random() < self.stereo_swap_prob:
            left, right = right, left
        return {"left": left, "right": right, "ok": torch.tensor(True), **self.labels[i]}
