"""make gpu-check: on a CUDA machine, set up what it lacks, run `pytest -m gpu`, then measure the GPU figures.

Stages, in order, each with its own time budget (a child process killed at its budget is recorded as `timeout`, the
next stage still runs; the whole run is held under TOTAL_BUDGET_S, six minutes on an H200 with set-up):
  setup   albumentations and its missing dependencies from carried wheels (.whl/, fetched beforehand on a machine
          with network by `make gpu-wheels`) into .gpu-site/, put on PYTHONPATH for the later stages
  tests   python -m pytest -m gpu (tests/test_gpu.py): outcome of every test from its JUnit XML
  memory  peak CUDA memory (`torch.cuda.max_memory_allocated`) of two real training steps per recipe grid of
          configs/*.yaml at its real shapes (random weights, the recipe's batch, optimizer, EMA, autocast), with and
          without grad checkpointing, against bench/recipes.py's memory model
  flops   sustained TFLOP/s of each recipe backbone, forward+backward and forward only, bf16 and fp16 autocast, as a
          share of the card's datasheet dense peak (FLOPs: bench/recipes.py's per-tile count)
  infer   python infer.py end to end (--device cuda --amp) for 10 random ViT-B/14 checkpoints (5 folds x grids 2x2 and
          3x3, native tiles) on full-size 2000x1000 images, against the tile encoder alone in the same precision
Results: one JSON file (--out, default docs/gpu.json); writing the default one also regenerates the docs, and
`python -m src.docs` renders docs/GPU.md's generated section from it (card, driver, torch, timm, date).
Without CUDA the run stops with one line before any work; `--dry-run` prints the plan (shapes, projections, wheels,
commands, budgets) on any machine.

    python bench/gpu_check.py [--dry-run] [--out PATH] [--stages tests memory flops infer]
    python bench/gpu_check.py --fetch-wheels          # on a machine with network: the wheels the GPU machine lacks
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from bench import recipes  # noqa: E402
from src import docs  # noqa: E402
from src.config import Config, add_config_flags, check_recipe, load_yaml, resolve_config  # noqa: E402
from src.errors import BiomassError, run_cli  # noqa: E402
from src.io_utils import write_text_atomic  # noqa: E402
from src.model import default_tile_size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEASURE = REPO / "bench" / "gpu_measure.py"  # the measuring stages: a child process each (they import albumentations)
RESULTS = REPO / "docs" / "gpu.json"
WHEELS_DIR = REPO / ".whl"
SITE_DIR = REPO / ".gpu-site"
# seconds per stage; their sum (and the parent's own start) stays under TOTAL_BUDGET_S < 6 minutes
BUDGETS = {"setup": 20, "tests": 160, "memory": 60, "flops": 40, "infer": 70}
TOTAL_BUDGET_S = 350
STAGES = tuple(BUDGETS)
GPU_TESTS = ("tests/test_gpu.py",)  # where the `gpu`-marked tests live
MIN_STAGE_S = 10  # a stage given less than this is skipped (out of time), not started
# What the GPU machine lacks (docs: torch 2.11, timm, OpenCV, scikit-learn, pandas, scipy, PyYAML there; Python 3.12):
# albumentations as requirements.txt pins it, and the dependencies it needs that are not there, at the versions
# installed with it on the CPU machines. typing_extensions travels because pydantic needs a recent one.
GPU_PYTHON = "3.12"
WHEELS = {
    "albumentations": "2.0.8",
    "albucore": "0.0.24",
    "pydantic": "2.14.4",
    "pydantic_core": "2.50.5",
    "annotated_types": "0.8.0",
    "typing_inspection": "0.4.5",
    "typing_extensions": "4.16.0",
    "simsimd": "6.5.16",
    "stringzilla": "5.3.2",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# datasheet dense (no sparsity) fp16/bf16 tensor-core peaks, matched on the device name; None = unknown card
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "T4": 65e12,
}
INFER_IMAGES, INFER_FOLDS, INFER_BATCH = 32, 5, 8
INFER_GRIDS = ((2, 2), (3, 3))  # the seed recipe's grids, native tiles (504 and 336 for patch 14)
INFER_KIND = "vit_b"  # bench/common.py MODELS: ViT-B/14 reg4, random init


# ---- the plan (runs anywhere) ------------------------------------------------------------------------------------
def resolve_recipe(path: Path, **model_overrides) -> tuple[Config, dict]:
    """The config train.py resolves from a recipe (plus model overrides) and its checked `recipe:` block."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    cfg = resolve_config(parser.parse_args(["--config", str(path)]))
    for key, value in model_overrides.items():
        setattr(cfg.model, key, value)
    return cfg, check_recipe(load_yaml(path).get("recipe", {}), str(path))


