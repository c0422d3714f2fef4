"""Image artifacts of the real photos: the orange camera date stamp and the cardboard strip at the bottom.

About a quarter of the competition images carry an orange date stamp in the bottom-right corner, and some
show a cardboard/frame strip at the bottom. Both are about the camera, not the pasture, yet a model can key
on them (the stamp encodes the date, and the date is a strong biomass prior inside the training months).

- `Cleaning` (`--clean-stamps`, `--crop-bottom FRAC`) removes them on the one image-reading path that
  training and inference share (`src.dataset.load_views`), so both see the same pixels.
- `PaintArtifacts` (`--aug-artifacts P`) does the opposite for training: it paints synthetic date stamps and
  small red flash dots, so the model learns to ignore them (10th place: +0.01 private).
- `python -m src.artifacts check --data-dir DIR` measures the stamp detector's recall and false-positive
  rate on a synthetic dataset, whose generator records every stamp it painted in `stamps.csv`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from src.data import read_image  # noqa: E402
from src.errors import BiomassError, run_cli  # noqa: E402
from src.io_utils import atomic_path  # noqa: E402

# Where a stamp can be: the bottom-right corner of the full image (fractions of its height / width).
CORNER_H, CORNER_W = 0.15, 0.35
# Orange in OpenCV HSV (H 0-179): saturated and bright. Soil, straw and shaded grass are far less saturated.
HSV_LOW, HSV_HIGH = (5, 180, 170), (25, 255, 255)
# A stamp is one line of text ("2015/09/04"): after merging its characters, one blob that is a small share of
# the corner, at most 8 % of the image height tall, at least 4 times as wide as tall (a date is ~7), and made of
# at least 4 separate glyphs. Measured on synthetic stamps: aspect 5.2-8.1, 4-15 glyphs.
MIN_SHARE, MAX_LINE_H, MIN_ASPECT, MIN_GLYPHS = 0.001, 0.08, 4.0, 4
BAND_SHARE = 0.25  # rows of the text band hold at least this share of the fullest row's orange pixels
INPAINT_RADIUS = 3
# Below ~250 px of image height the stamp's glyphs merge and recall drops (0.8 at 125 px on synthetic images):
# with --clean-stamps the reduced JPEG decode stops there.
STAMP_MIN_HEIGHT = 250


def _corner(shape: tuple[int, ...]) -> tuple[int, int]:
    """Top-left (y0, x0) of the corner region of an image of `shape`."""
    h, w = shape[:2]
    return int(h * (1 - CORNER_H)), int(w * (1 - CORNER_W))


def orange_mask(image: np.ndarray) -> np.ndarray:
    """uint8 mask (255 = stamp orange) of an RGB image: the detector's colour test."""
    return cv2.inRange(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV), HSV_LOW, HSV_HIGH)


