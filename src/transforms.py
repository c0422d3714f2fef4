"""One albumentations factory for train and eval; both views get the same random transform."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI check offline / in kernels

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from src.config import AUGMENT_STRENGTHS  # noqa: E402


def build_transform(view_size: tuple[int, int], train: bool, strength: str = "default") -> A.Compose:
    """Paired-view pipeline: `image` is the left view, `image2` the right one (same parameters).

    Eval (and strength 'none') only resizes to `view_size` (H, W); `strength` is one of AUGMENT_STRENGTHS
    (checked with the config).
    """
    height, width = view_size
    resize = A.Resize(height, width, interpolation=cv2.INTER_AREA)
    if not train or strength == "none":
        return A.Compose([resize], additional_targets={"image2": "image"})
    ops: list = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if strength == "default":
        # mild geometry: a biomass label is for the whole quadrat, so crops must keep most of it
        ops += [
            A.Affine(
                scale=(0.95, 1.05),
                translate_percent=(-0.03, 0.03),
                rotate=(-10, 10),
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.5,
            ),
            A.RandomResizedCrop(size=(height, width), scale=(0.85, 1.0), ratio=(0.9, 1.1), p=0.3),
        ]
    ops.append(resize)
    ops += [
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=15, val_shift_limit=10, p=0.3),
    ]
    if strength == "default":
        ops += [
            A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
            A.GaussianBlur(blur_limit=(3, 5), p=0.1),
            A.CoarseDropout(
                num_holes_range=(1, 4), hole_height_range=(0.05, 0.12), hole_width_range=(0.05, 0.12), p=0.2
            ),
        ]
    assert strength in AUGMENT_STRENGTHS, strength  # the config refuses any other value when it is resolved
    return A.Compose(ops, additional_targets={"image2": "image"})
