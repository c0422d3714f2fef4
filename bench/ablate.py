"""Ablation: the default vs each option of docs/OPTIONS.md (and the "top private" bundle), folds x options, on the
synthetic data with the tiny presets -> a table in docs/ABLATION.md and docs/ablation.csv.

    python bench/ablate.py                      # the full run (make ablate): every option, every fold
    python bench/ablate.py --quick              # smoke test: default + top-private, one fold, 2 epochs, 28 px tiles
    python bench/ablate.py --only default raw --folds-to-run 0 1 --epochs 8

Each (option, fold) is one `src.training.train_fold` call (the one training loop, as train.py makes it) into
<out-dir>/<option>/grid<R>x<C>/fold<K>/, with the option's flags resolved by train.py's own parser on top of the
same base flags; command.txt in each fold directory says how to rerun it with train.py. The table is
`src.report.compare_table` over those experiment directories (pooled oof.csv, best epoch, no TTA), so
`python report.py --compare <out-dir>/default <out-dir>/raw ...` shows the same rows. Results replace the block
between the ABLATION markers of the doc; the hand-written text around it stays.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from src.config import Config, add_config_flags, resolve_config  # noqa: E402
from src.data import load_train  # noqa: E402
from src.errors import BiomassError  # noqa: E402
from src.folds import load_folds  # noqa: E402
from src.io_utils import write_csv_atomic, write_text_atomic  # noqa: E402
from src.report import (  # noqa: E402
    compare_table,
    load_runs,
    oof_score,
    to_markdown,
)
from src.schema import SHORT_NAMES, TARGETS  # noqa: E402
from src.training import train_fold  # noqa: E402

DOC = common.REPO / "docs" / "ABLATION.md"
CSV = common.REPO / "docs" / "ablation.csv"
BEGIN, END = "<!-- ABLATION:BEGIN (written by bench/ablate.py) -->", "<!-- ABLATION:END -->"

# Full-run settings, chosen to fit ~25 minutes on the shared 2-core box: one fold of the tiny preset at its own
# 56 px tiles (view 112 px) costs ~2.6 s an epoch + ~3 s of set-up on one thread, so 17 rows x 5 folds leave
# ~6 epochs (1 frozen) per fold. All 5 month-grouped folds rather than 3 folds x 10 epochs: every image is then
# scored out of fold once (the metric is global over all rows) and one 48-image fold alone swings by hundredths.
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
    "default-seed1": ["--seed", "1"],  # not an option: the seed-to-seed noise a delta must beat
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


def base_flags(tile: int, epochs: int, seed: int) -> list[str]:
    return [
        "--preset",
        "tiny",
        "--tile-size",
        str(tile),
        "--epochs",
        str(epochs),
        "--freeze-epochs",
        str(FREEZE),
        "--seed",
        str(seed),
        "--device",
        "cpu",
    ]


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


def fold_stats(exp_dir: Path) -> tuple[float, float]:
    """Mean and std over folds of each fold's own weighted R2 (how much the folds disagree)."""

    values = [oof_score(r.oof)["weighted_r2"] for r in load_runs(exp_dir) if r.oof is not None]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def run(
    names: list[str],
    folds: list[int],
    tile: int,
    epochs: int,
    seed: int,
    data_dir: str,
    folds_csv: str,
    out_dir: Path,
    show: bool = True,
) -> pd.DataFrame:
    """Train every (option, fold), then one compare table (baseline: default) with flags and wall seconds added."""

    base = base_flags(tile, epochs, seed)
    configs = {
        n: resolve([*base, *option_flags(n, tile)], data_dir, folds_csv, out_dir, n) for n in names
    }  # bad flags fail here
    wall: dict[str, float] = {}
    for name in names:
        flags = [*base, *option_flags(name, tile)]
        start = time.perf_counter()
        for fold in folds:
            t0 = time.perf_counter()
            command = "python train.py --fold {} {} --data-dir {} --folds {} --out-dir {} --exp {}".format(
                fold, " ".join(flags), data_dir, folds_csv, out_dir, name
            )
            with common.quiet():
                result = train_fold(configs[name], fold, overwrite=True, command=command)
            if show:
                print(
                    f"{name:18s} fold {fold}: best val weighted R2 {result.best_metric:.4f} (epoch "
                    f"{result.best_epoch}) "
                    f"{time.perf_counter() - t0:6.1f} s",
                    flush=True,
                )
        wall[name] = time.perf_counter() - start
    table = compare_table([out_dir / n for n in names], baseline="default", source="pooled")
    table.insert(1, "flags", [" ".join(option_flags(n, tile)) or "(base flags)" for n in table["experiment"]])
    stats = {n: fold_stats(out_dir / n) for n in names}
    table["fold_mean"] = [stats[n][0] for n in table["experiment"]]
    table["fold_std"] = [stats[n][1] for n in table["experiment"]]
    table["wall_s"] = [round(wall[n], 1) for n in table["experiment"]]
    return table


