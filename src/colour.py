"""Colour features of an image: what a pasture photo's colours alone say about its biomass.

One function, `colour_features(image, grid, vegetation)`: RGB uint8 -> named values for the left view, the right
view and the whole image, and with `grid=(R, C)` for each of the R x C tiles of each view too. The classic set
(`vegetation=False`: pixel fractions, channel means, hue histogram) feeds the colour-ridge peer baseline
(`python -m src.baseline --colour`), the floor a model trained on the pixels must beat. `vegetation=True` adds
the hand features of pasture imaging that the frozen-feature heads (`train.py --features colour`) use: excess
green (ExG = 2g - r - b on chromatic coordinates), excess red (ExR = 1.4 r - g), ExG - ExR, CIVE, their green
cover fraction (ExG - ExR > 0) and a saturation histogram.

The thresholds are physical, not fitted: living leaves are green to blue-green and saturated; straw and dead
litter are yellowish, brighter than soil and only moderately saturated; soil is darker or grey.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from src.data import jpeg_reduce_factor, read_image, split_views
from src.dataset import jpeg_header_size
from src.logs import progress

SCOPES = ("left", "right", "image")
HUE_BINS = 12  # 30 degrees each
# OpenCV 8-bit HSV: hue in [0, 180) (degrees / 2), saturation and value in [0, 255]
GREEN_HUE, GREEN_MIN_S, GREEN_MIN_V = (30, 85), 64, 38  # 60-170 degrees, S >= 0.25, V >= 0.15
STRAW_HUE, STRAW_S, STRAW_MIN_V = (10, 30), (38, 180), 128  # 20-60 degrees, S 0.15-0.7, V >= 0.5
HIST_MIN_S = 38  # grey pixels have no meaningful hue
PER_SCOPE = (
    "green_frac", "straw_frac", "mean_r", "mean_g", "mean_b", "mean_s", "mean_v",
    *(f"hue{k:02d}" for k in range(HUE_BINS)),
)  # fmt: skip
FEATURE_NAMES = tuple(f"{scope}_{name}" for scope in SCOPES for name in PER_SCOPE)
SAT_BINS = 8
VEGETATION = (
    "exg", "exr", "exg_minus_exr", "cive", "exgr_cover", *(f"sat{k}" for k in range(SAT_BINS)),
)  # fmt: skip
FEATURE_SIDE = 120  # px per view the features are computed at (a reduced JPEG decode: fractions barely move)


def feature_names(grid: tuple[int, int] = (1, 1), vegetation: bool = False) -> tuple[str, ...]:
    """Names of `colour_features(image, grid, vegetation)`, in its order (grid (1, 1): no tile scopes)."""
    per = PER_SCOPE + (VEGETATION if vegetation else ())
    rows, cols = grid
    tiles = (
        []
        if (rows, cols) == (1, 1)
        else [f"{v}_t{r}{c}" for v in ("left", "right") for r in range(rows) for c in range(cols)]
    )
    return tuple(f"{scope}_{name}" for scope in (*SCOPES, *tiles) for name in per)


def _vegetation_features(rgb: np.ndarray) -> list[float]:
    """The VEGETATION values of one RGB uint8 array: mean indices on chromatic coordinates, cover, saturation."""
    pix = rgb.reshape(-1, 3).astype(np.float64)
    total = np.maximum(pix.sum(axis=1, keepdims=True), 1.0)
    r, g, b = (pix / total).T  # chromatic coordinates: brightness divided out
    exg, exr = 2 * g - r - b, 1.4 * r - g
    # CIVE (Kataoka 2003) on 0-255 values, scaled by 1/255 so it lives on the same range as the others
    cive = (0.441 * pix[:, 0] - 0.811 * pix[:, 1] + 0.385 * pix[:, 2]) / 255.0 + 18.78745 / 255.0
    sat = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).reshape(-1, 3)[:, 1].astype(np.int32)
    hist = np.bincount(sat * SAT_BINS // 256, minlength=SAT_BINS)[:SAT_BINS] / max(len(sat), 1)
    return [
        float(exg.mean()),
        float(exr.mean()),
        float((exg - exr).mean()),
        float(cive.mean()),
        float((exg - exr > 0).mean()),
        *(float(x) for x in hist),
    ]


def _scope_features(rgb: np.ndarray) -> list[float]:
    """The PER_SCOPE values of one RGB uint8 array (fractions of its pixels, means in [0, 1])."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.int32)
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    green = (h >= GREEN_HUE[0]) & (h < GREEN_HUE[1]) & (s >= GREEN_MIN_S) & (v >= GREEN_MIN_V)
    straw = (h >= STRAW_HUE[0]) & (h < STRAW_HUE[1]) & (s >= STRAW_S[0]) & (s <= STRAW_S[1]) & (v >= STRAW_MIN_V)
    coloured = s >= HIST_MIN_S
    hist = np.bincount(h[coloured] * HUE_BINS // 180, minlength=HUE_BINS)[:HUE_BINS] / max(len(h), 1)
    means = rgb.reshape(-1, 3).mean(axis=0) / 255.0
    return [
        float(green.mean()),
        float(straw.mean()),
        *(float(m) for m in means),
        float(s.mean() / 255.0),
        float(v.mean() / 255.0),
        *(float(x) for x in hist),
    ]


def _tiles(view: np.ndarray, grid: tuple[int, int]) -> list[np.ndarray]:
    """R x C tiles of a view, row-major (the model's tile order); edges split as evenly as the pixels allow."""
    rows, cols = grid
    ys = np.linspace(0, view.shape[0], rows + 1).astype(int)
    xs = np.linspace(0, view.shape[1], cols + 1).astype(int)
    return [view[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] for r in range(rows) for c in range(cols)]


def colour_features(image: np.ndarray, grid: tuple[int, int] = (1, 1), vegetation: bool = False) -> dict[str, float]:
    """RGB uint8 (H, W, 3) image of two views side by side -> {feature_names(grid, vegetation)[i]: value}.

    Scopes: left view, right view, whole image, then (grid other than 1x1) each tile of the left then the right
    view. Any resolution: every value is a fraction of pixels or a mean, so a reduced JPEG decode gives about the
    same.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    left, right = split_views(image)
    scopes = [left, right, image]
    if tuple(grid) != (1, 1):
        scopes += [*_tiles(left, grid), *_tiles(right, grid)]
    values = []
    for part in scopes:
        values += _scope_features(part) + (_vegetation_features(part) if vegetation else [])
    return dict(zip(feature_names(tuple(grid), vegetation), values))


def colour_table(
    wide: pd.DataFrame, grid: tuple[int, int] = (1, 1), vegetation: bool = False, show: bool = True
) -> np.ndarray:
    """(N, features) colour features of every image of `wide` (its `path` column), in wide order."""
    rows = []
    for path in progress(wide["path"], desc="colour features", disable=not show, leave=False):
        header = jpeg_header_size(path)
        reduce = jpeg_reduce_factor(header, (FEATURE_SIDE, FEATURE_SIDE)) if header is not None else 1
        rows.append(list(colour_features(read_image(path, reduce=reduce), grid, vegetation).values()))
    return np.asarray(rows, dtype=np.float64).reshape(len(wide), len(feature_names(tuple(grid), vegetation)))
