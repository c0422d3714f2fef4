"""The checkpoint file format and the run directory: what training writes and inference reads.

`best.pt` describes itself (state dict + resolved config + target statistics + target order, plain types
only), so it loads with `torch.load(weights_only=True)` and inference needs no flags to match training.
`last.pt` adds what `--resume` needs. A run directory is `<out_dir>/<exp>/grid<R>x<C>/fold<K>/`, or
`.../fold<K>/seed<S>/` when seeds are an axis of the experiment (`train.py --seeds`); both layouts load.
Each best.pt records a hash of the image ids it trained on and validated on, so `infer.py --oof` can refuse
a folds file that would score a model on its own training images.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch

from src.config import Config
from src.errors import BiomassError
from src.flops import checkpoint_geometry
from src.io_utils import atomic_path, make_dir, save_config, write_text_atomic
from src.schema import TARGETS

CHECKPOINT_FORMAT = 1
REPO = Path(__file__).resolve().parents[1]
# stage names of the training loop; last.pt of runs before the names stored the numbers 1 and 2
STAGES = ("frozen", "finetune")
LEGACY_STAGES = {1: "frozen", 2: "finetune"}


def target_stats(frame: pd.DataFrame) -> dict[str, list[float]]:
    """Training-target statistics stored in checkpoints (clamp bounds, fallback values, head bias)."""
    values = frame[list(TARGETS)].to_numpy(dtype=np.float64)
    return {
        "max": values.max(axis=0).tolist(),
        "median": np.median(values, axis=0).tolist(),
        "mean_log1p": np.log1p(values).mean(axis=0).tolist(),
        "mean": values.mean(axis=0).tolist(),
        # raw target space: grams / scale (the std, at least 1 g so an all-zero target cannot divide by 0)
        "scale": np.maximum(values.std(axis=0), 1.0).tolist(),
    }


def ids_hash(ids) -> str:
    """A short hash of a set of image ids (order and repeats do not matter)."""
    text = "\n".join(sorted({str(i) for i in ids}))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_record(train_frame: pd.DataFrame, val_frame: pd.DataFrame | None) -> dict:
    """What best.pt remembers of its split: counts and hashes of the training and the validation image ids."""
    record = {"n_train": len(train_frame), "train_ids": ids_hash(train_frame["image_id"])}
    if val_frame is not None:
        record.update({"n_val": len(val_frame), "val_ids": ids_hash(val_frame["image_id"])})
    return record


def save_best(
    path: Path,
    model,
    cfg: Config,
    stats: dict,
    epoch: int,
    metric,
    fold,
    swa_epochs: list[int] | None = None,
    split: dict | None = None,
) -> Path:
    """best.pt (or swa.pt): weights + resolved config + target statistics (+ the split's id hashes), plain types.

    It also stores the resolved tile size, patch size and backbone FLOPs per tile (`flops.checkpoint_geometry`) and
    the timm version it was trained with: inference builds no backbone to learn them (Kaggle's timm 1.0.19 cannot
    build one on the meta device), and kernels/build.py knows which timm the weights came from.
    """
    extra = {} if swa_epochs is None else {"swa_epochs": [int(e) for e in swa_epochs]}
    if split is not None:
        extra["split"] = dict(split)
    return torch_save_atomic(
        {
            **extra,
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "target_stats": stats,
            "targets": list(TARGETS),
            "epoch": int(epoch),
            "fold": None if fold is None else int(fold),
            "val_metric": None if metric is None else float(metric),
            **checkpoint_geometry(model),
            "timm_version": str(timm.__version__),
            "grid": list(model.grid),
            "norm": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        },
        path,
    )


def save_resume_state(
    path: Path,
    model,
    cfg: Config,
    stage: str,
    optimizer,
    scheduler,
    state: dict,
    ema=None,
    swa_top=None,
    extra: dict | None = None,
) -> Path:
    """last.pt: the stage's optimizer and scheduler and the loop state: enough to resume at the next epoch."""
    last = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "stage": stage,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
        "config": cfg.to_dict(),
    }
    if ema is not None:
        last["ema"] = ema.module.state_dict()
        last["ema_steps"] = int(getattr(ema, "steps", 0))  # the warm-up resumes where it stopped
    if swa_top is not None:
        last["swa_top"] = swa_top  # K weight copies: last.pt grows to (K + 1 or 2) x the model
    last.update(extra or {})  # e.g. the fp16 GradScaler's state
    torch_save_atomic(last, path)
    write_last_sidecar(path, state, finished=False)
    return Path(path)