def recipe_shapes(paths: list[Path] | None = None) -> list[dict]:
    """One row per recipe x grid: backbone, tile, batch, sequences per step, tokens, fwd FLOPs per tile."""
    rows = []
    for path in paths or recipes.RECIPES:
        cfg, recipe = resolve_recipe(path)
        for grid in recipe["grids"] or [tuple(cfg.model.grid)]:
            grid = tuple(int(g) for g in grid)
            patch = recipes.backbone_shape(cfg, 224)["patch"]
            tile = cfg.model.tile_size or default_tile_size(grid, patch)
            shape = recipes.backbone_shape(cfg, tile)
            rows.append(
                {
                    "recipe": path.stem,
                    "backbone": cfg.model.backbone,
                    "grid": f"{grid[0]}x{grid[1]}",
                    "tile": tile,
                    "batch_size": cfg.train.batch_size,
                    "sequences_per_step": cfg.train.batch_size * 2 * grid[0] * grid[1],
                    "tokens": shape["tokens"],
                    "fwd_gflop_per_tile": round((shape["depth"] * shape["block"] + shape["embed"]) / 1e9, 3),
                    "grad_checkpointing": bool(cfg.model.grad_checkpointing),
                    "freeze_blocks": cfg.train.freeze_blocks,
                    "ema": bool(cfg.train.ema_decay > 0 or cfg.train.ema_half_life > 0),
                }
            )
    return rows


def memory_projection(path: Path, grad_checkpointing: bool) -> dict[str, float]:
    """bench/recipes.py's projected GB per grid ("2x2" -> GB) of a recipe with grad checkpointing set on or off.

    The recipe is rewritten with that one setting into a temp file of the same name and projected as it is.
    """
    data = yaml.safe_load(path.read_text())
    data.setdefault("model", {})["grad_checkpointing"] = grad_checkpointing
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(yaml.safe_dump(data))
        rows, _ = recipes.project(copy)
    return {r["grid"]: float(r["memory_gb"]) for r in rows if r["device"] == "H100"}  # GB do not depend on the card