def _dilation_kernel(height: int) -> np.ndarray:
    """About 0.3 % of the image height each side (7 px at 1000 px): covers anti-aliased edges and JPEG ringing."""
    k = 2 * max(1, round(0.003 * height)) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def stamp_mask(image: np.ndarray) -> np.ndarray | None:
    """uint8 mask (H, W) of an orange date stamp in the bottom-right corner (dilated), or None if there is none.

    HSV colour mask restricted to the corner; a horizontal closing merges the characters of a line of text,
    and the blob holding most orange pixels is cut to its dense band of rows (a line of text fills many
    pixels per row; a straw stroke touching it only a few). It counts as a stamp only if that band is shaped
    like one line of text, so scattered orange-ish straw and orange soil filling the corner are not stamps.
    """
    y0, x0 = _corner(image.shape)
    roi = image[y0:, x0:]
    if roi.size == 0:
        return None
    height = image.shape[0]
    raw = orange_mask(roi)
    if np.count_nonzero(raw) < MIN_SHARE * raw.size:
        return None
    # odd sizes: a centred kernel, so the closing keeps every orange pixel (an even one shifts the result)
    closing = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * round(0.015 * height) + 1, 2 * round(0.003 * height) + 1))
    n, labels, _, _ = cv2.connectedComponentsWithStats(cv2.morphologyEx(raw, cv2.MORPH_CLOSE, closing))
    if n < 2:
        return None
    counts = np.bincount(labels[raw > 0], minlength=n)
    counts[0] = 0  # background
    blob = (labels == int(np.argmax(counts))) & (raw > 0)
    per_row = blob.sum(axis=1)
    band = np.flatnonzero(per_row >= BAND_SHARE * per_row.max())
    r0, r1 = int(band[0]), int(band[-1]) + 1
    pad = max(1, round(0.01 * height))  # the tops and tails of glyphs sit just outside the dense band
    line = np.zeros_like(raw)
    line[max(0, r0 - pad) : r1 + pad] = blob[max(0, r0 - pad) : r1 + pad] * np.uint8(255)
    cols = np.flatnonzero(line.any(axis=0))
    h, w = r1 - r0, int(cols[-1] - cols[0]) + 1
    if np.count_nonzero(line) < MIN_SHARE * raw.size or h > MAX_LINE_H * height or w < MIN_ASPECT * h:
        return None
    if cv2.connectedComponents(line)[0] - 1 < MIN_GLYPHS:
        return None
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[y0:, x0:] = cv2.dilate(line, _dilation_kernel(height))
    return mask


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1), exclusive ends, of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def remove_stamp(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Inpaint (OpenCV Telea) a detected date stamp; returns (image, stamp box or None). The input is not changed."""
    mask = stamp_mask(image)
    if mask is None:
        return image, None
    x0, y0, x1, y1 = mask_box(mask)
    pad = 2 * INPAINT_RADIUS  # Telea reads a few pixels of context around the mask
    ys, xs = slice(max(0, y0 - pad), y1 + pad), slice(max(0, x0 - pad), x1 + pad)
    out = image.copy()
    out[ys, xs] = cv2.inpaint(np.ascontiguousarray(image[ys, xs]), mask[ys, xs], INPAINT_RADIUS, cv2.INPAINT_TELEA)
    return out, (x0, y0, x1, y1)


@dataclass(frozen=True)
class Cleaning:
    """What the image-reading path removes before the view split; the same for training and inference."""

    clean_stamps: bool = False
    crop_bottom: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.crop_bottom < 0.5:
            raise BiomassError(f"--crop-bottom {self.crop_bottom}: must be a fraction in [0, 0.5), e.g. 0.05")

    @classmethod
    def from_config(cls, data_cfg) -> Cleaning:
        """The cleaning of a run's DataConfig (absent fields, e.g. of older checkpoints, mean none)."""
        return cls(bool(getattr(data_cfg, "clean_stamps", False)), float(getattr(data_cfg, "crop_bottom", 0.0)))

    @property
    def active(self) -> bool:
        return self.clean_stamps or self.crop_bottom > 0

    @property
    def key(self) -> str:
        """A short name of this cleaning ('' when none): inference batches are keyed by view size + this."""
        parts = (["stamps"] if self.clean_stamps else []) + (
            [f"crop{self.crop_bottom:g}"] if self.crop_bottom > 0 else []
        )
        return "+".join(parts)

    def max_reduce(self, height: int) -> int:
        """Largest JPEG decode reduction (1, 2, 4, 8) this cleaning allows for an image `height` rows tall."""
        if not self.clean_stamps:
            return 8
        return max([f for f in (1, 2, 4, 8) if height // f >= STAMP_MIN_HEIGHT] or [1])

    def kept_height(self, height: int) -> int:
        """Rows left after the bottom crop."""
        return max(1, height - int(round(height * self.crop_bottom)))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Stamp inpainting first (the detector needs the whole corner), then the bottom crop."""
        if self.clean_stamps:
            image, _ = remove_stamp(image)
        if self.crop_bottom > 0:
            image = image[: self.kept_height(image.shape[0])]
        return image


# ---- synthetic artifacts for augmentation -----------------------------------------------------------------
def _date_text(rng: np.random.Generator) -> str:
    return f"2015/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1, 29)):02d}"


class PaintArtifacts(A.ImageOnlyTransform):
    """Paint a camera-like orange date stamp (bottom-right) and a few small red flash dots onto a full image.

    Applied to the whole image before the view split, where the real camera puts them. `stamp_p` and
    `dots_p` are the chances of each; `p` (of albumentations) gates the transform as a whole.
    """

    def __init__(self, stamp_p: float = 0.5, dots_p: float = 0.5, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.stamp_p, self.dots_p = stamp_p, dots_p

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("stamp_p", "dots_p")

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        rng = self.random_generator
        h, w = params["shape"][:2]
        stamp = None
        if rng.random() < self.stamp_p:
            colour = (255, int(rng.integers(110, 170)), int(rng.integers(0, 40)))  # orange .. amber
            stamp = {
                "text": _date_text(rng), "height": float(rng.uniform(0.025, 0.045)) * h, "colour": colour,
                "dx": float(rng.uniform(0.01, 0.04)) * w, "dy": float(rng.uniform(0.015, 0.05)) * h,
            }  # fmt: skip
        dots = []
        if rng.random() < self.dots_p:
            for _ in range(int(rng.integers(1, 4))):
                dots.append((float(rng.uniform(0, w)), float(rng.uniform(0, h)), float(rng.uniform(0.003, 0.008)) * h))
        return {"stamp": stamp, "dots": dots}

    def apply(self, img: np.ndarray, stamp: dict | None = None, dots: list | None = None, **params) -> np.ndarray:
        if stamp is None and not dots:
            return img
        out = img.copy()
        h, w = out.shape[:2]
        if stamp is not None:
            font, thick = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(h / 300))
            (_, th), base = cv2.getTextSize(stamp["text"], font, 1.0, thick)
            scale = max(stamp["height"], 6.0) / th
            (tw, th), base = cv2.getTextSize(stamp["text"], font, scale, thick)
            org = (int(w - tw - stamp["dx"]), int(h - base - stamp["dy"]))
            cv2.putText(out, stamp["text"], org, font, scale, stamp["colour"], thick, cv2.LINE_AA)
        for x, y, r in dots or []:
            cv2.circle(out, (int(x), int(y)), max(1, int(round(r))), (230, 20, 25), -1, cv2.LINE_AA)
        return out


def artifact_transform(prob: float) -> A.Compose | None:
    """`--aug-artifacts P`: the full-image transform of training (None when P is 0)."""
    if not 0.0 <= prob <= 1.0:
        raise BiomassError(f"--aug-artifacts {prob}: must be a probability in [0, 1]")
    if prob == 0:
        return None
    return A.Compose([PaintArtifacts(stamp_p=0.7, dots_p=0.5, p=prob)])


# ---- how well the detector works: recall and false positives on synthetic images -----------------------------
def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detection_table(data_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per synthetic image: stamp painted (stamps.csv), detected, box IoU, orange left after cleaning."""
    data_dir = Path(data_dir)
    stamps_csv = data_dir / "stamps.csv"
    if not stamps_csv.is_file():
        raise BiomassError(f"{stamps_csv}: not found; the check needs a dataset made by python -m src.synthetic")
    truth = {row.image_path: (row.x0, row.y0, row.x1, row.y1) for row in pd.read_csv(stamps_csv).itertuples()}
    rows = []
    for path in sorted((data_dir / "train").glob("*.jpg")) + sorted((data_dir / "test").glob("*.jpg")):
        rel = path.relative_to(data_dir).as_posix()
        image = read_image(path)
        cleaned, box = remove_stamp(image)
        true_box = truth.get(rel)
        residual = np.nan
        if true_box is not None:  # orange pixels left inside the painted box after cleaning, per pixel of the box
            x0, y0, x1, y1 = (int(v) for v in true_box)
            residual = float(np.count_nonzero(orange_mask(cleaned[y0:y1, x0:x1]))) / max(1, (x1 - x0) * (y1 - y0))
        rows.append({
            "image_path": rel, "stamped": true_box is not None, "detected": box is not None,
            "iou": box_iou(box, true_box) if box is not None and true_box is not None else np.nan,
            "orange_left": residual,
        })  # fmt: skip
    if not rows:
        raise BiomassError(f"{data_dir}: no train/*.jpg or test/*.jpg images to check")
    return pd.DataFrame(rows)


def detection_summary(table: pd.DataFrame) -> dict[str, float]:
    """Recall (stamped images found), false-positive rate (clean images flagged), mean box IoU, orange left."""
    stamped, clean = table[table["stamped"]], table[~table["stamped"]]
    return {
        "images": len(table),
        "stamped": len(stamped),
        "recall": float(stamped["detected"].mean()) if len(stamped) else float("nan"),
        "false_positive_rate": float(clean["detected"].mean()) if len(clean) else float("nan"),
        "mean_iou": float(stamped["iou"].mean()) if stamped["detected"].any() else float("nan"),
        "orange_left": float(stamped["orange_left"].mean()) if len(stamped) else float("nan"),
    }


def plot_examples(data_dir: str | os.PathLike, table: pd.DataFrame, out: str | os.PathLike, n: int = 3) -> Path:
    """PNG: the corner of a few stamped images before and after cleaning (what the detector removes)."""
    import matplotlib  # optional heavy dependency: loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional heavy dependency (see above)

    picks = table[table["stamped"]].head(n)
    if picks.empty:
        raise BiomassError(f"{data_dir}: no stamped images to show")
    fig, axes = plt.subplots(len(picks), 2, figsize=(9, 1.15 * len(picks) + 0.2), squeeze=False)
    for ax, rel in zip(axes, picks["image_path"]):
        image = read_image(Path(data_dir) / rel)
        y0, x0 = _corner(image.shape)
        ax[0].imshow(image[y0:, x0:])
        ax[1].imshow(remove_stamp(image)[0][y0:, x0:])
        ax[0].set_title(f"{Path(rel).name}: corner", fontsize=8)
        ax[1].set_title("after --clean-stamps", fontsize=8)
        for a in ax:
            a.axis("off")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m src.artifacts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="stamp detector recall / false positives on a synthetic dataset (stamps.csv)")
    check.add_argument("--data-dir", default="data/synthetic")
    check.add_argument("--examples", default=None, help="also write a PNG of a few corners before/after cleaning")
    args = parser.parse_args(argv)
    table = detection_table(args.data_dir)
    summary = detection_summary(table)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    missed = table[table["stamped"] & ~table["detected"]]["image_path"].tolist()
    flagged = table[~table["stamped"] & table["detected"]]["image_path"].tolist()
    if missed:
        print(f"missed: {', '.join(missed[:10])}")
    if flagged:
        print(f"false positives: {', '.join(flagged[:10])}")
    if args.examples:
        print(f"wrote {plot_examples(args.data_dir, table, args.examples)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
