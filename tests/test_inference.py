"""infer.py: checkpoint discovery, TTA views, the fold x grid ensemble (in grams), physics, submission, fallback, OOF.

Every model here is one of the session's tiny checkpoints (grids 2x2 and 1x2 x folds 0 and 1); the expected
values are recomputed by hand from single-model predictions, so a change in how views, folds or grids are
averaged shows up as a number that differs, not just as a file that exists.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, run_script

import src.dataset
import src.inference
from src.artifacts import Cleaning
from src.checkpoint import find_checkpoints
from src.config import InferConfig, load_yaml
from src.data import load_sample_submission, load_test, load_train
from src.dataset import MultiSizeViewDataset
from src.errors import BiomassError, run_cli
from src.folds import load_folds
from src.inference import TTA_MODES, Predictor, fallback_values, grid_weight_map, predict_ensemble, upper_bounds
from src.metric import per_target_r2, weighted_r2
from src.model import flip_views
from src.postprocess import MODES, apply_physics, physics_gap
from src.schema import TARGETS

GRIDS, FOLDS = ((2, 2), (1, 2)), (0, 1)
KEYS = [(g, f) for g in GRIDS for f in FOLDS]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _infer_script():
    spec = importlib.util.spec_from_file_location("infer_script", REPO / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


infer_script = _infer_script()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops on 2 shared cores


def ckpt_path(exp: Path, grid: tuple[int, int], fold: int) -> Path:
    return exp / f"grid{grid[0]}x{grid[1]}" / f"fold{fold}" / "best.pt"


@pytest.fixture(scope="module")
def predictors(trained_exp: Path) -> dict[tuple, Predictor]:
    """(grid, fold) -> its full-TTA Predictor on the CPU."""
    return {(g, f): Predictor(ckpt_path(trained_exp, g, f), "cpu", tta="full") for g, f in KEYS}


@pytest.fixture(scope="module")
def test_images(synthetic_dir: Path) -> pd.DataFrame:
    return load_test(synthetic_dir)


@pytest.fixture(scope="module")
def per_model(predictors, test_images) -> dict[tuple, np.ndarray]:
    """(grid, fold) -> that model alone on the test images: (N, 4 TTA views, 5) grams."""
    return {k: predict_ensemble([p], test_images, show=False).per_view for k, p in predictors.items()}


def hand_ensemble(per_model: dict, n_views: int, weights: dict[tuple[int, int], float]) -> np.ndarray:
    """The documented average: grams, mean over TTA views and over the folds of a grid, weighted over grids."""
    total = sum(weights.values())
    return sum(
        w / total * np.mean([per_model[(g, f)][:, :n_views].mean(axis=1) for f in FOLDS], axis=0)
        for g, w in weights.items()
    )


def wide_of(sub: pd.DataFrame) -> pd.DataFrame:
    """submission.csv -> image_id x TARGETS frame."""
    parts = sub["sample_id"].str.rsplit("__", n=1)
    return sub.assign(image_id=parts.str[0], name=parts.str[1]).pivot(
        index="image_id", columns="name", values="target"
    )[list(TARGETS)]


def infer_argv(data: Path, checkpoints, out: Path, *extra: str) -> list[str]:
    ckpts = [str(c) for c in (checkpoints if isinstance(checkpoints, list) else [checkpoints])]
    return ["--data-dir", str(data), "--checkpoints", *ckpts, "--out", str(out), "--device", "cpu", *extra]


def one_error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    lines = [ln.split("\r")[-1].strip() for ln in err.splitlines() if ln.split("\r")[-1].strip()]
    assert rc == 1, err
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    return lines[-1]


# ---- checkpoint discovery ------------------------------------------------------------------------------------
def test_find_checkpoints_every_grid_and_fold(trained_exp: Path):
    found = find_checkpoints([trained_exp])
    assert found == [ckpt_path(trained_exp, g, f) for g in ((1, 2), (2, 2)) for f in FOLDS]  # sorted, best.pt only
    one = ckpt_path(trained_exp, (2, 2), 1)
    assert find_checkpoints([one]) == [one]
    assert find_checkpoints([one, trained_exp / "grid1x2"]) == [
        one,
        *(ckpt_path(trained_exp, (1, 2), f) for f in FOLDS),
    ]


def test_grid_weight_map_parses_and_normalizes():
    members = [SimpleNamespace(grid=g) for g in ((2, 2), (2, 2), (1, 2))]
    assert grid_weight_map(members, None) == {(1, 2): 0.5, (2, 2): 0.5}  # equal per grid, not per checkpoint
    assert grid_weight_map(members, ["2x2=3", "1X2=1"]) == pytest.approx({(2, 2): 0.75, (1, 2): 0.25})
    assert grid_weight_map(members, ["2x2=0"]) == {(2, 2): 0.0, (1, 2): 1.0}  # unnamed grids keep weight 1
    for bad, named in [
        (["2x2"], "RxC=W"), (["2by2=1"], "RxC=W"), (["2x2=heavy"], "RxC=W"), (["3x3=1"], "3x3"),
        (["2x2=0", "1x2=0"], "positive"), (["2x2=-1", "1x2=2"], "2x2=-1"), (["2x2=nan"], "2x2=nan"),
    ]:  # fmt: skip
        with pytest.raises(BiomassError, match=named):
            grid_weight_map(members, bad)


# ---- TTA views ------------------------------------------------------------------------------------------------
def test_tta_views_equal_forward_on_transformed_input(predictors, test_images, monkeypatch):
    """View k of predict_views == the model run on the flipped (or swapped) input; one backbone call for all."""
    p = predictors[((2, 2), 0)]
    batch = MultiSizeViewDataset(test_images.iloc[:3], [p.view_size])
    pairs = torch.stack([batch[i][f"{p.view_size[0]}x{p.view_size[1]}"] for i in range(3)])
    left, right = pairs[:, 0], pairs[:, 1]
    calls = []
    encode = p.model.encode_tiles
    monkeypatch.setattr(p.model, "encode_tiles", lambda x: calls.append(tuple(x.shape)) or encode(x))
    views = p.predict_views(left, right)
    assert views.shape == (3, 4, 5) and views.dtype == np.float32
    assert calls == [(3 * 2 * 3, 3, *p.view_size)]  # orig, hflip, vflip of both views in ONE call; swap reuses them

    def direct(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return p.model.to_grams(p.model(a, b)["targets"]).numpy()

    expected = [
        direct(left, right),
        direct(flip_views(left, True, False), flip_views(right, True, False)),
        direct(flip_views(left, False, True), flip_views(right, False, True)),
        direct(right, left),  # re-encoding the swapped input == swapping the cached tile features
    ]
    for k, name in enumerate(src.inference.TTA_VIEWS):
        np.testing.assert_allclose(views[:, k], expected[k], rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(views[:, 3] - views[:, 0]).max() > 1e-4  # the swap is a different view, not a no-op
    assert np.abs(views[:, 1] - views[:, 0]).max() > 1e-4

    for tta in ("none", "flip"):
        calls.clear()
        q = Predictor(p.path, "cpu", tta=tta)
        encode_q = q.model.encode_tiles
        monkeypatch.setattr(
            q.model, "encode_tiles", lambda x, encode_q=encode_q: calls.append(tuple(x.shape)) or encode_q(x)
        )
        out = q.predict_views(left, right)
        assert out.shape == (3, TTA_MODES[tta], 5)
        assert calls == [(TTA_MODES[tta] * 2 * 3, 3, *p.view_size)]
        np.testing.assert_allclose(out, views[:, : TTA_MODES[tta]], rtol=1e-5, atol=1e-5)


# ---- the ensemble ---------------------------------------------------------------------------------------------
def test_ensemble_is_weighted_mean_in_grams(predictors, per_model, test_images):
    assert "Averaging happens in grams" in src.inference.__doc__  # the documented space the test checks
    weights = {(2, 2): 0.8, (1, 2): 0.2}
    ens = predict_ensemble(list(predictors.values()), test_images, batch_size=4, grid_weights=weights, show=False)
    assert ens.per_view.shape == (len(test_images), 4, 5) and ens.ok.all()
    for tta, n in TTA_MODES.items():
        np.testing.assert_allclose(
            ens.mean(tta), hand_ensemble(per_model, n, weights), rtol=1e-6, atol=1e-6, err_msg=tta
        )
    # not the log-space (geometric) mean: that is biased low
    log_mean = np.expm1(
        sum(w * np.mean([np.log1p(per_model[(g, f)]).mean(axis=1) for f in FOLDS], axis=0) for g, w in weights.items())
    )
    assert (log_mean <= ens.mean("full") + 1e-9).all() and np.abs(log_mean - ens.mean("full")).max() > 1e-3
    # models disagree, so the weights matter
    assert np.abs(hand_ensemble(per_model, 4, {(2, 2): 1.0}) - hand_ensemble(per_model, 4, {(1, 2): 1.0})).max() > 1e-2

    with pytest.raises(BiomassError, match="same --tta"):
        predict_ensemble(
            [predictors[((2, 2), 0)], Predictor(predictors[((2, 2), 1)].path, "cpu", tta="none")],
            test_images,
            show=False,
        )


@pytest.mark.parametrize(
    "tta,physics,grid_weights",
    [("none", "none", None), ("flip", "seed", ["2x2=3", "1x2=1"]), ("full", "project", ["1x2=0"])],
)
def test_submission_values_settings(
    tta,
    physics,
    grid_weights,
    trained_exp,
    synthetic_dir,
    per_model,
    predictors,
    test_images,
    tmp_path,
    monkeypatch,
    capsys,
):
    """infer.py in process: each image read once for all 4 models; values = physics(weighted mean in grams)."""
    reads = []
    read_image = src.dataset.read_image
    monkeypatch.setattr(
        src.dataset, "read_image", lambda path, reduce=1: reads.append(str(path)) or read_image(path, reduce)
    )
    out = tmp_path / "sub" / "submission.csv"
    extra = ["--tta", tta, "--physics", physics, "--batch-size", "4"] + (
        ["--grid-weights", *grid_weights] if grid_weights else []
    )
    assert run_cli(infer_script.main, infer_argv(synthetic_dir, trained_exp, out, *extra)) == 0, capsys.readouterr().err
    assert f"wrote {out}: {5 * len(test_images)} rows for {len(test_images)} images" in capsys.readouterr().out
    assert sorted(reads) == sorted(test_images["path"])  # every unique image decoded exactly once
    # no temp file left; beside the submission: its resolved config (a valid --config), the log and run_report.json
    names = ["infer.log", "run_report.json", "submission.csv", "submission.yaml"]
    assert sorted(p.name for p in out.parent.iterdir()) == names
    saved = InferConfig.from_dict(load_yaml(out.with_suffix(".yaml")))
    assert (saved.tta, saved.physics, saved.batch_size, saved.out) == (tta, physics, 4, str(out))
    assert f"wrote {out}" in (out.parent / "infer.log").read_text().splitlines()[-1]

    sub = pd.read_csv(out)
    sample = load_sample_submission(synthetic_dir)
    assert list(sub.columns) == ["sample_id", "target"] and list(sub["sample_id"]) == list(sample["sample_id"])
    weights = {g: 1.0 for g in GRIDS} | {
        tuple(int(v) for v in w.split("=")[0].split("x")): float(w.split("=")[1]) for w in grid_weights or []
    }
    upper = upper_bounds(list(predictors.values()))
    expected = apply_physics(hand_ensemble(per_model, TTA_MODES[tta], weights), physics, upper)
    got = wide_of(sub).loc[test_images["image_id"]].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # physics properties of what was written
    assert (got >= 0).all() and np.isfinite(got).all()
    if physics == "project":
        assert physics_gap(got).max() < 1e-6  # GDM = Green + Clover, Total = Green + Dead + Clover
    if physics == "seed":
        assert (got <= upper + 1e-12).all()
    if physics == "none":
        np.testing.assert_allclose(got, hand_ensemble(per_model, TTA_MODES[tta], weights), rtol=1e-6, atol=1e-6)


def test_infer_script_end_to_end(trained_exp, synthetic_dir, per_model, test_images, tmp_path):
    """`python infer.py` as a user runs it (defaults: full TTA, project physics, equal grid weights)."""
    out = tmp_path / "submission.csv"
    proc = run_script("infer.py", *infer_argv(synthetic_dir, trained_exp, out), env=ONE_THREAD)
    assert f"wrote {out}: 30 rows for 6 images" in proc.stdout
    sub = pd.read_csv(out)
    test_long = pd.read_csv(synthetic_dir / "test.csv")
    assert len(sub) == len(test_long) == 30 and set(sub["sample_id"]) == set(test_long["sample_id"])
    assert list(sub["sample_id"]) == list(load_sample_submission(synthetic_dir)["sample_id"])
    expected = apply_physics(hand_ensemble(per_model, 4, {g: 1.0 for g in GRIDS}), "project")
    np.testing.assert_allclose(wide_of(sub).loc[test_images["image_id"]].to_numpy(), expected, rtol=1e-5, atol=1e-5)


# ---- unreadable images ---------------------------------------------------------------------------------------
@pytest.fixture()
def data_with_bad_image(synthetic_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the data whose 3rd test image is truncated and whose sample_submission rows are shuffled."""
    data = Path(shutil.copytree(synthetic_dir, tmp_path / "data", ignore=shutil.ignore_patterns("train")))
    images = load_test(data)
    bad = Path(images["path"][2])
    bad.write_bytes(bad.read_bytes()[:300])
    sample = pd.read_csv(data / "sample_submission.csv")
    sample.sample(frac=1.0, random_state=0).to_csv(data / "sample_submission.csv", index=False)
    return data, images["image_id"][2]


