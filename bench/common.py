"""Shared helpers of the benchmarks: machine description, interleaved median timing, synthetic data,
model configs and throwaway checkpoints, markdown tables, and the dated section appended to
docs/BENCHMARKS.md.

Every benchmark is `python bench/<name>.py [--quick] [--repeats N] [--doc PATH]`: it prints its tables
and appends one section (command, machine, date, numbers, bar met / not met) to the doc. `--quick`
is the smoke-test setting (tests/test_bench.py), `--doc` redirects the section (tests use a temp file).

Timings on a shared 2-core machine are noisy: the variants being compared run round-robin inside one
process (`interleaved`), so load from other processes hits them alike, and each figure is a median.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import fcntl
import hashlib
import io
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI check on import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the tables (read at tqdm import)

import subprocess

import numpy as np  # noqa: E402
import timm
import torch  # noqa: E402

from src.checkpoint import save_best
from src.config import PRESETS, Config, apply_overrides
from src.data import load_train
from src.model import build_model
from src.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "BENCHMARKS.md"
DOC_HEADER = (
    "# Benchmarks\n\nAppended by `bench/*.py` (one dated section per run; newest last). Do not edit by hand: each "
    "section ends with the sha256 of its text as its script wrote it, and tests/test_bench.py fails on a changed "
    "or unsealed section.\n"
)
# the last line of every section: the sha256 of the section text above it (from '## ' on, stripped)
RECORD_RE = re.compile(r"^<!-- record sha256:([0-9a-f]{64}) -->\s*$", re.M)
KAGGLE_LIMIT_S = 9 * 3600  # a Kaggle code-competition notebook's run-time limit

# Kaggle's GPUs, for FLOP-count projections (no GPU is lent to the CPU dev box): datasheet dense peak in
# FLOP/s and the share of it assumed achieved by ViT-B in eager PyTorch. The shares are assumptions, not
# measurements; every projection also prints the share that would be needed to meet its bar.
# T4: 8.1 TFLOP/s fp32, 65 TFLOP/s fp16 tensor cores (70 W card: clocks drop under sustained load, so a
# low share is assumed); no bf16 tensor cores before Ampere. P100: 9.3 fp32, 18.7 fp16 (no tensor cores).
GPUS: dict[str, dict[str, tuple[float, float]]] = {
    "Kaggle T4": {"fp32": (8.1e12, 0.60), "fp16 autocast": (65e12, 0.30)},
    "Kaggle P100": {"fp32": (9.3e12, 0.60), "fp16 autocast": (18.7e12, 0.50)},
}

# Model settings of the benchmarks, as config overrides (random init everywhere: speed does not
# depend on the weights, and no weight file is needed).
MODELS: dict[str, dict] = {
    "tiny": {},  # the tiny preset as it is (tile 56, grid 2x2)
    "tiny_quick": {"model": {"tile_size": 28}},  # smoke tests
    "vit_s": {"model": {"backbone": "vit_small_patch14_reg4_dinov2", "tile_size": 224}},
    "vit_b": {"model": {"backbone": "vit_base_patch14_reg4_dinov2", "tile_size": 518}},
}


# ---- command line ------------------------------------------------------------------------------------------
def parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The flags every benchmark shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smallest settings (smoke test, a few seconds)")
    p.add_argument(
        "--repeats", type=int, default=None, help=f"timed repeats per variant (default {repeats}; quick 1-2)"
    )
    p.add_argument("--doc", default=str(DOC), help="markdown file the dated section is appended to")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, = cores)")
    return p


WARMUP = {"rounds": 1}  # untimed round-robin rounds before timing; 0 under --quick


def setup(args: argparse.Namespace) -> None:
    """Threads, seed and warm-up; the same in every benchmark so runs compare."""
    WARMUP["rounds"] = 0 if args.quick else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def command_line(argv: list[str] | None) -> str:
    """How this run was started, as a user would type it."""
    script = Path(sys.argv[0]).resolve()
    name = f"bench/{script.name}" if script.parent.name == "bench" else "bench/<script>.py"
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", name, *args])


# ---- machine ---------------------------------------------------------------------------------------------------
def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def machine() -> dict[str, str]:
    """CPU model, cores, threads, library versions, GPU (if any) and the load average right now."""

    model, flags = _cpuinfo()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": f"{model} ({', '.join(isa) or 'no AVX-512'})",
        "cores": f"{os.cpu_count()} logical, torch threads {torch.get_num_threads()}",
        "torch": f"{torch.__version__}, timm {timm.__version__}, python {platform.python_version()}",
        "gpu": gpu,
        "load": load_average(),
        "env": ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")),
        "code": git_revision(),
    }


def git_revision() -> str:
    """Short commit of the checkout, '+ uncommitted changes' when the tree is dirty ('unknown' outside git)."""

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' + uncommitted changes' if dirty else ''}"


def load_average() -> str:
    """1/5/15-minute load average: how busy the shared machine was (2 cores: > 2 means contended)."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


