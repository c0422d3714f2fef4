"""OOF report of one experiment (tables, breakdowns, plots -> REPORT.md) and the table that compares several.

    python report.py checkpoints/<exp> [--data-dir DIR]           -> checkpoints/<exp>/report/REPORT.md + PNGs
    python report.py --compare checkpoints/<a> checkpoints/<b>   -> <out>/compare.md + compare.csv
    python report.py --stress checkpoints/<exp>                  -> the leave-state/month-out commands to run

Every number is recomputed from the files a run left behind (each fold's `oof.csv`, `oof_epochs.csv` and
`metrics.csv`, and `oof_report.csv` / `oof_ensemble.csv` from `infer.py --oof`), so a report never trusts a
logged score. A run is `grid<R>x<C>/fold<K>/` or, with seeds as an axis, `grid<R>x<C>/fold<K>/seed<S>/`.

Two OOF numbers, because picking on the same labels one scores flatters: the best-epoch OOF (each fold at the
epoch, or SWA average, that scored best on its own held-out images: what best.pt holds) and the fixed-schedule
OOF (each fold at the median best epoch of the *other* folds of its grid and seed, read from the per-epoch
held-out predictions in `oof_epochs.csv`: no choice made for a fold uses that fold's labels).
"""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from src.bootstrap import image_terms, paired_bootstrap
from src.config import Config
from src.data import load_train
from src.errors import BiomassError, run_cli
from src.io_utils import atomic_path, write_csv_atomic, write_text_atomic
from src.metric import per_target_r2, score
from src.schema import SHORT_NAMES, TARGETS

R2_COLUMNS = tuple(f"r2_{t}" for t in TARGETS)
TRUE_COLUMNS = tuple(f"true_{t}" for t in TARGETS)
BREAKDOWN_KEYS = (("State", "State"), ("month", "month"), ("species_group", "Species group"))
# the setting infer.py submits by default: the one row of oof_report.csv that compare uses
DEFAULT_SETTING = {"tta": "full", "physics": "project"}
STRESS_SCHEMES = {"leave_state_out": "lso", "leave_month_out": "lmo"}
PLOTS = ("pred_vs_true.png", "residuals_total.png", "fold_metric.png", "learning_curves.png")


# ---- what a run left behind ------------------------------------------------------------------------------
@dataclass
class FoldRun:
    """One `grid<R>x<C>/fold<K>/[seed<S>/]` directory: held-out predictions, per-epoch log, resolved config."""

    grid: str  # "2x2"
    fold: int
    path: Path
    oof: pd.DataFrame | None
    metrics: pd.DataFrame | None
    config: dict
    command: str | None
    seed: int | None = None  # S of a seed<S>/ directory; None for fold<K>/ runs (one group, whatever their seed)
    epochs: pd.DataFrame | None = None  # oof_epochs.csv: every validated epoch's held-out predictions

    @property
    def best_epoch(self) -> int | None:
        """The epoch with the best validation score in metrics.csv (selected on this fold's own labels).

        Epochs trained on past an early stop (`after_stop`) are not candidates: best.pt was kept from before them.
        """
        m = self.metrics
        if m is not None and "after_stop" in m:
            m = m[~m["after_stop"].astype(str).str.lower().eq("true")]
        if m is None or "weighted_r2" not in m or not m["weighted_r2"].notna().any():
            return None
        return int(m.loc[m["weighted_r2"].idxmax(), "epoch"])


def _read_csv(path: Path, **kwargs) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise BiomassError(
            f"{path}: not a readable CSV ({str(err).splitlines()[0]}); re-run the step that wrote it"
        ) from err


RUN_FILES = ("config.yaml", "metrics.csv", "oof.csv", "best.pt")


def run_dirs(exp_dir: Path) -> list[tuple[Path, Path, int | None]]:
    """(run dir, fold dir, seed of a seed<S>/ dir or None) of `grid*/fold*/` and `grid*/fold*/seed*/` runs."""
    found = []
    for d in sorted(exp_dir.glob("grid*/fold*")) or sorted(exp_dir.glob("fold*")):
        if not d.is_dir() or not d.name[4:].isdigit():
            continue
        seeds = [s for s in d.glob("seed*") if s.is_dir() and s.name[4:].isdigit()]
        seeds.sort(key=lambda s: int(s.name[4:]))
        if not seeds or any((d / name).is_file() for name in RUN_FILES):
            found.append((d, d, None))
        found.extend((s, d, int(s.name[4:])) for s in seeds)
    return found


def load_runs(exp_dir: str | Path) -> list[FoldRun]:
    """Every run of an experiment (`grid*/fold*/[seed*/]`, or `fold*/` directly), sorted by grid, fold, seed."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise BiomassError(f"{exp_dir}: experiment directory not found; pass checkpoints/<exp> as written by train.py")
    runs = []
    for d, fold_dir, seed in run_dirs(exp_dir):
        grid = fold_dir.parent.name[4:] if fold_dir.parent.name.startswith("grid") else "?"
        config_path = d / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        oof = _read_csv(d / "oof.csv", dtype={"image_id": str})
        if oof is not None:
            missing = [c for c in ("image_id", *TARGETS, *TRUE_COLUMNS) if c not in oof.columns]
            if missing:
                raise BiomassError(
                    f"{d / 'oof.csv'}: missing column(s) {', '.join(missing)}; re-train this fold with train.py"
                )
        command = (d / "command.txt").read_text().strip() if (d / "command.txt").is_file() else None
        epochs = _read_csv(d / "oof_epochs.csv", dtype={"image_id": str})
        runs.append(
            FoldRun(
                grid, int(fold_dir.name[4:]), d, oof, _read_csv(d / "metrics.csv"), config or {}, command, seed, epochs
            )
        )
    if not runs:
        raise BiomassError(
            f"{exp_dir}: no grid*/fold*/ directories inside; train with `python train.py --fold all --exp NAME`"
        )
    if not any(r.oof is not None for r in runs):
        raise BiomassError(
            f"{exp_dir}: no fold has an oof.csv yet (training writes it after the first validated epoch)"
        )
    return sorted(runs, key=lambda r: (_grid_key(r.grid), r.fold, -1 if r.seed is None else r.seed))


def _grid_key(grid: str) -> tuple:
    try:
        rows, cols = (int(v) for v in grid.split("x"))
        return (rows * cols, rows, cols)
    except ValueError:
        return (math.inf, 0, 0)


def oof_score(oof: pd.DataFrame) -> dict:
    """The competition metric and per-target R^2 of a wide OOF frame (predictions + true_ columns)."""
    truth = oof[list(TRUE_COLUMNS)].to_numpy(dtype=np.float64)
    pred = oof[list(TARGETS)].to_numpy(dtype=np.float64)
    return {"images": len(oof), **score(truth, pred)}


def grid_mean_oof(runs: list[FoldRun]) -> pd.DataFrame:
    """One prediction per OOF image: the mean over grids (and seeds) of its held-out predictions (grams, no TTA)."""
    frames = [r.oof.assign(fold=r.fold) for r in runs if r.oof is not None]
    pooled = pd.concat(frames, ignore_index=True)
    agg = {c: "mean" for c in (*TARGETS, *TRUE_COLUMNS)}
    agg["fold"] = "first"
    return pooled.groupby("image_id", sort=False).agg(agg).reset_index()[["image_id", "fold", *TARGETS, *TRUE_COLUMNS]]


def seeds_of(runs: list[FoldRun]) -> list:
    """The seeds of an experiment's runs, in order (None for runs that record none)."""
    return sorted({r.seed for r in runs}, key=lambda s: (s is None, s if s is not None else 0))