def test_bad_image_fallback_gives_training_median(
    data_with_bad_image, trained_exp, synthetic_dir, folds_csv, predictors, per_model, test_images, tmp_path, capsys
):
    data, bad_id = data_with_bad_image
    out = tmp_path / "submission.csv"
    with pytest.warns(UserWarning, match="truncated JPEG"):
        rc = run_cli(infer_script.main, infer_argv(data, trained_exp, out, "--on-bad-image", "fallback"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"warning: 1 unreadable image(s) got the training-median prediction: {bad_id}" in captured.out
    sub = pd.read_csv(out)
    assert list(sub["sample_id"]) == list(
        pd.read_csv(data / "sample_submission.csv")["sample_id"]
    )  # shuffled order kept

    # the training median: of each checkpoint's training folds, averaged over the 4 checkpoints
    wide = load_train(synthetic_dir).merge(load_folds(folds_csv, load_train(synthetic_dir)), on="image_id")
    medians = [np.median(wide.loc[wide["fold"] != f, list(TARGETS)].to_numpy(), axis=0) for _, f in KEYS]
    np.testing.assert_allclose(fallback_values(list(predictors.values())), np.mean(medians, axis=0), rtol=1e-6)
    got = wide_of(sub)
    np.testing.assert_allclose(
        got.loc[bad_id].to_numpy(), apply_physics(np.mean(medians, axis=0)[None], "project")[0], rtol=1e-6
    )
    # the other images are untouched by their unreadable batch-mate
    expected = apply_physics(hand_ensemble(per_model, 4, {g: 1.0 for g in GRIDS}), "project")
    good = (test_images["image_id"] != bad_id).to_numpy()
    np.testing.assert_allclose(got.loc[test_images["image_id"][good]].to_numpy(), expected[good], rtol=1e-5, atol=1e-5)


def test_bad_image_error_stops_and_keeps_previous_submission(data_with_bad_image, trained_exp, tmp_path, capsys):
    data, bad_id = data_with_bad_image
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    out.write_bytes(b"sample_id,target\nprevious,1.0\n")
    line = one_error_line(
        capsys, run_cli(infer_script.main, infer_argv(data, trained_exp, out, "--on-bad-image", "error"))
    )
    assert (
        line == f"error: {data / 'test' / bad_id}.jpg: truncated JPEG (no end marker); re-download or replace the image"
    )
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "infer.log",
        "submission.csv",
    ]  # the log ends with the error
    assert (out.parent / "infer.log").read_text().strip().splitlines()[-1].endswith(line)
    assert out.read_bytes() == b"sample_id,target\nprevious,1.0\n"


# ---- validation failures --------------------------------------------------------------------------------------
def _empty_exp(tmp_path: Path, trained_exp: Path) -> tuple[list[Path], str]:
    (tmp_path / "empty_exp" / "grid2x2" / "fold0").mkdir(parents=True)
    return [tmp_path / "empty_exp"], "no grid*/fold*/best.pt inside"


def _missing(tmp_path: Path, trained_exp: Path) -> tuple[list[Path], str]:
    return [trained_exp, tmp_path / "no_such_exp"], "no_such_exp: checkpoint directory or file not found"


def _other_target_order(tmp_path: Path, trained_exp: Path) -> tuple[list[Path], str]:
    """Checkpoints trained with another target order cannot be averaged with these."""
    ckpt = torch.load(ckpt_path(trained_exp, (1, 2), 0), map_location="cpu", weights_only=True)
    ckpt["targets"] = list(reversed(TARGETS))
    path = tmp_path / "other" / "best.pt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    return [trained_exp, path], f"{path}: target order"


def _unknown_grid_weight(tmp_path: Path, trained_exp: Path) -> tuple[list[Path], str]:
    return [trained_exp], "--grid-weights names grid 3x3, but no checkpoint has it"


def _negative_grid_weight(tmp_path: Path, trained_exp: Path) -> tuple[list[Path], str]:
    return [trained_exp], "--grid-weights item '2x2=-1'"


CASES = {
    "no checkpoint in the experiment": (_empty_exp, []),
    "missing checkpoint path": (_missing, []),
    "checkpoints with another target order": (_other_target_order, []),
    "grid weight for an absent grid": (_unknown_grid_weight, ["--grid-weights", "3x3=1"]),
    "negative grid weight": (_negative_grid_weight, ["--grid-weights", "2x2=-1", "1x2=2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_and_weight_errors_are_one_line(case, trained_exp, synthetic_dir, tmp_path, capsys):
    make, extra = CASES[case]
    checkpoints, named = make(tmp_path, trained_exp)
    out = tmp_path / "out" / "submission.csv"
    line = one_error_line(capsys, run_cli(infer_script.main, infer_argv(synthetic_dir, checkpoints, out, *extra)))
    assert named in line, line
    assert not out.parent.exists()


# ---- out-of-fold scoring --------------------------------------------------------------------------------------
def test_oof_report_matches_hand_recomputation(trained_exp, synthetic_dir, folds_csv, tmp_path, capsys):
    exp = tmp_path / "tiny"
    for g, f in KEYS:  # a private copy: --oof writes next to the checkpoints
        run_dir = exp / f"grid{g[0]}x{g[1]}" / f"fold{f}"
        run_dir.mkdir(parents=True)
        for name in ("best.pt", "oof.csv"):
            shutil.copy(trained_exp / run_dir.relative_to(exp) / name, run_dir / name)
    argv = [
        "--oof",
        "--data-dir",
        str(synthetic_dir),
        "--checkpoints",
        str(exp),
        "--folds",
        str(folds_csv),
        "--device",
        "cpu",
    ]
    assert run_cli(infer_script.main, argv) == 0, capsys.readouterr().err
    assert f"wrote {exp / 'oof_report.csv'}" in capsys.readouterr().out
    report = pd.read_csv(exp / "oof_report.csv")
    biased = report[report["physics"] == "project+bias"]  # issue 21's rows, checked at the end
    report = report[report["physics"] != "project+bias"]

    # by hand: each fold's two models (one per grid) alone on that fold's held-out images, grams averaged
    wide = load_train(synthetic_dir)
    wide = wide.merge(load_folds(folds_csv, wide), on="image_id")
    held_out = wide[wide["fold"].isin(FOLDS)].reset_index(drop=True)
    per_view = np.zeros((len(held_out), 4, 5))
    for g, f in KEYS:
        mask = (held_out["fold"] == f).to_numpy()
        p = Predictor(ckpt_path(exp, g, f), "cpu", tta="full")
        per_view[mask] += 0.5 * predict_ensemble([p], held_out[mask].reset_index(drop=True), show=False).per_view
    truth = held_out[list(TARGETS)].to_numpy(dtype=np.float64)
    upper = upper_bounds([Predictor(ckpt_path(exp, g, f), "cpu", tta="none") for g, f in KEYS])

    assert len(report) == len(TTA_MODES) * len(MODES)
    assert set(zip(report["tta"], report["physics"], strict=True)) == {(t, m) for t in TTA_MODES for m in MODES}
    assert (report["images"] == len(held_out)).all() and len(held_out) < len(wide)  # fold 2 has no model: not scored
    assert list(report["weighted_r2"]) == sorted(report["weighted_r2"], reverse=True)
    for row in report.itertuples():
        pred = apply_physics(per_view[:, : TTA_MODES[row.tta]].mean(axis=1), row.physics, upper)
        assert row.weighted_r2 == pytest.approx(weighted_r2(truth, pred), abs=1e-6), (row.tta, row.physics)
        assert row.r2_Dry_Total_g == pytest.approx(per_target_r2(truth, pred)["Dry_Total_g"], abs=1e-6)
    # bias-corrected grams: factors of each fold fitted on the other folds' rows only, then the projection
    assert sorted(biased["tta"]) == sorted(TTA_MODES)
    for row in biased.itertuples():
        mean = per_view[:, : TTA_MODES[row.tta]].mean(axis=1)
        folds = held_out["fold"].to_numpy()
        factors = np.ones_like(mean)
        for f in FOLDS:
            other = folds != f
            factors[~other] = (mean[other] * truth[other]).sum(0) / (mean[other] ** 2).sum(0)
        pred = apply_physics(np.clip(mean * factors, 0.5 * mean, 2 * mean), "project", upper)
        assert row.weighted_r2 == pytest.approx(weighted_r2(truth, pred), abs=1e-6), row.tta

    # independent of the inference code: training's own oof.csv of each model, averaged over grids
    oof = {
        (g, f): pd.read_csv(exp / f"grid{g[0]}x{g[1]}" / f"fold{f}" / "oof.csv", dtype={"image_id": str}).set_index(
            "image_id"
        )
        for g, f in KEYS
    }
    from_training = np.stack(
        [
            np.mean([oof[(g, f)].loc[i, list(TARGETS)].to_numpy(float) for g in GRIDS], axis=0)
            for i, f in zip(held_out["image_id"], held_out["fold"], strict=True)
        ]
    )
    none_none = report.set_index(["tta", "physics"]).loc[("none", "none"), "weighted_r2"]
    assert none_none == pytest.approx(weighted_r2(truth, from_training), abs=1e-3)

    ens = pd.read_csv(exp / "oof_ensemble.csv", dtype={"image_id": str}).set_index("image_id").loc[held_out["image_id"]]
    np.testing.assert_allclose(
        ens[list(TARGETS)].to_numpy(), apply_physics(per_view.mean(axis=1), "project"), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(ens[[f"true_{t}" for t in TARGETS]].to_numpy(), truth)
    assert (ens["fold"].to_numpy() == held_out["fold"].to_numpy()).all()


def test_inference_honours_each_checkpoints_jpeg_reduce(synthetic_dir, trained_exp, tmp_path):
    """issue 27 item 7: a checkpoint trained with data.jpeg_reduce false is fed full decodes, as in training (bit for
    bit), one trained with it true the reduced ones; both from one read per image, each under its own input key."""
    from src.data import load_train
    from src.dataset import ViewPairDataset, decode_reduction, input_key, jpeg_header_size
    from src.inference import CachedViews, ModelRef
    from src.transforms import build_transform

    best = trained_exp / "grid1x2" / "fold0" / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    ckpt["config"]["data"]["jpeg_reduce"] = False
    full_pt = tmp_path / "full" / "best.pt"
    full_pt.parent.mkdir()
    torch.save(ckpt, full_pt)
    reduced, full = ModelRef(best, tta="none"), ModelRef(full_pt, tta="none")
    assert (reduced.jpeg_reduce, full.jpeg_reduce) == (True, False) and reduced.input_key != full.input_key
    frame = load_train(synthetic_dir).head(2)
    view = full.view_size
    assert decode_reduction(jpeg_header_size(frame.at[0, "path"]), view, Cleaning()) > 1  # the flag matters here
    cached = CachedViews(frame, [reduced, full], 2, "error", 0, True, False)
    assert set(cached.views) == {input_key(view), input_key(view, None, False)} == {reduced.input_key, full.input_key}
    for jpeg_reduce, member in ((True, reduced), (False, full)):
        train = ViewPairDataset(frame, view, build_transform(view, train=False), jpeg_reduce=jpeg_reduce)[1]
        (_, pair), *_ = cached.batches(member)
        assert torch.equal(pair[1, 0], train["left"]) and torch.equal(pair[1, 1], train["right"])
    assert not torch.equal(cached.views[reduced.input_key], cached.views[full.input_key])  # a positive control


def test_multi_size_dataset_gives_every_model_exactly_its_training_views(synthetic_dir):
    """One read serves every model, yet each input equals training's ViewPairDataset views bit for bit.

    (28, 112) needs a finer decode than (56, 56) on a 400x200 image: sharing one reduced decode would
    upscale one of them; each input gets the reduction training used, and inputs with the same one share it.
    """
    from src.data import load_train
    from src.dataset import ViewPairDataset, decode_reduction, input_key, jpeg_header_size
    from src.transforms import build_transform

    frame = load_train(synthetic_dir).head(2)
    sizes = [(56, 56), (28, 112), (28, 28)]
    factors = [decode_reduction(jpeg_header_size(frame.at[0, "path"]), v, Cleaning()) for v in sizes]
    assert factors[0] != factors[1]  # the test really mixes decode reductions
    ds = MultiSizeViewDataset(frame, sizes)
    item = ds[1]
    for size in sizes:
        train_views = ViewPairDataset(frame, size, build_transform(size, train=False))[1]
        assert torch.equal(item[input_key(size)][0], train_views["left"])
        assert torch.equal(item[input_key(size)][1], train_views["right"])
