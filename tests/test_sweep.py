"""sweep.py: cartesian product on one feature cache per fold, resumable sweep.csv, same result as a plain fit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_FLAGS

from src import sweep, training
from src.errors import BiomassError


def base_args(synthetic_dir: Path, folds_csv: Path, out: Path, *extra: str) -> list[str]:
    flags = [f for f in TINY_FLAGS if f not in ("--epochs", "2", "--freeze-epochs", "1")]
    return [
        "--exp",
        "sw",
        "--out-dir",
        str(out),
        "--data-dir",
        str(synthetic_dir),
        "--folds",
        str(folds_csv),
        *flags,
        "--epochs",
        "1",
        *extra,
    ]


@pytest.fixture()
def spies(monkeypatch):
    """Count the sweep's calls of fit and feature_cache while still running them."""
    calls = {"fit": 0, "feature_cache": 0}
    real_fit, real_cache = sweep.fit, sweep.feature_cache

    def fit(*args, **kwargs):
        calls["fit"] += 1
        assert kwargs.get("cache") is not None and args[3] is None  # shared cache, nothing written per run
        return real_fit(*args, **kwargs)

    def feature_cache(*args, **kwargs):
        calls["feature_cache"] += 1
        return real_cache(*args, **kwargs)

    monkeypatch.setattr(sweep, "fit", fit)
    monkeypatch.setattr(sweep, "feature_cache", feature_cache)
    return calls


def test_sweep_product_resume_and_added_values(synthetic_dir, folds_csv, tmp_path, spies):
    argv = base_args(synthetic_dir, folds_csv, tmp_path, "--fold", "0", "--lr", "1e-3", "2e-3", "--dropout", "0", "0.2")
    assert sweep.main(argv) == 0
    csv = tmp_path / "sw" / "sweep.csv"
    rows = pd.read_csv(csv, dtype={"run_id": str})
    assert len(rows) == 4 and rows["run_id"].nunique() == 4
    assert spies == {"fit": 4, "feature_cache": 1}
    assert set(rows["lr"]) == {0.001, 0.002} and set(rows["dropout"]) == {0.0, 0.2}
    assert (rows["epochs"] == 1).all() and rows["weighted_r2"].notna().all() and rows["r2_Dry_Total_g"].notna().all()
    assert (tmp_path / "sw" / "sweep.md").is_file()

    assert sweep.main(argv) == 0  # everything done: no training, no cache
    assert spies == {"fit": 4, "feature_cache": 1}
    assert len(pd.read_csv(csv)) == 4

    assert sweep.main(argv + ["--dropout", "0", "0.2", "0.4"]) == 0  # one new dropout value: 2 new runs
    assert spies == {"fit": 6, "feature_cache": 2}
    again = pd.read_csv(csv, dtype={"run_id": str})
    assert len(again) == 6
    pd.testing.assert_frame_equal(again.iloc[:4], rows)  # earlier rows untouched


def test_sweep_run_equals_plain_fit(synthetic_dir, folds_csv, tmp_path):
    """The shared cache is exactly what fit() would compute itself: same seed, same backbone, same score."""
    args = sweep.parse_args(base_args(synthetic_dir, folds_csv, tmp_path, "--lr", "2e-3", "--hidden-ratio", "0.25"))
    base = sweep.base_config(args)
    table = sweep.run_sweep(base, sweep.grid_from_args(args), [1], show=False)
    assert len(table) == 1
    run = sweep.expand(base, sweep.grid_from_args(args))[0]
    from src.data import load_train
    from src.folds import load_folds

    wide = load_train(synthetic_dir)
    wide = wide.merge(load_folds(folds_csv, wide), on="image_id")
    train, val = (wide[m].reset_index(drop=True) for m in (wide["fold"] != 1, wide["fold"] == 1))
    plain = training.fit(run.cfg, train, val, None, __import__("torch").device("cpu"), fold=1)
    assert abs(plain.best_metric - table["weighted_r2"].iloc[0]) < 1e-6