def wheel_status(wheels_dir: Path) -> dict:
    """Which of WHEELS are in `wheels_dir` (one wheel per name, the pinned version) and which are missing."""
    files = sorted(p.name for p in wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    found, missing = {}, []
    for name, version in WHEELS.items():
        match = [f for f in files if f.lower().startswith(f"{name.lower()}-{version}-")]
        if match:
            found[name] = match[0]
        else:
            missing.append(f"{name}=={version}")
    return {"dir": str(wheels_dir), "found": found, "missing": missing}


def fetch_command(wheels_dir: Path) -> list[str]:
    """pip download of WHEELS for the GPU machine's Python and platform (binary only, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", GPU_PYTHON]
    cmd += ["--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(wheels_dir)]
    return cmd + [f"{name}=={version}" for name, version in WHEELS.items()]


def install_command(wheels: list[Path], site: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
            "--target", str(site), *map(str, wheels)]  # fmt: skip


def pytest_command(junit: Path) -> list[str]:
    """pytest -m gpu on the files that hold gpu tests (collecting every test file would import kaggle, absent there)."""
    return [sys.executable, "-m", "pytest", "-m", "gpu", *GPU_TESTS, "-p", "no:cacheprovider", "-q", "-rA",
            f"--junitxml={junit}"]  # fmt: skip


def plan(wheels_dir: Path = WHEELS_DIR, stages: tuple[str, ...] = STAGES) -> dict:
    """What a run would do: stages with budgets and commands, recipe shapes and projections, the wheels' state."""
    shapes = recipe_shapes()
    projections = {}
    for path in recipes.RECIPES:
        off, on = memory_projection(path, False), memory_projection(path, True)
        projections[path.stem] = {grid: {"without_ckpt_gb": off[grid], "with_ckpt_gb": on[grid]} for grid in off}
    wheels = wheel_status(wheels_dir)
    return {
        "stages": {name: {"budget_s": BUDGETS[name]} for name in stages},
        "total_budget_s": TOTAL_BUDGET_S,
        "budgets_sum_s": sum(BUDGETS[name] for name in stages),
        "commands": {
            "setup": " ".join(install_command([Path(wheels_dir) / f for f in wheels["found"].values()], SITE_DIR)),
            "tests": " ".join(pytest_command(Path("<tmp>/junit.xml"))),
            "infer": f"python infer.py --data-dir <tmp>/{INFER_IMAGES} full-size images --checkpoints <tmp>/exp "
            f"--device cuda --amp --batch-size {INFER_BATCH}  # {INFER_FOLDS} folds x grids "
            + " + ".join(f"{r}x{c}" for r, c in INFER_GRIDS),
        },
        "shapes": shapes,
        "memory_model_gb": projections,
        "wheels": wheels,
        "fetch_wheels": " ".join(fetch_command(wheels_dir)),
    }


# ---- running stages ------------------------------------------------------------------------------------------------
def run_limited(cmd: list[str], budget_s: float, env: dict | None = None, cwd: Path = REPO, tail: int = 4000) -> dict:
    """Run a child process for at most `budget_s` seconds: status ok / failed (exit code) / timeout, and the last
    `tail` characters of its output."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired as err:  # subprocess.run kills the child before raising
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"status": "timeout", "seconds": round(time.perf_counter() - start, 1), "output": out[-tail:]}
    status = "ok" if proc.returncode == 0 else "failed"
    output = (proc.stdout + proc.stderr)[-tail:]
    return {"status": status, "returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "output": output}  # fmt: skip


def junit_outcomes(path: Path) -> dict:
    """passed / failed / skipped / xfailed counts and one row per test case of a pytest JUnit XML file."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
                kind = child.get("type") or ""
                outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
                if child.tag == "skipped" and kind == "pytest.xfail":
                    outcome = "xfailed"
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0), 2), "message": message})  # fmt: skip
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped", "xfailed")}
    return {**counts, "cases": cases}


def setup_site(wheels_dir: Path, site: Path, budget_s: float) -> dict:
    """albumentations importable for the later stages: already there, or installed from the carried wheels."""
    probe = [sys.executable, "-c", "import albumentations; print(albumentations.__version__)"]
    have = run_limited(probe, budget_s, env=child_env(None))
    if have["status"] == "ok":
        return {
            "status": "ok",
            "note": f"albumentations {have['output'].strip()} already importable; nothing installed",
        }
    status = wheel_status(wheels_dir)
    if status["missing"]:
        raise BiomassError(
            f"{wheels_dir}: no wheel for {', '.join(status['missing'])}; run `make gpu-wheels` on a machine with "
            "network and carry .whl to this one"
        )
    result = run_limited(install_command([wheels_dir / f for f in status["found"].values()], site), budget_s)
    if result["status"] != "ok":
        return result
    check = run_limited(probe, budget_s, env=child_env(site))
    check["note"] = f"installed {len(status['found'])} wheels into {site}"
    return check