# ---- the fixed schedule: each fold at an epoch chosen without its own labels --------------------------------------
def schedule_epochs(best_epochs: dict[int, int]) -> dict[int, int | None]:
    """fold -> the median of the *other* folds' best epochs (halves round up); None when there is no other fold.

    Leave-one-fold-out, like the OOF predictions themselves: fold k's epoch is fixed by labels fold k never held.
    """
    out: dict[int, int | None] = {}
    for fold in best_epochs:
        others = [e for f, e in best_epochs.items() if f != fold]
        out[fold] = int(math.floor(float(np.median(others)) + 0.5)) if others else None
    return out


def fixed_schedule(runs: list[FoldRun]) -> dict[Path, tuple[int | None, pd.DataFrame | None]]:
    """run path -> (its fixed epoch, its held-out predictions at that epoch from oof_epochs.csv, or None).

    Folds are grouped by grid and seed (one training recipe each). A fold without predictions at its fixed epoch
    gets no frame (so no fixed score), never a nearer epoch: a run cut short by early stopping before training went
    on past the stop (`fit`) would otherwise be scored at an epoch its own labels chose.
    """
    out: dict[Path, tuple[int | None, pd.DataFrame | None]] = {}
    groups: dict[tuple, list[FoldRun]] = {}
    for r in runs:
        groups.setdefault((r.grid, r.seed), []).append(r)
    for members in groups.values():
        best = {r.fold: r.best_epoch for r in members if r.best_epoch is not None}
        epochs = schedule_epochs(best)
        for r in members:
            epoch = epochs.get(r.fold)
            frame = None
            if epoch is not None and r.epochs is not None and (r.epochs["epoch"] == epoch).any():
                frame = r.epochs[r.epochs["epoch"] == epoch].drop(columns=["epoch"]).reset_index(drop=True)
            out[r.path] = (epoch, frame)
    return out


def _fixed_frames(runs: list[FoldRun], schedule: dict) -> list[pd.DataFrame] | None:
    """The fixed-schedule frames of these runs, or None when any run lacks one (old runs: no oof_epochs.csv)."""
    frames = [schedule[r.path][1] for r in runs if r.oof is not None]
    return None if not frames or any(f is None for f in frames) else frames


def _fixed_score(runs: list[FoldRun], schedule: dict) -> float:
    frames = _fixed_frames(runs, schedule)
    return float("nan") if frames is None else oof_score(pd.concat(frames, ignore_index=True))["weighted_r2"]


def fold_table(runs: list[FoldRun]) -> pd.DataFrame:
    """Metric rows: each run; each grid pooled over its folds; all oof.csv pooled and the grid mean (per seed);
    the mean +- std over seeds and the seed ensemble. `fixed_r2` = the same rows at the fixed schedule."""
    schedule = fixed_schedule(runs)
    rows = []
    for r in runs:
        if r.oof is None:
            continue
        epoch, frame = schedule[r.path]
        fixed = oof_score(frame)["weighted_r2"] if frame is not None else float("nan")
        rows.append(
            {"scope": "fold", "grid": r.grid, "fold": str(r.fold), "seed": r.seed, "best_epoch": r.best_epoch,
             "fixed_epoch": epoch, **oof_score(r.oof), "fixed_r2": fixed}
        )  # fmt: skip
    with_oof = [r for r in runs if r.oof is not None]
    grids = sorted({r.grid for r in with_oof}, key=_grid_key)
    seeds = seeds_of(with_oof)
    top = []  # per seed: the experiment's own pooled OOF (over grids), for the seed mean
    for seed in seeds:
        mine = [r for r in with_oof if r.seed == seed]
        for grid in grids:
            part = [r for r in mine if r.grid == grid]
            if part:
                pooled = pd.concat([r.oof for r in part], ignore_index=True)
                row = {"scope": "grid", "grid": grid, "fold": "pooled", "seed": seed, **oof_score(pooled)}
                rows.append({**row, "fixed_r2": _fixed_score(part, schedule)})
        if len(grids) > 1:
            pooled = pd.concat([r.oof for r in mine], ignore_index=True)
            fixed = _fixed_score(mine, schedule)
            rows.append({"scope": "pooled", "grid": "all", "fold": "pooled", "seed": seed, **oof_score(pooled),
                         "fixed_r2": fixed})  # fmt: skip
            rows.append({"scope": "grid_mean", "grid": "mean", "fold": "pooled", "seed": seed,
                         **oof_score(grid_mean_oof(mine)), "fixed_r2": float("nan")})  # fmt: skip
        top.append(rows[-2] if len(grids) > 1 else rows[-1])
    if len(seeds) > 1:
        grid = "all" if len(grids) > 1 else grids[0]
        values = {k: float(np.mean([t[k] for t in top])) for k in ("weighted_r2", *R2_COLUMNS, "fixed_r2")}
        rows.append({"scope": "seed_mean", "grid": grid, "fold": "pooled", "seed": f"{len(seeds)} seeds",
                     "images": top[0]["images"], **values,
                     "seed_std": float(np.std([t["weighted_r2"] for t in top], ddof=1))})  # fmt: skip
        rows.append({"scope": "seed_ensemble", "grid": "mean", "fold": "pooled", "seed": f"{len(seeds)} seeds",
                     **oof_score(grid_mean_oof(with_oof)), "fixed_r2": float("nan")})  # fmt: skip
    table = pd.DataFrame(rows)
    for col in ("best_epoch", "fixed_epoch"):
        table[col] = table[col].astype("Int64") if col in table else pd.array([pd.NA] * len(table), dtype="Int64")
    table["seed"] = table["seed"].astype(object)
    order = ["scope", "grid", "fold", "seed", "best_epoch", "fixed_epoch", "images", "weighted_r2", "fixed_r2"]
    rest = [c for c in table.columns if c not in order]
    return table[order + rest]


