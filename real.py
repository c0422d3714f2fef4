"""python real.py --recipe seed [--owner USER] [--gpus 0,1] [--dry-run]: competition files to a submitted kernel.

`make real RECIPE=seed OWNER=me` runs this. It is the existing commands in order, each printed before it runs:
  1. python -m src.download               the competition files, if absent from --data-dir
  2. (check)                              the weights file the recipe names; missing: the export command to run
  3. python folds.py                      the folds file, if absent
  4. python train.py --config RECIPE      every fold of every grid (x seed) of the recipe: a finished fold is
                                          skipped, a killed one resumed (--resume); --gpus 0,1,... runs folds side
                                          by side, one process per device (CUDA_VISIBLE_DEVICES per process)
  5. python infer.py --oof                OOF scoring of the ensemble
  6. python report.py                     the OOF report
  7. python kernels/build.py              the offline kernel
  8. python kernels/push.py --submit      upload, wait for the kernel run, submit it
--dry-run prints every command and runs none. --override FILE merges a YAML over the recipe (the tests use
configs/overrides/tiny.yaml); the merged config is written to <out-dir>/<exp>/recipe.yaml and trains from there.
"""

from __future__ import annotations

import argparse
import copy
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from src.checkpoint import load_checkpoint, read_last_sidecar
from src.config import (
    Config,
    add_config_flags,
    check_backbone_weights,
    check_recipe,
    load_yaml,
    overlay,
    resolve_config,
    weights_file,
)
from src.download import COMPETITION, competition_files_present
from src.errors import BiomassError, run_cli
from src.io_utils import make_dir, write_text_atomic
from src.memory import device_memory_bytes, fit_to_memory, parse_fit_memory, projected_peak_bytes

REPO = Path(__file__).resolve().parent
CONFIGS = REPO / "configs"
DEFAULT_N_FOLDS = 5  # folds.py's default: the fold list of a dry run before the folds file exists
T4_BYTES = 15.64e9  # a T4's 16 GB as CUDA reports them (15,095 MiB usable is less: the fit keeps a 10% margin)


@dataclass
class Job:
    """One train.py run: a grid x fold (x seed) of the recipe, and what its run directory says about it."""

    grid: tuple[int, int]
    fold: int
    seed: int | None
    run_dir: Path
    state: str  # "new", "resume" (killed: last.pt of an unfinished run), "redo" (finished short, slim) or "done"

    @property
    def name(self) -> str:
        return f"grid{self.grid[0]}x{self.grid[1]} fold{self.fold}" + (
            f" seed{self.seed}" if self.seed is not None else ""
        )


def from_here(path: str) -> Path:
    """A path the user gave, as the subprocesses (run in the repo root) must see it: absolute unless cwd is the repo."""
    return Path(path) if Path.cwd().resolve() == REPO else Path(path).resolve()


def recipe_path(name: str) -> Path:
    """`seed` -> configs/seed.yaml; a path to a .yaml file is taken as it is."""
    if name.endswith((".yaml", ".yml")):
        path = from_here(name)
    else:
        path = CONFIGS / f"{name}.yaml"
        path = path.relative_to(REPO) if Path.cwd().resolve() == REPO else path
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise BiomassError(f"{path}: recipe not found; choose one of {known} or pass a .yaml path")
    return path


def load_recipe(path: Path, override: Path | None) -> tuple[dict, dict]:
    """(the config as a dict, its normalised `recipe:` section): the recipe with the override merged over it."""
    data = load_yaml(path)
    if override is not None:
        data = overlay(data, load_yaml(override))
    return data, check_recipe(data.get("recipe", {}), str(path))


