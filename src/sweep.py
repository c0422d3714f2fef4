"""Hyper-parameter sweeps of the frozen-backbone stage on one shared feature cache per fold.

    python sweep.py --exp NAME --preset tiny --fold 0 --lr 5e-4 1e-3 2e-3 --dropout 0.1 0.2 --hidden-ratio 0.25 0.5

Every flag of train.py sets the fixed part of the config; the flags below take several values and the
sweep runs their cartesian product. Only the frozen-stage heads train (epochs = freeze_epochs; `--epochs N`
sets both), so the backbone runs once per fold: `feature_cache` is built once and every run's `fit`
reads it. That is only valid while the backbone, its input and its seed stay fixed, which is why grid,
tile size, backbone, feature, seed and amp cannot be swept here (train them as separate experiments).
`--seeds 0 1 2` repeats the whole product per seed (one cache per fold and seed): sweep.md then shows each
run's mean and std over seeds, so a difference can be told from reseeding noise.

Results go to `checkpoints/<exp>/sweep.csv`, one row per (run, fold), rewritten atomically after each run;
a rerun skips every (run, fold) already there, so an interrupted sweep resumes and added values only
run what is new.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from src.backbone import check_backbone_name
from src.config import (
    Config,
    add_config_flags,
    apply_overrides,
    check_backbone_weights,
    check_config,
    resolve_config,
)
from src.errors import BiomassError, run_cli
from src.feature_cache import feature_cache
from src.folds import fold_numbers, load_fold_table, split_fold
from src.io_utils import write_csv_atomic, write_text_atomic
from src.logs import add_quiet_flag, get_logger
from src.model import build_model
from src.report import to_markdown
from src.runtime import resolve_device, seed_everything
from src.schema import SHORT_NAMES, TARGETS
from src.training import fit

log = get_logger(__name__)

# flag -> (config section, field): what a sweep may vary without invalidating the cached tile features
SWEEP_FIELDS: dict[str, tuple[str, str]] = {
    "lr": ("train", "lr"),
    "weight_decay": ("train", "weight_decay"),
    "warmup_frac": ("train", "warmup_frac"),
    "batch_size": ("train", "batch_size"),
    "mixup_prob": ("train", "mixup_prob"),
    "mixup_alpha": ("train", "mixup_alpha"),
    "stereo_swap_prob": ("train", "stereo_swap_prob"),
    "aux_state_weight": ("train", "aux_state_weight"),
    "aux_month_weight": ("train", "aux_month_weight"),
    "aux_species_weight": ("train", "aux_species_weight"),
    "target_weights": ("train", "target_weights"),
    "loss": ("train", "loss"),
    "huber_delta": ("train", "huber_delta"),
    "grad_clip": ("train", "grad_clip"),
    "dropout": ("model", "dropout"),
    "hidden_ratio": ("model", "hidden_ratio"),
    "fusion_dim": ("model", "fusion_dim"),
}
# settings that do not change a run's result: left out of its id
ID_EXCLUDED = {("data", "num_workers"), ("train", "device"), ("exp",), ("out_dir",)}
R2_COLUMNS = tuple(f"r2_{t}" for t in TARGETS)


@dataclass
class SweepRun:
    """One point of the product: its resolved config, the swept values and a stable id."""

    cfg: Config
    values: dict[str, object]
    run_id: str  # hash of the whole config, seed included: one (config, seed) pair
    config_id: str = ""  # the run_id at the first seed: the same config under every seed


def _value_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_id_of(cfg: Config) -> str:
    """A hash of everything that decides a run's result (all swept values and the fixed config), fold excluded.

    Hashing the whole config, not only the varied values, means a changed fixed flag (epochs, seed, data)
    in the same experiment never passes for a finished run.
    """
    data = cfg.to_dict()
    for path in ID_EXCLUDED:
        target = data
        for key in path[:-1]:
            target = target[key]
        target.pop(path[-1], None)
    # only values that differ from the defaults: a config field added later (at its default) keeps the ids
    defaults = Config().to_dict()
    data = {
        section: {k: v for k, v in values.items() if defaults.get(section, {}).get(k, object()) != v}
        if isinstance(values, dict)
        else values
        for section, values in data.items()
    }
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def expand(base: Config, grid: dict[str, list]) -> list[SweepRun]:
    """The cartesian product of the swept values over a base config, in flag order (last flag varies fastest)."""
    unknown = [k for k in grid if k not in SWEEP_FIELDS]
    if unknown:
        raise BiomassError(f"cannot sweep {unknown[0]!r}; sweepable: {', '.join(SWEEP_FIELDS)}")
    names = list(grid)
    runs, seen = [], set()
    for combo in itertools.product(*(grid[n] for n in names)):
        cfg = copy.deepcopy(base)
        overrides: dict[str, dict] = {}
        for name, value in zip(names, combo):
            section, field = SWEEP_FIELDS[name]
            overrides.setdefault(section, {})[field] = value
        check_config(apply_overrides(cfg, overrides, "sweep values"), "sweep values")
        values = {n: getattr(getattr(cfg, SWEEP_FIELDS[n][0]), SWEEP_FIELDS[n][1]) for n in SWEEP_FIELDS}
        run = SweepRun(cfg, values, run_id_of(cfg))
        if run.run_id not in seen:  # repeated values on the command line
            seen.add(run.run_id)
            runs.append(run)
    return runs


def expand_seeds(base: Config, grid: dict[str, list], seeds: list[int] | None = None) -> list[SweepRun]:
    """`expand` once per seed (default: the config's own), each run tagged with the config_id it shares."""
    seeds = list(dict.fromkeys(seeds)) if seeds else [base.train.seed]
    per_seed = []
    for seed in seeds:
        seeded = copy.deepcopy(base)
        seeded.train.seed = int(seed)
        per_seed.append(expand(seeded, grid))
    out = []
    for runs in per_seed:
        for run, first in zip(runs, per_seed[0]):
            run.config_id = first.run_id
            out.append(run)
    return out


def sweep_path(base: Config) -> Path:
    """checkpoints/<exp>/sweep.csv"""
    return Path(base.out_dir) / base.exp / "sweep.csv"


def read_sweep(path: Path) -> pd.DataFrame:
    """Rows of earlier runs (empty frame when the sweep is new)."""
    if not path.is_file():
        return pd.DataFrame()
    try:
        frame = pd.read_csv(path, dtype={"run_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise BiomassError(
            f"{path}: not a readable sweep CSV ({str(err).splitlines()[0]}); move it away to start over"
        ) from err
    if not {"run_id", "fold", "weighted_r2"} <= set(frame.columns):
        raise BiomassError(f"{path}: not a sweep.csv (needs run_id, fold, weighted_r2); move it away to start over")
    return frame


def _check_stage1(base: Config) -> None:
    tc = base.train
    if tc.epochs != tc.freeze_epochs or tc.epochs < 1:
        raise BiomassError(
            f"a sweep trains the frozen stage only: epochs ({tc.epochs}) must equal freeze_epochs "
            f"({tc.freeze_epochs}) >= 1"
        )
    if not tc.cache_features:
        raise BiomassError("a sweep needs --cache-features (the shared feature cache is the point of it)")


def run_sweep(
    base: Config,
    grid: dict[str, list],
    folds: list[int] | None = None,
    show: bool = True,
    seeds: list[int] | None = None,
) -> pd.DataFrame:
    """Run every (run, fold) of the product (per seed) not yet in sweep.csv; return the table of the product's runs.

    Per fold and seed the backbone is built once with that seed and `feature_cache` runs once; `fit` then
    builds each run's model with the same seed (so the same backbone) and reads that cache.
    """
    _check_stage1(base)
    runs = expand_seeds(base, grid, seeds)
    path = sweep_path(base)
    done = read_sweep(path)
    done_keys = set(zip(done["run_id"], done["fold"].astype(int))) if len(done) else set()
    table = load_fold_table(base.data)
    folds = fold_numbers(table) if folds is None else folds
    splits = {k: split_fold(table, k, base.data) for k in folds}  # every fold checked before the first run
    device = resolve_device(base.train.device)
    total = len(runs) * len(folds)
    skipped = sum((r.run_id, int(k)) in done_keys for r in runs for k in folds)
    if show:
        log.info(f"sweep {base.exp}: {len(runs)} run(s) x {len(folds)} fold(s) = {total}; {skipped} already in {path}")
    count = skipped
    for k, seed in itertools.product(folds, dict.fromkeys(r.cfg.train.seed for r in runs)):
        todo = [r for r in runs if r.cfg.train.seed == seed and (r.run_id, int(k)) not in done_keys]
        if not todo:
            continue
        train_frame, val_frame = splits[k].train, splits[k].val
        if show and splits[k].note:
            log.info(f"fold {k}: {splits[k].note}")
        start = time.time()
        seed_everything(seed)  # the seed fit() uses before build_model: same random-init backbone
        model = build_model(todo[0].cfg.model)
        model.to(device)
        cache = feature_cache(model, train_frame, val_frame, todo[0].cfg, device, show=show)
        del model
        cache_seconds = time.time() - start
        if show:
            log.info(
                f"fold {k} seed {seed}: feature cache of {len(train_frame)} train + {len(val_frame)} val images in "
                f"{cache_seconds:.1f}s"
            )
        for run in todo:
            start = time.time()
            result = fit(run.cfg, train_frame, val_frame, None, device, fold=int(k), cache=cache)
            seconds = time.time() - start
            best = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
            row = {
                "run_id": run.run_id,
                "fold": int(k),
                "seed": int(seed),
                **{n: _value_text(v) for n, v in run.values.items()},
                "epochs": run.cfg.train.epochs,
                "best_epoch": result.best_epoch,
                "weighted_r2": result.best_metric,
                **{c: best.get(c, float("nan")) for c in R2_COLUMNS},
                "seconds": round(seconds, 2),
                "cache_seconds": round(cache_seconds, 2),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True) if len(done) else pd.DataFrame([row])
            write_csv_atomic(done, path)
            count += 1
            if show:
                varied = " ".join(f"{n}={_value_text(run.values[n])}" for n in grid)
                log.info(
                    f"[{count}/{total}] fold {k} seed {seed} {run.run_id} {varied} -> wR2 {result.best_metric:.4f} "
                    f"({seconds:.1f}s)"
                )
    table = sweep_table(done, runs, list(grid), folds)
    write_text_atomic(path.with_name("sweep.md"), f"# Sweep `{base.exp}`\n\n{sweep_markdown(table)}\n")
    if show:
        log.info(sweep_markdown(table))
        log.info(f"wrote {path} and {path.with_name('sweep.md')}")
    return table


def sweep_table(rows: pd.DataFrame, runs: list[SweepRun], varied: list[str], folds: list[int]) -> pd.DataFrame:
    """The product's configs: mean over the requested folds per seed, then mean and std over seeds; sorted by
    the metric, delta to the best. `run_id` is the config's id at its first seed."""
    config_of = {r.run_id: r.config_id or r.run_id for r in runs}
    part = rows[rows["run_id"].isin(list(config_of)) & rows["fold"].astype(int).isin([int(f) for f in folds])].copy()
    metric_cols = ["weighted_r2", *R2_COLUMNS, "seconds"]
    per_seed = part.groupby("run_id").agg(folds=("fold", "count"), **{c: (c, "mean") for c in metric_cols})
    per_seed["config_id"] = [config_of[i] for i in per_seed.index]
    agg = per_seed.groupby("config_id").agg(
        folds=("folds", "max"), seeds=("folds", "count"), **{c: (c, "mean") for c in metric_cols}
    )
    agg.insert(agg.columns.get_loc("weighted_r2") + 1, "seed_std", per_seed.groupby("config_id")["weighted_r2"].std())
    agg = agg.reset_index().rename(columns={"config_id": "run_id"})
    firsts = [r for r in runs if (r.config_id or r.run_id) == r.run_id]
    values = pd.DataFrame([{"run_id": r.run_id, **{n: _value_text(r.values[n]) for n in varied}} for r in firsts])
    table = values.merge(agg, on="run_id", how="inner")
    table = table.sort_values("weighted_r2", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(table.columns.get_loc("weighted_r2") + 1, "delta", table["weighted_r2"] - table["weighted_r2"].max())
    return table


def sweep_markdown(table: pd.DataFrame) -> str:
    """The sweep table as markdown (per-target R^2 with short names)."""
    shown = table.rename(columns={f"r2_{t}": f"r2_{s}" for t, s in zip(TARGETS, SHORT_NAMES)}).copy()
    shown["delta"] = [f"{v:+.4f}" for v in table["delta"]]
    return to_markdown(shown, {"seconds": 1})


# ---- command line -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sweep.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        conflict_handler="resolve",
    )
    add_config_flags(parser)  # the fixed part; the sweepable flags below replace their single-value versions
    add_quiet_flag(parser)
    parser.add_argument("--fold", default="0", help="fold index, comma list, or 'all' (default 0)")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=None, metavar="S", help="repeat the sweep per seed (not with --seed)"
    )
    group = parser.add_argument_group("swept values (several values each: the sweep runs their product)")
    for name in SWEEP_FIELDS:
        flag = "--" + name.replace("_", "-")
        helptext = (
            "5 floats per run (Green Dead Clover GDM Total); repeat groups of 5"
            if name == "target_weights"
            else "one or more values"
        )
        group.add_argument(flag, dest=f"sweep_{name}", nargs="+", default=None, metavar="V", help=helptext)
    return parser.parse_args(argv)


def grid_from_args(args: argparse.Namespace) -> dict[str, list]:
    """{flag name: [values...]} in command-line definition order; target weights come in groups of five."""
    grid = {}
    for name in SWEEP_FIELDS:
        values = getattr(args, f"sweep_{name}")
        if values is None:
            continue
        if name == "target_weights":
            if len(values) % len(TARGETS):
                raise BiomassError(f"--target-weights takes groups of {len(TARGETS)} numbers; got {len(values)}")
            values = [values[i : i + len(TARGETS)] for i in range(0, len(values), len(TARGETS))]
        grid[name] = values
    return grid


def base_config(args: argparse.Namespace) -> Config:
    """defaults < preset < YAML < flags, then the frozen stage only: --epochs N sets both epoch counts."""
    cfg = resolve_config(args)
    epochs, freeze = getattr(args, "train.epochs"), getattr(args, "train.freeze_epochs")
    if epochs is not None and freeze is not None and int(epochs) != int(freeze):
        raise BiomassError(
            "a sweep trains the frozen stage only: give --epochs N (it sets freeze_epochs too), not both"
        )
    if epochs is not None:
        cfg.train.freeze_epochs = cfg.train.epochs
    else:
        cfg.train.epochs = cfg.train.freeze_epochs
    return cfg


def parse_folds(text: str) -> list[int] | None:
    """'all' -> None (every fold of the folds file), '0' or '0,2' -> [0] / [0, 2]."""
    if text == "all":
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as err:
        raise BiomassError(f"--fold must be an integer, a comma list or 'all', got {text!r}") from err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.exp is None:
        raise BiomassError("pass --exp NAME: the sweep writes checkpoints/<NAME>/sweep.csv")
    base = base_config(args)
    check_backbone_name(base.model.backbone)
    check_backbone_weights(base)
    if args.seeds is not None and getattr(args, "train.seed") is not None:
        raise BiomassError("give --seed S or --seeds S [S ...], not both")
    run_sweep(base, grid_from_args(args), parse_folds(args.fold), seeds=args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
