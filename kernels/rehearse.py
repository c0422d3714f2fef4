"""python kernels/rehearse.py [--checkpoints checkpoints/<exp> --data-dir DIR] [--work DIR]: rehearse the hidden rerun.

`make kaggle-sim`. What Kaggle does with a code submission, here, with what the rerun can throw at it:

1. Builds the kernel (kernels/build.py) from the checkpoints, one of which is poisoned first (NaN weights in
   its head: it returns NaN for every image). Without --checkpoints a tiny experiment is made first
   (synthetic images, the tiny preset, two folds of one grid: ~30 s on 2 cores).
2. Lays out a Kaggle input tree under a temporary root, named to the kernel only by I2B_KAGGLE_INPUT: the
   competition data with a test.csv of one extra column (Sampling_Date), a sample_submission.csv in another
   row order and two corrupt test images (truncated; not an image), the code and weights datasets.
   Run 1 uses the 2026 layout (competitions/csiro-biomass, datasets/<owner>/<slug>) with the weights
   dataset's experiment folder left zipped; run 2 the competition-era layout (<root>/csiro-biomass,
   <root>/<slug>) with Kaggle's timm (1.0.19) first on the path, installed once with
   `pip install --no-deps --target` into a cache folder (skipped, with the reason, when the package index
   cannot be reached).
3. Runs kernel.py in a subprocess with every socket connect refused, no I2B_*_DIR override, the repo off the
   import path, from the working folder.
4. Checks: exit 0; every test.csv id exactly once, in sample_submission.csv's order; every value finite and
   >= 0; on the healthy images the values of `infer.py` with the same config on the healthy checkpoints;
   the corrupt images got the training-median fallback; `infer`/`src` came from the code dataset (and timm
   from the cache in run 2).

With --real-size (issue 25) two more kernels run what users build, under timm 1.0.19 on 2 full-size 2000x1000
images with TTA off: a ViT-B/14 seed-recipe checkpoint with random weights and native tiles, and a DINOv3-shaped
one built with --bundle-timm (its kernel must install the wheel). Slow on a CPU: not part of the test suite.

Prints one line per check and writes rehearsal.json in the work folder; exit 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python kernels/rehearse.py`: `src` and `kernels` live in the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import infer  # noqa: E402  - the repo's own entry point: the reference the kernel must agree with
from kernels import build as kbuild  # noqa: E402
from kernels.kernel_template import INPUT_ENV  # noqa: E402
from src.checkpoint import save_best, target_stats  # noqa: E402
from src.config import Config  # noqa: E402
from src.data import load_train  # noqa: E402
from src.errors import BiomassError, run_cli  # noqa: E402
from src.folds import make_folds, save_folds  # noqa: E402
from src.inference import Predictor, fallback_values, upper_bounds  # noqa: E402
from src.logs import add_quiet_flag, get_logger  # noqa: E402
from src.model import build_model  # noqa: E402
from src.postprocess import apply_physics  # noqa: E402
from src.schema import SAMPLE_ID_SEP, TARGETS  # noqa: E402
from src.synthetic import generate  # noqa: E402

log = get_logger("kernels.rehearse")

REPO = Path(__file__).resolve().parents[1]
OWNER, SLUG = "rehearsal", "image2biomass"
KAGGLE_TIMM = "1.0.19"  # the Kaggle image's timm in early 2026 (../shared/ENV_FACTS.md)
TIMM_CACHE_ENV = "I2B_TIMM_CACHE"
DEFAULT_TIMM_CACHE = Path.home() / ".cache" / "image2biomass"
EXTRA_TEST_COLUMN = "Sampling_Date"
# the tiny experiment made when no --checkpoints is given (the tests' TINY_FLAGS)
TINY_TRAIN_FLAGS = ["--preset", "tiny", "--tile-size", "28", "--epochs", "2", "--freeze-epochs", "1",
                    "--batch-size", "8", "--seed", "0", "--grid", "1", "2", "--quiet"]  # fmt: skip

# Runs a script with the network cut (every connect raises), then reports where `infer`/`src`/`timm` came from.
WRAPPER = """
import json, os, runpy, socket, sys