# ---- timing -------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int | None = None
) -> dict[str, list[float]]:
    """Run the variants round-robin (warmup rounds discarded); returns every timed wall time per variant.

    Round-robin instead of one variant after another: on a shared machine the load drifts, and
    interleaving spreads the drift over all variants instead of biasing the ratio.
    """
    for _ in range(WARMUP["rounds"] if warmup is None else warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


@contextlib.contextmanager
def quiet():
    """Swallow progress bars and per-epoch log lines of src code (exceptions still propagate)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float], unit: str = "s", digits: int = 3) -> str:
    """'median (min-max, n)' for a table cell."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit} (n=1)"
    return f"{median(values):.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f}, n={len(values)})"


def linear_fit(x, y) -> tuple[float, float, np.ndarray]:
    """Least-squares y = intercept + slope * x; returns (slope, intercept, relative residuals)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    fitted = intercept + slope * x
    return float(slope), float(intercept), (y - fitted) / fitted


# ---- memory -------------------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to /proc/self/clear_refs); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory in MiB: VmHWM (since the last reset) and ru_maxrss (whole process life)."""
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[f"{key.lower()}_mb"] = float(value.split()[0]) / 1024
    except OSError:
        pass
    return out


# ---- data, configs, checkpoints -------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where generated benchmark data lives (outside the repo; BENCH_CACHE_DIR overrides)."""
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path(tempfile.gettempdir()) / "i2b_bench")


def synthetic_dataset(n_images: int, size: tuple[int, int], seed: int = 0) -> Path:
    """A competition-layout synthetic train set of n_images (W x H JPEGs), generated once and reused."""

    out = cache_dir() / f"syn_n{n_images}_{size[0]}x{size[1]}_s{seed}"
    if not (out / "train.csv").is_file():
        generate(out, n_images, 0, seed=seed, size=size, workers=1 if n_images <= 8 else 2, overwrite=True)
    return out


def synthetic_test_set(n_test: int, size: tuple[int, int], seed: int = 0) -> Path:
    """A competition-layout data dir whose test.csv holds n_test images (for running infer.py itself)."""

    out = cache_dir() / f"syn_test{n_test}_{size[0]}x{size[1]}_s{seed}"
    if not (out / "test.csv").is_file():
        generate(out, 1, n_test, seed=seed, size=size, workers=1 if n_test <= 8 else 2, overwrite=True)
    return out


def train_frame(n_images: int, size: tuple[int, int], seed: int = 0):
    """The wide training frame (with absolute `path`) of `synthetic_dataset`."""

    return load_train(synthetic_dataset(n_images, size, seed))


def make_config(kind: str, **model_overrides):
    """Config of the tiny preset plus MODELS[kind] plus overrides (e.g. grid=(3, 3), tile_size=336)."""

    cfg = Config()
    apply_overrides(cfg, PRESETS["tiny"] if kind.startswith("tiny") else {}, "preset")
    apply_overrides(cfg, copy.deepcopy(MODELS[kind]), f"bench model {kind}")
    apply_overrides(cfg, {"model": model_overrides}, "bench overrides")
    return cfg


FAKE_STATS = {  # plausible grams so predictions are in the competition's range (Green Dead Clover GDM Total)
    "max": [160.0, 85.0, 72.0, 160.0, 186.0],
    "median": [20.0, 15.0, 3.0, 30.0, 40.0],
    "mean_log1p": [2.9, 2.4, 1.2, 3.3, 3.7],
}