def child_env(site: Path | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def machine_info() -> dict:
    """Card, capability, memory, driver, library versions, git commit and the date: the header of the results."""
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()[0]  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown (nvidia-smi not available)"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(0)
    return {
        "card": name,
        "capability": f"sm_{props.major}{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "gpus": torch.cuda.device_count(),
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "peak_tflops": peak_flops(name) / 1e12 if peak_flops(name) else None,
        "git": commit or "unknown",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def peak_flops(name: str) -> float | None:
    """Datasheet dense fp16/bf16 FLOP/s of a card, from its name (None when not in PEAK_FLOPS)."""
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


# ---- the whole check ---------------------------------------------------------------------------------------------
def check(out: Path, stages: tuple[str, ...], wheels_dir: Path, site: Path) -> dict:
    """Every stage in order under its budget and the total one; the results dict (also written to `out`)."""
    started = time.time()
    # a T4 is projected from the measured shares at its fp16 peak (bench/recipes.py's T4_PEAK; docs/GPU.md says how)
    results = {"kind": "measurement", "machine": machine_info(), "stages": {}, "budgets_s": dict(BUDGETS),
               "total_budget_s": TOTAL_BUDGET_S, "t4_peak_tflops": recipes.T4_PEAK / 1e12}  # fmt: skip
    env_site = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in stages:
            left = TOTAL_BUDGET_S - (time.time() - started)
            budget = min(BUDGETS[name], left)
            if budget < MIN_STAGE_S:
                results["stages"][name] = {"status": "skipped: total budget spent", "seconds": 0}
                continue
            print(f"gpu-check: {name} (budget {budget:.0f} s)", flush=True)
            if name == "setup":
                stage = setup_site(wheels_dir, site, budget)
                env_site = site if "installed" in stage.get("note", "") else None
            elif name == "tests":
                junit = Path(tmp) / "junit.xml"
                stage = run_limited(pytest_command(junit), budget, env=child_env(env_site))
                if junit.is_file():
                    results["tests"] = junit_outcomes(junit)
            else:
                part = Path(tmp) / f"{name}.json"
                cmd = [sys.executable, str(MEASURE), name, "--part", str(part),
                       "--deadline", str(time.time() + budget - 5)]  # fmt: skip
                stage = run_limited(cmd, budget, env=child_env(env_site))
                if part.is_file():
                    results.update(json.loads(part.read_text()))
            results["stages"][name] = {**stage, "budget_s": round(budget)}
            print(f"gpu-check: {name} {stage['status']} in {stage.get('seconds', 0)} s", flush=True)
    results["total_seconds"] = round(time.time() - started, 1)
    write_text_atomic(out, json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan (shapes, wheels, commands) and stop")
    parser.add_argument("--fetch-wheels", action="store_true", help="pip download the wheels the GPU machine lacks")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON (default docs/gpu.json: docs regenerated)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order")
    parser.add_argument("--wheels", default=str(WHEELS_DIR), help="folder of carried wheels (default .whl)")
    args = parser.parse_args(argv)
    wheels_dir = Path(args.wheels)
    if args.fetch_wheels:
        wheels_dir.mkdir(parents=True, exist_ok=True)
        return subprocess.run(fetch_command(wheels_dir)).returncode
    if args.dry_run:
        print(json.dumps(plan(wheels_dir, tuple(args.stages)), indent=1))
        return 0
    if not torch.cuda.is_available():
        raise BiomassError(
            f"no CUDA device visible (torch {torch.__version__}): gpu-check measures a GPU; "
            "`python bench/gpu_check.py --dry-run` shows its plan here"
        )
    out = Path(args.out)
    results = check(out, tuple(args.stages), wheels_dir, SITE_DIR)
    print(f"gpu-check: wrote {out}")
    if out.resolve() == RESULTS.resolve():
        for line in docs.rewrite(REPO):
            print(f"rewrote {line}")
    tests = results.get("tests", {})
    bad = [n for n, s in results["stages"].items() if s["status"] != "ok"]
    if tests.get("failed") or tests.get("error") or bad:
        failed = [c["name"] for c in tests.get("cases", []) if c["outcome"] in ("failed", "error")]
        raise BiomassError(f"gpu-check: stages not ok: {', '.join(bad) or 'none'}; failed tests: "
                           f"{', '.join(failed) or 'none'} (details in {out})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
