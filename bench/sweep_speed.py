"""Sweep timing: wall time of `python sweep.py` for a 27-run sweep (3 x 3 x 3 values of lr, dropout and
hidden ratio) of the tiny preset's frozen stage on one fold of the synthetic data, then the same command
again to show that a finished sweep resumes by skipping every run.

sweep.py runs as a subprocess, exactly as a user runs it (imports, data check, one feature cache for the
fold, 27 `fit` calls reading it, sweep.csv rewritten after each run, the compare table). The per-run and
cache seconds come from the sweep.csv it writes. The data is the demo's: 240 synthetic 1000x500 JPEGs
(seed 0, as `make data-synthetic`) and group_month 5-fold folds (seed 42, as folds.py), generated once
into the bench cache unless --data-dir / --folds point at existing ones.
Bar (issue 10): the 27-run sweep finishes in minutes on 2 cores (here: under 10 minutes of wall time).

    python bench/sweep_speed.py [--quick] [--epochs 10] [--data-dir DIR --folds CSV]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from bench import common  # noqa: E402
from src.data import load_train  # noqa: E402
from src.folds import make_folds, save_folds  # noqa: E402

BAR_S = 600.0  # "finishes in minutes": under 10 minutes of wall time
IMAGE_SIZE = (1000, 500)  # the demo data size
GRID = {"--lr": ["5e-4", "1e-3", "2e-3"], "--dropout": ["0.1", "0.2", "0.3"], "--hidden-ratio": ["0.25", "0.5", "1.0"]}
QUICK_GRID = {"--lr": ["1e-3", "2e-3"]}
HEADER = re.compile(r"(\d+) run\(s\) x (\d+) fold\(s\) = (\d+); (\d+) already in")


def demo_data(n_images: int, size: tuple[int, int], n_folds: int, fold_seed: int) -> tuple[Path, Path]:
    """The synthetic train set (common.synthetic_dataset) and its group_month folds CSV, made once."""

    data = common.synthetic_dataset(n_images, size, seed=0)
    folds = data / f"folds_group_month_{n_folds}_s{fold_seed}.csv"
    if not folds.is_file():
        save_folds(make_folds(load_train(data), "group_month", n_folds=n_folds, seed=fold_seed), folds)
    return data, folds


def run_sweep(argv: list[str]) -> dict:
    """python sweep.py ARGV as a child process: wall seconds and its output (raises if it fails)."""
    cmd = [sys.executable, str(common.REPO / "sweep.py"), *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    print(f"$ python sweep.py {' '.join(argv)}\n{output.rstrip()}\n[{wall:.1f} s]", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep.py exited {proc.returncode}:\n{output[-3000:]}")
    match = HEADER.search(output)
    if match is None:
        raise RuntimeError(f"sweep.py printed no 'N run(s) x F fold(s)' line:\n{output[-3000:]}")
    runs, folds, total, skipped = (int(g) for g in match.groups())
    return {"wall": wall, "output": output, "runs": runs, "folds": folds, "total": total, "skipped": skipped}


def main(argv: list[str] | None = None) -> dict:

    p = common.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument(
        "--epochs", type=int, default=10, help="frozen-stage epochs per run (default 10; the tiny preset's own is 1)"
    )
    p.add_argument("--fold", default="0", help="sweep.py --fold (default 0)")
    p.add_argument(
        "--data-dir", default=None, help="existing competition-layout data (default: generate the demo's 240 images)"
    )
    p.add_argument("--folds", default=None, help="folds CSV of --data-dir (required with it)")
    args = p.parse_args(argv)
    common.setup(args)
    info = common.machine()
    if (args.data_dir is None) != (args.folds is None):
        p.error("--data-dir and --folds go together")
    if args.quick:
        data, folds = demo_data(20, (256, 128), 2, 0)
        grid, epochs, extra = QUICK_GRID, 1, ["--tile-size", "28", "--batch-size", "8"]
    else:
        data, folds = (Path(args.data_dir), Path(args.folds)) if args.data_dir else demo_data(240, IMAGE_SIZE, 5, 42)
        grid, epochs, extra = GRID, args.epochs, []
    n_runs = 1
    for values in grid.values():
        n_runs *= len(values)
    swept = [x for flag, values in grid.items() for x in (flag, *values)]
    with tempfile.TemporaryDirectory() as tmp:
        sweep_argv = [
            "--exp",
            "sweep_bench",
            "--out-dir",
            tmp,
            "--preset",
            "tiny",
            "--fold",
            args.fold,
            "--data-dir",
            str(data),
            "--folds",
            str(folds),
            "--epochs",
            str(epochs),
            "--num-workers",
            "0",
            *extra,
            *swept,
        ]
        first = run_sweep(sweep_argv)
        again = run_sweep(sweep_argv)  # resume: every (run, fold) is in sweep.csv
        rows = pd.read_csv(Path(tmp) / "sweep_bench" / "sweep.csv", dtype={"run_id": str})
        table_md = (Path(tmp) / "sweep_bench" / "sweep.md").read_text()
    if first["runs"] != n_runs or first["skipped"] != 0 or len(rows) != first["total"]:
        raise RuntimeError(
            f"expected {n_runs} new runs, got {first['runs']} ({first['skipped']} skipped), {len(rows)} rows"
        )
    if again["skipped"] != again["total"]:
        raise RuntimeError(f"resume re-ran runs: {again['skipped']} of {again['total']} skipped")
    cache_s = float(rows.groupby("fold")["cache_seconds"].first().sum())
    run_s = rows["seconds"].astype(float)
    overhead = first["wall"] - cache_s - float(run_s.sum())
    n_train = (
        first["output"].split("feature cache of ", 1)[1].split(" train")[0]
        if "feature cache of " in first["output"]
        else "?"
    )
    best = rows.sort_values("weighted_r2", ascending=False).iloc[0]
    # the same product without the shared cache: every run builds its own cache (train.py's stage 1) and
    # pays the process start; derived from this run's figures, not measured
    per_process = overhead  # imports + data check + table of one sweep.py process
    naive = first["total"] * (cache_s / first["folds"] + float(run_s.median()) + per_process)
    values_text = "; ".join(f"{flag[2:]} {' '.join(v)}" for flag, v in grid.items())
    table_rows = [
        {
            "step": f"python sweep.py: {first['runs']} runs x {first['folds']} fold ({values_text}), {epochs} "
            "epochs each",
            "wall s": f"{first['wall']:.1f}",
            "detail": f"feature cache {cache_s:.1f} s ({n_train} train images x 4 flips + val); "
            f"runs {run_s.sum():.1f} s (median {run_s.median():.2f}, min {run_s.min():.2f}, max "
            f"{run_s.max():.2f} s per run); "
            f"rest (imports, data check, table) {overhead:.1f} s",
        },
        {
            "step": "the same command again (resume)",
            "wall s": f"{again['wall']:.1f}",
            "detail": f"{again['skipped']} of {again['total']} (run, fold) already in sweep.csv: nothing trained",
        },
        {
            "step": "without the shared cache (derived, not run)",
            "wall s": f"{naive:.0f}",
            "detail": f"{first['total']} x (cache {cache_s / first['folds']:.1f} + run {run_s.median():.2f} + "
            f"process {per_process:.1f} s)",
        },
    ]
    lines = [
        f"Tiny preset frozen stage (`--preset tiny --epochs {epochs}`: epochs = freeze_epochs), fold {args.fold} of "
        f"`{folds.name}`, data `{data.name}` ({'given' if args.data_dir else 'generated by the bench'}), "
        "num_workers 0, CPU, "
        "one child process per command; seconds per run and of the cache from the sweep.csv it wrote. "
        f"Command: `python sweep.py {' '.join(a if a != tmp else '<tmp>' for a in sweep_argv)}`.",
        "",
        common.table(table_rows),
        "",
        f"Best run: lr {best['lr']}, dropout {best['dropout']}, hidden_ratio {best['hidden_ratio']}: val weighted R2 "
        f"{best['weighted_r2']:.4f} (random-init tiny backbone: the frozen stage alone learns little, see ENV_FACTS).",
        "",
        "<details><summary>sweep.md as written</summary>",
        "",
        table_md.split("\n", 2)[-1].strip(),
        "",
        "</details>",
        "",
        "- "
        + common.bar_line(
            f"{first['total']}-run sweep in {first['wall']:.0f} s = {first['wall'] / 60:.1f} min wall on this machine "
            f"(bar: minutes, < {BAR_S / 60:.0f} min); resume of the finished sweep {again['wall']:.1f} s",
            first["wall"] < BAR_S,
        ),
    ]
    common.report(
        args, argv, f"Sweep: {first['total']}-run tiny-preset sweep on one feature cache", "\n".join(lines), info
    )
    return {"first": first, "again": again, "rows": rows}


if __name__ == "__main__":
    main()
