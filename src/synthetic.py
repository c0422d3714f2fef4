"""Competition-layout synthetic data: the real images are not in this repo, so tests and the demo use these.

Labels follow aggregate statistics of the real train.csv (the constants below; no rows of it), and the
pixels carry the labels: grass blades, dead litter and clover leaves whose coverage grows with their mass,
with saturation, occlusion, lighting and a per-image density factor so colour alone cannot solve it.

    python -m src.synthetic --out DIR --n-train 40 --n-test 10 --seed 0 [--size 1000x500] [--shift soil]
    python -m src.synthetic stats --real PATH --synthetic DIR/train.csv
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from src.errors import BiomassError, run_cli
from src.io_utils import atomic_path, write_csv_atomic, write_text_atomic
from src.logs import progress
from src.schema import STATES, TARGETS, TEST_COLUMNS, TRAIN_COLUMNS, species_group

# ---- calibration: aggregates of the real train.csv (357 images) ----
# Sampling date -> number of images, per state: 28 dates, 30 date x state groups.
DATES: dict[str, dict[str, int]] = {
    "Tas": {"2015/5/18": 22, "2015/5/19": 7, "2015/6/26": 18, "2015/6/29": 10, "2015/7/1": 10,
            "2015/9/3": 9, "2015/9/4": 16, "2015/9/11": 9, "2015/11/9": 20, "2015/11/10": 17},
    "Vic": {"2015/6/26": 19, "2015/6/30": 6, "2015/7/1": 9, "2015/7/2": 10, "2015/8/14": 18, "2015/8/18": 10,
            "2015/8/19": 1, "2015/9/29": 11, "2015/9/30": 10, "2015/10/13": 11, "2015/10/14": 7},
    "NSW": {"2015/1/15": 17, "2015/2/24": 15, "2015/2/25": 9, "2015/4/1": 10, "2015/5/7": 13, "2015/10/6": 11},
    "WA": {"2015/7/8": 12, "2015/8/21": 8, "2015/9/1": 12},
}  # fmt: skip
# Species -> number of images, per state (species are tied to the state's farms).
SPECIES: dict[str, dict[str, int]] = {
    "Tas": {"Ryegrass_Clover": 66, "Ryegrass": 41, "Clover": 21, "WhiteClover": 10},
    "Vic": {"Phalaris_Clover": 42, "Ryegrass_Clover": 32,
            "Phalaris_BarleyGrass_SilverGrass_SpearGrass_Clover_Capeweed": 11, "Ryegrass": 10,
            "Phalaris_Ryegrass_Clover": 8, "Phalaris_Clover_Ryegrass_Barleygrass_Bromegrass": 7, "Mixed": 2},
    "NSW": {"Fescue": 28, "Lucerne": 22, "Fescue_CrumbWeed": 10, "Phalaris": 8, "Ryegrass": 7},
    "WA": {"Clover": 20, "Ryegrass": 4, "SubcloverLosa": 5, "SubcloverDalkeith": 3},
}  # fmt: skip
# (state, month) -> mean/sd of log Total, mean dead share when dead > 0, P(dead == 0),
# mean log height, mean NDVI, mean GDM share of Total. Biomass and composition move with state and season.
MONTHLY: dict[tuple[str, int], tuple[float, ...]] = {
    ("NSW", 1): (3.98, 0.39, 0.22, 0.0, 2.77, 0.71, 0.78), ("NSW", 2): (4.30, 0.42, 0.15, 0.0, 2.61, 0.60, 0.85),
    ("NSW", 4): (3.56, 0.67, 0.02, 0.6, 3.47, 0.76, 0.99), ("NSW", 5): (4.07, 0.46, 0.30, 0.08, 2.49, 0.69, 0.72),
    ("NSW", 10): (4.55, 0.42, 0.35, 0.0, 2.47, 0.58, 0.65), ("Tas", 5): (3.44, 0.57, 0.35, 0.0, 1.52, 0.65, 0.65),
    ("Tas", 6): (3.18, 0.60, 0.55, 0.0, 0.83, 0.57, 0.45), ("Tas", 7): (3.29, 0.47, 0.51, 0.0, 1.46, 0.60, 0.49),
    ("Tas", 9): (3.44, 0.47, 0.34, 0.0, 1.13, 0.66, 0.66), ("Tas", 11): (3.66, 0.73, 0.38, 0.0, 1.26, 0.64, 0.62),
    ("Vic", 6): (3.39, 0.49, 0.45, 0.0, 1.34, 0.76, 0.55), ("Vic", 7): (3.18, 0.36, 0.16, 0.0, 1.16, 0.73, 0.84),
    ("Vic", 8): (3.68, 0.33, 0.16, 0.03, 1.40, 0.77, 0.84), ("Vic", 9): (4.16, 0.36, 0.08, 0.0, 2.04, 0.79, 0.92),
    ("Vic", 10): (3.79, 0.25, 0.50, 0.0, 1.39, 0.45, 0.50), ("WA", 7): (2.81, 0.98, 0.0, 1.0, 0.39, 0.52, 1.0),
    ("WA", 8): (3.58, 0.57, 0.0, 1.0, 0.62, 0.65, 1.0), ("WA", 9): (3.15, 1.02, 0.0, 1.0, 0.83, 0.64, 1.0),
}  # fmt: skip
# Species group -> P(clover == 0), mean clover share of live mass when clover > 0.
CLOVER: dict[str, tuple[float, float]] = {
    "clover": (0.02, 0.86), "ryegrass_clover": (0.17, 0.22), "phalaris_clover": (0.13, 0.24), "ryegrass": (0.63, 0.11),
    "phalaris": (0.97, 0.1), "fescue": (0.97, 0.14), "lucerne": (0.98, 0.1), "other": (0.98, 0.1),
}  # fmt: skip
WIDE_COLUMNS = ("image_id", "Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm", *TARGETS)
SHIFTS = ("lighting", "soil")
STAMP_SHARE, FRAME_SHARE = 0.27, 0.3
ORANGE = (255, 140, 20)
LEAF_R = (0.006, 0.0085, 0.011)  # clover leaflet radii, fractions of the view height
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in full-image pixels


def _pick(rng: np.random.Generator, counts: dict[str, int], n: int) -> np.ndarray:
    """Systematic sampling: each key's count is within 1 of n * share (exact at n = 357), order shuffled."""
    keys = np.array(list(counts), dtype=object)
    cdf = np.cumsum(list(counts.values())) / sum(counts.values())
    idx = np.searchsorted(cdf, (rng.random() + np.arange(n)) / n, side="right")
    return keys[rng.permutation(np.minimum(idx, len(keys) - 1))]


