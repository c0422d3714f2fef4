"""Physics post-processing: the projection is exact, lands on the identities and never hurts; the seed rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import nnls

from src.data import long_to_wide, read_csv_checked, validate_train
from src.errors import BiomassError
from src.metric import weighted_r2
from src.postprocess import COMPONENTS, MODES, apply_physics, physics_gap, project_physics, seed_physics
from src.schema import TARGET_WEIGHTS, TARGETS, TRAIN_COLUMNS
from src.synthetic import sample_labels

W = np.asarray(TARGET_WEIGHTS)
N_DRAWS = 50


def _wsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, the metric's weighted squared error."""
    return np.sum(W * (a - b) ** 2, axis=1)


def _noisy(rng: np.random.Generator, n: int = 200, scale: float = 60.0) -> np.ndarray:
    """Predictions anywhere, including negative parts and broken identities."""
    return rng.normal(0, scale, (n, 5)) + rng.uniform(0, 40, (n, 1))


@pytest.fixture(scope="module", params=["real", "synthetic"])
def labels(request) -> tuple[str, np.ndarray]:
    """The real label matrix (skipped when the file is absent) and calibrated synthetic labels."""
    if request.param == "real":
        path = request.getfixturevalue("real_train_csv")
        frame = read_csv_checked(path, TRAIN_COLUMNS, "real label file")
        return "real train.csv", long_to_wide(validate_train(frame, path))[list(TARGETS)].to_numpy()
    return "synthetic labels", sample_labels(357, np.random.default_rng(0))[list(TARGETS)].to_numpy()


# ---- project_physics ----
def test_projection_satisfies_identities_and_is_non_negative():
    p = _noisy(np.random.default_rng(0))
    assert (p < 0).any() and physics_gap(p).min() > 1e-3  # the input breaks everything
    q = project_physics(p)
    assert q.shape == p.shape
    green, dead, clover, gdm, total = q.T
    np.testing.assert_allclose(gdm, green + clover, rtol=0, atol=1e-9)
    np.testing.assert_allclose(total, green + dead + clover, rtol=0, atol=1e-9)
    assert (q >= 0).all()
    assert physics_gap(q).max() <= 1e-9


def test_projection_keeps_label_vectors(labels):
    _, y = labels
    synthetic = sample_labels(300, np.random.default_rng(1))[list(TARGETS)].to_numpy()
    # the synthetic generator builds GDM and Total from the parts, so every row lies on the constraint set
    assert physics_gap(synthetic).max() < 1e-9
    np.testing.assert_allclose(project_physics(synthetic), synthetic, rtol=0, atol=1e-9)
    # real labels keep the identities to 0.01 g (one image to 0.31 g): they move by at most that much
    on_set = physics_gap(y) < 1e-9
    np.testing.assert_allclose(project_physics(y[on_set]), y[on_set], rtol=0, atol=1e-9)
    assert np.abs(project_physics(y) - y).max() <= 0.35


def test_projection_is_idempotent():
    q = project_physics(_noisy(np.random.default_rng(2)))
    np.testing.assert_allclose(project_physics(q), q, rtol=0, atol=1e-9)


def test_projection_matches_brute_force_nnls():
    rng = np.random.default_rng(3)
    p = np.concatenate([_noisy(rng, 300), np.zeros((1, 5)), -np.ones((1, 5)), [[10, 0, 0, 50, 5]], [[0, 0, 0, 0, 30]]])
    q = project_physics(p)
    sqrt_w = np.sqrt(W)
    for i, row in enumerate(p):
        x, _ = nnls(sqrt_w[:, None] * COMPONENTS, sqrt_w * row)  # min ||W^1/2 (A x - p)||, x >= 0
        best = COMPONENTS @ x
        assert _wsq(q[i : i + 1], row[None]) <= _wsq(best[None], row[None]) + 1e-9, i
        np.testing.assert_allclose(q[i], best, rtol=0, atol=1e-6, err_msg=f"row {i}: {row}")


def test_projection_hand_cases():
    # already consistent: unchanged
    np.testing.assert_allclose(project_physics([[10, 5, 2, 12, 17]]), [[10, 5, 2, 12, 17]], atol=1e-12)
    # everything negative: the nearest point of the cone is 0
    np.testing.assert_allclose(project_physics([[-1, -2, -3, -4, -5]]), np.zeros((1, 5)), atol=1e-12)
    # only Total = 30 predicted. By symmetry green = clover = s, dead = d; with r = 2s + d - 30 the cost is
    # 0.1 s^2 + 0.1 d^2 + 0.1 s^2 + 0.2 (2s)^2 + 0.5 r^2 = s^2 + 0.1 d^2 + 0.5 r^2.
    # d/ds: 2s + 2r = 0 -> s = -r;  d/dd: 0.2 d + r = 0 -> d = -5r;  r = -2r - 5r - 30 -> r = -3.75.
    # s = 3.75, d = 18.75: (3.75, 18.75, 3.75, GDM 7.5, Total 26.25), cost 56.25 (dead alone: 75)
    q = project_physics([[0, 0, 0, 0, 30]])
    np.testing.assert_allclose(q, [[3.75, 18.75, 3.75, 7.5, 26.25]], atol=1e-9)
    assert _wsq(q, np.array([[0, 0, 0, 0, 30.0]])) == pytest.approx(56.25)