def test_flags_and_ids():
    args = sweep.parse_args(
        [
            "--exp",
            "x",
            "--preset",
            "tiny",
            "--epochs",
            "4",
            "--target-weights",
            *"1 1 1 1 1 .1 .1 .1 .2 .5".split(),
            "--lr",
            "1e-3",
        ]
    )
    base = sweep.base_config(args)
    assert base.train.epochs == base.train.freeze_epochs == 4
    grid = sweep.grid_from_args(args)
    assert grid["target_weights"] == [["1", "1", "1", "1", "1"], [".1", ".1", ".1", ".2", ".5"]]
    runs = sweep.expand(base, grid)
    assert len(runs) == 2 and runs[1].values["target_weights"] == (0.1, 0.1, 0.1, 0.2, 0.5)
    assert [r.run_id for r in runs] == [r.run_id for r in sweep.expand(base, grid)]  # stable
    import copy

    moved = copy.deepcopy(base)
    moved.train.device, moved.data.num_workers, moved.exp = "cpu", 3, "elsewhere"  # no effect on the result
    assert sweep.run_id_of(moved) == sweep.run_id_of(base)
    moved.train.seed += 1
    assert sweep.run_id_of(moved) != sweep.run_id_of(base)
    # ids hash only non-default values: a config field added later, at its default, keeps finished runs
    from src.config import Config

    plain, newer = Config(), Config()
    newer.data.aug_artifacts = 0.5
    assert sweep.run_id_of(newer) != sweep.run_id_of(plain)
    real_to_dict = Config.to_dict
    with pytest.MonkeyPatch.context() as mp:  # as if `aug_artifacts` did not exist yet when the run was made
        mp.setattr(
            Config,
            "to_dict",
            lambda self: {
                **real_to_dict(self),
                "data": {k: v for k, v in real_to_dict(self)["data"].items() if k != "aug_artifacts"},
            },
        )
        before = sweep.run_id_of(plain)
    assert before == sweep.run_id_of(plain)
    default = sweep.base_config(sweep.parse_args(["--exp", "x", "--preset", "tiny"]))
    assert default.train.epochs == default.train.freeze_epochs == 1  # tiny's frozen stage
    with pytest.raises(BiomassError, match="groups of 5"):
        sweep.grid_from_args(sweep.parse_args(["--exp", "x", "--target-weights", "1", "2"]))
    with pytest.raises(BiomassError, match="frozen stage only"):
        sweep.base_config(sweep.parse_args(["--exp", "x", "--epochs", "3", "--freeze-epochs", "2"]))
    with pytest.raises(BiomassError, match="--exp"):
        sweep.main(["--lr", "1e-3"])


def test_sweep_over_seeds_reports_mean_and_std(synthetic_dir, folds_csv, tmp_path, spies):
    argv = base_args(synthetic_dir, folds_csv, tmp_path, "--fold", "0", "--lr", "1e-3", "2e-3", "--seeds", "0", "1")
    flags = [f for i, f in enumerate(argv) if f != "--seed" and argv[i - 1] != "--seed"]  # --seeds replaces it
    assert sweep.main(flags) == 0
    rows = pd.read_csv(tmp_path / "sw" / "sweep.csv", dtype={"run_id": str})
    assert len(rows) == 4 and sorted(rows["seed"]) == [0, 0, 1, 1] and rows["run_id"].nunique() == 4
    assert spies == {"fit": 4, "feature_cache": 2}  # one cache per (fold, seed)
    args = sweep.parse_args(flags)
    runs = sweep.expand_seeds(sweep.base_config(args), sweep.grid_from_args(args), [0, 1])
    table = sweep.sweep_table(rows, runs, ["lr"], [0])
    assert len(table) == 2 and (table["seeds"] == 2).all()
    for _, row in table.iterrows():
        mine = rows[rows["lr"] == float(row["lr"])]["weighted_r2"]
        assert row["weighted_r2"] == pytest.approx(mine.mean()) and row["seed_std"] == pytest.approx(mine.std())
    assert "seed_std" in (tmp_path / "sw" / "sweep.md").read_text()
    with pytest.raises(BiomassError, match="not both"):
        sweep.main([*flags, "--seed", "3"])