def sample_labels(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Draw n wide label rows (image_id, metadata, 5 targets) from the calibrated joint distribution."""
    states = _pick(rng, {s: sum(DATES[s].values()) for s in STATES}, n)
    dates, species = np.empty(n, object), np.empty(n, object)
    for s in STATES:
        idx = np.flatnonzero(states == s)
        dates[idx], species[idx] = _pick(rng, DATES[s], len(idx)), _pick(rng, SPECIES[s], len(idx))
    months = [int(d.split("/")[1]) for d in dates]
    mu, sd, dead_m, dead0, logh, ndvi_m, gdm_m = np.array([MONTHLY[(s, m)] for s, m in zip(states, months)]).T
    groups = np.array([species_group(x) for x in species])
    clover0, clover_m = np.array([CLOVER[g] for g in groups]).T

    z = sd * rng.standard_normal(n)  # within-group deviation of log Total: drives height and NDVI too
    total = np.maximum(np.exp(mu + z), 1.0)
    total = np.where(total > 120, 200 - 80 * np.exp(-(total - 120) / 80), total)  # soft cap: real max 185.7 g
    k = 6.0  # Beta concentration: sd of a share ~0.19 at mean 0.35, as in the real file
    dead_share = rng.beta(np.maximum(dead_m, 0.01) * k, np.maximum(1 - dead_m, 0.01) * k)
    dead_share[(dead_m == 0) | (rng.random(n) < dead0)] = 0.0
    clover_share = rng.beta(clover_m * k, (1 - clover_m) * k)  # of the live (green + clover) mass
    clover_share[rng.random(n) < clover0] = 0.0
    green0 = np.where(groups == "clover", np.where(states == "WA", 0.6, 0.08), 0.0)  # pure clover swards
    clover_share[rng.random(n) < green0] = 1.0
    dead = np.round(total * dead_share, 4)
    clover = np.round((total - dead) * clover_share, 4)
    green = np.round(total - dead - clover, 4)

    gdm_share = (green + clover) / np.maximum(green + clover + dead, 1e-9)
    height = np.exp(logh + 0.6 * z + 0.43 * rng.standard_normal(n))
    step = rng.choice([1.0, 2.0, 6.0], size=n, p=[0.55, 0.25, 0.2])  # heights are means of a few readings
    height = np.round(np.clip(np.round(height * step) / step, 1.0, 70.0), 4)
    ndvi = ndvi_m + 0.16 * z + 0.32 * (gdm_share - gdm_m) + 0.075 * rng.standard_normal(n)
    ids = rng.choice(9 * 10**9, size=n, replace=False) + 10**9
    return pd.DataFrame(
        {
            "image_id": [f"ID{i}" for i in ids], "Sampling_Date": dates.astype(str), "State": states.astype(str),
            "Species": species.astype(str), "Pre_GSHH_NDVI": np.round(np.clip(ndvi, 0.14, 0.91), 2),
            "Height_Ave_cm": height, "Dry_Green_g": green, "Dry_Dead_g": dead, "Dry_Clover_g": clover,
            "GDM_g": np.round(green + clover, 4), "Dry_Total_g": np.round(green + dead + clover, 4),
        }
    )  # fmt: skip


# ---- rendering ----
def _look(rng: np.random.Generator, shift: str | None) -> dict:
    """Per-image soil colour and lighting; a shift moves one of them out of the training range."""
    brown = np.array([80.0, 62, 45]) + rng.uniform() * np.array([50.0, 43, 35])  # dark .. light brown
    soil = rng.uniform(0.75, 1.1) * (brown + rng.uniform(0, 0.6) * (np.array([115.0, 110, 105]) - brown))  # .. grey
    gain, tint = rng.uniform(0.75, 1.2), rng.uniform([0.93, 0.95, 0.9], [1.07, 1.05, 1.1])
    if shift == "soil":  # red-ochre or pale sandy soils never seen in training
        soil = rng.choice([np.array([150.0, 70, 45]), np.array([190.0, 170, 135])]) * rng.uniform(0.9, 1.1, 3)
    elif shift == "lighting" and rng.random() < 0.5:  # dusk: dim and blue
        gain, tint = rng.uniform(0.45, 0.6), np.array([0.85, 0.95, 1.2])
    elif shift == "lighting":  # harsh midday: bright and warm
        gain, tint = rng.uniform(1.3, 1.5), np.array([1.15, 1.0, 0.8])
    return {"soil": soil, "gain": gain, "tint": tint}


def _noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise (unit-ish sd) with features of about `cell` pixels, by upsampling a coarse grid."""
    small = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _soil(rng: np.random.Generator, h: int, w: int, colour: np.ndarray) -> np.ndarray:
    """Brown/grey background with clods (coarse noise), crumbs (fine noise) and grain."""
    tex = 0.12 * _noise(rng, h, w, max(h // 6, 2)) + 0.08 * _noise(rng, h, w, max(h // 40, 2))
    tex += 0.07 * rng.standard_normal((h, w), dtype=np.float32)
    img = colour.astype(np.float32)[None, None, :] * (1.0 + tex[..., None])
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(img: np.ndarray, pts: np.ndarray, colours: np.ndarray, thickness: int, rng: np.random.Generator) -> None:
    """Draw polylines pts (n, k, 2) in a palette of colours: one cv2 call per colour keeps it fast."""
    if len(pts) == 0:
        return
    which = rng.integers(0, len(colours), len(pts))
    for c, col in enumerate(colours):
        sel = pts[which == c]
        if len(sel):
            cv2.polylines(img, list(sel), False, tuple(float(v) for v in col), thickness, cv2.LINE_AA)


def _palette(rng: np.random.Generator, lo, hi, n: int = 6) -> np.ndarray:
    """n colours along the lo..hi ramp with a little per-channel jitter (independent channels give odd hues)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return np.clip(lo + rng.uniform(0, 1, (n, 1)) * (hi - lo) + rng.normal(0, 6, (n, 3)), 0, 255)


def _blades(rng, n: int, h: int, w: int, length: float, bend: float) -> np.ndarray:
    """Curved 3-point strokes with random base, direction and length."""
    base = rng.uniform([0, 0], [w, h], (n, 2))
    theta = rng.uniform(0, 2 * np.pi, n)
    seg = (length * rng.uniform(0.3, 0.7, n))[:, None]
    turn = theta + rng.normal(0, bend, n)
    mid = base + seg * np.c_[np.cos(theta), np.sin(theta)]
    tip = mid + seg * np.c_[np.cos(turn), np.sin(turn)]
    return np.stack([base, mid, tip], 1).round().astype(np.int32)


def _vegetation(img: np.ndarray, row, rng: np.random.Generator, view_h: int) -> None:
    """Paint dead litter, clover and grass whose stroke counts are proportional to their mass."""
    h, w = img.shape[:2]
    area = h * w / view_h**2  # counts are per view-height squared, so coverage does not depend on resolution
    density = np.exp(rng.normal(0, 0.25))  # per-image mass-to-pixels factor: no exact colour -> mass map

    def count(grams: float, per_gram: float) -> int:
        return min(int(rng.poisson(grams * per_gram * area * density * np.exp(rng.normal(0, 0.1)))), 60000)

    height = float(np.clip(row["Height_Ave_cm"], 1, 40))
    blade_len = view_h * (0.03 + 0.012 * height**0.7)  # taller sward -> longer blades, fewer per gram
    wide = species_group(row["Species"]) in ("fescue", "phalaris", "lucerne")
    thick = max(1, round(view_h * (0.005 if wide else 0.0035)))
    n_green = count(row["Dry_Green_g"], 90 * (0.067 * view_h) / blade_len)
    n_dead, n_clover = count(row["Dry_Dead_g"], 120), count(row["Dry_Clover_g"], 45)

    dead = _blades(rng, n_dead, h, w, view_h * 0.04, 1.0)
    dead_pal = _palette(rng, [165, 135, 70], [215, 180, 110])  # straw: lighter and yellower than soil
    green = _blades(rng, n_green, h, w, blade_len, 0.35)
    green_pal = _palette(rng, [55, 110, 25], [110, 165, 60])  # yellowish grass green
    clover_pal = _palette(rng, [30, 85, 45], [70, 135, 85])  # darker blue-green
    size_class = rng.integers(0, 3, n_clover)  # three leaf sizes, one disc thickness each
    r = view_h * np.array(LEAF_R)[size_class]
    centre = rng.uniform([0, 0], [w, h], (n_clover, 2))
    phi = rng.uniform(0, 2 * np.pi, n_clover)[:, None] + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    leaflets = centre[:, None, :] + 0.9 * r[:, None, None] * np.stack([np.cos(phi), np.sin(phi)], -1)
    leaflets = leaflets.round().astype(np.int32).reshape(-1, 1, 2).repeat(2, 1)  # zero-length line = disc
    leaf_class, part_of = np.repeat(size_class, 3), np.repeat(np.arange(n_clover) % 3, 3)

    cut = int(0.7 * n_dead)
    _draw(img, dead[:cut], dead_pal, max(1, round(view_h * 0.005)), rng)  # litter under the canopy
    for part in range(3):  # interleave clover and grass so each occludes the other
        for c, rc in enumerate(LEAF_R):
            sel = (leaf_class == c) & (part_of == part)
            _draw(img, leaflets[sel], clover_pal, max(1, round(2 * rc * view_h)), rng)
        _draw(img, green[part::3], green_pal, thick, rng)
    _draw(img, dead[cut:], dead_pal, max(1, round(view_h * 0.004)), rng)  # standing dead on top


def _frame(img: np.ndarray, rng: np.random.Generator, margin: int) -> None:
    """Cardboard or quadrat-frame strips at the bottom and/or the sides, in the scene (both views see them)."""
    h, w = img.shape[:2]
    colour = rng.choice([np.array([205.0, 190, 155]), np.array([160.0, 160, 155])]) * rng.uniform(0.85, 1.05)
    mask = np.zeros((h, w), bool)
    if rng.random() < 0.7:
        mask[h - margin - int(h * rng.uniform(0.03, 0.09)) :] = True
    side = margin + int(w * rng.uniform(0.02, 0.06))
    where = rng.choice(["none", "left", "right", "both"], p=[0.5, 0.15, 0.15, 0.2])
    mask[:, :side] |= where in ("left", "both")
    mask[:, w - side :] |= where in ("right", "both")
    img[mask] = np.clip(colour * (1 + 0.04 * rng.standard_normal((int(mask.sum()), 1))), 0, 255).astype(np.uint8)


def _light(view: np.ndarray, rng: np.random.Generator, gain: float, tint: np.ndarray) -> np.ndarray:
    """Global gain and tint, a linear gradient and soft cloud shadows: lighting is not biomass."""
    h, w = view.shape[:2]
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    ramp_x, ramp_y = np.linspace(-0.5, 0.5, w, dtype=np.float32), np.linspace(-0.5, 0.5, h, dtype=np.float32)
    grad = 1 + gx * ramp_x[None, :] + gy * ramp_y[:, None]
    grad = grad + 0.08 * _noise(rng, h, w, max(h // 3, 2))
    grad = grad + 0.03 * rng.standard_normal((h, w), dtype=np.float32)  # sensor noise, differs per view
    out = view.astype(np.float32) * (grad[..., None] * (gain * tint).astype(np.float32))
    return np.clip(out, 0, 255).astype(np.uint8)


def _stamp(img: np.ndarray, date: str, rng: np.random.Generator) -> Box:
    """Orange camera date stamp in the bottom-right corner; returns its box (x0, y0, x1, y1)."""
    h, w = img.shape[:2]
    y, m, d = (int(v) for v in date.split("/"))
    text, font = f"{y:04d}/{m:02d}/{d:02d}", cv2.FONT_HERSHEY_SIMPLEX
    thick = max(2, round(h / 300))
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, thick)
    scale = max(0.035 * h, 10) / th
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    x, yb = w - tw - int(0.02 * w) - int(rng.integers(0, 3)), h - base - int(0.03 * h)
    cv2.putText(img, text, (x, yb), font, scale, ORANGE, thick, cv2.LINE_AA)
    pad = thick
    return max(x - pad, 0), max(yb - th - pad, 0), min(x + tw + pad, w), min(yb + base + pad, h)


def render_image(
    labels_row, rng: np.random.Generator, size: tuple[int, int] = (2000, 1000), shift: str | None = None
) -> tuple[np.ndarray, Box | None]:
    """Render one (H, W, 3) uint8 RGB image: the same quadrat twice side by side; also the stamp box or None."""
    w, h = size
    left_w, right_w = w // 2, w - w // 2
    m = max(2, round(0.04 * w))  # room for the stereo shift
    look = _look(rng, shift)
    scene = _soil(rng, h + 2 * m, right_w + 2 * m, look["soil"])
    _vegetation(scene, labels_row, rng, h)
    if rng.random() < FRAME_SHARE:
        _frame(scene, rng, m)
    dx, dy = int(rng.integers(max(1, m // 4), m + 1)), int(rng.integers(-(m // 4), m // 4 + 1))
    left = _light(scene[m : m + h, m : m + left_w], rng, look["gain"], look["tint"])
    change = rng.uniform(0.8, 1.2) * rng.uniform(0.96, 1.04, 3)  # second view: other exposure and white balance
    right = _light(scene[m + dy : m + dy + h, m - dx : m - dx + right_w], rng, look["gain"], look["tint"] * change)
    img = np.ascontiguousarray(np.concatenate([left, right], 1))
    box = _stamp(img, str(labels_row["Sampling_Date"]), rng) if rng.random() < STAMP_SHARE else None
    return img, box


# ---- dataset ----
def to_long(wide: pd.DataFrame, split: str) -> pd.DataFrame:
    """Wide labels -> the competition's long format, rows sorted by sample_id as in the real file."""
    long = wide.melt(list(WIDE_COLUMNS[:6]), list(TARGETS), var_name="target_name", value_name="target")
    long["sample_id"] = long["image_id"] + "__" + long["target_name"]
    long["image_path"] = f"{split}/" + long["image_id"] + ".jpg"
    return long.sort_values("sample_id", ignore_index=True)[list(TRAIN_COLUMNS)]


def _render_job(job: tuple) -> tuple[str, Box | None]:
    index, row, path, seed, size, shift = job
    img, box = render_image(row, np.random.default_rng([seed, 1, index]), size, shift)  # seed per image
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise BiomassError(f"{path}: JPEG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return path, box


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool is the parallelism; nested threads only oversubscribe


def generate(out_dir, n_train: int, n_test: int, seed: int = 0, size: tuple[int, int] = (2000, 1000),
             shift: str | None = None, workers: int = 2, overwrite: bool = False) -> Path:  # fmt: skip
    """Write a competition-layout dataset (CSVs, JPEGs, test_labels.csv, stamps.csv) to out_dir; return it."""
    out = Path(out_dir)
    if shift not in (None, *SHIFTS):
        raise BiomassError(f"shift={shift!r}: unknown; use one of {SHIFTS} or none")
    if n_train < 1 or n_test < 0 or size[0] < 64 or size[1] < 32:
        raise BiomassError(f"n_train={n_train}, n_test={n_test}, size={size}: need n_train >= 1, n_test >= 0, 64x32+")
    if (out / "train.csv").exists() and not overwrite:
        raise BiomassError(f"{out}/train.csv exists; choose an empty directory or pass --overwrite")
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in (out / split).glob("*.jpg") if overwrite else ():
            old.unlink()  # stale images of a bigger earlier run would otherwise look like data
    wide = sample_labels(n_train + n_test, np.random.default_rng([seed, 0]))
    splits = {"train": wide.iloc[:n_train].reset_index(drop=True), "test": wide.iloc[n_train:].reset_index(drop=True)}
    jobs = [
        (i, row, str(out / split / f"{row['image_id']}.jpg"), seed, tuple(size), shift if split == "test" else None)
        for i, (split, row) in enumerate((s, r) for s, f in splits.items() for r in f.to_dict("records"))
    ]
    workers = max(1, min(workers, os.cpu_count() or 1, len(jobs)))
    bar = dict(total=len(jobs), desc="synthetic images", unit="img")
    if workers == 1:
        results = [_render_job(j) for j in progress(jobs, **bar)]
    else:  # spawn: forking a process that already holds torch threads can deadlock
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            results = list(progress(pool.imap(_render_job, jobs, chunksize=1), **bar))
    stamps = sorted((os.path.relpath(p, out), *box) for p, box in results if box is not None)
    write_csv_atomic(pd.DataFrame(stamps, columns=["image_path", "x0", "y0", "x1", "y1"]), out / "stamps.csv")
    train, test = to_long(splits["train"], "train"), to_long(splits["test"], "test")
    write_csv_atomic(test, out / "test_labels.csv")
    write_csv_atomic(test[list(TEST_COLUMNS)], out / "test.csv")
    write_csv_atomic(test[["sample_id"]].assign(target=0.0), out / "sample_submission.csv")
    write_csv_atomic(train, out / "train.csv")  # last: its presence marks a complete dataset
    return out


# ---- synthetic vs real statistics ----
def label_stats(long: pd.DataFrame) -> dict[str, str]:
    """Summary statistics of a long-format label frame, formatted for a markdown table."""
    missing = set(TRAIN_COLUMNS) - set(long.columns)
    if missing:
        raise BiomassError(f"label file lacks columns {sorted(missing)}; expected {list(TRAIN_COLUMNS)}")
    wide = long.pivot_table(index=list(TRAIN_COLUMNS[1:7]), columns="target_name", values="target").reset_index()
    stats = {"images": f"{len(wide)}"}
    for t in TARGETS:
        x = wide[t]
        stats[f"{t} mean / std / max"] = f"{x.mean():.1f} / {x.std():.1f} / {x.max():.1f}"
        stats[f"{t} share == 0"] = f"{(x == 0).mean():.3f}"
    for s in STATES:
        stats[f"images in {s}"] = f"{(wide['State'] == s).sum()}"
    months = wide["Sampling_Date"].str.split("/").str[1]
    stats["species / dates / months / date x state groups"] = (
        f"{wide['Species'].nunique()} / {wide['Sampling_Date'].nunique()} / {months.nunique()} / "
        f"{len(wide.groupby(['Sampling_Date', 'State']))}"
    )
    stats["height mean / std; NDVI mean / std"] = (
        f"{wide['Height_Ave_cm'].mean():.1f} / {wide['Height_Ave_cm'].std():.1f}; "
        f"{wide['Pre_GSHH_NDVI'].mean():.2f} / {wide['Pre_GSHH_NDVI'].std():.2f}"
    )
    stats["corr(Total, height)"] = f"{wide['Dry_Total_g'].corr(wide['Height_Ave_cm']):.2f}"
    stats["corr(Total, NDVI)"] = f"{wide['Dry_Total_g'].corr(wide['Pre_GSHH_NDVI']):.2f}"
    stats["corr(log Total, log height)"] = f"{np.log(wide['Dry_Total_g']).corr(np.log(wide['Height_Ave_cm'])):.2f}"
    return stats


def compare_stats(synthetic: str | os.PathLike, real: str | os.PathLike | None = None) -> str:
    """Markdown table of synthetic (and, when given, real) label statistics side by side."""
    paths = {"synthetic": Path(synthetic), **({"real": Path(real)} if real is not None else {})}
    for name, p in paths.items():
        if not p.is_file():
            raise BiomassError(f"{p}: {name} label file not found; pass the path of a train.csv")
    cols = {name: label_stats(pd.read_csv(p)) for name, p in paths.items()}
    lines = ["| statistic | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(c[k] for c in cols.values()) + " |" for k in cols["synthetic"]]
    if real is None:
        lines.insert(0, "real label file: not given (--real PATH absent); showing synthetic statistics only\n")
    return "\n".join(lines)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WxH, e.g. 1000x500") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    """CLI: generate a dataset, or `stats` to compare label statistics with the real file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stats"]:
        p = argparse.ArgumentParser(prog="python -m src.synthetic stats", description=compare_stats.__doc__)
        p.add_argument("--synthetic", required=True, help="synthetic train.csv")
        p.add_argument("--real", default=None, help="real train.csv (optional)")
        p.add_argument("--out", default=None, help="also write the table to this markdown file")
        a = p.parse_args(argv[1:])
        table = compare_stats(a.synthetic, a.real)
        print(table)
        if a.out:
            write_text_atomic(a.out, table + "\n")
        return 0
    p = argparse.ArgumentParser(prog="python -m src.synthetic", description=generate.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, required=True)
    p.add_argument("--n-test", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_parse_size, default=(2000, 1000), help="WxH, default 2000x1000")
    p.add_argument("--shift", choices=SHIFTS, default=None, help="render the test images under a domain shift")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = generate(a.out, a.n_train, a.n_test, a.seed, a.size, a.shift, a.workers, a.overwrite)
    print(f"wrote {a.n_train} train + {a.n_test} test images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
