"""torch Datasets: image files -> paired view tensors; cached tile features for the frozen stage."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from src.artifacts import Cleaning, artifact_transform
from src.config import DataConfig
from src.data import jpeg_reduce_factor, read_image, split_views
from src.errors import BiomassError
from src.schema import TARGETS
from src.transforms import build_transform

AUX_COLUMNS = {"state": "state_idx", "month": "month_idx", "species": "species_idx"}
# regression aux labels: batch key -> metadata column; training adds `<key>_z` (standardized by the training fold)
AUX_REGRESSION_COLUMNS = {"ndvi": "Pre_GSHH_NDVI", "height": "Height_Ave_cm"}
# --aux-bins labels: training adds one interval index per target (-1 = unknown), batch key "bins" of shape (5,)
AUX_BIN_COLUMNS = tuple(f"bin_{t}" for t in TARGETS)


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
    if "sample_weight" in frame.columns:  # test-time pseudo-labels weigh W, real labels 1
        out["weight"] = torch.tensor(float(row["sample_weight"]), dtype=torch.float32)
    if AUX_BIN_COLUMNS[0] in frame.columns:
        out["bins"] = torch.from_numpy(row[list(AUX_BIN_COLUMNS)].to_numpy(dtype=np.int64))
    return out


def jpeg_header_size(path: str, jpeg_reduce: bool = True) -> tuple[int, int] | None:
    """(height, width) from a JPEG's header, None when no reduced decode applies (off, not a JPEG, unreadable)."""
    if not jpeg_reduce or not str(path).lower().endswith((".jpg", ".jpeg")):
        return None
    try:
        width, height = Image.open(path).size  # header only
    except (OSError, ValueError):
        return None  # let read_image produce the precise error
    return height, width


def decode_reduction(header: tuple[int, int] | None, view_size: tuple[int, int], cleaning: Cleaning) -> int:
    """JPEG decode reduction (1, 2, 4, 8) for views of `view_size`: as far as the view and the cleaning allow."""
    if header is None:
        return 1
    height, width = header
    return min(jpeg_reduce_factor((cleaning.kept_height(height), width), view_size), cleaning.max_reduce(height))


def load_image(
    path: str, view_size: tuple[int, int], jpeg_reduce: bool = True, cleaning: Cleaning | None = None
) -> np.ndarray:
    """Decode (reduced when views of `view_size` need less than native) and clean: the full RGB image."""
    cleaning = cleaning or Cleaning()
    return cleaning(read_image(path, reduce=decode_reduction(jpeg_header_size(path, jpeg_reduce), view_size, cleaning)))


def load_views(
    path: str,
    view_size: tuple[int, int],
    jpeg_reduce: bool = True,
    cleaning: Cleaning | None = None,
    image_transform=None,
) -> tuple[np.ndarray, np.ndarray]:
    """The one image-reading path of training and inference: decode, clean, (augment), split into the two views.

    The JPEG is decoded at reduced resolution when views of `view_size` need less than native; `cleaning`
    (stamp inpainting, bottom crop) and the full-image `image_transform` (training-only artifacts) run on the
    whole image before the split, where the camera put the stamp.
    """
    return _views(load_image(path, view_size, jpeg_reduce, cleaning), image_transform)


def _views(image: np.ndarray, image_transform=None) -> tuple[np.ndarray, np.ndarray]:
    if image_transform is not None:
        image = image_transform(image=image)["image"]
    return split_views(image)


def _to_chw(view: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(view.transpose(2, 0, 1)))


class ViewPairDataset(Dataset):
    """Reads an image (once per access, OpenCV), splits the views, applies the paired transform.

    Returns uint8 CHW views (4x less IPC than float); the model normalizes. With
    on_bad_image='fallback' an unreadable file yields zero views and ok=False instead of raising.
    `cleaning` and the full-image `image_transform` are those of `load_views`. `cache_images` keeps each
    decoded, cleaned image in RAM after its first read (one copy per DataLoader worker): later epochs skip
    the decode, which is most of a tiny model's step on a CPU (docs/BENCHMARKS.md, data pipeline).
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        view_size: tuple[int, int],
        transform,
        stereo_swap_prob: float = 0.0,
        jpeg_reduce: bool = True,
        on_bad_image: str = "error",
        cleaning: Cleaning | None = None,
        image_transform=None,
        cache_images: bool = False,
    ) -> None:
        self.frame = frame.reset_index(drop=True)
        self.labels = [_labels(self.frame, i) for i in range(len(self.frame))]  # pandas once, not per item
        self.view_size = tuple(view_size)
        self.transform = transform
        self.stereo_swap_prob = stereo_swap_prob
        self.jpeg_reduce = jpeg_reduce
        self.on_bad_image = on_bad_image
        self.cleaning = cleaning
        self.image_transform = image_transform
        self.cache_images = cache_images
        self._images: dict[int, np.ndarray] = {}

    def set_random_seed(self, seed: int) -> None:
        """Seed albumentations' own RNGs (the paired view transform and the full-image one)."""
        for transform in (self.transform, self.image_transform):
            if transform is not None and hasattr(transform, "set_random_seed"):
                transform.set_random_seed(seed)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path = self.frame.at[i, "path"]
        ok = True
        try:
            image = self._images.get(i)
            if image is None:
                image = load_image(path, self.view_size, self.jpeg_reduce, self.cleaning)
                if self.cache_images:
                    image.flags.writeable = False  # transforms must copy, never edit the cached pixels
                    self._images[i] = image
            left, right = _views(image, self.image_transform)
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


