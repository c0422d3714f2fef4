"""Colour features of an image: what a pasture photo's colours alone say about its biomass.

One function, `colour_features(image)`: RGB uint8 -> named values for the left view, the right view and the
whole image. They feed the colour-ridge peer baseline (`python -m src.baseline --colour`), the floor a model
trained on the pixels must beat, and are meant to grow into vegetation-index features (excess green, CIVE,
saturation histograms, cover fractions) that a model head can reuse; add them here, under new names.

The thresholds are physical, not fitted: living leaves are green to blue-green and saturated; straw and dead
litter are yellowish, brighter than soil and only moderately saturated; soil is darker or grey.
"""

from __future__ import annotations

import cv2
import numpy as np

from src.data import split_views

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


def colour_features(image: np.ndarray) -> dict[str, float]:
    """RGB uint8 (H, W, 3) image of two views side by side -> {FEATURE_NAMES[i]: value}, in that order.

    Any resolution: every value is a fraction of pixels or a mean, so a reduced JPEG decode gives about the same.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    left, right = split_views(image)
    values = [*_scope_features(left), *_scope_features(right), *_scope_features(image)]
    return dict(zip(FEATURE_NAMES, values))
