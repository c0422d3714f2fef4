"""Ablation: the default vs each option of docs/OPTIONS.md (and the "top private" bundle), seeds x folds x options,
on the synthetic data with the tiny presets -> a table in docs/ABLATION.md and docs/ablation.csv (+ .json).

    python bench/ablate.py                      # the full run (make ablate): every option, every fold, 3 seeds
    python bench/ablate.py --quick              # smoke test: default + top-private, one fold, 2 epochs, 28 px tiles
    python bench/ablate.py --only default raw --folds-to-run 0 1 --epochs 8 --seeds 0 1 2 3 4

Each (option, seed, fold) is one `src.training.train_fold` call (the one training loop, as train.py makes it)
into <out-dir>/<option>/grid<R>x<C>/fold<K>/seed<S>/, with the option's flags resolved by train.py's own parser
on top of the same base flags; command.txt in each run directory says how to rerun it with train.py. The table is
`src.report.compare_table` over those experiment directories (pooled oof.csv per seed, best epoch, no TTA; mean
± std over seeds; the paired bootstrap interval of each option's difference to the default), so
`python report.py --compare <out-dir>/default <out-dir>/raw ... --baseline default` shows the same rows. The
results replace the `generated:ablation` section of the doc (rendered by `src.docs.render_ablation` from the
CSV and JSON, so `python -m src.docs --check` can tell the doc from its sources); the text around it stays.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from src.config import Config, add_config_flags, resolve_config  # noqa: E402
from src.data import load_train  # noqa: E402
from src.docs import ablation_table, render_ablation, replace_section  # noqa: E402
from src.errors import BiomassError  # noqa: E402
from src.folds import load_folds  # noqa: E402
from src.io_utils import write_csv_atomic, write_text_atomic  # noqa: E402
from src.report import compare_table  # noqa: E402
from src.training import train_fold  # noqa: E402

DOC = common.REPO / "docs" / "ABLATION.md"
CSV = common.REPO / "docs" / "ablation.csv"
SECTION = "ablation"  # the generated section of the doc
SEEDS = (0, 1, 2)  # every row is trained with each: a delta is only read against the seed-to-seed noise

# Full-run settings, chosen for ~20-25 minutes per seed on the shared 2-core box (the one-seed run took 20.6 min for
# 17 rows x 5 folds, docs/ablation.json): one fold of the tiny preset at its own 56 px tiles (view 112 px) leaves
# ~6 epochs (1 frozen) per fold; 3 seeds about triple it. All 5 month-grouped folds rather than 3 folds x 10
# epochs: every image is then scored out of fold once (the metric is global over all rows).
TILE, EPOCHS, FREEZE = 56, 6, 1
# One torch thread: with 2 threads on a box other processes also use, OpenMP spin-waiting made the same
# epochs ~10x slower (measured 2.6 s vs ~30 s an epoch); one thread gives the same numbers (CPU runs are deterministic).
THREADS = 1
# EMA window: 192 training images / batch 16 = 12 steps an epoch, so decay 0.9 averages about the last epoch
# (0.999, right for thousands of real-data steps, would leave the EMA near its random init here).
EMA = "0.9"

# option name -> flags on top of the base flags (exactly what a user adds to train.py)
OPTIONS: dict[str, list[str]] = {
    "default": [],
    "dinov3": ["--preset", "tiny-dinov3", "--tile-size", "{tile16}"],
    "grid-1x1": ["--grid", "1", "1", "--tile-size", "{tile2}"],  # one tile per view, same pixels per view
    "freeze-blocks-1": ["--freeze-blocks", "1"],  # 1 of the tiny ViT's 2 blocks (top teams: 50-80%)
    "layer-decay-0.75": ["--layer-decay", "0.75"],
    "raw": ["--target-space", "raw"],
    "heads-gdc": ["--heads", "green-dead-clover"],
    "heads-cgt": ["--heads", "clover-gdm-total"],
    "aux-ndvi": ["--aux-ndvi-weight", "0.2"],
    "aux-height": ["--aux-height-weight", "0.2"],
    "aux-bins": ["--aux-bins", "5", "--aux-bins-weight", "0.2"],
    "fusion-concat": ["--fusion", "concat"],
    "fusion-cross-attn": ["--fusion", "cross-attn"],
    "ema": ["--ema-decay", EMA],
    "swa-3": ["--swa-top-k", "3"],
    # issue 26: each component of the pipeline switched off alone (the tiny preset's defaults are the "on" state)
    "no-frozen-stage": ["--freeze-epochs", "0"],
    "no-mixup": ["--mixup-prob", "0"],
    "no-stereo-swap": ["--stereo-swap-prob", "0"],
    "no-aux-heads": ["--aux-state-weight", "0", "--aux-month-weight", "0", "--aux-species-weight", "0"],
    "augment-light": ["--augment", "light"],
    "augment-none": ["--augment", "none"],
    "feature-mean": ["--feature", "mean"],
    "no-warmup": ["--warmup-frac", "0"],
    "no-grad-clip": ["--grad-clip", "0"],
    "no-ema": ["--ema-half-life", "0", "--ema-decay", "0"],
    "early-stop-6": ["--patience", "6"],
    "weight-decay-0.05": ["--weight-decay", "0.05"],
    "top-private": [
        "--target-space",
        "raw",
        "--heads",
        "green-dead-clover",
        "--ema-decay",
        EMA,
        "--aux-ndvi-weight",
        "0.2",
        "--aux-height-weight",
        "0.2",
        "--grid",
        "1",
        "1",
        "--tile-size",
        "{tile2}",
    ],
}
QUICK_OPTIONS = ("default", "top-private")


def base_flags(tile: int, epochs: int) -> list[str]:
    return ["--preset", "tiny", "--tile-size", str(tile), "--epochs", str(epochs), "--freeze-epochs", str(FREEZE),
            "--device", "cpu"]  # fmt: skip


def option_flags(name: str, tile: int) -> list[str]:
    """The option's flags with the tile placeholders filled: 2x the base tile for 1x1, a multiple of 16 for DINOv3."""
    tile16 = max(16, int(round(tile * 8 / 7 / 16)) * 16)  # 56 -> 64: the tiny-dinov3 preset's 4x4 patches
    return [f.format(tile2=2 * tile, tile16=tile16) for f in OPTIONS[name]]