def save_random_checkpoint(cfg, path: Path, fold: int = 0) -> Path:
    """A best.pt of a random-init model (build_model + save_best): inference cost without training."""

    torch.manual_seed(fold)
    model = build_model(cfg.model, load_backbone_weights=False)
    model.init_target_bias(FAKE_STATS["mean_log1p"])
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_best(path, model, cfg, FAKE_STATS, epoch=0, metric=None, fold=fold)


def random_views(batch: int, view_size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, H, W) left and right views, as the datasets produce them."""
    g = torch.Generator().manual_seed(seed)
    left = torch.randint(0, 256, (batch, 3, *view_size), dtype=torch.uint8, generator=g)
    right = torch.randint(0, 256, (batch, 3, *view_size), dtype=torch.uint8, generator=g)
    return left, right


# ---- reporting --------------------------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of dict rows (columns default to the first row's keys)."""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def bar_line(text: str, met: bool | None, invalid: str | None = None) -> str:
    """'**Bar met**: ...' / '**Bar NOT met**: ...' / '**Bar not measured**: ...' / '**Bar invalid**: ... (why)'.

    `invalid` names why the measurement cannot be true (see `impossible`): such a figure judges no bar either way.
    Callers write it as a list item ('- ' + this line), which is the form src/docs.py reads into README.
    """
    if invalid:
        return f"**Bar invalid**: {text} (invalid measurement: {invalid})"
    verdict = {True: "met", False: "NOT met", None: "not measured"}[met]
    return f"**Bar {verdict}**: {text}"


def impossible(value: float, limit: float, what: str) -> str | None:
    """Why `value` cannot be a true measurement (it exceeds its physical `limit`), or None when it can.

    E.g. a speed-up from N processes above N, or a share of a measured peak above 1: the baseline or the peak
    was measured under other load, so the ratio says nothing about the code.
    """
    return f"{what} {value:.2f} exceeds its physical limit {limit:g}" if value > limit else None


def append_section(
    doc: str | Path, title: str, command: str, body: str, info: dict[str, str] | None = None, quick: bool = False
) -> Path:
    """Append one dated section (title, command, machine, date, body) to `doc`; never rewrites what is there.

    An exclusive flock keeps two engineers' runs from interleaving their sections.
    """
    doc = Path(doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    info = info or machine()
    now = dt.datetime.now().astimezone()
    head = [
        f"\n## {title} — {now:%Y-%m-%d %H:%M %Z}{' (quick smoke settings, not a result)' if quick else ''}\n",
        f"- command: `{command}`",
        f"- machine: {info['cpu']}; {info['cores']}; GPU: {info['gpu']}",
        f"- software: torch {info['torch']}; {info.get('env', '')}; code: git {info.get('code', 'unknown')}",
        f"- load average at start (1/5/15 min): {info['load']}; at end: {load_average()}",
        f"- date: {now.isoformat(timespec='seconds')}",
        "",
    ]
    text = "\n".join(head) + body.rstrip() + "\n"
    text += record_line(text) + "\n"
    with open(doc, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                fh.write(DOC_HEADER)
            fh.write(text)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return doc


def record_line(section: str) -> str:
    """The seal appended under a section: a hand edit of the text above it no longer matches."""
    return f"<!-- record sha256:{hashlib.sha256(section.strip().encode('utf-8')).hexdigest()} -->"


def broken_records(text: str) -> list[str]:
    """Each section of a benchmarks doc whose text differs from what its script wrote (or that has no seal)."""
    problems = []
    for block in re.split(r"(?m)^(?=## )", text)[1:]:
        title = block.splitlines()[0]
        seals = list(RECORD_RE.finditer(block))
        if not seals:
            problems.append(f"{title}: no record line (a section not written by bench/common.append_section)")
        elif len(seals) > 1 or block[seals[0].end() :].strip():
            problems.append(f"{title}: text after its record line")
        elif record_line(block[: seals[0].start()]) != seals[0].group(0).rstrip():
            problems.append(f"{title}: edited after its script wrote it (sha256 differs)")
    return problems


def report(args: argparse.Namespace, argv: list[str] | None, title: str, body: str, info: dict[str, str]) -> None:
    """Print the section and append it to args.doc."""
    print(f"\n## {title}\n\n{body}")
    path = append_section(args.doc, title, command_line(argv), body, info, quick=args.quick)
    print(f"\nappended to {path}")
