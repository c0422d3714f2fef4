"""Frozen-feature heads (ridge / kernel ridge / boosting), their embeddings, the OOF blend (issue 20)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler

from infer import main as infer_main
from src.blend import fit_blend, load_members, nested_oof, read_blend, write_blend
from src.checkpoint import find_checkpoints
from src.colour import colour_features, colour_table, feature_names
from src.config import PRESETS, Config, DataConfig
from src.data import load_test, load_train
from src.dataset import image_dataset
from src.embeddings import backbone_embeddings, cache_dir
from src.errors import BiomassError
from src.folds import load_fold_table, make_folds, save_folds
from src.heads import ALPHAS, fit_head, fit_ridge, load_head, save_head, to_fit_space, to_grams
from src.inference import Predictor, load_predictors, predict_ensemble, upper_bounds
from src.metric import score
from src.postprocess import apply_physics, structural_zeros
from src.report import default_setting_row, load_runs, run_compare
from src.schema import TARGETS
from tests.conftest import TINY_FLAGS
from train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")


def _xy(n=60, f=6, k=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * rng.uniform(0.5, 20, size=f) + rng.normal(size=f) * 5
    y = np.stack([x[:, 0] * 0.3 - x[:, 1] * 0.05 + rng.normal(size=n), x[:, 2] * 0.1 + rng.normal(size=n) * 3], 1)
    return x, y[:, :k]


def test_ridge_head_equals_sklearn_ridge_with_the_alpha_a_hand_inner_cv_picks():
    x, y = _xy()
    head = fit_ridge(x, y, seed=3)
    z = StandardScaler().fit_transform(x)
    for j in range(y.shape[1]):
        errors = []
        for alpha in ALPHAS:  # the inner CV by hand: same 5 folds of the training rows, sklearn's Ridge
            err = 0.0
            for tr, te in KFold(5, shuffle=True, random_state=3).split(z):
                err += ((Ridge(alpha=alpha).fit(z[tr], y[tr, j]).predict(z[te]) - y[te, j]) ** 2).sum()
            errors.append(err)
        alpha = ALPHAS[int(np.argmin(errors))]
        assert head.meta["alphas"][j] == pytest.approx(alpha)
        ref = Ridge(alpha=alpha).fit(z, y[:, j])
        np.testing.assert_allclose(head.arrays["coef"][j], ref.coef_, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(head.predict(x)[:, j], ref.predict(z), rtol=1e-7, atol=1e-9)
    assert len(set(head.meta["alphas"])) == 2  # one alpha per target (target 1 is mostly noise: more shrinkage)


def test_boosting_head_saved_trees_predict_like_sklearn_and_load_without_pickle(tmp_path):
    x, y = _xy(80)
    x[3, 1] = np.nan  # missing values follow sklearn's missing_go_to_left
    head = fit_head("hgb", x, y, seed=0, hgb_max_iter=25)
    z = (x - head.arrays["mean"]) / head.arrays["scale"]
    for j in range(2):
        ref = HistGradientBoostingRegressor(
            max_iter=25, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=5, early_stopping=False, random_state=0
        ).fit(z, y[:, j])
        np.testing.assert_allclose(head.predict(x)[:, j], ref.predict(z), rtol=1e-10, atol=1e-10)
    head.meta |= {"layout": "five", "space": "raw"}
    save_head(head, tmp_path)
    again = load_head(tmp_path)
    np.testing.assert_array_equal(again.predict(x), head.predict(x))
    np.savez(tmp_path / "head.npz", mean=np.array([object()], dtype=object))  # a pickled payload
    with pytest.raises(BiomassError, match="pickled head file"):
        load_head(tmp_path)


def test_kernel_ridge_head_fits_a_nonlinear_target_better_than_ridge():
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, size=(120, 2))
    y = np.sin(2 * x[:, :1]) + 0.05 * rng.normal(size=(120, 1))
    xt = rng.uniform(-2, 2, size=(200, 2))
    yt = np.sin(2 * xt[:, :1])
    err = {k: ((fit_head(k, x, y).predict(xt) - yt) ** 2).mean() for k in ("ridge", "kernel-ridge")}
    assert err["kernel-ridge"] < 0.2 * err["ridge"]


def test_three_part_layouts_derive_gdm_and_total_exactly():
    grams = np.array([[10.0, 5.0, 2.0, 12.0, 17.0], [0.0, 1.0, 3.0, 3.0, 4.0]])
    for layout in ("green-dead-clover", "clover-gdm-total"):
        for space in ("log1p", "raw"):
            y = to_fit_space(grams, layout, space)
            assert y.shape == (2, 3)
            out = to_grams(y, layout, space, y.min(axis=0), y.max(axis=0))
            np.testing.assert_allclose(out, grams, atol=1e-9)
    low = np.zeros(3)
    out = to_grams(np.array([[1e9, -5.0, 2.0]]), "green-dead-clover", "raw", low, np.full(3, 50.0))
    np.testing.assert_allclose(out, [[50.0, 0.0, 2.0, 52.0, 52.0]])  # clamped to the training range, parts >= 0


def test_vegetation_features_by_hand_and_tiles():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = (60, 140, 40)  # green left view
    image[:10, 20:] = (190, 160, 90)  # straw top half of the right view
    image[10:, 20:] = (60, 140, 40)
    f = colour_features(image, grid=(2, 1), vegetation=True)
    assert list(f) == list(feature_names((2, 1), vegetation=True))
    r, g, b = np.array([60, 140, 40]) / 240
    assert f["left_exg"] == pytest.approx(2 * g - r - b) and f["left_exr"] == pytest.approx(1.4 * r - g)
    assert f["left_exgr_cover"] == 1.0 and f["right_exgr_cover"] == 0.5
    assert f["right_t00_straw_frac"] == 1.0 and f["right_t10_green_frac"] == 1.0 and f["left_t10_green_frac"] == 1.0
    cive = (0.441 * 60 - 0.811 * 140 + 0.385 * 40 + 18.78745) / 255
    assert f["left_cive"] == pytest.approx(cive)
    assert sum(f[f"image_sat{k}"] for k in range(8)) == pytest.approx(1.0)
    # the peer baseline's classic set is unchanged by default
    assert list(colour_features(image)) == list(feature_names())


def _train_head(synthetic_dir, folds_csv, out, exp, *extra):
    args = ["--fold", "all", "--data-dir", str(synthetic_dir), "--folds", str(folds_csv), "--out-dir", str(out)]
    assert train_main([*args, "--exp", exp, "--quiet", *TINY_FLAGS, *extra]) == 0
    return out / exp


@pytest.fixture(scope="module")
def head_exps(synthetic_dir, folds_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    cache = str(out / "cache")
    colour = _train_head(synthetic_dir, folds_csv, out, "colour", "--regressor", "ridge", "--features", "colour")
    emb = _train_head(
        synthetic_dir, folds_csv, out, "emb", "--regressor", "kernel-ridge", "--features", "backbone",
        "--embed-cache", cache, "--heads", "green-dead-clover",
    )  # fmt: skip
    return out, colour, emb


def test_head_experiment_writes_the_run_layout_that_report_and_compare_read(head_exps, synthetic_dir, folds_csv):
    out, colour, emb = head_exps
    runs = load_runs(colour)
    assert [r.fold for r in runs] == [0, 1, 2] and all(r.oof is not None for r in runs)
    table = load_fold_table(DataConfig(data_dir=str(synthetic_dir), folds=str(folds_csv)))
    for r in runs:
        head = load_head(r.path)
        assert head.kind == "ridge" and head.meta["fold"] == r.fold
        held = table[table["fold"] == r.fold]
        assert sorted(r.oof["image_id"]) == sorted(held["image_id"])
        truth = r.oof[[f"true_{t}" for t in TARGETS]].to_numpy()
        metrics = pd.read_csv(r.path / "metrics.csv")
        assert metrics.loc[0, "weighted_r2"] == pytest.approx(
            score(truth, r.oof[list(TARGETS)].to_numpy())["weighted_r2"]
        )
    emb_oof = pd.concat([r.oof for r in load_runs(emb)])
    np.testing.assert_allclose(emb_oof["GDM_g"], emb_oof["Dry_Green_g"] + emb_oof["Dry_Clover_g"])
    compare = run_compare([str(colour), str(emb)], out=out / "cmp")
    assert list(compare["experiment"].str.rstrip(" *")) == ["colour", "emb"]
    assert list(compare["options"]) == [
        "regressor=ridge features=colour",
        "heads=green-dead-clover regressor=kernel-ridge features=backbone",
    ]
    pooled = pd.concat([r.oof for r in runs])
    truth = pooled[[f"true_{t}" for t in TARGETS]].to_numpy()
    assert compare["weighted_r2"].iloc[0] == pytest.approx(
        score(truth, pooled[list(TARGETS)].to_numpy())["weighted_r2"]
    )


def test_embedding_cache_is_content_keyed_and_resumes(synthetic_dir, tmp_path):
    cfg = Config.from_dict({**_tiny_dict(), "head": {"embed_cache": str(tmp_path), "embed_chunk": 16}})
    frame = load_train(synthetic_dir)
    first = backbone_embeddings(frame, cfg, show=False)
    chunks = sorted(cache_dir(cfg).glob("chunk-*.npz"))
    assert first.shape == (len(frame), 2 * 2 * 64) and len(chunks) == 3  # 40 images / 16; cls_mean of embed 64
    chunks[1].unlink()  # a run killed before its second chunk: only that chunk is recomputed
    again = backbone_embeddings(frame, cfg, show=False)
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)
    assert len(list(cache_dir(cfg).glob("chunk-*.npz"))) == 3
    flips = Config.from_dict({**_tiny_dict(), "head": {"embed_cache": str(tmp_path), "embed_flips": True}})
    assert cache_dir(flips) != cache_dir(cfg)  # another key, another directory
    assert json.loads((cache_dir(cfg) / "key.json").read_text())["flips"] is False


def _tiny_dict() -> dict:
    return {k: dict(v) for k, v in PRESETS["tiny"].items()}


# ---- blending -----------------------------------------------------------------------------------------------------
def test_blend_weights_recover_a_known_mixture():
    rng = np.random.default_rng(0)
    preds = rng.gamma(2.0, 10.0, size=(200, 3, 5))
    truth = 0.7 * preds[:, 0] + 0.3 * preds[:, 2]
    fit = fit_blend(preds, truth)
    np.testing.assert_allclose(fit.weights, np.tile([0.7, 0.0, 0.3], (5, 1)), atol=1e-9)
    calibrated = fit_blend(preds, 0.8 * truth + 2.0, calibrate=True)  # a hand scaling, recovered as a line
    np.testing.assert_allclose(calibrated.weights, fit.weights, atol=1e-9)
    np.testing.assert_allclose(calibrated.calibration, np.tile([0.8, 2.0], (5, 1)), atol=1e-8)
    np.testing.assert_allclose(calibrated.apply(preds), 0.8 * truth + 2.0, atol=1e-8)


def test_nested_blend_estimate_lies_below_the_in_sample_one_on_pure_noise():
    rng = np.random.default_rng(1)
    nested, in_sample = [], []
    for _ in range(30):
        truth = rng.gamma(2.0, 10.0, size=(60, 5))
        preds = rng.gamma(2.0, 10.0, size=(60, 6, 5))  # six experiments that know nothing
        folds = np.arange(60) % 3
        in_sample.append(score(truth, fit_blend(preds, truth, True).apply(preds))["weighted_r2"])
        nested.append(score(truth, nested_oof(preds, truth, folds, True))["weighted_r2"])
    assert np.mean(nested) < np.mean(in_sample) - 0.05
    assert np.mean(in_sample) > 0 > np.mean(nested)  # in-sample flatters noise; nested does not


def test_blend_of_head_experiments_and_refusal_of_other_folds(head_exps, synthetic_dir, tmp_path):
    out, colour, emb = head_exps
    members = load_members([colour, emb])
    record = write_blend(members, tmp_path / "blend")
    paths, fit = read_blend(tmp_path / "blend")
    assert paths == [colour, emb] and (fit.weights >= 0).all()
    oof = pd.read_csv(tmp_path / "blend" / "oof_blend.csv", dtype={"image_id": str})
    truth = oof[[f"true_{t}" for t in TARGETS]].to_numpy()
    assert record["oof"]["nested_weighted_r2"] == pytest.approx(
        score(truth, oof[list(TARGETS)].to_numpy())["weighted_r2"]
    )
    # an experiment on another folds file is refused
    other = tmp_path / "folds_other.csv"
    folds = make_folds(load_train(synthetic_dir), "group_month", n_folds=3, seed=0)
    a, b = folds.index[folds["fold"] == 0][0], folds.index[folds["fold"] == 1][0]
    folds.loc[[a, b], "fold"] = [1, 0]  # two images trade folds: another partition
    save_folds(folds, other)
    moved = _train_head(synthetic_dir, other, tmp_path, "other", "--regressor", "ridge", "--features", "colour")
    with pytest.raises(BiomassError, match="other folds for the same images"):
        load_members([colour, moved])
    shutil.rmtree(moved)


# ---- inference ----------------------------------------------------------------------------------------------------
def _wide_of(sub: pd.DataFrame) -> pd.DataFrame:
    parts = sub["sample_id"].str.rsplit("__", n=1)
    return sub.assign(image_id=parts.str[0], name=parts.str[1]).pivot(
        index="image_id", columns="name", values="target"
    )[list(TARGETS)]


def test_infer_applies_a_network_plus_head_blend_like_its_parts_by_hand(
    trained_exp, synthetic_dir, folds_csv, tmp_path
):
    colour = tmp_path / "colour01"
    for fold in ("0", "1"):  # the folds the network fixture trained
        _train_head(
            synthetic_dir, folds_csv, tmp_path, "colour01", "--fold", fold, "--regressor", "ridge", "--features",
            "colour",
        )  # fmt: skip
    record = write_blend(load_members([trained_exp, colour]), tmp_path / "blend", calibrate=True)
    out = tmp_path / "sub" / "submission.csv"
    args = ["--data-dir", str(synthetic_dir), "--checkpoints", str(tmp_path / "blend"), "--out", str(out)]
    assert infer_main([*args, "--device", "cpu", "--tta", "flip", "--quiet"]) == 0
    got = _wide_of(pd.read_csv(out))
    # by hand: the network ensemble (Predictor API), the heads' mean over folds, blend.yaml's weights, physics
    images = load_test(synthetic_dir)
    predictors = load_predictors(find_checkpoints([trained_exp]), "cpu", "flip", False)
    net_upper = upper_bounds(predictors)
    network = apply_physics(predict_ensemble(predictors, images, show=False).mean("flip"), "project", net_upper)
    features = colour_table(images, (2, 2), vegetation=True, show=False)
    heads = [load_head(r.path) for r in load_runs(colour)]
    head = apply_physics(np.mean([h.predict_grams(features) for h in heads], axis=0), "project")
    expected = np.zeros_like(network)
    for j, name in enumerate(TARGETS):
        w = record["weights"][name]
        a, b = record["calibration"][name]
        expected[:, j] = np.maximum(a * (w[str(trained_exp)] * network[:, j] + w[str(colour)] * head[:, j]) + b, 0)
    upper = np.maximum(net_upper, np.max([h.meta["target_stats"]["max"] for h in heads], axis=0))
    expected = apply_physics(expected, "project", upper)
    np.testing.assert_allclose(got.loc[images["image_id"]].to_numpy(), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(expected, network, rtol=1e-3)  # the head did change the submission


# ---- structural zeros ---------------------------------------------------------------------------------------------
def test_structural_zeros_scale_dead_by_not_wa_and_clover_by_not_nsw():
    pred = np.array([[10.0, 4.0, 2.0, 12.0, 16.0], [5.0, 3.0, 1.0, 6.0, 9.0]])
    p_state = np.array([[0.0, 0.0, 0.25, 0.75], [1.0, 0.0, 0.0, 0.0]])  # STATES = Tas Vic NSW WA
    out = structural_zeros(pred, p_state)
    np.testing.assert_allclose(out[0], [10.0, 1.0, 1.5, 12.0, 16.0])
    np.testing.assert_allclose(out[1], pred[1])  # a Tas image keeps both
    assert (
        default_setting_row(
            pd.DataFrame(
                {
                    "tta": ["full"] * 2,
                    "physics": ["project"] * 2,
                    "structural_zeros": [True, False],
                    "weighted_r2": [0.9, 0.5],
                }
            )  # fmt: skip
        )["weighted_r2"]
        == 0.5
    )  # compare's default row is infer.py's default: zeros off


def test_oof_scores_structural_zeros_from_the_state_head_by_hand(trained_exp, synthetic_dir, folds_csv, tmp_path):
    exp = tmp_path / "tiny"
    for best in find_checkpoints([trained_exp]):
        run_dir = exp / best.parent.relative_to(trained_exp)
        run_dir.mkdir(parents=True)
        for name in ("best.pt", "oof.csv"):
            shutil.copy(best.parent / name, run_dir / name)
    argv = ["--oof", "--data-dir", str(synthetic_dir), "--checkpoints", str(exp), "--folds", str(folds_csv)]
    assert infer_main([*argv, "--device", "cpu", "--structural-zeros", "--quiet"]) == 0
    report = pd.read_csv(exp / "oof_report.csv")
    assert len(report) == 3 * (3 * 2 + 1) and set(report["structural_zeros"]) == {True, False}  # + project+bias per tta
    # by hand: each fold's two models (one per grid), no TTA; State softmax of the model's own forward
    table = load_fold_table(DataConfig(data_dir=str(synthetic_dir), folds=str(folds_csv)))
    held = table[table["fold"].isin([0, 1])].reset_index(drop=True)
    pred, p_state = np.zeros((len(held), 5)), np.zeros((len(held), 4))
    for best in find_checkpoints([exp]):
        p = Predictor(best, "cpu", tta="none")
        mask = (held["fold"] == p.fold).to_numpy()
        frame = held[mask].reset_index(drop=True)
        pred[mask] += 0.5 * predict_ensemble([p], frame, show=False).mean("none")
        for i, item in zip(np.flatnonzero(mask), image_dataset(frame, p.view_size, p.cfg.data)):
            with torch.no_grad():
                logits = p.model(item["left"][None], item["right"][None])["state"]
            p_state[i] += 0.5 * torch.softmax(logits, -1)[0].numpy()
    zeroed = structural_zeros(pred, p_state)
    truth = held[list(TARGETS)].to_numpy(np.float64)
    row = report[(report["tta"] == "none") & (report["physics"] == "none") & report["structural_zeros"]].iloc[0]
    assert row["weighted_r2"] == pytest.approx(score(truth, np.clip(zeroed, 0, None))["weighted_r2"], abs=1e-5)
    plain = report[(report["tta"] == "none") & (report["physics"] == "none") & ~report["structural_zeros"]].iloc[0]
    assert plain["weighted_r2"] == pytest.approx(score(truth, np.clip(pred, 0, None))["weighted_r2"], abs=1e-5)
    assert row["weighted_r2"] != plain["weighted_r2"]