def sidecar_path(last_path: Path) -> Path:
    """last.json beside last.pt: the loop state in a few bytes (real.py reads it instead of a GB-sized last.pt)."""
    return Path(last_path).with_suffix(".json")


def write_last_sidecar(last_path: Path, state: dict, finished: bool, last: str = "full") -> Path:
    """The loop state of last.pt (epoch, best, patience count), whether the fold finished and what last.pt still
    holds (`last`: full, slim or none), written atomically."""
    keep = {k: state.get(k) for k in ("epoch", "best_metric", "best_epoch", "bad_epochs")}
    if keep["best_metric"] is not None and not np.isfinite(keep["best_metric"]):
        keep["best_metric"] = None  # -inf before any validation: JSON has no infinity
    record = {**keep, "finished": bool(finished), "last": last}
    return write_text_atomic(sidecar_path(last_path), json.dumps(record) + "\n")


def read_last_sidecar(last_path: Path) -> dict | None:
    """last.json's state, or None when there is none or it does not parse (then last.pt itself is read)."""
    path = sidecar_path(last_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "epoch" in data else None


KEEP_LAST = ("full", "slim", "none")


def finish_last(last_path: Path, keep: str) -> int:
    """At a fold's end: last.pt kept in full, slimmed to weights + loop state (no optimizer, scheduler, EMA or
    SWA copies: a ViT-L last.pt goes from ~3.6 GB to ~1.2 GB), or removed; the sidecar says the fold finished.
    Returns the bytes freed."""
    last_path = Path(last_path)
    if keep not in KEEP_LAST:
        raise BiomassError(f"--keep-last {keep!r}: choose one of {', '.join(KEEP_LAST)}")
    if not last_path.is_file():
        return 0
    before = last_path.stat().st_size
    saved = load_checkpoint(last_path)
    if keep == "none":
        last_path.unlink()
    elif keep == "slim":
        slim = {k: saved[k] for k in ("format", "model", "stage", "state", "config") if k in saved} | {"slim": True}
        torch_save_atomic(slim, last_path)
    write_last_sidecar(last_path, saved.get("state") or {}, finished=True, last=keep)
    return before - (last_path.stat().st_size if last_path.is_file() else 0)


def stage_of(saved: dict) -> str:
    """The stage name a last.pt was saved in (old files stored 1 or 2)."""
    stage = saved.get("stage")
    return LEGACY_STAGES.get(stage, stage) if isinstance(stage, int) else stage


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True: a checkpoint holding pickled code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise BiomassError(f"{path}: checkpoint not found; train it with train.py or check --checkpoints")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only=True met a pickled class or function: never run it
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        detail = f" ({lines[0][:160]})" if lines else ""
        raise BiomassError(
            f"{path}: refused: it holds pickled Python objects, not only tensors{detail}; checkpoints are loaded with "
            "weights_only=True and this one would run code; re-train it or re-download it from a source you trust"
        ) from err
    except Exception as err:  # truncated zip, foreign formats: all mean "not ours"
        reason = str(err).strip().split(". ")[0].splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise BiomassError(
            f"{path}: not a loadable checkpoint ({reason}); truncated or corrupt? re-train or re-download it"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise BiomassError(f"{path}: not an image2biomass checkpoint (format {CHECKPOINT_FORMAT}); re-train it")
    return ckpt


def check_resume(last_path: Path, cfg: Config) -> dict | None:
    """last.pt of an interrupted run (None if there is none), refused if its model config differs from cfg."""
    if not last_path.is_file():
        return None
    saved = load_checkpoint(last_path)
    if saved.get("slim"):
        raise BiomassError(
            f"{last_path}: this fold finished (--keep-last slim kept its weights, not the optimizer): nothing to "
            "resume; pass --overwrite to train it again"
        )
    # keys added to ModelConfig after that run was saved count as their defaults (which keep the old model)
    defaults = Config().to_dict()["model"]
    ours, theirs = cfg.to_dict()["model"], {**defaults, **((saved.get("config") or {}).get("model") or {})}
    # the image cleaning decides what the model has seen, like the model config does
    data_defaults, saved_data = Config().to_dict()["data"], (saved.get("config") or {}).get("data") or {}
    for key in ("clean_stamps", "crop_bottom"):
        ours[key], theirs[key] = getattr(cfg.data, key), saved_data.get(key, data_defaults[key])
    for side in (ours, theirs):  # grad checkpointing changes memory, not the weights (--fit-memory may switch it)
        side.pop("grad_checkpointing", None)
    if theirs != ours:
        keys = sorted(set(ours) | set(theirs))
        diff = [f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in keys if theirs.get(k) != ours.get(k)]
        raise BiomassError(
            f"{last_path}: was trained with another model config ({'; '.join(diff[:3])}); resume with the same "
            "flags or pass --overwrite to start again"
        )
    return saved


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    """torch.save atomically (checkpoints survive a kill mid-write)."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk as RuntimeError, not OSError
            raise OSError(f"{str(err).strip().splitlines()[0][:200]}; disk full?") from err
    return Path(path)


# ---- run directories ------------------------------------------------------------------------------------------
def run_dir_for(cfg: Config, fold: int, seed_dir: bool = False) -> Path:
    """checkpoints/<exp>/grid<R>x<C>/fold<K>/, or .../fold<K>/seed<S>/ (S = the config's seed) with `seed_dir`."""
    rows, cols = cfg.model.grid
    fold_dir = Path(cfg.out_dir) / cfg.exp / f"grid{rows}x{cols}" / f"fold{fold}"
    return fold_dir / f"seed{cfg.train.seed}" if seed_dir else fold_dir


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A fold directory that already holds a run needs --resume or --overwrite."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            for f in run_dir.iterdir():
                if f.is_file():
                    f.unlink()
        elif not resume:
            raise BiomassError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
    make_dir(run_dir)


def git_description(repo: Path = REPO) -> str:
    """The commit of the repo this code lives in, and whether it has uncommitted changes (not the cwd's repo)."""
    try:
        run = {"capture_output": True, "text": True, "check": True, "cwd": repo}
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], **run).stdout.strip()
        return f"{commit}{' (dirty)' if dirty else ''}\n"
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)\n"