def table_markdown(table: pd.DataFrame) -> str:
    """The ablation rows: OOF weighted R2, delta to default, fold mean +- std, per-target R2, seconds."""

    shown = pd.DataFrame(
        {
            "option": [f"{e} *" if b else e for e, b in zip(table["experiment"], table["baseline"])],
            "flags": [f"`{f}`" for f in table["flags"]],
            "OOF wR2": table["weighted_r2"],
            "delta": [f"{v:+.4f}" for v in table["delta"]],
            "fold mean ± std": [f"{m:.3f} ± {s:.3f}" for m, s in zip(table["fold_mean"], table["fold_std"])],
            **{f"R2 {s}": table[f"r2_{t}"] for t, s in zip(TARGETS, SHORT_NAMES)},
            "train s": table["train_s"],
            "wall s": table["wall_s"],
        }
    )
    return to_markdown(shown, {"train s": 0, "wall s": 0}, default_digits=4)


DEFAULT_NOTE = """# Ablation of the options on the synthetic data

Written by `bench/ablate.py` (`make ablate`); the text outside the markers is hand-written and kept.
"""


def _shown(path: str | Path) -> str:
    """A path as the doc shows it: relative to the repo when inside it (the doc is committed)."""
    path = Path(path).resolve()
    return str(path.relative_to(common.REPO)) if path.is_relative_to(common.REPO) else str(path)


def write_doc(doc: Path, block: str) -> Path:
    """Replace the block between the markers (or append it, keeping everything else)."""
    text = doc.read_text() if doc.is_file() else DEFAULT_NOTE
    section = f"{BEGIN}\n{block.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    return write_text_atomic(doc, text)


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
    p.add_argument("--seed", type=int, default=0)
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
        help="markdown file whose ABLATION block is replaced (default docs/ABLATION.md; quick: in --out-dir)",
    )
    p.add_argument("--csv", default=None, help="CSV of the full table (default docs/ablation.csv; quick: in --out-dir)")
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
        resolve([*base_flags(28, 2, 0), *option_flags(name, 28)], args.data_dir, args.folds, Path(args.out_dir), name)
    all_folds = sorted(int(f) for f in load_folds(args.folds, load_train(args.data_dir))["fold"].unique())
    folds = args.folds_to_run or (all_folds[:1] if args.quick else all_folds)
    tile = args.tile or (28 if args.quick else TILE)
    epochs = args.epochs or (2 if args.quick else EPOCHS)
    info, load_start, start = common.machine(), common.load_average(), time.perf_counter()
    table = run(names, folds, tile, epochs, args.seed, args.data_dir, args.folds, Path(args.out_dir))
    minutes = (time.perf_counter() - start) / 60
    write_csv_atomic(table, args.csv)
    command = " ".join(["python bench/ablate.py", *(sys.argv[1:] if argv is None else argv)])
    n_images = len(load_train(args.data_dir))
    block = "\n".join(
        [
            f"## Results{' (quick smoke settings, not a result)' if args.quick else ''} — "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}",
            "",
            f"- command: `{command}` ({minutes:.1f} min for {len(names)} options x {len(folds)} folds)",
            f"- data: `{args.data_dir}` ({n_images} train images), folds `{args.folds}` (run: "
            f"{', '.join(map(str, folds))})",
            f"- base flags of every run: `{' '.join(base_flags(tile, epochs, args.seed))}`; each row adds its flags",
            f"- machine: {info['cpu']}; {info['cores']}; load average at start {load_start}, at end "
            f"{common.load_average()}",
            f"- CSV: `{_shown(args.csv)}`; experiment directories: `{args.out_dir}/<option>` (`python report.py "
            "--compare ...` reads them)",
            "",
            table_markdown(table),
            "",
            "OOF wR2 = the competition metric on all folds' oof.csv rows pooled (best epoch per fold, no TTA, "
            "no physics "
            "post-processing); delta = OOF wR2 - default's; fold mean ± std = each fold's own weighted R2; "
            "train s = sum of "
            "the per-epoch seconds of metrics.csv (feature-cache builds excluded); wall s = the whole "
            "train_fold calls.",
        ]
    )
    write_doc(Path(args.doc), block)
    print(table_markdown(table))
    print(f"wrote {_shown(args.doc)} and {_shown(args.csv)} in {minutes:.1f} min")
    return table


if __name__ == "__main__":
    from src.errors import run_cli

    raise SystemExit(run_cli(lambda argv: main(argv) is None))  # a table back means success: exit 0
