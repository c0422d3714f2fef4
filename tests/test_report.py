"""report.py: OOF report of an experiment (numbers recomputed by hand), plots, compare table, stress commands."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import run_script

from src.report import PLOTS, compare_table, load_runs, make_report, run_compare, stress_commands
from src.schema import TARGET_WEIGHTS, TARGETS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def weighted_r2_by_hand(oof: pd.DataFrame) -> float:
    """The competition formula written out again, independent of src.metric."""
    y = oof[[f"true_{t}" for t in TARGETS]].to_numpy(np.float64).ravel()
    p = oof[list(TARGETS)].to_numpy(np.float64).ravel()
    w = np.tile(np.asarray(TARGET_WEIGHTS), len(oof))
    mean = (w * y).sum() / w.sum()
    return 1 - (w * (y - p) ** 2).sum() / (w * (y - mean) ** 2).sum()


@pytest.fixture(scope="module")
def exp_copy(trained_exp: Path, tmp_path_factory) -> Path:
    """A private copy of the session's trained experiment (reports write into it)."""
    dest = tmp_path_factory.mktemp("report") / "tiny"
    shutil.copytree(trained_exp, dest, ignore=shutil.ignore_patterns("last.pt"))
    return dest


@pytest.fixture(scope="module")
def reported(exp_copy: Path, synthetic_dir: Path) -> Path:
    """`python report.py <exp> --data-dir DIR` run as a user would; returns the report directory."""
    proc = run_script("report.py", str(exp_copy), "--data-dir", str(synthetic_dir))
    assert "weighted_r2" in proc.stdout and "REPORT.md" in proc.stdout
    return exp_copy / "report"


