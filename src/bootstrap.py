"""Is one experiment better than another? The paired bootstrap of an OOF metric difference, resampling images.

The competition metric is one weighted R² over all (image, target) rows, so it is not a mean of per-image
scores: each bootstrap draw recomputes it from scratch. It only needs four sums per image (weighted squared
error, weighted y², weighted y, weight), so a draw is a dot product of image counts with those sums, exactly
the metric of the resampled rows (an image drawn twice counts twice). Both experiments get the same draw of
images (paired): what differs between them is the model, not the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from src.schema import TARGET_WEIGHTS

VERDICTS = ("better", "worse", "can't tell")


def image_terms(truth: np.ndarray, pred: np.ndarray, image_index: np.ndarray | None = None, n_images=None):
    """(n_images, 4) sums per image of w (y - p)², w y², w y and w over its rows and targets.

    `truth`, `pred`: (rows, 5) in TARGETS order. `image_index[r]` is the image of row r (default: one row per
    image); an experiment with several rows per image (one per grid) sums them, as pooling the rows would.
    """
    truth = np.asarray(truth, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    w = np.asarray(TARGET_WEIGHTS, dtype=np.float64)
    per_row = np.stack(
        [(w * (truth - pred) ** 2).sum(1), (w * truth**2).sum(1), (w * truth).sum(1), np.full(len(truth), w.sum())],
        axis=1,
    )
    if image_index is None:
        return per_row
    n = int(n_images if n_images is not None else np.max(image_index) + 1)
    out = np.zeros((n, 4))
    np.add.at(out, np.asarray(image_index), per_row)
    return out


def r2_from_terms(terms: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The weighted R² of each resample: `terms` (N, 4), `counts` (B, N) how often each image is drawn -> (B,)."""
    counts = np.atleast_2d(counts).astype(np.float64)
    sse, swy2, swy, sw = (counts @ terms[:, k] for k in range(4))
    sst = swy2 - swy**2 / sw
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / sst, 0.0)


@dataclass(frozen=True)
class Interval:
    """A paired difference (a - b) of seed-mean OOF metrics and its bootstrap percentile interval."""

    delta: float
    low: float
    high: float
    draws: int
    level: float

    @property
    def verdict(self) -> str:
        """better / worse when the interval excludes 0, else can't tell."""
        if self.low > 0:
            return VERDICTS[0]
        if self.high < 0:
            return VERDICTS[1]
        return VERDICTS[2]


def paired_bootstrap(
    terms_a: np.ndarray,
    terms_b: np.ndarray,
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    resample_seeds: bool = True,
) -> Interval:
    """Difference of mean-over-seeds weighted R² of a and b over the same images, with a bootstrap interval.

    `terms_a` (Sa, N, 4) and `terms_b` (Sb, N, 4): `image_terms` of each seed's OOF predictions, the same N
    images in the same order. Each draw resamples the N images with replacement (the same draw for a and b);
    with `resample_seeds`, each experiment's seeds are resampled too, so the interval also carries how much a
    reseed moves the score (with one seed it cannot).
    """
    terms_a, terms_b = np.asarray(terms_a, np.float64), np.asarray(terms_b, np.float64)
    if terms_a.ndim == 2:
        terms_a = terms_a[None]
    if terms_b.ndim == 2:
        terms_b = terms_b[None]
    if terms_a.shape[1:] != terms_b.shape[1:] or terms_a.shape[2] != 4:
        raise ValueError(f"terms of the same images expected, got {terms_a.shape} and {terms_b.shape}")
    n = terms_a.shape[1]
    ones = np.ones((1, n))
    delta = float(
        np.mean([r2_from_terms(t, ones)[0] for t in terms_a]) - np.mean([r2_from_terms(t, ones)[0] for t in terms_b])
    )
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=draws)
    per_seed_a = np.stack([r2_from_terms(t, counts) for t in terms_a], axis=1)  # (draws, Sa)
    per_seed_b = np.stack([r2_from_terms(t, counts) for t in terms_b], axis=1)

    def seed_mean(per_seed: np.ndarray) -> np.ndarray:
        if not resample_seeds or per_seed.shape[1] == 1:
            return per_seed.mean(axis=1)
        pick = rng.integers(per_seed.shape[1], size=per_seed.shape)
        return np.take_along_axis(per_seed, pick, axis=1).mean(axis=1)

    diffs = seed_mean(per_seed_a) - seed_mean(per_seed_b)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return Interval(delta, float(low), float(high), int(draws), float(level))
