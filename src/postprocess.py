"""Physics post-processing: make the five predictions agree with how the labels are built.

Labels satisfy GDM = Green + Clover and Total = Green + Dead + Clover (to 0.01 g), all >= 0.
"""

from __future__ import annotations

import itertools

import numpy as np

from src.config import PHYSICS_CHOICES
from src.errors import BiomassError
from src.schema import STATES, TARGET_WEIGHTS, TARGETS

MODES = PHYSICS_CHOICES  # --physics: the config owns the names, this module what they do

# y = A @ (green, dead, clover): the five targets as a linear map of the three components
COMPONENTS = np.array(
    [
        [1.0, 0.0, 0.0],  # Green
        [0.0, 1.0, 0.0],  # Dead
        [0.0, 0.0, 1.0],  # Clover
        [1.0, 0.0, 1.0],  # GDM
        [1.0, 1.0, 1.0],  # Total
    ]
)


def seed_physics(pred: np.ndarray, upper: np.ndarray | None = None, tolerance: float = 0.15) -> np.ndarray:
    """The seed design: where Total disagrees with the sum of parts by > tolerance (relative), take
    Dead = relu(Total - GDM); then clamp every target to [0, upper] (upper: training maxima).

    A row with a NaN or inf comes back all NaN (a clamp would turn +inf into the training maximum)."""
    out = np.array(pred, dtype=np.float64, copy=True)
    broken = ~np.isfinite(out).all(axis=1)
    green, dead, clover, gdm, total = out.T
    with np.errstate(invalid="ignore"):  # NaN/inf rows: overwritten below
        derived_dead = np.maximum(total - gdm, 0.0)
        gap = np.abs(total - (green + dead + clover)) / np.maximum(total, 1e-6)
        out[:, 1] = np.where(gap > tolerance, derived_dead, dead)
    out = np.clip(out, 0.0, None if upper is None else np.asarray(upper, dtype=np.float64))
    out[broken] = np.nan
    return out


def project_physics(pred: np.ndarray, weights=TARGET_WEIGHTS) -> np.ndarray:
    """Project each prediction onto K = {A x : x = (green, dead, clover) >= 0} in the metric's norm.

    Why it never hurts: K is a closed convex set and every true label vector y lies in K. For the
    projection P in the norm ||v||_W^2 = sum_j w_j v_j^2, the obtuse-angle property
    <p - P(p), y - P(p)>_W <= 0 gives ||P(p) - y||_W^2 = ||p - y||_W^2 - ||p - P(p)||_W^2
    + 2 <p - P(p), P(p) - y>_W <= ||p - y||_W^2. Summed over images, the metric's weighted squared
    error cannot grow, and its denominator depends on the truth only: the weighted R^2 cannot drop.

    Solved exactly per image as a 3-variable non-negative least squares: the optimum is the
    unconstrained weighted least-squares solution on its support, so we try all 8 supports
    (vectorised over images) and keep the best feasible one.

    A row with a NaN or inf comes back all NaN: no support of such a row is ever "better", and mapping it to
    the all-zero vector would hide a broken model behind a plausible number (the guard refuses NaN).
    """
    p = np.asarray(pred, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    broken = ~np.isfinite(p).all(axis=1)
    p = np.where(broken[:, None], 0.0, p)  # solved on zeros, then overwritten: no NaN warnings from the algebra
    best = np.zeros((len(p), 3))
    best_cost = np.full(len(p), np.inf)
    for support in itertools.chain.from_iterable(itertools.combinations(range(3), k) for k in range(4)):
        x = np.zeros((len(p), 3))
        if support:
            a = COMPONENTS[:, list(support)]  # (5, s)
            gram = a.T @ (w[:, None] * a)  # (s, s)
            rhs = (p * w) @ a  # (N, s)
            x[:, list(support)] = np.linalg.solve(gram, rhs.T).T
        feasible = np.all(x >= -1e-12, axis=1)
        cost = np.sum(w * (x @ COMPONENTS.T - p) ** 2, axis=1)
        better = feasible & (cost < best_cost - 1e-15)
        best[better], best_cost[better] = x[better], cost[better]
    out = np.clip(best, 0.0, None) @ COMPONENTS.T
    out[broken] = np.nan
    return out


def apply_physics(pred: np.ndarray, mode: str, upper: np.ndarray | None = None) -> np.ndarray:
    """Dispatch by mode name: none (clamp at 0 only), seed, project. Rows with a NaN or inf stay NaN in every mode."""
    if mode == "none":
        pred = np.asarray(pred, dtype=np.float64)
        out = np.clip(pred, 0.0, None)
        out[~np.isfinite(pred).all(axis=1)] = np.nan  # -inf would clip to a plausible 0
        return out
    if mode == "seed":
        return seed_physics(pred, upper)
    if mode == "project":
        return project_physics(pred)
    raise BiomassError(f"unknown --physics {mode!r}; choose one of {', '.join(MODES)}")


def physics_gap(pred: np.ndarray) -> np.ndarray:
    """Per image, the largest absolute violation of the two identities (grams)."""
    p = np.asarray(pred, dtype=np.float64)
    return np.maximum(np.abs(p[:, 3] - p[:, 0] - p[:, 2]), np.abs(p[:, 4] - p[:, 0] - p[:, 1] - p[:, 2]))


def structural_zeros(pred: np.ndarray, p_state: np.ndarray) -> np.ndarray:
    """Dead x (1 - p(WA)) and Clover x (1 - p(NSW)): the expected value when WA images have no dead matter and NSW
    images no clover (real labels: 32 of 32 WA Dead = 0, 74 of 75 NSW Clover = 0), given the State head's
    probabilities (N, 4) in `STATES` order. Only those two parts move; apply the physics projection after it."""
    out = np.array(pred, dtype=np.float64, copy=True)
    p = np.asarray(p_state, dtype=np.float64)
    out[:, TARGETS.index("Dry_Dead_g")] *= 1.0 - p[:, STATES.index("WA")]
    out[:, TARGETS.index("Dry_Clover_g")] *= 1.0 - p[:, STATES.index("NSW")]
    return out