def resolve(flags: list[str], data_dir: str, folds: str, out_dir: Path, exp: str) -> Config:
    """The config train.py would build from these flags (same parser, same precedence)."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(
        [*flags, "--data-dir", data_dir, "--folds", folds, "--out-dir", str(out_dir), "--exp", exp]
    )
    return resolve_config(args)


def run(
    names: list[str],
    folds: list[int],
    tile: int,
    epochs: int,
    seeds: list[int],
    data_dir: str,
    folds_csv: str,
    out_dir: Path,
    show: bool = True,
) -> pd.DataFrame:
    """Train every (option, seed, fold), then one compare table (baseline: default; seed mean ± std, paired
    bootstrap interval and verdict) with flags and wall seconds added."""

    base = base_flags(tile, epochs)
    configs = {
        (n, s): resolve([*base, "--seed", str(s), *option_flags(n, tile)], data_dir, folds_csv, out_dir, n)
        for n in names
        for s in seeds
    }  # bad flags fail here
    wall: dict[str, float] = {}
    for name in names:
        flags = [*base, *option_flags(name, tile)]
        start = time.perf_counter()
        for seed in seeds:
            for fold in folds:
                t0 = time.perf_counter()
                command = (
                    "python train.py --fold {} --seeds {} {} --data-dir {} --folds {} --out-dir {} --exp {}".format(
                        fold, seed, " ".join(flags), data_dir, folds_csv, out_dir, name
                    )
                )
                with common.quiet():
                    result = train_fold(configs[name, seed], fold, overwrite=True, command=command, seed_dir=True)
                if show:
                    print(
                        f"{name:18s} seed {seed} fold {fold}: best val weighted R2 {result.best_metric:.4f} (epoch "
                        f"{result.best_epoch}) {time.perf_counter() - t0:6.1f} s",
                        flush=True,
                    )
        wall[name] = time.perf_counter() - start
    table = compare_table([out_dir / n for n in names], baseline="default", source="pooled")
    table.insert(1, "flags", [" ".join(option_flags(n, tile)) or "(base flags)" for n in table["experiment"]])
    table["wall_s"] = [round(wall[n], 1) for n in table["experiment"]]
    return table


DEFAULT_NOTE = """# Ablation of the options on the synthetic data

Written by `bench/ablate.py` (`make ablate`); the text outside the generated section is hand-written and kept.
"""


def _shown(path: str | Path) -> str:
    """A path as the doc shows it: relative to the repo when inside it (the doc is committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(common.REPO)) if path.is_relative_to(common.REPO) else str(path)