def test_report_writes_markdown_and_readable_pngs(reported: Path):
    text = (reported / "REPORT.md").read_text()
    for section in ("## Headline", "## Per fold and grid", "## Breakdowns", "## CV stress tests", "## Configuration"):
        assert section in text
    assert "python infer.py --oof" in text  # no oof_report.csv yet: the report says how to make it
    assert "leave_state_out" in text and "python train.py --fold all" in text
    for name in PLOTS:
        data = (reported / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"]({name})" in text


def test_per_fold_metric_equals_hand_computed(reported: Path, exp_copy: Path):
    table = pd.read_csv(reported / "folds.csv", dtype={"fold": str})
    text = (reported / "REPORT.md").read_text()
    runs = load_runs(exp_copy)
    assert len(runs) == 4
    for run in runs:
        oof = pd.read_csv(run.path / "oof.csv", dtype={"image_id": str})
        row = table[(table["scope"] == "fold") & (table["grid"] == run.grid) & (table["fold"] == str(run.fold))]
        assert len(row) == 1
        expected = weighted_r2_by_hand(oof)
        assert abs(float(row["weighted_r2"].iloc[0]) - expected) < 1e-6
        assert int(row["images"].iloc[0]) == len(oof)
        assert f"| {run.grid} | {run.fold} |" in text and f"{expected:.4f}" in text
    pooled = pd.concat([pd.read_csv(r.path / "oof.csv") for r in runs])
    row = table[table["scope"] == "pooled"]
    assert abs(float(row["weighted_r2"].iloc[0]) - weighted_r2_by_hand(pooled)) < 1e-6


def test_breakdown_rows_sum_to_oof_images(reported: Path, exp_copy: Path):
    breakdown = pd.read_csv(reported / "breakdown.csv")
    images = pd.concat([pd.read_csv(r.path / "oof.csv", dtype={"image_id": str}) for r in load_runs(exp_copy)])[
        "image_id"
    ].nunique()
    assert set(breakdown["by"]) == {"State", "month", "Species group"}
    for _, part in breakdown.groupby("by"):
        assert part["images"].sum() == images
    assert (breakdown["rmse_total"] >= 0).all()


def test_report_without_data_skips_breakdowns_and_uses_ensemble_report(exp_copy: Path, tmp_path: Path):
    exp = tmp_path / "nodata"
    shutil.copytree(exp_copy, exp, ignore=shutil.ignore_patterns("report", "best.pt"))
    for cfg_path in exp.glob("grid*/fold*/config.yaml"):
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["data"]["data_dir"] = str(tmp_path / "gone")
        cfg_path.write_text(yaml.safe_dump(cfg))
    rows = [
        {"tta": t, "physics": p, "images": 10, "weighted_r2": v, **{f"r2_{n}": v for n in TARGETS}}
        for t, p, v in (("full", "project", 0.5), ("none", "none", 0.6))
    ]
    pd.DataFrame(rows).to_csv(exp / "oof_report.csv", index=False)
    text = make_report(exp, show=False).read_text()
    assert "Breakdowns skipped" in text and not (exp / "report" / "breakdown.csv").exists()
    assert "ensemble, infer.py default (tta=full, physics=project) | 10 | 0.5000" in text
    assert "ensemble, best setting (tta=none, physics=none) | 10 | 0.6000" in text


def test_compare_sorts_and_deltas(exp_copy: Path, tmp_path: Path):
    worse = tmp_path / "worse"
    shutil.copytree(exp_copy, worse, ignore=shutil.ignore_patterns("report", "*.pt"))
    oof_path = worse / "grid2x2" / "fold0" / "oof.csv"
    oof = pd.read_csv(oof_path, dtype={"image_id": str})
    oof[list(TARGETS)] = oof[list(TARGETS)] * 1.8 + 5.0  # much worse predictions in one fold
    oof.to_csv(oof_path, index=False)
    out = tmp_path / "cmp"
    from src.report import main

    assert main(["--compare", str(worse), str(exp_copy), "--baseline", "worse", "--out", str(out)]) == 0
    table = pd.read_csv(out / "compare.csv")
    assert list(table["experiment"]) == ["tiny", "worse"]  # sorted by the metric, best first
    assert table["weighted_r2"].is_monotonic_decreasing
    pooled = {
        e: weighted_r2_by_hand(pd.concat([pd.read_csv(p) for p in sorted(d.glob("grid*/fold*/oof.csv"))]))
        for e, d in (("tiny", exp_copy), ("worse", worse))
    }
    for _, row in table.iterrows():
        assert abs(row["weighted_r2"] - pooled[row["experiment"]]) < 1e-6
        assert abs(row["delta"] - (pooled[row["experiment"]] - pooled["worse"])) < 1e-9
    assert table.loc[table["experiment"] == "worse", "delta"].iloc[0] == 0
    assert (table["source"].str.startswith("pooled")).all()
    assert table["train_s"].gt(0).all() and set(table["grids"]) == {"1x2/2x2"}
    assert set(table["options"]) == {"default"}  # the session experiment uses no option beyond the seed design
    md = (out / "compare.md").read_text()
    assert "| worse * |" in md and "| tiny |" in md
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_compare_baseline_must_exist(exp_copy: Path, tmp_path: Path):
    from src.errors import BiomassError

    with pytest.raises(BiomassError, match="--baseline"):
        run_compare([exp_copy], baseline="nope", out=tmp_path, show=False)
    table = compare_table([exp_copy])
    assert len(table) == 1 and table["delta"].iloc[0] == 0


def test_stress_commands_reuse_each_grids_config(exp_copy: Path):
    commands = stress_commands(exp_copy)
    assert sum("python folds.py" in c and "--scheme leave_state_out" in c for c in commands) == 1
    assert sum("--scheme leave_month_out" in c for c in commands) == 1
    trains = [c for c in commands if c.startswith("python train.py")]
    assert len(trains) == 4  # 2 schemes x 2 grids
    assert all("config.yaml" in c and "--exp tiny_l" in c for c in trains)
    assert commands[-1].startswith(f"python report.py --compare {exp_copy} ")


def test_option_summary_names_only_the_options_that_differ_from_their_defaults():
    from src.config import Config
    from src.report import option_summary

    cfg = Config()
    assert option_summary(cfg.to_dict()) == "default"
    cfg.model.target_space, cfg.train.ema_decay, cfg.data.clean_stamps = "raw", 0.999, True
    assert option_summary(cfg.to_dict()) == "target_space=raw ema_decay=0.999 clean_stamps=True"
    assert option_summary({"model": {"grid": [2, 2]}}) == "default"  # configs from before the options existed
