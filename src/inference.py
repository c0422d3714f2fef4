"""Inference: one `Predictor` per checkpoint, batched TTA, the fold x grid ensemble, OOF scoring.

Averaging happens in grams (after expm1), over TTA views, folds and grids: the metric is a squared
error in grams, and the arithmetic mean of grams is what minimizes it; a log-space mean is a
geometric mean and biased low.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from src.artifacts import Cleaning
from src.config import Config
from src.dataset import MultiSizeViewDataset, flip_views, input_key
from src.errors import BiomassError
from src.model import build_model
from src.runtime import autocast, worker_init
from src.schema import TARGETS
from src.training import load_checkpoint

TTA_MODES = {"none": 1, "flip": 3, "full": 4}
# view order of the per-view predictions: original, hflip, vflip, stereo swap
TTA_VIEWS = ("orig", "hflip", "vflip", "swap")


class Predictor:
    """A trained checkpoint ready to predict: the only inference API (infer.py, OOF, kernel, TTA)."""

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu", tta: str = "full", amp: bool = False) -> None:
        if tta not in TTA_MODES:
            raise BiomassError(f"unknown --tta {tta!r}; choose one of {', '.join(TTA_MODES)}")
        self.path = Path(checkpoint)
        ckpt = load_checkpoint(self.path)
        if "target_stats" not in ckpt:  # last.pt carries optimizer state for --resume, not what inference needs
            raise BiomassError(f"{self.path}: a resume state (last.pt), not a best.pt; pass best.pt or the experiment directory")
        if list(ckpt.get("targets", [])) != list(TARGETS):
            raise BiomassError(f"{self.path}: target order {ckpt.get('targets')} differs from {list(TARGETS)}; re-train it")
        self.cfg = Config.from_dict(ckpt["config"], source=str(self.path))
        self.device = torch.device(device)
        self.model = build_model(self.cfg.model, load_backbone_weights=False)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0])[:200]  # line 0 is "Error(s) in loading state_dict for ..."
            raise BiomassError(f"{self.path}: weights do not fit its own config ({detail}); re-train it") from err
        self.model.to(self.device).eval()
        self.tta = tta
        self.amp = amp
        self.stats = {k: np.asarray(v, dtype=np.float64) for k, v in ckpt["target_stats"].items()}
        self.fold = ckpt.get("fold")
        self.val_metric = ckpt.get("val_metric")
        # the image cleaning the checkpoint was trained with (--clean-stamps, --crop-bottom), and so its batch key
        self.cleaning = Cleaning.from_config(self.cfg.data)
        self.input_key = input_key(self.view_size, self.cleaning)

    def with_model(self, model: torch.nn.Module) -> Predictor:
        """This predictor (config, statistics, TTA) with other weights of the same architecture: test-time fine-tuning."""
        other = copy.copy(self)
        other.model = model.to(self.device).eval()
        return other

    @property
    def view_size(self) -> tuple[int, int]:
        return self.model.view_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.model.grid

    @torch.no_grad()
    def predict_views(self, left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) views -> per-TTA-view predictions in grams, (B, V, 5).

        Flips of both views go through the backbone in one call; the stereo swap reuses the original
        tile features with the views exchanged (no second backbone pass).
        """
        n_flips = min(TTA_MODES[self.tta], 3)
        flips = ((False, False), (True, False), (False, True))[:n_flips]
        batch = left.shape[0]
        views = torch.cat([left, right]).to(self.device)
        stacked = torch.cat([flip_views(views, h, v) for h, v in flips])
        with autocast(self.device, self.amp):
            feats = self.model.encode_tiles(stacked)
            feats = feats.reshape(n_flips, 2, batch, *feats.shape[1:])
            outs = [self.model.head_from_features(feats[k, 0], feats[k, 1])["targets"] for k in range(n_flips)]
            if self.tta == "full":
                outs.append(self.model.head_from_features(feats[0, 1], feats[0, 0])["targets"])
        return self.model.to_grams(torch.stack(outs, dim=1)).cpu().numpy()  # any target space / head layout