def write_doc(doc: Path, block: str) -> Path:
    """Replace the generated section (or append it, keeping everything else)."""
    text = doc.read_text() if doc.is_file() else DEFAULT_NOTE
    return write_text_atomic(doc, replace_section(text, SECTION, block))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke test: default + top-private, one fold, 2 epochs, 28 px tiles"
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=list(OPTIONS),
        help="options to run (default: all; 'default' is always added)",
    )
    p.add_argument(
        "--folds-to-run", nargs="+", type=int, default=None, help="fold indices (default: every fold of --folds)"
    )
    p.add_argument("--epochs", type=int, default=None, help=f"epochs per fold (default {EPOCHS}; quick 2)")
    p.add_argument("--tile", type=int, default=None, help=f"tile size of the 2x2 runs (default {TILE}; quick 28)")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=list(SEEDS),
        help=f"seeds of every row (default {' '.join(map(str, SEEDS))})",
    )
    p.add_argument(
        "--data-dir", default="data/synthetic", help="competition-layout data (make demo writes data/synthetic)"
    )
    p.add_argument("--folds", default="data/folds.csv", help="folds CSV (folds.py)")
    p.add_argument(
        "--out-dir", default=None, help="experiment directories, one per option (default checkpoints/ablation[-quick])"
    )
    p.add_argument(
        "--doc",
        default=None,
        help="markdown file whose generated:ablation section is replaced (default docs/ABLATION.md; quick: --out-dir)",
    )
    p.add_argument(
        "--csv",
        default=None,
        help="CSV of the table, .json beside it (default docs/ablation.csv; quick: --out-dir)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch threads (default {THREADS}: no OpenMP spin-waiting on a shared box)",
    )
    args = p.parse_args(argv)
    # a smoke run never overwrites the committed results
    args.out_dir = args.out_dir or ("checkpoints/ablation-quick" if args.quick else "checkpoints/ablation")
    args.doc = args.doc or str(Path(args.out_dir) / "ABLATION.md" if args.quick else DOC)
    args.csv = args.csv or str(Path(args.out_dir) / "ablation.csv" if args.quick else CSV)

    torch.set_num_threads(args.threads)
    if not (Path(args.data_dir) / "train.csv").is_file():
        raise BiomassError(
            f"{args.data_dir}: no train.csv; run `make demo` (or make data-synthetic + folds.py) first, or pass "
            "--data-dir"
        )
    names = list(QUICK_OPTIONS if args.quick and args.only is None else args.only or OPTIONS)
    names = ["default", *[n for n in names if n != "default"]]
    for name in OPTIONS:  # every option's flags resolve (a typo fails the quick run too)
        resolve([*base_flags(28, 2), *option_flags(name, 28)], args.data_dir, args.folds, Path(args.out_dir), name)
    all_folds = sorted(int(f) for f in load_folds(args.folds, load_train(args.data_dir))["fold"].unique())
    folds = args.folds_to_run or (all_folds[:1] if args.quick else all_folds)
    tile = args.tile or (28 if args.quick else TILE)
    epochs = args.epochs or (2 if args.quick else EPOCHS)
    info, load_start, start = common.machine(), common.load_average(), time.perf_counter()
    seeds = list(dict.fromkeys(args.seeds))
    table = run(names, folds, tile, epochs, seeds, args.data_dir, args.folds, Path(args.out_dir))
    minutes = (time.perf_counter() - start) / 60
    write_csv_atomic(table, args.csv)
    meta = {
        "quick": bool(args.quick),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join(["python bench/ablate.py", *(sys.argv[1:] if argv is None else argv)]),
        "minutes": round(minutes, 1),
        "options": len(names),
        "folds": len(folds),
        "seeds": len(seeds),
        "data_dir": args.data_dir,
        "images": len(load_train(args.data_dir)),
        "folds_csv": args.folds,
        "folds_run": ", ".join(map(str, folds)),
        "base_flags": " ".join([*base_flags(tile, epochs), "--seeds", *map(str, seeds)]),
        "cpu": info["cpu"],
        "cores": info["cores"],
        "load_start": load_start,
        "load_end": common.load_average(),
        "csv": _shown(args.csv),
        "out_dir": args.out_dir,
    }
    meta_path = Path(args.csv).with_suffix(".json")
    write_text_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    write_doc(Path(args.doc), render_ablation(table, meta))
    print(ablation_table(table))
    print(f"wrote {_shown(args.doc)}, {_shown(args.csv)} and {_shown(meta_path)} in {minutes:.1f} min")
    return table


if __name__ == "__main__":
    from src.errors import run_cli

    raise SystemExit(run_cli(lambda argv: main(argv) is None))  # a table back means success: exit 0