def selection_table(runs: list[FoldRun]) -> pd.DataFrame:
    """Best-epoch vs fixed-schedule OOF, per grid and seed and over everything: how much selection flatters."""
    table = fold_table(runs)
    part = table[table["scope"] != "fold"].copy()
    part = part[["scope", "grid", "seed", "images", "weighted_r2", "fixed_r2"]].rename(
        columns={"weighted_r2": "best_epoch_r2"}
    )
    part["gap"] = part["best_epoch_r2"] - part["fixed_r2"]
    return part.reset_index(drop=True)


def pooled_oof(runs: list[FoldRun]) -> pd.DataFrame:
    """All oof.csv rows of an experiment concatenated (an image appears once per grid and seed)."""
    return pd.concat([r.oof for r in runs if r.oof is not None], ignore_index=True)


def _stale(path: Path, runs: list[FoldRun]) -> bool:
    """A file from infer.py --oof older than some checkpoint describes models that no longer exist."""
    newest = max((p.stat().st_mtime for r in runs for p in (r.path / "best.pt",) if p.is_file()), default=0.0)
    return path.stat().st_mtime < newest


def ensemble_table(exp_dir: Path) -> pd.DataFrame | None:
    """oof_report.csv (fold x grid ensemble, every TTA x physics row), or None when infer.py --oof has not run."""
    report = _read_csv(exp_dir / "oof_report.csv")
    if report is None:
        return None
    missing = [c for c in ("tta", "physics", "weighted_r2", *R2_COLUMNS) if c not in report.columns]
    if missing:
        raise BiomassError(
            f"{exp_dir / 'oof_report.csv'}: missing column(s) {', '.join(missing)}; re-run infer.py --oof"
        )
    return report.sort_values("weighted_r2", ascending=False).reset_index(drop=True)


def default_setting_row(report: pd.DataFrame) -> pd.Series:
    """The tta=full, physics=project row (what infer.py submits by default), else the first row."""
    hit = report[(report["tta"] == DEFAULT_SETTING["tta"]) & (report["physics"] == DEFAULT_SETTING["physics"])]
    if "structural_zeros" in report.columns:  # infer.py's default leaves them off
        hit = hit[~hit["structural_zeros"].astype(str).str.lower().eq("true")]
    return (hit if len(hit) else report).iloc[0]


def per_image_predictions(exp_dir: Path, runs: list[FoldRun]) -> tuple[pd.DataFrame, str]:
    """One prediction per OOF image for breakdowns and plots, and a sentence saying where it comes from."""
    ens = _read_csv(exp_dir / "oof_ensemble.csv", dtype={"image_id": str})
    if ens is not None and not _stale(exp_dir / "oof_ensemble.csv", runs):
        return ens, "`oof_ensemble.csv`: the fold x grid ensemble with full TTA and project physics (infer.py --oof)"
    grids = sorted({r.grid for r in runs if r.oof is not None}, key=_grid_key)
    what = "the mean over grids " + ", ".join(grids) if len(grids) > 1 else f"grid {grids[0]}"
    return grid_mean_oof(runs), f"each fold's `oof.csv` ({what}; best epoch, no TTA, no physics)"


# ---- breakdowns -----------------------------------------------------------------------------------------------
def resolve_data_dir(runs: list[FoldRun], data_dir: str | Path | None) -> tuple[Path | None, str]:
    """--data-dir if given (it must exist), else the training config's data_dir when it exists; else a note."""
    if data_dir is not None:
        if not (Path(data_dir) / "train.csv").is_file():
            raise BiomassError(
                f"{Path(data_dir) / 'train.csv'}: not found; pass --data-dir DIR holding the competition files"
            )
        return Path(data_dir), ""
    configured = next((r.config.get("data", {}).get("data_dir") for r in runs if r.config.get("data")), None)
    if configured and (Path(configured) / "train.csv").is_file():
        return Path(configured), ""
    return None, (
        f"Breakdowns skipped: the training data_dir ({configured or 'not recorded'}) has no train.csv here; "
        "re-run with `--data-dir DIR`."
    )


def breakdown_table(pred: pd.DataFrame, wide: pd.DataFrame) -> pd.DataFrame:
    """Per State, month and species group: images, weighted R^2 and RMSE of Dry_Total_g (grams)."""
    meta_cols = [c for c, _ in BREAKDOWN_KEYS]
    merged = pred.merge(wide[["image_id", *meta_cols]], on="image_id", how="left", validate="one_to_one")
    unknown = merged[meta_cols[0]].isna()
    if unknown.any():
        raise BiomassError(
            f"{int(unknown.sum())} OOF image(s) are not in train.csv (first "
            f"{merged.loc[unknown, 'image_id'].iloc[0]}); "
            "pass the --data-dir the experiment was trained on"
        )
    rows = []
    for col, label in BREAKDOWN_KEYS:
        for value, part in merged.groupby(col, sort=True):
            s = oof_score(part)
            err = part["Dry_Total_g"].to_numpy(np.float64) - part["true_Dry_Total_g"].to_numpy(np.float64)
            rows.append(
                {
                    "by": label,
                    "group": str(value),
                    "images": len(part),
                    "weighted_r2": s["weighted_r2"],
                    "rmse_total": float(np.sqrt(np.mean(err**2))),
                    "mean_true_total": float(part["true_Dry_Total_g"].mean()),
                }
            )
    return pd.DataFrame(rows)


# ---- plots ---------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib  # optional heavy dependency: loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional heavy dependency (see above)

    return plt


def _log1p_axis(ax, which: str = "both") -> None:
    """Axes evenly spaced in log1p(grams) but labelled in grams: zeros stay visible, large values are not squashed."""
    from matplotlib.ticker import FixedLocator, FuncFormatter  # optional heavy dependency: plots only

    ticks = [0, 1, 3, 10, 30, 100, 300, 1000]
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    for axis, name in ((ax.xaxis, "x"), (ax.yaxis, "y")):
        if which in ("both", name):
            getattr(ax, f"set_{name}scale")("function", functions=(np.log1p, np.expm1))
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_major_formatter(fmt)


def _fold_colors(folds: np.ndarray):
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    uniq = sorted(set(int(f) for f in folds))
    return [cmap(uniq.index(int(f)) % 10) for f in folds], {f: cmap(i % 10) for i, f in enumerate(uniq)}