def find_checkpoints(paths: list[str | Path]) -> list[Path]:
    """Every `grid*/fold*/best.pt` under the given experiment directories, plus explicit .pt files."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            hits = sorted(path.glob("grid*/fold*/best.pt")) or sorted(path.glob("fold*/best.pt"))
            if not hits and (path / "best.pt").is_file():
                hits = [path / "best.pt"]
            if not hits:
                raise BiomassError(f"{path}: no grid*/fold*/best.pt inside; train with train.py or point --checkpoints at an experiment")
            found.extend(hits)
        else:
            raise BiomassError(f"{path}: checkpoint directory or file not found; check --checkpoints")
    if not found:
        raise BiomassError("no checkpoint found; pass --checkpoints checkpoints/<exp>")
    return found


def load_predictors(paths: list[Path], device, tta: str, amp: bool) -> list[Predictor]:
    """Load every checkpoint (each one checks its target order, so any set of them can be averaged)."""
    with tqdm(paths, desc="loading models", leave=False) as bar:  # closed (line cleared) before an error is printed
        return [Predictor(p, device, tta, amp) for p in bar]


def grid_weight_map(predictors: list[Predictor], grid_weights: list[str] | None) -> dict[tuple[int, int], float]:
    """`--grid-weights 2x2=1 3x3=0.5` -> normalized weight per grid; default equal."""
    grids = sorted({p.grid for p in predictors})
    weights = {g: 1.0 for g in grids}
    for item in grid_weights or []:
        try:
            key, value = item.split("=")
            rows, cols = (int(v) for v in key.lower().split("x"))
            weights[(rows, cols)] = float(value)
        except ValueError as err:
            raise BiomassError(f"--grid-weights item {item!r}: expected RxC=W, e.g. 2x2=1.0") from err
        # a negative weight extrapolates away from a grid and nan/inf poison every prediction: typos, not intent
        if not np.isfinite(weights[(rows, cols)]) or weights[(rows, cols)] < 0:
            raise BiomassError(f"--grid-weights item {item!r}: the weight must be a finite number >= 0, e.g. 2x2=0.5")
    unknown = [g for g in weights if g not in grids]
    if unknown:
        raise BiomassError(f"--grid-weights names grid {unknown[0][0]}x{unknown[0][1]}, but no checkpoint has it (have {grids})")
    total = sum(weights.values())
    if total <= 0:
        raise BiomassError("--grid-weights must sum to a positive number")
    return {g: w / total for g, w in weights.items()}


@dataclass
class EnsemblePrediction:
    """Per-TTA-view predictions of the ensemble in grams (N, V, 5) and which images were readable."""

    per_view: np.ndarray
    ok: np.ndarray
    seconds: float

    def mean(self, tta: str = "full") -> np.ndarray:
        return self.per_view[:, : TTA_MODES[tta]].mean(axis=1)


def predict_ensemble(
    predictors: list[Predictor],
    frame: pd.DataFrame,
    batch_size: int = 8,
    grid_weights: dict[tuple[int, int], float] | None = None,
    on_bad_image: str = "error",
    num_workers: int = 0,
    jpeg_reduce: bool = True,
    show: bool = True,
) -> EnsemblePrediction:
    """Read each image once, run every model on it; average folds equally within a grid, grids by weight."""
    if not predictors:
        raise BiomassError("no models to ensemble")
    n_views = max(TTA_MODES[p.tta] for p in predictors)
    if any(TTA_MODES[p.tta] != n_views for p in predictors):
        raise BiomassError("all predictors of an ensemble must use the same --tta")
    by_grid: dict[tuple[int, int], list[Predictor]] = defaultdict(list)
    for p in predictors:
        by_grid[p.grid].append(p)
    weights = grid_weights or {g: 1.0 / len(by_grid) for g in by_grid}
    dataset = MultiSizeViewDataset(frame, [p.view_size for p in predictors], jpeg_reduce, on_bad_image, [p.cleaning for p in predictors])
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, worker_init_fn=worker_init)
    out = np.zeros((len(frame), n_views, len(TARGETS)))
    ok = np.ones(len(frame), dtype=bool)
    start = time.time()
    for batch in tqdm(loader, desc="predicting", disable=not show):
        idx = batch["index"].numpy()
        ok[idx] = batch["ok"].numpy()
        acc = np.zeros((len(idx), n_views, len(TARGETS)))
        for grid, members in by_grid.items():
            for p in members:
                pair = batch[p.input_key]
                acc += weights[grid] / len(members) * p.predict_views(pair[:, 0], pair[:, 1])
        out[idx] = acc
    seconds = time.time() - start
    if show:
        print(f"predicted {len(frame)} images with {len(predictors)} models in {seconds:.1f}s ({len(frame) / max(seconds, 1e-9):.2f} images/s)", flush=True)
    return EnsemblePrediction(out, ok, seconds)


def fallback_values(predictors: list[Predictor]) -> np.ndarray:
    """Training-median prediction (mean over the ensemble's checkpoints) for unreadable images."""
    return np.mean([p.stats["median"] for p in predictors], axis=0)


def upper_bounds(predictors: list[Predictor]) -> np.ndarray:
    """Clamp bounds for `seed` physics: the largest training value of each target seen by any model."""
    return np.max([p.stats["max"] for p in predictors], axis=0)


# ---- the two jobs of infer.py ------------------------------------------------------------------------------
def run_submission(
    data_dir: str | Path,
    checkpoints: list[str],
    out: str | Path,
    tta: str = "full",
    physics: str = "project",
    grid_weights: list[str] | None = None,
    batch_size: int = 8,
    device: str = "auto",
    amp: bool = False,
    on_bad_image: str = "error",
    num_workers: int = 0,
    pseudo_label=None,
) -> pd.DataFrame:
    """test.csv -> ensemble -> physics -> (pseudo-label adaptation) -> guard -> submission.csv (atomic).

    `pseudo_label` is an `adapt.PseudoLabelSettings` (None or epochs 0: off). Returns the submission.
    """
    from src.data import load_sample_submission, load_test, read_csv_checked
    from src.io_utils import check_writable
    from src.postprocess import apply_physics
    from src.runtime import resolve_device
    from src.schema import TEST_COLUMNS
    from src.submission import build_submission, guard, write_submission

    if on_bad_image not in ("error", "fallback"):
        raise BiomassError(f"unknown --on-bad-image {on_bad_image!r}; choose error or fallback")
    check_writable(out)  # a read-only --out fails now, not after the whole ensemble ran
    test_images = load_test(data_dir, check_images=on_bad_image == "error")
    test_long = read_csv_checked(Path(data_dir) / "test.csv", TEST_COLUMNS, "pass --data-dir")
    sample = load_sample_submission(data_dir)
    if sample is not None and set(sample["sample_id"]) != set(test_long["sample_id"]):
        raise BiomassError(f"{Path(data_dir) / 'sample_submission.csv'}: ids differ from test.csv; re-download the competition files")
    predictors = load_predictors(find_checkpoints(checkpoints), resolve_device(device), tta, amp)
    weights = grid_weight_map(predictors, grid_weights)
    pred = predict_ensemble(predictors, test_images, batch_size, weights, on_bad_image, num_workers)
    values = apply_physics(pred.mean(tta), physics, upper_bounds(predictors))
    if not pred.ok.all():
        bad = test_images["image_id"][~pred.ok].tolist()
        print(f"warning: {len(bad)} unreadable image(s) got the training-median prediction: {', '.join(bad)}", flush=True)
        values[~pred.ok] = apply_physics(fallback_values(predictors)[None], physics, upper_bounds(predictors))
    if pseudo_label is not None and pseudo_label.enabled:
        from src.adapt import run_pseudo_label

        values = run_pseudo_label(pseudo_label, predictors, test_images, values, pred, data_dir, physics, weights, batch_size, num_workers, tta)
    sub = build_submission(test_images["image_id"], values, test_long, sample)
    guard(sub, test_long, sample, physics=physics == "project")
    write_submission(sub, out)
    print(f"wrote {out}: {len(sub)} rows for {len(test_images)} images", flush=True)
    return sub


def run_oof(
    data_dir: str | Path,
    checkpoints: list[str],
    batch_size: int = 8,
    device: str = "auto",
    amp: bool = False,
    folds_path: str | None = None,
    num_workers: int = 0,
) -> pd.DataFrame:
    """Score each fold's models on their own held-out images for every TTA x physics setting.

    Writes `<exp>/oof_report.csv` (one row per setting) and `<exp>/oof_ensemble.csv` (predictions of the
    full-TTA, project-physics ensemble) next to the checkpoints; returns the report.
    """
    from src.data import load_train
    from src.folds import load_folds
    from src.io_utils import write_csv_atomic
    from src.metric import score
    from src.postprocess import MODES, apply_physics
    from src.runtime import resolve_device

    paths = find_checkpoints(checkpoints)
    predictors = load_predictors(paths, resolve_device(device), "full", amp)
    wide = load_train(data_dir, check_images=True)
    folds = load_folds(folds_path or predictors[0].cfg.data.folds, wide)
    wide = wide.merge(folds, on="image_id")
    per_view = np.full((len(wide), TTA_MODES["full"], len(TARGETS)), np.nan)
    by_fold: dict[int, list[Predictor]] = defaultdict(list)
    for p in predictors:
        if p.fold is None:
            raise BiomassError(f"{p.path}: has no fold; OOF scoring needs fold checkpoints from train.py")
        by_fold[int(p.fold)].append(p)
    for fold, members in sorted(by_fold.items()):
        mask = (wide["fold"] == fold).to_numpy()
        if not mask.any():
            raise BiomassError(f"fold {fold} of the checkpoints has no images in the folds file; pass the folds used in training")
        pred = predict_ensemble(members, wide[mask].reset_index(drop=True), batch_size, grid_weight_map(members, None), num_workers=num_workers, show=False)
        per_view[mask] = pred.per_view
    scored = ~np.isnan(per_view[:, 0, 0])
    truth = wide.loc[scored, list(TARGETS)].to_numpy(dtype=np.float64)
    upper = upper_bounds(predictors)
    rows = []
    for tta in TTA_MODES:
        mean = per_view[scored, : TTA_MODES[tta]].mean(axis=1)
        for physics in MODES:
            rows.append({"tta": tta, "physics": physics, "images": int(scored.sum()), **score(truth, apply_physics(mean, physics, upper))})
    report = pd.DataFrame(rows).sort_values("weighted_r2", ascending=False).reset_index(drop=True)
    exp_dir = _experiment_dir(paths)
    write_csv_atomic(report, exp_dir / "oof_report.csv")
    best = apply_physics(per_view[scored].mean(axis=1), "project")
    ens = pd.DataFrame({"image_id": wide.loc[scored, "image_id"].to_numpy(), "fold": wide.loc[scored, "fold"].to_numpy()})
    for j, name in enumerate(TARGETS):
        ens[name] = best[:, j]
        ens[f"true_{name}"] = truth[:, j]
    write_csv_atomic(ens, exp_dir / "oof_ensemble.csv")
    print(report.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {exp_dir / 'oof_report.csv'}")
    return report


def _experiment_dir(paths: list[Path]) -> Path:
    """checkpoints/<exp> of grid*/fold*/best.pt paths (their common ancestor above grid*)."""
    parents = {p.parent.parent.parent if p.parent.parent.name.startswith("grid") else p.parent for p in paths}
    return parents.pop() if len(parents) == 1 else Path(*Path(paths[0]).parts[: len(Path(paths[0]).parts) - 3])