def blocked(*args, **kwargs):
    raise OSError("network blocked by kernels/rehearse.py")

socket.socket.connect = blocked
socket.create_connection = blocked
try:
    runpy.run_path(sys.argv[1], run_name="__main__")
finally:
    mods = {name: getattr(sys.modules.get(name), "__file__", None) for name in ("infer", "src", "timm")}
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE")}
    with open(sys.argv[2], "w") as f:
        json.dump({"modules": mods, "sys_path": sys.path, "env": env}, f)
"""


@dataclass
class Run:
    """One kernel run of the rehearsal and what was checked about it."""

    name: str
    layout: str
    returncode: int | None = None
    seconds: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.skipped is not None or (bool(self.checks) and all(self.checks.values()))

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks[name] = bool(ok)
        if detail:
            self.details[name] = detail


# ---- inputs ----------------------------------------------------------------------------------------------------
def tiny_experiment(work: Path) -> tuple[Path, Path]:
    """(experiment dir, data dir): 40+6 synthetic 400x200 images, two folds of the tiny preset via train.py."""
    data = generate(work / "data", 40, 6, seed=0, size=(400, 200))
    folds = work / "folds.csv"
    save_folds(make_folds(load_train(data), "group_month", n_folds=3, seed=0), folds)
    for fold in ("0", "1"):
        cmd = [sys.executable, str(REPO / "train.py"), "--fold", fold, "--data-dir", str(data), "--folds", str(folds),
               "--out-dir", str(work / "checkpoints"), "--exp", "tiny", *TINY_TRAIN_FLAGS]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BiomassError(f"train.py --fold {fold} for the rehearsal failed: {proc.stderr.strip()[-500:]}")
    return work / "checkpoints" / "tiny", data


def random_checkpoint(path: Path, model: dict, fold: int = 0, seed: int = 0, train: pd.DataFrame | None = None) -> Path:
    """A best.pt of the model config `model` (a ModelConfig dict over the defaults: the seed recipe) with random
    weights and no training: the shape and size users train, in seconds. Target statistics from `train` (default:
    a fixed synthetic frame)."""
    torch.manual_seed(seed)
    cfg = Config.from_dict({"model": {**model, "backbone_weights": None}}, source="rehearsal")
    net = build_model(cfg.model, load_backbone_weights=False)
    if train is None:
        rng = np.random.default_rng(seed)
        train = pd.DataFrame(rng.gamma(2.0, 10.0, size=(64, len(TARGETS))), columns=list(TARGETS))
    save_best(Path(path), net, cfg, target_stats(train), epoch=0, metric=None, fold=fold)
    return Path(path)


def poisoned_copy(exp_dir: Path, dst_root: Path) -> tuple[Path, Path, list[Path]]:
    """A copy of the experiment's best.pt files whose first one has NaN head weights: (copy, poisoned, healthy).

    Every floating tensor outside the backbone becomes NaN, so that model returns NaN for every image.
    """
    paths = sorted(exp_dir.glob("grid*/fold*/best.pt"))
    if len(paths) < 2:
        raise BiomassError(f"{exp_dir}: the rehearsal needs >= 2 checkpoints (one is poisoned), found {len(paths)}")
    copy = dst_root / exp_dir.resolve().name
    for path in paths:
        kbuild.place_file(path, copy / path.relative_to(exp_dir))
    poisoned = copy / paths[0].relative_to(exp_dir)
    ckpt = torch.load(poisoned, weights_only=True)
    for key, value in ckpt["model"].items():
        if not key.startswith("backbone") and value.is_floating_point():
            ckpt["model"][key] = torch.full_like(value, float("nan"))
    poisoned.unlink()  # a hard link: never write through it into the source experiment
    torch.save(ckpt, poisoned)
    return copy, poisoned, [copy / p.relative_to(exp_dir) for p in paths[1:]]


def competition_data(data_dir: Path, dst: Path) -> dict:
    """The competition folder as the rerun may serve it: test.csv + a column, sample order shuffled, 2 bad images."""
    for name in ("train.csv",):
        kbuild.place_file(data_dir / name, dst / name)
    for image in sorted((data_dir / "train").glob("*")):
        kbuild.place_file(image, dst / "train" / image.name)
    test = pd.read_csv(data_dir / "test.csv", dtype=str)
    images = list(dict.fromkeys(test["image_path"]))
    if len(images) < 3:
        raise BiomassError(f"{data_dir / 'test.csv'}: the rehearsal needs >= 3 test images (2 are corrupted)")
    for rel in images:
        kbuild.place_file(data_dir / rel, dst / rel)
    test.insert(1, EXTRA_TEST_COLUMN, "2015/9/4")  # a column the kernel must ignore
    test.to_csv(dst / "test.csv", index=False)
    sample = test[["sample_id"]].assign(target=0.0).iloc[::-1]  # another order: the submission must follow it
    sample.to_csv(dst / "sample_submission.csv", index=False)
    truncated, garbage = dst / images[0], dst / images[1]
    data = truncated.read_bytes()
    truncated.unlink()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.unlink()
    garbage.write_bytes(np.random.default_rng(0).bytes(4000))
    return {
        "test_ids": test["sample_id"].tolist(),
        "sample_order": sample["sample_id"].tolist(),
        "corrupt": [Path(images[0]).stem, Path(images[1]).stem],
    }


def lay_out(build_out: Path, competition: Path, root: Path, layout: str) -> Path:
    """Kaggle's /kaggle/{input,working} under `root`; returns the input root.

    `2026`: input/competitions/csiro-biomass, input/datasets/<owner>/<slug>-{code,weights}, the weights
    dataset's experiment folder left as the .zip that `--dir-mode zip` uploads. `classic`: input/csiro-biomass,
    input/<slug>-{code,weights}, all unpacked.
    """
    inputs = root / "input"
    if layout == "2026":
        comp, datasets = inputs / "competitions" / "csiro-biomass", inputs / "datasets" / OWNER
    else:
        comp, datasets = inputs / "csiro-biomass", inputs
    shutil.copytree(competition, comp, copy_function=os.link)
    shutil.copytree(build_out / "code", datasets / f"{SLUG}-code", copy_function=os.link)
    weights = datasets / f"{SLUG}-weights"
    if layout == "2026":
        weights.mkdir(parents=True)
        for entry in (build_out / "weights").iterdir():
            if entry.is_dir():
                shutil.make_archive(str(weights / entry.name), "zip", entry)
            else:
                kbuild.place_file(entry, weights / entry.name)
    else:
        shutil.copytree(build_out / "weights", weights, copy_function=os.link)
    (root / "working").mkdir(parents=True)
    return inputs


# ---- Kaggle's timm -------------------------------------------------------------------------------------------------
# pip's words for an index it cannot reach or that does not hold the version (anything else is a real failure)
UNREACHABLE = (
    "No matching distribution found", "Could not find a version", "Failed to establish a new connection",
    "Max retries exceeded", "Network is unreachable", "Temporary failure in name resolution", "Connection refused",
)  # fmt: skip


def kaggle_timm(cache_root: Path | None = None) -> tuple[Path | None, str]:
    """(folder holding timm KAGGLE_TIMM, how it got there) or (None, why not): installed once, then reused."""
    cache_root = Path(cache_root or os.environ.get(TIMM_CACHE_ENV) or DEFAULT_TIMM_CACHE)
    target = cache_root / f"timm-{KAGGLE_TIMM}"
    if (target / "timm" / "version.py").is_file():
        return target, f"cached in {target}"
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".timm-{KAGGLE_TIMM}.", dir=cache_root))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--disable-pip-version-check",
           "--target", str(tmp), f"timm=={KAGGLE_TIMM}"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        return None, f"pip install timm=={KAGGLE_TIMM} timed out: the package index cannot be reached"
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        text = proc.stderr or proc.stdout
        last = text.strip().splitlines()[-1:] or ["no output"]
        # only an index that cannot be reached (or lacks the version) excuses the run; any other pip failure is one
        why = "the package index cannot be reached" if any(m in text for m in UNREACHABLE) else "a failed install"
        return None, f"pip install timm=={KAGGLE_TIMM} failed ({last[0][:200]}): {why}"
    try:
        os.rename(tmp, target)
    except OSError:  # another rehearsal won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target, f"installed into {target} ({' '.join(cmd[2:])})"


# ---- runs ----------------------------------------------------------------------------------------------------------
def kernel_env(inputs: Path, home: Path, pythonpath: Path | None = None) -> dict:
    """The kernel's environment: the input root, nothing that would point it at the repo or the inputs directly."""
    drop = ("PYTHONPATH", "HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "I2B_")) and k not in drop}
    tmp = home.parent / "tmp"  # the kernel's temp folders (unzipped datasets, its config) stay in the work folder
    tmp.mkdir(parents=True, exist_ok=True)
    env.update({INPUT_ENV: str(inputs), "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                "KAGGLE_KERNEL_RUN_TYPE": "Batch", "TMPDIR": str(tmp)})  # fmt: skip
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def run_kernel(
    kernel_py: Path, root: Path, inputs: Path, pythonpath: Path | None = None, timeout: float = 900
) -> tuple[dict, Run]:
    """kernel.py through the network-blocking wrapper, from root/working; (wrapper report, run with output)."""
    wrapper, report = root / "wrapper.py", root / "wrapper.json"
    wrapper.write_text(WRAPPER)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(wrapper), str(kernel_py), str(report)],
        cwd=root / "working", env=kernel_env(inputs, root / "home", pythonpath), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    run = Run("", "", proc.returncode, time.time() - start, stdout=proc.stdout, stderr=proc.stderr)
    return (json.loads(report.read_text()) if report.is_file() else {}), run


def reference_values(build_info: dict, competition: Path, healthy: list[Path], out: Path) -> pd.Series:
    """infer.py with the kernel's own config on the healthy checkpoints and the same data: sample_id -> value."""
    config = {**build_info["infer"], "data_dir": str(competition), "checkpoints": [str(p) for p in healthy],
              "out": str(out / "submission.csv"), "device": "cpu"}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "infer.json").write_text(json.dumps(config))
    if run_cli(infer.main, ["--config", str(out / "infer.json"), "--quiet"]) != 0:
        raise BiomassError("infer.py on the healthy checkpoints failed; see its error above")
    return pd.read_csv(out / "submission.csv").set_index("sample_id")["target"]


def fallback_row(checkpoints: list[Path], physics: str) -> np.ndarray:
    """The training-median prediction an unreadable image gets from this ensemble."""
    predictors = [Predictor(p, "cpu", tta="none") for p in checkpoints]
    return apply_physics(fallback_values(predictors)[None], physics, upper_bounds(predictors))[0]


def check_run(run: Run, report: dict, root: Path, code_dir_name: str, expect: dict) -> None:
    """The rehearsal's checks of one run (each a named boolean with a detail line)."""
    run.check("exit 0", run.returncode == 0, "" if run.returncode == 0 else run.stderr.strip()[-600:])
    path = root / "working" / "submission.csv"
    if not path.is_file():
        run.check("submission.csv written", False, str(path))
        return
    sub = pd.read_csv(path)
    ids = sub["sample_id"].tolist()
    run.check("every test.csv id once", sorted(ids) == sorted(expect["test_ids"]) and len(set(ids)) == len(ids),
              f"{len(ids)} rows for {len(expect['test_ids'])} test.csv rows")  # fmt: skip
    run.check("sample_submission.csv order", ids == expect["sample_order"])
    values = sub.set_index("sample_id")["target"]
    run.check("finite and >= 0", bool(np.isfinite(values).all() and (values >= 0).all()),
              f"min {values.min():.4g}, max {values.max():.4g}")  # fmt: skip
    corrupt = set(expect["corrupt"])
    healthy = [s for s in expect["test_ids"] if s.split(SAMPLE_ID_SEP)[0] not in corrupt]
    diff = float(np.max(np.abs(values[healthy].to_numpy() - expect["reference"][healthy].to_numpy())))
    run.check("healthy images = infer.py", bool(np.allclose(values[healthy], expect["reference"][healthy],
              rtol=1e-6, atol=1e-6)), f"{len(healthy)} rows, max abs diff {diff:.3g} g")  # fmt: skip
    fallback = [values[[f"{i}{SAMPLE_ID_SEP}{t}" for t in TARGETS]].to_numpy() for i in expect["corrupt"]]
    run.check("corrupt images = fallback", all(np.allclose(f, expect["fallback"], rtol=1e-6) for f in fallback))
    out = run.stdout
    run.check("extra column ignored", f"ignoring unexpected column(s) {EXTRA_TEST_COLUMN}" in out)
    run.check("2 unreadable images counted", "2 unreadable image(s) got the training-median prediction" in out)
    run.check("NaN model left out", f"{expect['poisoned']}: non-finite prediction for" in out)
    run.check("devices logged", "device cpu" in out)
    modules = report.get("modules", {})
    came_from = {k: modules.get(k) or "" for k in ("infer", "src")}
    run.check("code from the code dataset",
              all(f"/{code_dir_name}/" in p and not p.startswith(str(REPO) + "/") for p in came_from.values()),
              ", ".join(f"{k} {v}" for k, v in came_from.items()))  # fmt: skip
    if expect.get("timm_dir"):
        timm_file = modules.get("timm") or ""
        first = timm_file.startswith(str(expect["timm_dir"])) and f"timm {KAGGLE_TIMM}" in out
        run.check(f"timm {KAGGLE_TIMM} first on the path", first, timm_file)


def rehearse(
    work: Path,
    checkpoints: Path | None = None,
    data_dir: Path | None = None,
    timm: bool = True,
    timm_cache: Path | None = None,
    real_size: bool = False,
) -> dict:
    """Every step of the module docstring under `work`; returns the report (also written to rehearsal.json)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if checkpoints is None:
        log.info("no --checkpoints: training a tiny experiment for the rehearsal")
        checkpoints, made_data = tiny_experiment(work / "tiny")
        data_dir = data_dir or made_data
    if data_dir is None:
        raise BiomassError("--checkpoints needs --data-dir: the competition-layout data its test images come from")
    exp, poisoned, healthy = poisoned_copy(Path(checkpoints), work / "checkpoints")
    build_out = work / "build"
    info = kbuild.build([str(exp)], build_out, OWNER, SLUG, kbuild.KernelOptions())
    competition = work / "competition"
    expect = competition_data(Path(data_dir), competition)
    expect["poisoned"] = str(poisoned.relative_to(work / "checkpoints"))  # as the kernel names it, under weights/
    expect["reference"] = reference_values(info, competition, healthy, work / "reference")
    expect["fallback"] = fallback_row([poisoned, *healthy], info["infer"]["physics"])

    runs = []
    plans = [("kaggle 2026 layout, weights left zipped", "2026", None)]
    timm_dir, timm_note = (None, "--no-timm-run") if not timm else kaggle_timm(timm_cache)
    plans.append((f"competition-era layout, timm {KAGGLE_TIMM}", "classic", timm_dir))
    for name, layout, pythonpath in plans:
        if layout == "classic" and timm_dir is None:
            if "cannot be reached" in timm_note or timm_note == "--no-timm-run":
                runs.append(Run(name, layout, skipped=f"skipped: {timm_note}"))
            else:  # pip failed for another reason: the rehearsal fails rather than skip the run
                failed = Run(name, layout)
                failed.check(f"timm {KAGGLE_TIMM} installed", False, timm_note)
                runs.append(failed)
            continue
        root = work / f"kaggle-{layout}"
        inputs = lay_out(build_out, competition, root, layout)
        report, run = run_kernel(build_out / "kernel" / "kernel.py", root, inputs, pythonpath)
        run.name, run.layout = name, layout
        check_run(run, report, root, f"{SLUG}-code", {**expect, "timm_dir": pythonpath})
        (root / "kernel.stdout").write_text(run.stdout)
        (root / "kernel.stderr").write_text(run.stderr)
        runs.append(run)
    if real_size:  # issue 25: what users build (slow on a CPU: ~ViT-B on 2 full-size images)
        if timm_dir is None:
            runs.append(Run("real-size checkpoints", "classic", skipped=f"skipped: {timm_note}"))
        else:
            runs.extend(real_size_runs(work / "real-size", timm_dir))
    result = {
        "passed": all(r.passed for r in runs),
        "seconds": round(time.time() - start, 1),
        "work": str(work),
        "timm": timm_note,
        "runs": [
            {
                "name": r.name,
                "layout": r.layout,
                "returncode": r.returncode,
                "seconds": round(r.seconds, 1),
                "checks": r.checks,
                "details": r.details,
                "skipped": r.skipped,
            }  # fmt: skip
            for r in runs
        ],
    }
    (work / "rehearsal.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ---- what users build: real-size checkpoints, native tiles, full-size images (issue 25) -----------------------------
SEED_RECIPE = {}  # ModelConfig defaults = the seed recipe: DINOv2 ViT-B/14 reg4, grid 2x2, native tiles (504 px)
DINOV3_SHAPED = {
    "backbone": "vit_small_patch16_dinov3",
    "backbone_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2},
    "fusion_dim": 32,
}  # native tiles too; needs timm >= 1.0.20: the bundled wheel
FULL_SIZE = (2000, 1000)
REAL_SIZE_TIMEOUT = 3600.0  # seconds per real-size kernel run


def real_size_runs(work: Path, timm_dir: Path, n_images: int = 2) -> list[Run]:
    """Two kernels on `n_images` full-size 2000x1000 synthetic images, TTA off, under Kaggle's timm (`timm_dir` first
    on the path): a ViT-B/14 seed-recipe checkpoint (random weights, native tiles; the image's timm must do) and a
    DINOv3-shaped one (built with --bundle-timm; the kernel must install the wheel). Each: exit 0, a complete valid
    submission, a finite model in run_report.json."""
    data = generate(work / "full-size-data", 2, n_images, seed=1, size=FULL_SIZE)
    runs = []
    plans = [("ViT-B/14 seed recipe, native tiles, full-size images", "vitb", SEED_RECIPE, False),
             ("DINOv3-shaped, native tiles, bundled timm", "dinov3", DINOV3_SHAPED, True)]  # fmt: skip
    for name, key, model, bundle in plans:
        start = time.time()
        exp = work / f"exp-{key}"
        random_checkpoint(exp / "grid2x2" / "fold0" / "best.pt", model)
        options = kbuild.KernelOptions(kbuild.kernel_infer_config(tta="none"), bundle_timm=bundle)
        build_out = work / f"build-{key}"
        kbuild.build([str(exp)], build_out, OWNER, SLUG, options)
        root = work / f"kaggle-{key}"
        inputs = lay_out(build_out, data, root, "classic")
        # a ViT-B on a 2-core CPU under load: the one attempt so far (900 s cap, load ~10) did not finish in time
        report, run = run_kernel(build_out / "kernel" / "kernel.py", root, inputs, timm_dir, timeout=REAL_SIZE_TIMEOUT)
        run.name, run.layout, run.seconds = name, "classic", time.time() - start
        run.check("exit 0", run.returncode == 0, "" if run.returncode == 0 else run.stderr.strip()[-600:])
        sub_path = root / "working" / "submission.csv"
        test = pd.read_csv(data / "test.csv")
        sub = pd.read_csv(sub_path) if sub_path.is_file() else pd.DataFrame({"sample_id": [], "target": []})
        run.check("every test.csv id once", sorted(sub["sample_id"]) == sorted(test["sample_id"]),
                  f"{len(sub)} rows for {len(test)} test.csv rows")  # fmt: skip
        run.check("finite and >= 0", bool(len(sub) and np.isfinite(sub["target"]).all() and (sub["target"] >= 0).all()))
        path = root / "working" / "run_report.json"
        rep = json.loads(path.read_text()) if path.is_file() else {}
        run.check("a finite model in run_report.json", rep.get("finite_models") == 1 and not rep.get("failed"),
                  json.dumps({k: rep.get(k) for k in ("finite_models", "failed", "errors")}))  # fmt: skip
        timm_file = (report.get("modules") or {}).get("timm") or ""
        if bundle:
            run.check("bundled timm installed", "timm from the bundled" in run.stdout and not timm_file.startswith(
                str(timm_dir)), timm_file)  # fmt: skip
        else:
            run.check(f"timm {KAGGLE_TIMM} first on the path", timm_file.startswith(str(timm_dir))
                      and f"timm {KAGGLE_TIMM}" in run.stdout, timm_file)  # fmt: skip
        (root / "kernel.stdout").write_text(run.stdout)
        (root / "kernel.stderr").write_text(run.stderr)
        runs.append(run)
    return runs


def summary(result: dict, kept: bool = True) -> list[str]:
    """One line per check of each run, then the verdict."""
    lines = []
    for run in result["runs"]:
        if run["skipped"]:
            lines.append(f"{run['name']}: {run['skipped']}")
            continue
        lines.append(f"{run['name']}: kernel.py exit {run['returncode']} in {run['seconds']:.1f}s")
        for name, ok in run["checks"].items():
            detail = run["details"].get(name, "")
            lines.append(f"  {'ok  ' if ok else 'FAIL'} {name}" + (f" ({detail})" if detail else ""))
    verdict = "passed" if result["passed"] else "FAILED"
    where = f"work folder {result['work']}" if kept else "work folder removed; --work DIR keeps it"
    lines.append(f"rehearsal {verdict} in {result['seconds']:.1f}s ({where})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python kernels/rehearse.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoints", default=None, help="experiment dir (default: train a tiny one)")
    parser.add_argument("--data-dir", default=None, help="competition-layout data of --checkpoints (test images)")
    parser.add_argument("--work", default=None, help="work folder, kept (default: a temp folder, removed)")
    parser.add_argument("--no-timm-run", action="store_true", help=f"skip the run with timm {KAGGLE_TIMM}")
    parser.add_argument("--timm-cache", default=None, help=f"where timm {KAGGLE_TIMM} is installed once "
                        f"(default ${TIMM_CACHE_ENV} or {DEFAULT_TIMM_CACHE})")  # fmt: skip
    parser.add_argument(
        "--real-size",
        action="store_true",
        help="also rehearse a ViT-B/14 seed-recipe and a "
        "DINOv3-shaped checkpoint (random weights, native tiles) on 2 full-size images (slow on a CPU)",
    )
    add_quiet_flag(parser)
    args = parser.parse_args(argv)
    tmp = None if args.work else tempfile.mkdtemp(prefix="i2b-rehearsal-")
    try:
        result = rehearse(
            Path(args.work or tmp),
            Path(args.checkpoints) if args.checkpoints else None,
            Path(args.data_dir) if args.data_dir else None,
            timm=not args.no_timm_run,
            timm_cache=Path(args.timm_cache) if args.timm_cache else None,
            real_size=args.real_size,
        )
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    for line in summary(result, kept=tmp is None):
        print(line)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