def write_run_files(run_dir: Path, cfg: Config, command: str = "") -> None:
    """config.yaml (the resolved config), git.txt (commit + dirty flag) and command.txt of a run."""
    save_config(cfg, run_dir / "config.yaml")
    write_text_atomic(run_dir / "git.txt", git_description())
    if command:
        write_text_atomic(run_dir / "command.txt", command + "\n")


RUN_PATTERNS = ("grid*/fold*/best.pt", "grid*/fold*/seed*/best.pt")


def find_checkpoints(paths: list[str | Path]) -> list[Path]:
    """Every `grid*/fold*/[seed*/]best.pt` under the given experiment directories, plus explicit .pt files."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            hits = sorted(h for pattern in RUN_PATTERNS for h in path.glob(pattern))
            hits = hits or sorted(h for pattern in RUN_PATTERNS for h in path.glob(pattern.split("/", 1)[1]))
            if not hits and (path / "best.pt").is_file():
                hits = [path / "best.pt"]
            if not hits:
                raise BiomassError(
                    f"{path}: no grid*/fold*/best.pt inside; train with train.py or point --checkpoints at an "
                    "experiment"
                )
            found.extend(hits)
        else:
            raise BiomassError(f"{path}: checkpoint directory or file not found; check --checkpoints")
    if not found:
        raise BiomassError("no checkpoint found; pass --checkpoints checkpoints/<exp>")
    return found


def _experiment_of(path: Path) -> Path:
    """checkpoints/<exp> of one grid*/fold*/[seed*/]best.pt (the directory above grid*), else its own directory."""
    run = path.parent.parent if path.parent.name.startswith("seed") else path.parent
    return run.parent.parent if run.parent.name.startswith("grid") else path.parent


def experiment_dir(paths: list[Path]) -> Path:
    """checkpoints/<exp> of grid*/fold*/[seed*/]best.pt paths (their common ancestor above grid*)."""
    parents = {_experiment_of(Path(p)) for p in paths}
    return parents.pop() if len(parents) == 1 else Path(*Path(paths[0]).parts[: len(Path(paths[0]).parts) - 3])