def test_projection_never_hurts(labels):
    name, y = labels
    rng = np.random.default_rng(0)
    upper = y.max(axis=0)
    # how far each truth row is from the constraint set (0 for consistent labels), in the metric's norm
    off_set = np.sqrt(_wsq(project_physics(y), y))
    before, after, seeded, clipped = [], [], [], []
    for _ in range(N_DRAWS):
        sigma = rng.uniform(0.1, 0.6)
        p = y * np.exp(sigma * rng.standard_normal(y.shape)) + rng.normal(0, 0.3 * y.std(axis=0), y.shape)
        p = np.clip(p, 0, None)
        q = project_physics(p)
        e_p, e_q = _wsq(p, y), _wsq(q, y)
        # per image: never worse for a consistent truth; otherwise no worse than the truth's own distance
        # (projection is non-expansive: |P(p) - y| <= |P(p) - P(y)| + |P(y) - y| <= |p - y| + |P(y) - y|)
        on = off_set < 1e-9
        assert np.all(e_q[on] <= e_p[on] + 1e-9)
        assert np.all(np.sqrt(e_q) <= np.sqrt(e_p) + off_set + 1e-9)
        r_p, r_q = weighted_r2(y, p), weighted_r2(y, q)
        assert r_q >= r_p
        before.append(r_p)
        after.append(r_q)
        seeded.append(weighted_r2(y, seed_physics(p, upper)))
        # the box [0, upper] holds every truth too, so clipping first and projecting after also never hurts
        clipped.append(weighted_r2(y, project_physics(np.clip(p, 0, upper))))
        assert clipped[-1] >= r_p
    before, after, seeded, clipped = map(np.asarray, (before, after, seeded, clipped))
    print(
        f"\n{name}, {N_DRAWS} noise draws: weighted R2 none {before.mean():.4f}, seed {seeded.mean():.4f}, "
        f"project {after.mean():.4f}, clip to max + project {clipped.mean():.4f}; "
        f"project - seed = {np.mean(after - seeded):+.4f} (min {np.min(after - seeded):+.4f}, "
        f"seed better in {np.sum(seeded > after)} draws), project - none = {np.mean(after - before):+.4f}"
    )
    assert np.mean(after - before) > 0.01  # it does something, not just "no harm"


# ---- seed_physics ----
def test_seed_physics_replaces_dead_only_beyond_the_tolerance():
    #          green dead clover gdm total     relative gap |total - (g + d + c)| / total
    rows = np.array(
        [
            [10.0, 5.0, 5.0, 15.0, 20.0],  # 0: consistent -> unchanged
            [10.0, 7.9, 5.0, 15.0, 20.0],  # 2.9 / 20 = 0.145 -> unchanged
            [10.0, 8.2, 5.0, 15.0, 20.0],  # 3.2 / 20 = 0.160 -> dead = 20 - 15 = 5
            [10.0, 1.0, 5.0, 15.0, 20.0],  # 4.0 / 20 = 0.200 (too little) -> dead = 5
            [10.0, 10.0, 5.0, 15.0, 12.0],  # 13 / 12 -> dead = relu(12 - 15) = 0
            [10.0, 3.0, 5.0, 12.0, 40.0],  # 22 / 40 -> dead = 40 - 12 = 28 (GDM, not green + clover)
        ]
    )
    out = seed_physics(rows)
    np.testing.assert_allclose(out[:, 1], [5.0, 7.9, 5.0, 5.0, 0.0, 28.0])
    np.testing.assert_array_equal(np.delete(out, 1, axis=1), np.delete(rows, 1, axis=1))  # other targets kept
    assert rows[1, 1] == 7.9  # the input is not modified in place


def test_seed_physics_clamps_to_zero_and_upper():
    rows = np.array([[-3.0, 2.0, 1.0, 1.0, 3.0], [300.0, 0.0, 0.0, 300.0, 300.0]])
    upper = np.array([150.0, 90.0, 70.0, 160.0, 180.0])
    out = seed_physics(rows, upper)
    np.testing.assert_allclose(out[0], [0.0, 2.0, 1.0, 1.0, 3.0])
    np.testing.assert_allclose(out[1], [150.0, 0.0, 0.0, 160.0, 180.0])
    assert seed_physics(rows)[1, 0] == 300.0  # no upper: clamped below only


def test_apply_physics_dispatch():
    p = np.array([[-1.0, 2.0, 3.0, 9.0, 40.0]])
    np.testing.assert_array_equal(apply_physics(p, "none"), [[0.0, 2.0, 3.0, 9.0, 40.0]])
    np.testing.assert_allclose(apply_physics(p, "seed"), seed_physics(p))
    np.testing.assert_allclose(apply_physics(p, "project"), project_physics(p))
    assert MODES == ("none", "seed", "project")
    with pytest.raises(BiomassError, match="unknown --physics 'projected'; choose one of none, seed, project"):
        apply_physics(p, "projected")