def resolve(config_file: Path, data_dir: Path, folds: Path, out_dir: Path) -> Config:
    """The config train.py will resolve from this file and these flags (same parser, same checks)."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    argv = ["--config", str(config_file), "--data-dir", str(data_dir), "--folds", str(folds), "--out-dir", str(out_dir)]
    return resolve_config(parser.parse_args(argv))


def weights_problem(cfg: Config) -> str | None:
    """Why training cannot start for want of the backbone weights file (None when it can)."""
    check_backbone_weights(cfg)
    path = weights_file(cfg.model)
    if path is None or (REPO / path).is_file():  # train.py runs in the repo root: a relative path starts there
        return None
    name = cfg.model.backbone
    return (
        f"{path}: backbone weights file not found; make it once on a machine with internet: "
        f"python -m src.weights export --name {name} --out {Path(path).parent}"
    )


def fold_state(run_dir: Path, cfg: Config) -> str:
    """done (the fold reached its last epoch: last.json says so, or last.pt), redo, resume (a killed run) or new.

    An early stop does not end a run (training goes on past it for the fixed-schedule OOF), so only the last epoch
    counts as done. last.json (a few bytes) is read before last.pt (up to GBs)."""
    last = run_dir / "last.pt"
    sidecar = read_last_sidecar(last)
    if sidecar is None and not last.is_file():
        return "resume" if run_dir.is_dir() and any(run_dir.iterdir()) else "new"
    state = sidecar if sidecar is not None else (load_checkpoint(last).get("state") or {})
    epoch = int(state.get("epoch", -1))
    if epoch >= cfg.train.epochs - 1 and (run_dir / "best.pt").is_file():
        return "done"
    if sidecar is not None and sidecar.get("last") in ("slim", "none"):
        return "redo"  # finished with fewer epochs than the recipe now asks; no optimizer state left to resume
    return "resume" if last.is_file() else "new"


def fit_note(cfg: Config, fit_memory: str) -> str:
    """What train.py --fit-memory will choose for this recipe, for the plan printed before any work.

    auto without a GPU here: the choice a 16 GB T4 (Kaggle's GPU) would get, labelled as such.
    """
    value = fit_memory.strip().lower()
    if value in ("off", "none", ""):
        return f"any GPU (fit-memory off): {projected_peak_bytes(cfg)['total'] / 1e9:.1f} GB projected per process"
    budget = device_memory_bytes() if value == "auto" else parse_fit_memory(value)
    label = "this GPU" if value == "auto" else f"{value} GB"
    if budget is None:
        budget, label = T4_BYTES, "a 16 GB T4 (no GPU here; each fold fits its own GPU when it trains)"
    _, note = fit_to_memory(cfg, budget)
    return f"{label}: {note}"


def fold_numbers_of(recipe: dict, folds_file: Path) -> list[int]:
    """The recipe's folds: its list, or every fold of the folds file (folds.py's default count before it exists)."""
    if recipe["folds"] != "all":
        return list(recipe["folds"])
    if not folds_file.is_file():
        print(f"# {folds_file} does not exist yet: assuming folds.py's {DEFAULT_N_FOLDS} folds")
        return list(range(DEFAULT_N_FOLDS))
    return sorted(int(k) for k in pd.read_csv(folds_file)["fold"].unique())


def plan_jobs(recipe: dict, cfg: Config, folds_file: Path) -> list[Job]:
    """Every grid x fold (x seed) of the recipe and the state of its run directory (checkpoint.run_dir_for's layout)."""
    grids = recipe["grids"] or [tuple(cfg.model.grid)]
    seeds = recipe["seeds"] or [None]
    jobs, fold_list = [], fold_numbers_of(recipe, folds_file)
    for grid in grids:
        for fold in fold_list:
            for seed in seeds:
                run_dir = Path(cfg.out_dir) / cfg.exp / f"grid{grid[0]}x{grid[1]}" / f"fold{fold}"
                run_dir = run_dir / f"seed{seed}" if seed is not None else run_dir
                jobs.append(Job(tuple(grid), fold, seed, run_dir, "new"))
    for job in jobs:
        job.state = fold_state(job.run_dir, cfg)
    return jobs


def train_command(
    job: Job, config_file: Path, data_dir: Path, folds: Path, out_dir: Path, extra: list[str] | None = None
) -> list[str]:
    cmd = [sys.executable, "train.py", "--config", str(config_file), "--grid", *map(str, job.grid)]
    cmd += ["--fold", str(job.fold), "--data-dir", str(data_dir), "--folds", str(folds), "--out-dir", str(out_dir)]
    if job.seed is not None:
        cmd += ["--seeds", str(job.seed)]
    state = {"resume": ["--resume"], "redo": ["--overwrite"]}.get(job.state, [])
    return cmd + list(extra or []) + state


def loader_workers(gpus: list[str]) -> int:
    """DataLoader workers per train.py: the cores this machine lets us use, shared by the side-by-side folds."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(16, cores // max(1, len(gpus)) - 1))


def show(cmd: list[str], env: dict | None = None) -> str:
    prefix = "".join(f"{k}={v} " for k, v in (env or {}).items())
    return prefix + shlex.join(["python" if c == sys.executable else c for c in cmd])


def run(cmd: list[str], dry_run: bool) -> None:
    """Print the command; run it unless dry_run; a failed step stops the chain naming it."""
    print(f"$ {show(cmd)}", flush=True)
    if dry_run:
        return
    start = time.time()
    code = subprocess.call(cmd, cwd=REPO)
    if code != 0:
        raise BiomassError(f"step failed (exit {code}): {show(cmd)}; fix it and run the same command again")
    print(f"# {cmd[1] if cmd[1] != '-m' else cmd[2]}: done in {time.time() - start:.0f} s", flush=True)


def run_jobs(commands: list[tuple[Job, list[str]]], gpus: list[str], log_dir: Path) -> list[str]:
    """The train.py runs: one after another, or with gpus one process per device; the names of the failed ones."""
    if not gpus:
        failed = []
        for job, cmd in commands:
            print(f"$ {show(cmd)}", flush=True)
            start = time.time()
            code = subprocess.call(cmd, cwd=REPO)
            print(f"# {job.name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {time.time() - start:.0f} s")
            if code != 0:
                failed.append(job.name)
        return failed
    todo: queue.Queue = queue.Queue()
    for item in commands:
        todo.put(item)
    failed: list[str] = []
    lock = threading.Lock()

    def worker(gpu: str) -> None:
        while True:
            try:
                job, cmd = todo.get_nowait()
            except queue.Empty:
                return
            env = {"CUDA_VISIBLE_DEVICES": gpu}
            log = (
                log_dir
                / f"grid{job.grid[0]}x{job.grid[1]}-fold{job.fold}{'' if job.seed is None else f'-seed{job.seed}'}.out"
            )
            with lock:
                print(f"[gpu {gpu}] $ {show(cmd, env)}  > {log}", flush=True)
            with open(log, "w") as out:
                code = subprocess.call(cmd, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
            with lock:
                print(
                    f"[gpu {gpu}] {job.name}: {'done' if code == 0 else f'FAILED (exit {code}), see {log}'}", flush=True
                )
                if code != 0:
                    failed.append(job.name)

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python real.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="seed", help="configs/<name>.yaml (seed, top, gpu-smoke) or a .yaml path")
    parser.add_argument(
        "--override", default=None, help="YAML merged over the recipe (e.g. configs/overrides/tiny.yaml)"
    )
    parser.add_argument("--owner", default=None, help="Kaggle user name for the kernel (default: kernels/build.py's)")
    parser.add_argument("--gpus", default=None, help="devices to run folds on side by side, e.g. 0,1,2,3")
    parser.add_argument(
        "--data-dir", default=f"data/{COMPETITION}", help="the competition files (downloaded if absent)"
    )
    parser.add_argument("--folds", default=None, help="folds file (default <data-dir>/folds.csv; made if absent)")
    parser.add_argument("--out-dir", default="checkpoints", help="root of the experiment directories")
    parser.add_argument("--build", default=None, help="kernel build folder (default build/kaggle-<exp>)")
    parser.add_argument("--no-submit", action="store_true", help="push the kernel but do not wait and submit")
    parser.add_argument(
        "--fit-memory",
        default="auto",
        help="train.py --fit-memory: GB, auto (each process fits its GPU) or off (default auto)",
    )
    parser.add_argument(
        "--keep-last",
        default="slim",
        choices=("full", "slim", "none"),
        help="train.py --keep-last: a finished fold's last.pt slimmed to its weights (default), removed, or kept full",
    )
    parser.add_argument("--dry-run", action="store_true", help="print every command and run none")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry = args.dry_run
    data_dir, out_dir = from_here(args.data_dir), from_here(args.out_dir)
    folds = from_here(args.folds) if args.folds else data_dir / "folds.csv"
    source = recipe_path(args.recipe)
    override = from_here(args.override) if args.override else None
    data, recipe = load_recipe(source, override)
    cfg = resolve(source, data_dir, folds, out_dir)  # the recipe alone must resolve too
    config_file = source
    if args.override:
        merged = f"# {source.name} with {override} merged over it (real.py --override)\n"
        merged += yaml.safe_dump(data, sort_keys=False)
        with tempfile.TemporaryDirectory() as tmp:  # resolved before anything is written (a dry run writes nothing)
            (Path(tmp) / "recipe.yaml").write_text(merged)
            cfg = resolve(Path(tmp) / "recipe.yaml", data_dir, folds, out_dir)
        config_file = out_dir / cfg.exp / "recipe.yaml"
        print(f"# {'would write' if dry else 'writing'} {config_file}: {source} + {override}")
        if not dry:
            make_dir(config_file.parent)
            write_text_atomic(config_file, merged)
    exp_dir = out_dir / cfg.exp
    print(
        f"# recipe {source.stem}: {cfg.model.backbone}, grids {recipe['grids']}, folds {recipe['folds']} -> {exp_dir}"
    )

    # 1. competition files
    if competition_files_present(data_dir):
        print(f"# {data_dir}: competition files present")
    else:
        run([sys.executable, "-m", "src.download", "--out", str(data_dir)], dry)
    # 2. backbone weights
    problem = weights_problem(cfg)
    if problem:
        if not dry:
            raise BiomassError(problem)
        print(f"# {problem}")
    # 3. folds
    if folds.is_file():
        print(f"# {folds}: folds file present")
    else:
        run([sys.executable, "folds.py", "--data-dir", str(data_dir), "--out", str(folds)], dry)
    # 4. training
    jobs = plan_jobs(recipe, cfg, folds)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    for grid in recipe["grids"] or [tuple(cfg.model.grid)]:  # what train.py --grid R C resolves (native tile)
        grid_cfg = copy.deepcopy(cfg)
        grid_cfg.model.grid = list(grid)
        print(f"# grid {grid[0]}x{grid[1]} on {fit_note(grid_cfg, args.fit_memory)}")
    extra = ["--fit-memory", args.fit_memory, "--keep-last", args.keep_last]
    if gpus:  # side-by-side folds share the CPU: each gets its share of the cores
        extra += ["--num-workers", str(loader_workers(gpus))]
    commands = []
    for job in jobs:
        if job.state == "done":
            print(f"# {job.name}: finished ({job.run_dir}), skipped")
        else:
            commands.append((job, train_command(job, config_file, data_dir, folds, out_dir, extra)))
    if dry:
        for i, (_, cmd) in enumerate(commands):
            # a real run hands each fold to the first free device; the dry run shows them round-robin
            print(f"$ {show(cmd, {'CUDA_VISIBLE_DEVICES': gpus[i % len(gpus)]} if gpus else None)}")
    elif commands:
        failed = run_jobs(commands, gpus, make_dir(exp_dir / "logs"))
        if failed:
            raise BiomassError(
                f"train.py failed for {', '.join(failed)} (see their train.log); run the same command again: "
                "finished folds are skipped, killed ones resumed"
            )
    # 5-8. OOF scoring, report, kernel, push + submit
    run([sys.executable, "infer.py", "--oof", "--data-dir", str(data_dir), "--checkpoints", str(exp_dir)], dry)
    run([sys.executable, "report.py", str(exp_dir)], dry)
    build = from_here(args.build) if args.build else Path("build") / f"kaggle-{cfg.exp}"
    owner = ["--owner", args.owner] if args.owner else []
    run([sys.executable, "kernels/build.py", "--checkpoints", str(exp_dir), *owner, "--out", str(build)], dry)
    run([sys.executable, "kernels/push.py", str(build), *([] if args.no_submit else ["--submit"])], dry)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
