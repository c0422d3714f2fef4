"""Honest numbers: seeds as an axis, the paired bootstrap, selection-honest OOF, leak guards, the colour peer,
generated doc sections, and mixup / stereo swap counted in the real training loop.

Expected values are recomputed by hand (the metric written out again, scores of the files training wrote), so a
change in how seeds, folds or images are combined shows up as a number that differs.
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
from conftest import REPO, TINY_FLAGS
from scipy.stats import binom

import real as real_script
from src import docs, training
from src.baseline import colour_ridge_oof, colour_table
from src.baseline import main as baseline_main
from src.bootstrap import VERDICTS, image_terms, paired_bootstrap, r2_from_terms
from src.checkpoint import CHECKPOINT_FORMAT, experiment_dir, find_checkpoints, ids_hash, load_checkpoint
from src.colour import FEATURE_NAMES, colour_features
from src.config import resolve_config
from src.data import load_train
from src.dataset import image_dataset
from src.errors import BiomassError, run_cli
from src.feature_cache import feature_cache
from src.folds import load_folds
from src.inference import Predictor, member_weights
from src.metric import weighted_r2
from src.model import build_model
from src.report import FoldRun, compare_table, fixed_schedule, fold_table, load_runs, make_report, schedule_epochs
from src.runtime import seed_everything
from src.schema import TARGETS
from src.submit import fold_upper_bounds

CPU = torch.device("cpu")
TRUE = [f"true_{t}" for t in TARGETS]
SEEDLESS = [f for i, f in enumerate(TINY_FLAGS) if f != "--seed" and TINY_FLAGS[i - 1] != "--seed"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops on 2 shared cores


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script, infer_script = _script("train"), _script("infer")


def r2_by_hand(frame: pd.DataFrame) -> float:
    """The competition formula written out again, independent of src.metric and src.bootstrap."""
    y = frame[TRUE].to_numpy(np.float64).ravel()
    p = frame[list(TARGETS)].to_numpy(np.float64).ravel()
    w = np.tile([0.1, 0.1, 0.1, 0.2, 0.5], len(frame))
    mean = (w * y).sum() / w.sum()
    return 1 - (w * (y - p) ** 2).sum() / (w * (y - mean) ** 2).sum()


def wide_with_folds(synthetic_dir: Path, folds_csv: Path) -> pd.DataFrame:
    wide = load_train(synthetic_dir)
    return wide.merge(load_folds(folds_csv, wide), on="image_id")


@pytest.fixture(scope="module")
def seeded_exp(synthetic_dir: Path, folds_csv: Path, tmp_path_factory) -> Path:
    """`train.py --seeds 0 1` of folds 0 and 1 (tiny preset, 2x2): four runs in fold<K>/seed<S>/."""
    out = tmp_path_factory.mktemp("seeded")
    for fold in ("0", "1"):
        argv = ["--fold", fold, "--seeds", "0", "1", *SEEDLESS, "--data-dir", str(synthetic_dir), "--folds",
                str(folds_csv), "--out-dir", str(out), "--exp", "seeded", "--device", "cpu", "--quiet"]  # fmt: skip
        assert train_script.main(argv) == 0
    return out / "seeded"


def private_copy(exp: Path, dest: Path) -> Path:
    shutil.copytree(exp, dest, ignore=shutil.ignore_patterns("last.pt", "report"))
    return dest


# ---- seeds as an axis ---------------------------------------------------------------------------------------------
def test_seeds_layout_is_found_and_averaged_like_folds(seeded_exp: Path, trained_exp: Path, capsys):
    runs = sorted(p.relative_to(seeded_exp).as_posix() for p in find_checkpoints([seeded_exp]))
    assert runs == [f"grid2x2/fold{f}/seed{s}/best.pt" for f in (0, 1) for s in (0, 1)]
    assert experiment_dir(find_checkpoints([seeded_exp])) == seeded_exp
    assert len(find_checkpoints([trained_exp])) == 4  # the one-seed layout (fold<K>/best.pt) still loads
    for path in find_checkpoints([seeded_exp]):
        assert load_checkpoint(path)["config"]["train"]["seed"] == int(path.parent.name[4:])
    loaded = load_runs(seeded_exp)
    assert [(r.fold, r.seed) for r in loaded] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert run_cli(train_script.main, ["--fold", "0", "--seed", "3", "--seeds", "1", "--preset", "tiny"]) == 1
    assert "not both" in capsys.readouterr().err


def test_member_weights_mean_over_seeds_then_folds_then_grids():
    p = [SimpleNamespace(grid=g, fold=f) for g, f in [((2, 2), 0), ((2, 2), 0), ((2, 2), 1), ((1, 2), 0)]]
    # 2x2: fold 0 has two seeds (a quarter each of the grid's half), fold 1 one (half of it); 1x2: one fold
    assert member_weights(p) == pytest.approx([0.125, 0.125, 0.25, 0.5])
    assert member_weights(p, {(2, 2): 0.8, (1, 2): 0.2}) == pytest.approx([0.2, 0.2, 0.4, 0.2])
    assert member_weights([SimpleNamespace(grid=(2, 2), fold=None)] * 2) == pytest.approx([0.5, 0.5])


def test_oof_of_seeds_equals_the_mean_of_their_training_predictions(seeded_exp, synthetic_dir, folds_csv, tmp_path):
    exp = private_copy(seeded_exp, tmp_path / "seeded")
    argv = ["--oof", "--data-dir", str(synthetic_dir), "--checkpoints", str(exp), "--folds", str(folds_csv),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert infer_script.main(argv) == 0
    report = pd.read_csv(exp / "oof_report.csv").set_index(["tta", "physics"])
    # by hand: within each fold the grams of its two seeds' oof.csv averaged, then scored over both folds
    frames = [
        pd.concat([pd.read_csv(exp / f"grid2x2/fold{f}/seed{s}/oof.csv", dtype={"image_id": str}) for s in (0, 1)])
        .groupby("image_id")
        .mean(numeric_only=True)
        for f in (0, 1)
    ]
    by_hand = r2_by_hand(pd.concat(frames))
    assert report.loc[("none", "none"), "weighted_r2"] == pytest.approx(by_hand, abs=1e-3)
    selection = pd.read_csv(exp / "oof_selection.csv")
    assert {"best_epoch_r2", "fixed_r2", "gap"} <= set(selection.columns) and "seed_mean" in set(selection["scope"])


# ---- leak guards ----------------------------------------------------------------------------------------------------
def test_checkpoint_records_the_split_it_trained_and_validated_on(seeded_exp, synthetic_dir, folds_csv):
    wide = wide_with_folds(synthetic_dir, folds_csv)
    for path in find_checkpoints([seeded_exp]):
        ckpt = load_checkpoint(path)
        fold = ckpt["fold"]
        split = ckpt["split"]
        assert split["val_ids"] == ids_hash(wide.loc[wide["fold"] == fold, "image_id"])
        assert split["train_ids"] == ids_hash(wide.loc[wide["fold"] != fold, "image_id"])
        assert (split["n_train"], split["n_val"]) == ((wide["fold"] != fold).sum(), (wide["fold"] == fold).sum())
    assert ids_hash(["b", "a", "a"]) == ids_hash(["a", "b"]) != ids_hash(["a"])


def test_oof_refuses_a_folds_file_that_does_not_reproduce_the_split(
    seeded_exp, synthetic_dir, folds_csv, tmp_path, capsys
):
    exp = private_copy(seeded_exp, tmp_path / "seeded")
    folds = pd.read_csv(folds_csv, dtype={"image_id": str})
    renumbered = folds.assign(fold=folds["fold"].map({0: 1, 1: 0, 2: 2}))  # same partition, other numbers
    path = tmp_path / "regenerated.csv"
    renumbered.to_csv(path, index=False)
    argv = ["--oof", "--data-dir", str(synthetic_dir), "--checkpoints", str(exp), "--folds", str(path), "--device",
            "cpu"]  # fmt: skip
    assert run_cli(infer_script.main, argv) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip().startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: fold 0: ") and "--folds" in lines[0] and "validation images" in lines[0]
    assert not (exp / "oof_report.csv").exists()


def test_seed_clamp_uses_each_folds_own_training_maxima(trained_exp, synthetic_dir, folds_csv):
    wide = wide_with_folds(synthetic_dir, folds_csv)
    preds = [Predictor(trained_exp / f"grid2x2/fold{f}/best.pt", "cpu", tta="none") for f in (0, 1)]
    row_folds = np.array([0, 1, 1, 0])
    upper = fold_upper_bounds(preds, row_folds)
    for f in (0, 1):
        own = wide.loc[wide["fold"] != f, list(TARGETS)].max().to_numpy()
        np.testing.assert_allclose(upper[row_folds == f], np.tile(own, ((row_folds == f).sum(), 1)))
    # the pooled maxima would include a held-out label for some fold and target (so the test can fail)
    pooled = wide.loc[wide["fold"].isin([0, 1]), list(TARGETS)].max().to_numpy()
    assert any((wide.loc[wide["fold"] != f, list(TARGETS)].max().to_numpy() < pooled).any() for f in (0, 1))


# ---- selection-honest OOF ----------------------------------------------------------------------------------------
def test_schedule_is_the_median_best_epoch_of_the_other_folds():
    assert schedule_epochs({0: 3, 1: 5, 2: 8}) == {0: 7, 1: 6, 2: 4}  # medians 6.5, 5.5, 4 (halves round up)
    assert schedule_epochs({0: 2, 1: 9, 2: 4, 3: 4}) == {0: 4, 1: 4, 2: 4, 3: 4}
    assert schedule_epochs({0: 5}) == {0: None}


def test_fixed_schedule_reads_the_epoch_rows_and_never_a_nearer_epoch():
    def epochs_frame(fold: int, last: int) -> pd.DataFrame:
        rows = [{"image_id": f"f{fold}i{i}", "fold": fold, "epoch": e, **{t: e + i for t in TARGETS},
                 **{c: 10.0 * i for c in TRUE}} for e in range(last + 1) for i in range(3)]  # fmt: skip
        return pd.DataFrame(rows)

    def run(fold: int, best: int, last: int) -> FoldRun:
        metrics = pd.DataFrame(
            {"epoch": range(last + 1), "weighted_r2": [1.0 if e == best else 0.0 for e in range(last + 1)]}
        )
        return FoldRun("2x2", fold, Path(f"f{fold}"), None, metrics, {}, None, 0, epochs_frame(fold, last))

    runs = [run(0, 1, 9), run(1, 7, 9), run(2, 3, 3)]  # fold 2: an old run cut short at epoch 3
    sched = fixed_schedule(runs)
    assert sched[Path("f0")][0] == 5 and sched[Path("f1")][0] == 2  # medians of (7, 3) and (1, 3)
    frame = sched[Path("f0")][1]
    assert (frame[list(TARGETS)].to_numpy() == 5 + np.arange(3)[:, None]).all() and "epoch" not in frame
    # the median of (1, 7) is 4, past fold 2's last epoch: no score at all, never its own last (label-chosen) epoch
    assert sched[Path("f2")] == (4, None)


def test_an_early_stopped_fold_trains_on_and_is_scored_at_the_other_folds_median(
    synthetic_dir, folds_csv, tmp_path, monkeypatch
):
    """Patience 1 stops fold 1 after epoch 2 (best 1); it keeps best.pt from epoch 1, trains on to epoch 5, and the
    fixed schedule scores it at epoch 5 (the median best epoch of two other folds, 4 and 5), past its own stop."""
    argv = ["--fold", "1", *TINY_FLAGS, "--data-dir", str(synthetic_dir), "--folds", str(folds_csv),
            "--device", "cpu", "--epochs", "6", "--freeze-epochs", "1", "--patience", "1"]  # fmt: skip
    cfg = resolve_config(train_script.parse_args(argv))
    wide = wide_with_folds(synthetic_dir, folds_csv)
    train, val = (wide[m].reset_index(drop=True) for m in (wide["fold"] != 1, wide["fold"] == 1))
    # scripted validation scores: 0.9 at epoch 3 would be the best if selection went on past the stop
    scripted = iter([0.2, 0.5, 0.1, 0.9, 0.3, 0.4])
    real_score = training.score
    monkeypatch.setattr(training, "score", lambda y, p: {**real_score(y, p), "weighted_r2": next(scripted)})
    run_dir = tmp_path / "exp" / "grid2x2" / "fold1"
    run_dir.mkdir(parents=True)
    result = training.fit(cfg, train, val, run_dir, CPU, fold=1)
    assert [row["epoch"] for row in result.history] == list(range(6))  # not cut short at epoch 2
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["after_stop"].tolist() == [False, False, False, True, True, True]
    assert result.best_epoch == 1 and torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == 1
    epochs = pd.read_csv(run_dir / "oof_epochs.csv", dtype={"image_id": str})
    assert sorted(epochs["epoch"].unique()) == list(range(6))
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"image_id": str})
    kept = epochs[epochs["epoch"] == 1].drop(columns="epoch").reset_index(drop=True)
    pd.testing.assert_frame_equal(oof, kept, check_dtype=False)  # oof.csv is still the kept epoch's
    mine = load_runs(tmp_path / "exp")[0]
    assert mine.best_epoch == 1  # epoch 3's 0.9 came after the stop: not a candidate
    other = [FoldRun("2x2", f, Path(f"f{f}"), None, pd.DataFrame({"epoch": range(6), "weighted_r2":
             [1.0 if e == best else 0.0 for e in range(6)]}), {}, None) for f, best in ((0, 4), (2, 5))]  # fmt: skip
    epoch, frame = fixed_schedule([mine, *other])[mine.path]
    assert epoch == 5  # median of (4, 5) = 4.5, halves round up; past best 1 + patience 1 = the stop at epoch 2
    want = epochs[epochs["epoch"] == 5].drop(columns="epoch").reset_index(drop=True)
    pd.testing.assert_frame_equal(frame, want)
    assert oof_r2_differs(frame, oof)


def oof_r2_differs(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """The scheduled epoch's predictions are not the kept epoch's (the test would pass on a clipped schedule else)."""
    return not np.allclose(a[list(TARGETS)].to_numpy(), b[list(TARGETS)].to_numpy())


def test_fold_table_fixed_schedule_matches_the_epoch_files(trained_exp: Path):
    runs = [r for r in load_runs(trained_exp) if r.grid == "2x2"]
    table = fold_table(runs)
    for r in runs:
        epochs = pd.read_csv(r.path / "oof_epochs.csv", dtype={"image_id": str})
        assert sorted(epochs["epoch"].unique()) == [0, 1]
        assert all(sorted(part["image_id"]) == sorted(r.oof["image_id"]) for _, part in epochs.groupby("epoch"))
        best = epochs[epochs["epoch"] == r.best_epoch].drop(columns="epoch").set_index("image_id")
        pd.testing.assert_frame_equal(best.loc[r.oof["image_id"]].reset_index(), r.oof, check_dtype=False)
        other = [o.best_epoch for o in runs if o.fold != r.fold][0]  # two folds: the other one's best epoch
        row = table[(table["scope"] == "fold") & (table["fold"] == str(r.fold))].iloc[0]
        assert row["fixed_epoch"] == other
        assert row["fixed_r2"] == pytest.approx(r2_by_hand(epochs[epochs["epoch"] == other]), abs=1e-9)


def test_report_of_seeds_shows_mean_std_and_the_selection_section(seeded_exp, tmp_path):
    exp = private_copy(seeded_exp, tmp_path / "seeded")
    text = make_report(exp, show=False).read_text()
    assert "## Selection-honest OOF" in text and "mean over 2 seeds (std " in text and "fixed_r2" in text
    table = pd.read_csv(exp / "report" / "folds.csv", dtype={"fold": str, "seed": str})
    per_seed = [r2_by_hand(pd.concat([r.oof for r in load_runs(exp) if r.seed == s])) for s in (0, 1)]
    mean_row = table[table["scope"] == "seed_mean"].iloc[0]
    assert mean_row["weighted_r2"] == pytest.approx(np.mean(per_seed), abs=1e-9)
    assert mean_row["seed_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-9)


# ---- compare: mean +- std over seeds, the paired bootstrap, the verdict -------------------------------------------
def test_compare_shows_seed_mean_std_interval_and_verdict(seeded_exp: Path, trained_exp: Path, tmp_path: Path):
    table = compare_table([seeded_exp, trained_exp], baseline="tiny", draws=500).set_index("experiment")
    seeded = table.loc["seeded"]
    per_seed = [r2_by_hand(pd.concat([r.oof for r in load_runs(seeded_exp) if r.seed == s])) for s in (0, 1)]
    assert seeded["seeds"] == 2 and table.loc["tiny", "seeds"] == 1
    assert seeded["weighted_r2"] == pytest.approx(np.mean(per_seed), abs=1e-9)
    assert seeded["seed_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-9)
    # the same images on both sides, so the paired delta is the difference of the two seed-mean scores
    assert seeded["delta"] == pytest.approx(seeded["weighted_r2"] - table.loc["tiny", "weighted_r2"], abs=1e-9)
    assert seeded["ci_low"] <= seeded["delta"] <= seeded["ci_high"] and seeded["verdict"] in VERDICTS
    assert table.loc["tiny", "verdict"] == "baseline" and table.loc["tiny", "delta"] == 0


# ---- the paired bootstrap -------------------------------------------------------------------------------------------
def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.gamma(2.0, 10.0, (n, 5))
    return truth, truth + rng.normal(0, 8.0, (n, 5))


def test_resampled_metric_is_the_metric_of_the_repeated_rows():
    truth, pred = _rows(6, 0)
    terms = image_terms(truth, pred)
    assert r2_from_terms(terms, np.ones(6))[0] == pytest.approx(weighted_r2(truth, pred), abs=1e-12)
    counts = np.array([2, 0, 1, 3, 0, 0])
    rows = np.repeat(np.arange(6), counts)
    assert r2_from_terms(terms, counts)[0] == pytest.approx(weighted_r2(truth[rows], pred[rows]), abs=1e-12)
    # two rows per image (two grids) sum into one image: resampling an image takes both of its rows
    pred2 = pred + 1.0
    index = np.r_[np.arange(6), np.arange(6)]
    pooled = image_terms(np.r_[truth, truth], np.r_[pred, pred2], index, 6)
    both = np.r_[rows, rows]
    expected = weighted_r2(np.r_[truth, truth][np.r_[rows, rows + 6]], np.r_[pred, pred2][np.r_[rows, rows + 6]])
    assert len(both) == 12 and r2_from_terms(pooled, counts)[0] == pytest.approx(expected, abs=1e-12)


def test_bootstrap_interval_against_the_exact_distribution_of_two_images():
    """Two images: a resample is (2, 0), (1, 1) or (0, 2) with probability 1/4, 1/2, 1/4, so the 95% interval
    runs from the smallest to the largest of the three differences, computed here by hand."""
    truth, pred_b = _rows(2, 1)
    pred_a = truth + 0.5 * (pred_b - truth)
    diffs = []
    for rows in ([0, 0], [0, 1], [1, 1]):
        diffs.append(weighted_r2(truth[rows], pred_a[rows]) - weighted_r2(truth[rows], pred_b[rows]))
    interval = paired_bootstrap(image_terms(truth, pred_a), image_terms(truth, pred_b), draws=4000)
    assert interval.delta == pytest.approx(diffs[1], abs=1e-12)
    assert interval.low == pytest.approx(min(diffs), abs=1e-12) and interval.high == pytest.approx(
        max(diffs), abs=1e-12
    )


def test_bootstrap_verdicts_on_known_cases():
    truth, noisy = _rows(40, 2)
    perfect, same = image_terms(truth, truth), image_terms(truth, noisy)
    assert paired_bootstrap(perfect, same, draws=300).verdict == "better"
    assert paired_bootstrap(same, perfect, draws=300).verdict == "worse"
    tie = paired_bootstrap(same, same, draws=300)
    assert (tie.delta, tie.low, tie.high, tie.verdict) == (0.0, 0.0, 0.0, "can't tell")
    # two seeds far apart: resampling seeds widens the interval beyond what resampling images alone gives
    _, other = _rows(40, 3)
    seeds = np.stack([image_terms(truth, truth + 0.2 * (noisy - truth)), image_terms(truth, other)])
    narrow = paired_bootstrap(seeds, same[None], draws=800, resample_seeds=False)
    wide = paired_bootstrap(seeds, same[None], draws=800)
    assert wide.delta == narrow.delta and wide.high - wide.low > narrow.high - narrow.low


# ---- the colour peer ------------------------------------------------------------------------------------------------
def test_colour_features_by_hand():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = (60, 140, 40)  # grass green: hue ~ 100 degrees
    image[:, 20:] = (190, 160, 90)  # straw: hue ~ 42 degrees, S 0.53, V 0.75
    f = colour_features(image)
    assert list(f) == list(FEATURE_NAMES)
    assert (f["left_green_frac"], f["left_straw_frac"], f["right_green_frac"], f["right_straw_frac"]) == (1, 0, 0, 1)
    assert f["image_green_frac"] == f["image_straw_frac"] == 0.5
    assert f["left_mean_g"] == pytest.approx(140 / 255) and f["image_mean_r"] == pytest.approx(125 / 255)
    assert f["left_hue03"] == 1.0 and f["right_hue01"] == 1.0  # 90-120 and 30-60 degree bins
    assert sum(f[f"image_hue{k:02d}"] for k in range(12)) == pytest.approx(1.0)


def test_colour_ridge_fits_each_fold_on_its_training_images_only(synthetic_dir, folds_csv):
    wide = load_train(synthetic_dir)
    folds = load_folds(folds_csv, wide)
    features = colour_table(wide, show=False)
    oof = colour_ridge_oof(wide, folds, features)
    held = wide[["image_id"]].merge(folds, on="image_id")["fold"].to_numpy() == 0
    garbled = wide.copy()
    garbled.loc[held, list(TARGETS)] = garbled.loc[held, list(TARGETS)].to_numpy()[::-1] * 3 + 7
    again = colour_ridge_oof(garbled, folds, features)
    np.testing.assert_allclose(again[held], oof[held])  # fold 0's labels never reach fold 0's predictions
    assert not np.allclose(again[~held], oof[~held])  # ... but they train the other folds


def test_baseline_script_writes_per_fold_scores_and_predictions(synthetic_dir, folds_csv, tmp_path, capsys):
    out = tmp_path / "bl"
    assert (
        baseline_main(["--colour", "--data-dir", str(synthetic_dir), "--folds", str(folds_csv), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "train-mean baseline OOF: weighted_r2=" in printed and "colour-ridge baseline OOF: weighted_r2=" in printed
    table = pd.read_csv(out / "baselines.csv", dtype={"fold": str})
    for name in ("train_mean", "colour_ridge"):
        oof = pd.read_csv(out / f"oof_{name}.csv", dtype={"image_id": str})
        part = table[table["baseline"] == name].set_index("fold")
        assert part.loc["pooled", "weighted_r2"] == pytest.approx(r2_by_hand(oof), abs=1e-9)
        for fold, rows in oof.groupby("fold"):
            assert part.loc[str(fold), "weighted_r2"] == pytest.approx(r2_by_hand(rows), abs=1e-9)


# ---- generated doc sections ---------------------------------------------------------------------------------------
def test_generated_doc_sections_match_their_sources():
    assert docs.rewrite(REPO, check=True) == [], "run `python -m src.docs` after changing docs/*.csv or *.json"
    names = {name for path in docs.doc_files(REPO) for name, _ in docs.sections(path.read_text())}
    assert {"ablation", "demo-table", "demo-peer"} <= names


def test_replace_section_inline_block_and_append():
    text = "a <!-- generated:x -->old<!-- /generated --> b\n<!-- generated:y -->\nold\n<!-- /generated -->\n"
    out = docs.replace_section(docs.replace_section(text, "x", "new"), "y", "line 1\nline 2")
    assert (
        out
        == "a <!-- generated:x -->new<!-- /generated --> b\n<!-- generated:y -->\nline 1\nline 2\n<!-- /generated -->\n"
    )
    assert docs.replace_section("head\n", "z", "body").endswith("<!-- generated:z -->\nbody\n<!-- /generated -->\n")


def test_unknown_generated_section_is_an_error(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- generated:nope -->x<!-- /generated -->\n")
    with pytest.raises(BiomassError, match="unknown generated section 'nope'"):
        docs.rewrite(tmp_path, check=True)


# ---- what the loop really does: mixup and stereo swap, counted ---------------------------------------------------
def _count_in_loop(synthetic_dir: Path, folds_csv: Path, mixup_prob: float, swap_prob: float) -> dict:
    """fit() 3 frozen (cached features) + 3 finetune epochs; every training batch observed as the loop sees it."""
    argv = ["--fold", "1", *TINY_FLAGS, "--data-dir", str(synthetic_dir), "--folds", str(folds_csv),
            "--device", "cpu", "--epochs", "6", "--freeze-epochs", "3", "--batch-size", "2", "--augment", "none",
            "--mixup-prob", str(mixup_prob), "--stereo-swap-prob", str(swap_prob), "--patience", "0"]  # fmt: skip
    cfg = resolve_config(train_script.parse_args(argv))
    wide = wide_with_folds(synthetic_dir, folds_csv)
    train, val = (wide[m].reset_index(drop=True) for m in (wide["fold"] != 1, wide["fold"] == 1))
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    cache = feature_cache(model, train, val, cfg, CPU, show=False)
    views = image_dataset(train, model.view_size, cfg.data)  # eval views: what an unswapped item holds
    counts = {s: {"batches": 0, "mixed": 0, "items": 0, "swapped": 0} for s in ("frozen", "finetune")}

    def observe(raw, mixed, mix, cached):
        c = counts["frozen" if cached else "finetune"]
        c["batches"] += len(raw["targets"]) > 1
        c["mixed"] += mix is not None
        for k, i in enumerate(raw["index"].tolist()):
            if cached:
                own = [torch.equal(raw["left"][k], cache["train"][i, v, 0]) for v in range(cache["train"].shape[1])]
                other = [torch.equal(raw["left"][k], cache["train"][i, v, 1]) for v in range(cache["train"].shape[1])]
            else:
                item = views[i]
                own, other = [torch.equal(raw["left"][k], item["left"])], [torch.equal(raw["left"][k], item["right"])]
            assert any(own) != any(other)  # each item is exactly its own pair, swapped or not
            c["items"] += 1
            c["swapped"] += any(other)
        if mix is not None:  # frozen-stage mixup mixes the cached tile features themselves
            lam, perm = mix
            source = raw["left"].float() / (1.0 if cached else 255.0)
            torch.testing.assert_close(mixed["left"], lam * source + (1 - lam) * source[perm])

    training.BATCH_OBSERVERS.append(observe)
    try:
        training.fit(cfg, train, val, None, CPU, model=model, fold=1, cache=cache)
    finally:
        training.BATCH_OBSERVERS.remove(observe)
    return counts


def test_mixup_and_stereo_swap_fire_at_their_probabilities_in_both_stages(synthetic_dir, folds_csv):
    counts = _count_in_loop(synthetic_dir, folds_csv, mixup_prob=0.3, swap_prob=0.7)
    for stage, c in counts.items():
        assert c["items"] == 3 * 26 and c["batches"] == 3 * 13, (stage, c)  # 26 training images, batches of 2
        lo, hi = binom.interval(0.999, c["batches"], 0.3)
        assert lo <= c["mixed"] <= hi, (stage, c)
        lo, hi = binom.interval(0.999, c["items"], 0.7)
        assert lo <= c["swapped"] <= hi, (stage, c)
    for c in _count_in_loop(synthetic_dir, folds_csv, mixup_prob=0.0, swap_prob=1.0).values():
        assert c["mixed"] == 0 and c["swapped"] == c["items"] > 0


def test_real_py_resumes_a_run_that_stopped_early_but_did_not_reach_its_last_epoch(tmp_path: Path):
    """An early stop no longer ends a run, so real.py counts only the last epoch as done."""
    cfg = resolve_config(train_script.parse_args(["--fold", "0", *TINY_FLAGS, "--epochs", "24", "--patience", "6"]))
    (tmp_path / "best.pt").write_bytes(b"")
    last = {"format": CHECKPOINT_FORMAT, "model": {}}
    torch.save({**last, "state": {"epoch": 12, "bad_epochs": 6, "stopped_epoch": 12}}, tmp_path / "last.pt")
    assert real_script.fold_state(tmp_path, cfg) == "resume"  # patience ran out at 12: it must train on to 23
    torch.save({**last, "state": {"epoch": 23, "bad_epochs": 6, "stopped_epoch": 12}}, tmp_path / "last.pt")
    assert real_script.fold_state(tmp_path, cfg) == "done"