def image_dataset(
    frame: pd.DataFrame,
    view_size: tuple[int, int],
    data_cfg: DataConfig,
    transform=None,
    stereo_swap_prob: float = 0.0,
    train: bool = False,
) -> ViewPairDataset:
    """A run's images, read with its cleaning (`--clean-stamps`, `--crop-bottom`); `--aug-artifacts` in training only.

    `transform` defaults to the eval transform (resize only).
    """
    transform = transform if transform is not None else build_transform(view_size, train=False)
    artifacts = artifact_transform(data_cfg.aug_artifacts) if train else None
    return ViewPairDataset(
        frame, view_size, transform, stereo_swap_prob, data_cfg.jpeg_reduce, cleaning=Cleaning.from_config(data_cfg),
        image_transform=artifacts, cache_images=data_cfg.cache_images,
    )  # fmt: skip


def input_key(view_size: tuple[int, int], cleaning: Cleaning | None = None, jpeg_reduce: bool = True) -> str:
    """Batch key of one model input: view size, the cleaning it was trained with and, when off, the reduced JPEG
    decode ('56x112', '56x112|stamps', '56x112|full-decode')."""
    key = f"{view_size[0]}x{view_size[1]}"
    key = f"{key}|{cleaning.key}" if cleaning is not None and cleaning.active else key
    return key if jpeg_reduce else f"{key}|full-decode"


class MultiSizeViewDataset(Dataset):
    """Inference: read each image once for all models and give every model its input: view size x cleaning.

    Each input is made exactly as training's `load_views` makes it (same decode reduction, cleaning and eval
    resize), so train/infer preprocessing cannot drift; inputs that share a decode reduction share one decode,
    and each cleaning runs once per decode. `cleanings[i]` belongs to `view_sizes[i]` (default none), and so does
    `jpeg_reduce[i]` when a list (each checkpoint's `data.jpeg_reduce`: training's decode, reduced or not).
    """

    def __init__(
        self, frame: pd.DataFrame, view_sizes, jpeg_reduce=True, on_bad_image: str = "error", cleanings=None
    ) -> None:
        self.frame = frame.reset_index(drop=True)
        view_sizes = [tuple(v) for v in view_sizes]
        cleanings = list(cleanings) if cleanings is not None else [Cleaning()] * len(view_sizes)
        reduces = (
            [bool(r) for r in jpeg_reduce]
            if isinstance(jpeg_reduce, (list, tuple))
            else [bool(jpeg_reduce)] * len(view_sizes)
        )
        if len(cleanings) != len(view_sizes) or len(reduces) != len(view_sizes):
            raise ValueError("one cleaning and one jpeg_reduce per view size")
        self.inputs = sorted(
            set(zip(view_sizes, cleanings, reduces)), key=lambda vcr: (vcr[0], vcr[1].key, vcr[2])
        )  # (view size, cleaning, reduced decode)
        self.transforms = {v: build_transform(v, train=False) for v, _, _ in self.inputs}
        self.jpeg_reduce = any(reduces)
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, i: int) -> dict:
        path = self.frame.at[i, "path"]
        try:
            inputs = self._inputs(path)
            ok = True
        except Exception as err:  # noqa: BLE001 - one bad image must not end the hidden rerun
            if self.on_bad_image != "fallback":
                if isinstance(err, BiomassError):
                    raise
                raise BiomassError(f"{path}: reading the image failed ({_one_line(err)}); replace the image") from err
            why = str(err) if isinstance(err, BiomassError) else f"{path}: {_one_line(err)}"
            warnings.warn(f"{why}; using the fallback prediction for this image", stacklevel=2)
            inputs = {input_key(s, c, r): torch.zeros(2, 3, *s, dtype=torch.uint8) for s, c, r in self.inputs}
            ok = False
        return {"index": torch.tensor(i), "ok": torch.tensor(ok), **inputs}

    def _inputs(self, path: str) -> dict[str, torch.Tensor]:
        """Every model input of one image: read, clean and resize (any failure is the whole image's)."""
        header = jpeg_header_size(path, self.jpeg_reduce)  # read once for every input
        decoded: dict[int, np.ndarray] = {}
        views: dict[tuple[int, Cleaning], tuple[np.ndarray, np.ndarray]] = {}
        out: dict[str, torch.Tensor] = {}
        for size, cleaning, reduced in self.inputs:
            reduce = decode_reduction(header if reduced else None, size, cleaning)
            if reduce not in decoded:
                decoded[reduce] = read_image(path, reduce=reduce)
            if (reduce, cleaning) not in views:
                views[reduce, cleaning] = split_views(cleaning(decoded[reduce]))
            res = self.transforms[size](image=views[reduce, cleaning][0], image2=views[reduce, cleaning][1])
            out[input_key(size, cleaning, reduced)] = torch.stack((_to_chw(res["image"]), _to_chw(res["image2"])))
        return out


def _one_line(err: BaseException) -> str:
    """`TypeName: first line of the message` (OpenCV's errors span several lines)."""
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


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