def plot_pred_vs_true(pred: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Five panels (one per target), predicted vs true grams on log1p axes, coloured by fold."""
    plt = _plt()
    colors, legend = _fold_colors(pred["fold"].to_numpy())
    r2 = per_target_r2(pred[list(TRUE_COLUMNS)].to_numpy(np.float64), pred[list(TARGETS)].to_numpy(np.float64))
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(3.9 * len(TARGETS), 4.6), layout="constrained")
    for ax, name in zip(axes, TARGETS):
        y, p = pred[f"true_{name}"].to_numpy(np.float64), pred[name].to_numpy(np.float64)
        hi = max(float(np.nanmax(y)), float(np.nanmax(p)), 1.0) * 1.1
        ax.plot([0, hi], [0, hi], color="0.5", lw=1, ls="--", zorder=1)
        ax.scatter(y, p, c=colors, s=18, alpha=0.8, edgecolors="none", zorder=2)
        _log1p_axis(ax)
        ax.set_xlim(-0.3, hi)  # zeros (common for Clover and Dead) sit just inside the frame
        ax.set_ylim(-0.3, hi)
        ax.set_title(f"{name}\nR² = {r2[name]:.3f}", fontsize=10)
        ax.set_xlabel("true (g)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted (g)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f"fold {f}") for f, c in legend.items()]
    axes[-1].legend(handles=handles, fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11, fontweight="bold")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_residuals(pred: pd.DataFrame, path: Path) -> Path:
    """Residual (predicted - true) of Dry_Total_g against true Total: bias at the extremes shows here."""
    plt = _plt()
    colors, legend = _fold_colors(pred["fold"].to_numpy())
    y = pred["true_Dry_Total_g"].to_numpy(np.float64)
    res = pred["Dry_Total_g"].to_numpy(np.float64) - y
    fig, ax = plt.subplots(figsize=(7.5, 4.5), constrained_layout=True)
    ax.axhline(0, color="0.5", lw=1, ls="--")
    ax.scatter(y, res, c=colors, s=20, alpha=0.8, edgecolors="none")
    _log1p_axis(ax, "x")
    ax.set_xlim(-0.3, max(float(y.max()), 1.0) * 1.1)
    ax.set_xlabel("true Dry_Total_g (g, log1p axis)")
    ax.set_ylabel("predicted - true (g)")
    ax.set_title(f"Dry_Total_g residuals: RMSE {np.sqrt(np.mean(res**2)):.1f} g, mean {res.mean():+.1f} g", fontsize=10)
    ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f"fold {f}") for f, c in legend.items()]
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_fold_bars(table: pd.DataFrame, path: Path) -> Path:
    """Weighted R^2 of each fold, one bar per grid (mean over seeds, whiskers = their range); dashed lines = each
    grid pooled over its folds."""
    plt = _plt()
    folds = table[table["scope"] == "fold"]
    grids = list(dict.fromkeys(folds["grid"]))
    fold_ids = sorted(folds["fold"].astype(int).unique())
    width = 0.8 / max(1, len(grids))
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(
        figsize=(max(5.0, 1.3 * len(fold_ids) * max(1, len(grids)) + 2.5), 4.2), constrained_layout=True
    )
    for g, grid in enumerate(grids):
        per_fold = folds[folds["grid"] == grid].groupby(folds["fold"].astype(int))["weighted_r2"]
        mean, low, high = per_fold.mean(), per_fold.min(), per_fold.max()
        xs = [i + (g - (len(grids) - 1) / 2) * width for i in range(len(fold_ids))]
        vals = [float(mean[f]) if f in mean.index else np.nan for f in fold_ids]
        err = [[v - float(low.get(f, v)) for f, v in zip(fold_ids, vals)],
               [float(high.get(f, v)) - v for f, v in zip(fold_ids, vals)]]  # fmt: skip
        bars = ax.bar(xs, vals, width * 0.95, color=cmap(g % 10), label=f"grid {grid}", yerr=err, capsize=2)
        ax.bar_label(bars, labels=[f"{v:.3f}" if np.isfinite(v) else "" for v in vals], fontsize=8, padding=2)
        pooled = table[(table["scope"] == "grid") & (table["grid"] == grid)]
        if len(pooled):
            ax.axhline(
                float(pooled["weighted_r2"].mean()), color=cmap(g % 10), ls="--", lw=1, label=f"grid {grid} pooled"
            )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(fold_ids)), [f"fold {f}" for f in fold_ids])
    ax.set_ylabel("weighted R²")
    lo = min(0.0, float(np.nanmin(folds["weighted_r2"]))) - 0.05
    hi = max(0.0, float(np.nanmax(folds["weighted_r2"])))
    ax.set_ylim(lo, hi + 0.12 * (hi - lo) + 0.05)
    ax.set_title("OOF weighted R² per fold", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_learning_curves(runs: list[FoldRun], path: Path) -> Path:
    """Train loss and val weighted R^2 per epoch for every fold; dotted line = start of the finetune stage."""
    plt = _plt()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    grids = list(dict.fromkeys(r.grid for r in runs))
    boundaries = set()
    for r in runs:
        m = r.metrics
        if m is None or m.empty:
            continue
        color = cmap(r.fold % 10)
        ls = styles[grids.index(r.grid) % len(styles)]
        label = f"{r.grid} fold {r.fold}" + (f" seed {r.seed}" if len(seeds_of(runs)) > 1 else "")
        ax_loss.plot(m["epoch"], m["train_loss"], color=color, ls=ls, marker="o", ms=3, label=label)
        if "weighted_r2" in m:
            ax_val.plot(m["epoch"], m["weighted_r2"], color=color, ls=ls, marker="o", ms=3, label=label)
            if r.best_epoch is not None:  # the kept checkpoint's epoch (never one trained on past an early stop)
                best = m.loc[m["epoch"] == r.best_epoch].iloc[0]
                ax_val.plot(best["epoch"], best["weighted_r2"], marker="*", ms=12, color=color, ls="")
        finetune = (
            m["stage"].isin(["finetune", 2, "2"]) if "stage" in m else pd.Series(False, index=m.index)
        )  # 2: older runs
        starts = m.loc[finetune, "epoch"]
        if len(starts):
            boundaries.add(float(starts.min()) - 0.5)
    for ax in (ax_loss, ax_val):
        for b in sorted(boundaries):
            ax.axvline(b, color="0.3", ls=":", lw=1.2)
        if boundaries:
            ymax = ax.get_ylim()[1]
            for b in sorted(boundaries):
                ax.text(b + 0.05, ymax, " finetune stage →", fontsize=7, va="top", ha="left", color="0.3")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.set_ylabel("train loss (weighted, log1p)")
    ax_loss.set_title("training loss", fontsize=10)
    ax_val.set_ylabel("val weighted R²")
    ax_val.set_title("validation metric (★ = best epoch, kept in best.pt)", fontsize=10)
    ax_val.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- markdown ------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(frame: pd.DataFrame, digits: dict[str, int] | None = None, default_digits: int = 4) -> str:
    """A pipe table (no tabulate dependency); floats rounded per column."""
    digits = digits or {}
    cols = list(frame.columns)
    lines = [
        "| " + " | ".join(map(str, cols)) + " |",
        "|" + "|".join("---:" if _numeric(frame[c]) else "---" for c in cols) + "|",
    ]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], digits.get(c, default_digits)) for c in cols) + " |")
    return "\n".join(lines)


def _numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _short_r2(frame: pd.DataFrame) -> pd.DataFrame:
    """r2_Dry_Green_g -> r2_green for readable tables."""
    return frame.rename(columns={f"r2_{t}": f"r2_{s}" for t, s in zip(TARGETS, SHORT_NAMES)})


# ---- the report ---------------------------------------------------------------------------------------------------
def make_report(exp_dir: str | Path, data_dir: str | Path | None = None, show: bool = True) -> Path:
    """Write `<exp>/report/REPORT.md`, its CSVs and PNGs; print the headline table. Returns REPORT.md's path."""
    exp_dir = Path(exp_dir)
    runs = load_runs(exp_dir)
    out = exp_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = fold_table(runs)
    write_csv_atomic(table, out / "folds.csv")
    ens = ensemble_table(exp_dir)
    notes = [
        f"fold {r.fold} of grid {r.grid} has no oof.csv (training stopped before a validated epoch)"
        for r in runs
        if r.oof is None
    ]
    ens_stale = ens is not None and _stale(exp_dir / "oof_report.csv", runs)
    pred, pred_source = per_image_predictions(exp_dir, runs)
    data_path, data_note = resolve_data_dir(runs, data_dir)
    breakdown = None
    if data_path is not None:
        breakdown = breakdown_table(pred, load_train(data_path))
        write_csv_atomic(breakdown, out / "breakdown.csv")
    title = f"{exp_dir.name}: {pred_source.split(':')[0].strip('`')} (one point per OOF image)"
    plot_pred_vs_true(pred, out / PLOTS[0], title)
    plot_residuals(pred, out / PLOTS[1])
    plot_fold_bars(table, out / PLOTS[2])
    plot_learning_curves(runs, out / PLOTS[3])

    headline = headline_table(table, ens)
    text = _report_markdown(
        exp_dir, runs, table, ens, ens_stale, headline, pred_source, breakdown, data_path, data_note, notes
    )
    write_text_atomic(out / "REPORT.md", text)
    if show:
        print(_short_r2(headline).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        for note in notes + ([data_note] if data_note else []):
            print(f"note: {note}")
        print(f"wrote {out / 'REPORT.md'}")
    return out / "REPORT.md"


def headline_table(table: pd.DataFrame, ens: pd.DataFrame | None) -> pd.DataFrame:
    """The few rows worth reading first: each grid pooled, all pooled / grid mean (per seed), the seed mean and
    ensemble, the infer.py ensemble settings; `fixed_r2` beside each oof.csv row is its fixed-schedule twin."""
    rows = []
    summary = table[table["scope"] != "fold"]
    several = summary["scope"].eq("seed_mean").any()
    for _, r in summary.iterrows():
        seed = f", seed {r['seed']}" if several and r["scope"] in ("grid", "pooled", "grid_mean") else ""
        label = {
            "grid": f"grid {r['grid']} (oof.csv, folds pooled{seed})",
            "pooled": f"all grids (oof.csv rows pooled{seed})",
            "grid_mean": f"mean over grids (oof.csv{seed})",
            "seed_mean": f"mean over {r['seed']} (std {r.get('seed_std', float('nan')):.4f})",
            "seed_ensemble": f"mean over {r['seed']} and grids of each image's prediction (oof.csv)",
        }[r["scope"]]
        rows.append(
            {
                "model": label,
                "images": int(r["images"]),
                "weighted_r2": r["weighted_r2"],
                "fixed_r2": r["fixed_r2"],
                **{c: r[c] for c in R2_COLUMNS},
            }
        )
    if ens is not None:
        best = ens.iloc[0]
        default = default_setting_row(ens)
        for name, r in (("ensemble, best setting", best), ("ensemble, infer.py default", default)):
            rows.append(
                {
                    "model": f"{name} (tta={r['tta']}, physics={r['physics']})",
                    "images": int(r.get("images", 0) or 0),
                    "weighted_r2": r["weighted_r2"],
                    "fixed_r2": float("nan"),
                    **{c: r[c] for c in R2_COLUMNS},
                }
            )
    return pd.DataFrame(rows)


def _seeds_text(runs: list[FoldRun]) -> str:
    seeds = [str(v) for v in seeds_of(runs) if v is not None]
    return f", seed(s) {', '.join(seeds)} (fold<K>/seed<S>/)" if seeds else ""


def _selection_markdown(table: pd.DataFrame) -> list[str]:
    """The selection-honest section of REPORT.md: best-epoch vs fixed-schedule OOF, and why both."""
    folds = table[table["scope"] == "fold"]
    lines = [
        "## Selection-honest OOF",
        "",
        "`weighted_r2` above is the **best-epoch** OOF: each fold's `oof.csv` holds the epoch (or the SWA average) "
        "that scored best on that fold's own held-out images, so the choice has seen the labels it is scored on "
        "and the number is optimistic. `fixed_r2` is the **fixed-schedule** OOF: each fold at the median best "
        "epoch of the *other* folds of its grid and seed (`fixed_epoch`), read from the per-epoch held-out "
        "predictions training writes to `oof_epochs.csv` (no weights kept, no retraining: validation already "
        "predicts every epoch). No choice made for a fold uses that fold's labels: a fold that stops early keeps its "
        "`best.pt` but trains on to the last epoch so that its fixed epoch is always recorded (a fold lacking it "
        "has no `fixed_r2`). The gap is what selection on the "
        "scored labels is worth; quote `fixed_r2` when comparing with a peer that selects nothing.",
        "",
    ]
    if folds["fixed_r2"].isna().all():
        lines += ["No fold has an `oof_epochs.csv` (trained before it was written): re-train to get `fixed_r2`.", ""]
        return lines
    part = table[table["scope"] != "fold"][["scope", "grid", "seed", "images", "weighted_r2", "fixed_r2"]].copy()
    part["gap"] = part["weighted_r2"] - part["fixed_r2"]
    lines += [to_markdown(part.rename(columns={"weighted_r2": "best_epoch_r2"})), ""]
    return lines


def _report_markdown(
    exp_dir, runs, table, ens, ens_stale, headline, pred_source, breakdown, data_path, data_note, notes
) -> str:
    name = exp_dir.name
    fold_rows = _short_r2(table[table["scope"] == "fold"].drop(columns=["scope", "seed_std"], errors="ignore"))
    summary_rows = _short_r2(table[table["scope"] != "fold"].drop(columns=["scope", "best_epoch", "fixed_epoch"]))
    lines = [
        f"# OOF report: `{name}`",
        "",
        f"`{exp_dir}`: {len(runs)} fold run(s) over grid(s) {', '.join(dict.fromkeys(r.grid for r in runs))}"
        f"{_seeds_text(runs)}. "
        "Metric = the competition's weighted R² over all (image, target) rows (weights Green/Dead/Clover .1, GDM .2, "
        "Total .5); r2_<target> = plain R² of one target. All numbers are recomputed here from the run's files.",
        "",
    ]
    lines += [f"> note: {n}" for n in notes]
    lines += [
        "## Headline",
        "",
        to_markdown(_short_r2(headline)),
        "",
        "`weighted_r2`: best epoch per fold (selected on the fold's own labels); `fixed_r2`: the same predictions "
        "at an epoch fixed by the other folds (see Selection-honest OOF). The ensemble rows use best.pt.",
        "",
    ]
    lines += [
        "## Per fold and grid (each fold's `oof.csv`: best epoch, no TTA, no physics)",
        "",
        to_markdown(fold_rows),
        "",
        to_markdown(summary_rows),
        "",
        "`pooled` concatenates the oof.csv rows (an image counts once per grid); `mean` averages each image's "
        "predictions over grids first (an ensemble of grids without TTA). Table as CSV: `folds.csv`.",
        "",
        "![per-fold metric](fold_metric.png)",
        "",
        *_selection_markdown(table),
        "## Fold x grid ensemble (`oof_report.csv`)",
        "",
    ]
    if ens is None:
        lines += [
            "Not computed yet. Score the ensemble with every TTA x physics setting with:",
            "",
            "```",
            f"python infer.py --oof --data-dir {data_path or 'DIR'} --checkpoints {exp_dir}",
            f"python report.py {exp_dir}",
            "```",
            "",
        ]
    else:
        if ens_stale:
            lines += [
                "> warning: `oof_report.csv` is older than some `best.pt`; re-run `infer.py --oof` before trusting it.",
                "",
            ]
        lines += [
            to_markdown(_short_r2(ens)),
            "",
            "Rows sorted by the metric; tta none/flip/full x physics none/seed/project.",
            "",
        ]
    lines += ["## Breakdowns", "", f"Predictions: {pred_source}.", ""]
    if breakdown is None:
        lines += [data_note, ""]
    else:
        lines += [f"Metadata from `{data_path}/train.csv`. rmse_total = RMSE of Dry_Total_g in grams.", ""]
        for _, label in BREAKDOWN_KEYS:
            part = breakdown[breakdown["by"] == label].drop(columns=["by"]).rename(columns={"group": label})
            lines += [f"### {label}", "", to_markdown(part, {"rmse_total": 2, "mean_true_total": 2}), ""]
        lines += [
            "A group far below the others is what a leave-that-group-out CV (below) measures directly: the default "
            "folds group by month, so every State and species is seen in training.",
            "",
        ]
    lines += [
        "## Plots",
        "",
        "Predicted vs true per target (log1p axes, labelled in grams; dashed = perfect):",
        "",
        "![pred vs true](pred_vs_true.png)",
        "",
        "Residuals of Dry_Total_g (weight .5 of the metric):",
        "",
        "![residuals](residuals_total.png)",
        "",
        "Learning curves from each fold's `metrics.csv` (dotted line = backbone unfrozen):",
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    lines += _stress_markdown(exp_dir, runs)
    lines += [
        "## Configuration",
        "",
        f"Resolved `config.yaml` of {runs[0].grid}/fold{runs[0].fold}:",
        "",
        "```yaml",
        yaml.safe_dump(runs[0].config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    first = _flatten(runs[0].config)
    diffs = []
    for r in runs[1:]:
        other = _flatten(r.config)
        changed = {k: other.get(k) for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)}
        if changed:
            diffs.append(f"- {r.grid}/fold{r.fold}: " + ", ".join(f"`{k}` = {v!r}" for k, v in changed.items()))
    if diffs:
        lines += ["Other fold runs differ in:", "", *diffs, ""]
    commands = list(dict.fromkeys(r.command for r in runs if r.command))
    lines += ["Commands (`command.txt`):", "", "```", *(commands or ["(no command.txt recorded)"]), "```", ""]
    return "\n".join(lines)


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "backbone_kwargs":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---- CV stress tests ---------------------------------------------------------------------------------------------
def stress_commands(exp_dir: str | Path, runs: list[FoldRun] | None = None) -> list[str]:
    """Commands that retrain `exp` under leave-state-out and leave-month-out folds, then compare with the default CV.

    Each grid is retrained from its own resolved config.yaml, so only the folds change.
    """
    exp_dir = Path(exp_dir)
    runs = runs if runs is not None else load_runs(exp_dir)
    first = runs[0].config.get("data", {})
    data_dir = first.get("data_dir", "data/synthetic")
    folds_path = Path(first.get("folds", "data/folds.csv"))
    commands = []
    one_per_grid = {r.grid: r for r in runs}
    for scheme, suffix in STRESS_SCHEMES.items():
        folds_out = folds_path.with_name(f"folds_{suffix}.csv")
        commands.append(
            f"python folds.py --data-dir {shlex.quote(str(data_dir))} --scheme {scheme} --out "
            f"{shlex.quote(str(folds_out))}"
        )
        for r in one_per_grid.values():
            cfg_path = r.path / "config.yaml"
            commands.append(
                f"python train.py --fold all --config {shlex.quote(str(cfg_path))} --folds "
                f"{shlex.quote(str(folds_out))} "
                f"--exp {exp_dir.name}_{suffix} --overwrite"
            )
    siblings = " ".join(shlex.quote(str(exp_dir.parent / f"{exp_dir.name}_{s}")) for s in STRESS_SCHEMES.values())
    commands.append(f"python report.py --compare {shlex.quote(str(exp_dir))} {siblings} --baseline {exp_dir.name}")
    return commands


def _stress_markdown(exp_dir: Path, runs: list[FoldRun]) -> list[str]:
    lines = [
        "## CV stress tests",
        "",
        "The default folds group images by sampling month (StratifiedGroupKFold), so a fold's States, species and "
        "sites are all seen in training. The hidden test set may hold conditions the training set does not; "
        "`leave_state_out` (one fold per State) and `leave_month_out` (one fold per month) hold out a whole State "
        "or month. The gap between this experiment's OOF metric and theirs, in one compare table, is how much the "
        "default CV flatters the model on unseen conditions; a small gap says the default CV can be trusted for "
        "model selection. (`python report.py --stress <exp>` prints these commands.)",
        "",
        "```",
        *stress_commands(exp_dir, runs),
        "```",
        "",
    ]
    siblings = [exp_dir.parent / f"{exp_dir.name}_{s}" for s in STRESS_SCHEMES.values()]
    present = [s for s in siblings if s.is_dir()]
    if present:
        table = compare_table([exp_dir, *present], baseline=exp_dir.name)
        lines += ["Stress runs found next to this experiment:", "", compare_markdown(table), ""]
    return lines


# ---- compare ------------------------------------------------------------------------------------------------------
def _joined(values: Iterable) -> str:
    return "/".join(dict.fromkeys(str(v) for v in values))


# options beyond the seed design (docs/OPTIONS.md, docs/HYGIENE.md): shown in the compare table when not default
OPTION_KEYS = (
    ("model", "target_space"), ("model", "heads"), ("model", "fusion"), ("model", "aux_ndvi_weight"),
    ("model", "aux_height_weight"), ("model", "aux_bins"), ("model", "feature"), ("train", "ema_decay"),
    ("train", "swa_top_k"), ("train", "freeze_blocks"), ("train", "layer_decay"), ("data", "clean_stamps"),
    ("data", "crop_bottom"), ("data", "aug_artifacts"), ("data", "drop_ids"), ("head", "regressor"),
    ("head", "features"),
)  # fmt: skip


def option_summary(config: dict) -> str:
    """`name=value` of every option that differs from its default, or 'default'."""
    defaults = Config().to_dict()
    parts = [
        f"{name}={config.get(section, {}).get(name)}"
        for section, name in OPTION_KEYS
        if name in config.get(section, {}) and config[section][name] != defaults[section][name]
    ]
    return " ".join(parts) or "default"


def key_config(runs: list[FoldRun]) -> dict:
    """The config values that distinguish experiments; several values (e.g. per grid) are joined with '/'."""

    def get(section, name):
        return _joined(r.config.get(section, {}).get(name) for r in runs)

    aux = _joined(
        "/".join(f"{r.config.get('train', {}).get(f'aux_{k}_weight', '')}" for k in ("state", "month", "species"))
        for r in runs
    )
    folds_files = _joined(Path(str(r.config.get("data", {}).get("folds", "?"))).name for r in runs)
    n_folds = len({r.fold for r in runs})
    return {
        "grids": _joined(r.grid for r in runs),
        "tile_size": get("model", "tile_size"),
        "backbone": get("model", "backbone"),
        "epochs/freeze": _joined(
            f"{r.config.get('train', {}).get('epochs')}/{r.config.get('train', {}).get('freeze_epochs')}" for r in runs
        ),
        "mixup_prob": get("train", "mixup_prob"),
        "stereo_swap_prob": get("train", "stereo_swap_prob"),
        "aux s/m/sp": aux,
        "loss": get("train", "loss"),
        "options": _joined(option_summary(r.config) for r in runs),
        "folds": f"{folds_files} ({n_folds})",
    }


def seed_oof(runs: list[FoldRun]) -> dict:
    """seed -> that seed's oof.csv rows of every grid and fold, pooled."""
    seeds = seeds_of([r for r in runs if r.oof is not None])
    return {seed: pooled_oof([r for r in runs if r.seed == seed]) for seed in seeds}


def experiment_metric(exp_dir: Path, runs: list[FoldRun], source: str) -> dict:
    """OOF metric of one experiment: `pooled` (per seed all oof.csv rows, mean over seeds) or `ensemble`
    (oof_report.csv default row: the seed x fold x grid ensemble)."""
    seeds = seeds_of([r for r in runs if r.oof is not None])
    if source == "ensemble":
        report = ensemble_table(exp_dir)
        if report is None:
            raise BiomassError(
                f"{exp_dir}: no oof_report.csv; run `python infer.py --oof --checkpoints {exp_dir}` or use "
                "--source pooled"
            )
        row = default_setting_row(report)
        stale = " STALE" if _stale(exp_dir / "oof_report.csv", runs) else ""
        return {
            "source": f"ensemble tta={row['tta']} physics={row['physics']}{stale}",
            "seeds": len(seeds),
            "images": int(row.get("images", 0) or 0),
            "weighted_r2": float(row["weighted_r2"]),
            "seed_std": float("nan"),
            "fixed_r2": float("nan"),
            **{c: float(row[c]) for c in R2_COLUMNS},
        }
    per_seed = [oof_score(frame) for frame in seed_oof(runs).values()]
    schedule = fixed_schedule(runs)
    fixed = [_fixed_score([r for r in runs if r.seed == seed], schedule) for seed in seeds]
    return {
        "source": f"pooled oof.csv ({len({r.grid for r in runs})} grid(s))",
        "seeds": len(seeds),
        "images": per_seed[0]["images"],
        "weighted_r2": float(np.mean([p["weighted_r2"] for p in per_seed])),
        "seed_std": float(np.std([p["weighted_r2"] for p in per_seed], ddof=1)) if len(per_seed) > 1 else float("nan"),
        "fixed_r2": float(np.mean(fixed)),
        **{c: float(np.mean([p[c] for p in per_seed])) for c in R2_COLUMNS},
    }


def experiment_predictions(exp_dir: Path, runs: list[FoldRun], source: str) -> list[pd.DataFrame] | None:
    """The per-image predictions the metric of `experiment_metric` is made of: one frame per seed (pooled), or
    oof_ensemble.csv (ensemble; None when it is missing or older than the checkpoints)."""
    if source == "ensemble":
        path = exp_dir / "oof_ensemble.csv"
        ens = _read_csv(path, dtype={"image_id": str})
        return None if ens is None or _stale(path, runs) else [ens]
    return list(seed_oof(runs).values())


def frame_terms(frames: list[pd.DataFrame], images: pd.Index) -> np.ndarray:
    """(seeds, images, 4) bootstrap sums of each frame's rows on these images (rows of other images left out)."""
    out = []
    for frame in frames:
        keep = frame["image_id"].isin(images).to_numpy()
        part = frame[keep]
        out.append(
            image_terms(
                part[list(TRUE_COLUMNS)].to_numpy(np.float64),
                part[list(TARGETS)].to_numpy(np.float64),
                images.get_indexer(part["image_id"]),
                len(images),
            )
        )
    return np.stack(out)


def compare_table(
    exp_dirs: list[str | Path], baseline: str | None = None, source: str = "auto", draws: int = 2000
) -> pd.DataFrame:
    """One row per experiment: key config, seed-mean OOF metric +- std over seeds, fixed-schedule OOF, per-target
    R^2, train time; sorted; the paired bootstrap difference to the baseline with its 95% interval and verdict.

    source='auto' uses the ensemble (oof_report.csv) only when every experiment has one, so rows stay comparable.
    The difference is taken over the images both experiments scored (resampled together, the metric recomputed
    each draw); seeds are resampled too, so `can't tell` covers reseeding noise as well as the image sample.
    """
    if source not in ("auto", "pooled", "ensemble"):
        raise BiomassError(f"unknown --source {source!r}; choose auto, pooled or ensemble")
    dirs = [Path(d) for d in exp_dirs]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    loaded = [load_runs(d) for d in dirs]
    if source == "auto":
        source = "ensemble" if all((d / "oof_report.csv").is_file() for d in dirs) else "pooled"
    base = baseline if baseline is not None else names[0]
    match = [i for i, (n, d) in enumerate(zip(names, dirs)) if base in (n, str(d), d.name)]
    if not match:
        raise BiomassError(f"--baseline {base!r} is not one of the compared experiments ({', '.join(names)})")
    b = match[0]
    preds = [experiment_predictions(d, runs, source) for d, runs in zip(dirs, loaded)]
    rows = []
    for name, d, runs in zip(names, dirs, loaded):
        seconds = sum(
            float(r.metrics["seconds"].sum()) for r in runs if r.metrics is not None and "seconds" in r.metrics
        )
        rows.append(
            {"experiment": name, **key_config(runs), **experiment_metric(d, runs, source), "train_s": round(seconds, 1)}
        )
    table = pd.DataFrame(rows)
    deltas, lows, highs, verdicts = [], [], [], []
    for i in range(len(table)):
        delta = float(table.loc[i, "weighted_r2"] - table.loc[b, "weighted_r2"])
        low = high = float("nan")
        verdict = "baseline" if i == b else "no predictions"
        if i != b and preds[i] is not None and preds[b] is not None:
            images = pd.Index(sorted(set(preds[i][0]["image_id"]) & set(preds[b][0]["image_id"])))
            if len(images):
                interval = paired_bootstrap(frame_terms(preds[i], images), frame_terms(preds[b], images), draws=draws)
                delta, low, high, verdict = interval.delta, interval.low, interval.high, interval.verdict
        deltas.append(0.0 if i == b else delta)
        lows.append(low)
        highs.append(high)
        verdicts.append(verdict)
    at = table.columns.get_loc("fixed_r2") + 1
    for offset, (col, values) in enumerate(
        (("delta", deltas), ("ci_low", lows), ("ci_high", highs), ("verdict", verdicts))
    ):
        table.insert(at + offset, col, values)
    table["baseline"] = [i == b for i in range(len(table))]
    return table.sort_values("weighted_r2", ascending=False, kind="stable").reset_index(drop=True)


def _pm(value: float, std: float) -> str:
    return f"{value:.4f}" if not np.isfinite(std) else f"{value:.4f} ± {std:.4f}"


def _interval_text(low: float, high: float) -> str:
    return "" if not (np.isfinite(low) and np.isfinite(high)) else f"[{low:+.4f}, {high:+.4f}]"


def compare_markdown(table: pd.DataFrame) -> str:
    """The compare table as markdown (baseline row marked with *): mean ± std over seeds, delta [95% CI], verdict."""
    shown = _short_r2(table.drop(columns=["baseline", "seed_std", "ci_low", "ci_high"])).copy()
    shown["experiment"] = [f"{e} *" if b else e for e, b in zip(table["experiment"], table["baseline"])]
    shown["weighted_r2"] = [_pm(v, s) for v, s in zip(table["weighted_r2"], table["seed_std"])]
    shown["delta"] = [f"{v:+.4f}" for v in table["delta"]]
    shown.insert(
        shown.columns.get_loc("delta") + 1,
        "95% CI",
        [_interval_text(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"])],
    )
    return to_markdown(shown, {"train_s": 1})


def run_compare(
    exp_dirs: list[str | Path],
    baseline: str | None = None,
    out: str | Path | None = None,
    source: str = "auto",
    show: bool = True,
) -> pd.DataFrame:
    """compare_table -> <out>/compare.csv + compare.md (atomic); out defaults to <parent of the first exp>/compare."""
    if len(exp_dirs) < 1:
        raise BiomassError("--compare needs at least one experiment directory")
    table = compare_table(exp_dirs, baseline, source)
    out = Path(out) if out is not None else Path(exp_dirs[0]).parent / "compare"
    write_csv_atomic(table, out / "compare.csv")
    md = compare_markdown(table)
    note = (
        "Sorted by weighted_r2 (mean ± std over seeds). Metric source per row in `source`: `pooled` = per seed all "
        "oof.csv rows of the experiment concatenated (best epoch, no TTA), then the mean over seeds; `ensemble` = "
        f"oof_report.csv's tta={DEFAULT_SETTING['tta']}, physics={DEFAULT_SETTING['physics']} row. fixed_r2 = the "
        "pooled OOF with each fold at the median best epoch of the other folds (selection-honest; empty for runs "
        "without oof_epochs.csv). delta = this row - the baseline (*) on the images both scored, with the paired "
        "bootstrap 95% interval (images and seeds resampled, the metric recomputed each draw); verdict: better / "
        "worse when the interval excludes 0, else can't tell. train_s = sum of metrics.csv epoch seconds "
        "(feature-cache builds excluded)."
    )
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(f"# Compare\n\n{md}\n\n{note}\n")
    if show:
        print(md)
        print(f"wrote {out / 'compare.md'} and {out / 'compare.csv'}")
    return table


# ---- command line -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="report.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    parser.add_argument("exp", nargs="?", help="experiment directory (checkpoints/<exp>) to report on")
    parser.add_argument(
        "--data-dir", default=None, help="competition-layout data for the breakdowns (default: the run's data_dir)"
    )
    parser.add_argument(
        "--compare", nargs="+", metavar="EXP", default=None, help="experiment directories to compare in one table"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="experiment name (or path) the delta column is relative to (default: the first)",
    )
    parser.add_argument(
        "--out", default=None, help="directory for compare.md/.csv (default: <parent of the first EXP>/compare)"
    )
    parser.add_argument(
        "--source",
        default="auto",
        choices=["auto", "pooled", "ensemble"],
        help="compare metric: pooled oof.csv rows, the oof_report.csv ensemble, or auto (ensemble if all have it)",
    )
    parser.add_argument(
        "--stress", metavar="EXP", default=None, help="print the leave-state/month-out commands for EXP and exit"
    )
    args = parser.parse_args(argv)
    chosen = sum(x is not None for x in (args.exp, args.compare, args.stress))
    if chosen != 1:
        parser.error("give exactly one of: EXP, --compare EXP [EXP ...], --stress EXP")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare is not None:
        run_compare(args.compare, args.baseline, args.out, args.source)
    elif args.stress is not None:
        print("\n".join(stress_commands(args.stress)))
    else:
        make_report(args.exp, args.data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
