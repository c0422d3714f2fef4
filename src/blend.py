"""`python -m src.blend EXP [EXP ...] --out checkpoints/<blend> [--calibrate]`: OOF-fitted blend of experiments.

Per target, non-negative weights summing to 1 of the experiments' out-of-fold predictions by least squares (scipy's
NNLS; the metric is a weighted sum of per-target squared errors, so each target's weights are its own problem), and
with `--calibrate` a per-target line y = a * blend + b fitted with them (the principled form of hand scalings such as
clover x 0.8). Weights chosen on the same labels they are scored on flatter the blend, so its own OOF is
estimated by nested cross-validation: each fold's predictions use weights (and calibration) fitted on the other
folds only. That nested score is what `blend.yaml` reports as the blend's OOF, beside the in-sample one.

Experiments must share their folds (same images, same fold of each), or the weights would be fitted on
predictions some of which saw the rows they score: refused. Each experiment contributes one prediction per
image: `oof_ensemble.csv` (infer.py --oof: full TTA, project physics) when present and fresh, else the mean of
its folds' `oof.csv` (what `report.py` reads). `infer.py --checkpoints checkpoints/<blend>` applies blend.yaml.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import nnls

from src.checkpoint import find_checkpoints
from src.config import InferConfig
from src.devices import resolve_devices
from src.errors import BiomassError, run_cli
from src.head_inference import HeadEnsemble, head_runs
from src.inference import fallback_values, load_predictors, predict_ensemble, upper_bounds
from src.io_utils import write_csv_atomic, write_text_atomic
from src.logs import get_logger
from src.metric import score
from src.postprocess import apply_physics, structural_zeros
from src.report import TRUE_COLUMNS, load_runs, per_image_predictions
from src.schema import TARGET_WEIGHTS, TARGETS
from src.state_probs import state_probabilities

log = get_logger(__name__)
BLEND_FILE = "blend.yaml"


@dataclass
class BlendFit:
    """Per-target weights (5, M) and calibration (5, 2) = (a, b) of y = a * blend + b (identity when off)."""

    weights: np.ndarray
    calibration: np.ndarray

    def apply(self, preds: np.ndarray) -> np.ndarray:
        """(N, M, 5) member predictions in grams -> (N, 5) blended grams (at least 0)."""
        mixed = np.einsum("nmt,tm->nt", np.asarray(preds, dtype=np.float64), self.weights)
        return np.maximum(mixed * self.calibration[:, 0] + self.calibration[:, 1], 0.0)


def fit_blend(preds: np.ndarray, truth: np.ndarray, calibrate: bool = False) -> BlendFit:
    """Non-negative weights summing to 1 per target of (N, M, 5) predictions against (N, 5) truth, by NNLS.

    Rows are scaled by the target's metric weight (each target's solution is unchanged, the objective is the
    metric's). The sum-to-1 constraint is a heavily weighted extra NNLS row: without it the weights also rescale
    the predictions, which on held-out folds mostly amplifies their errors. With `calibrate` the scale is set free
    on purpose, with an intercept (NNLS columns +1 and -1): y = a * mixture + b, fitted in the same least squares.
    """
    preds, truth = np.asarray(preds, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    members = preds.shape[1]
    weights = np.zeros((len(TARGETS), members))
    calibration = np.tile([1.0, 0.0], (len(TARGETS), 1))
    for j, w in enumerate(TARGET_WEIGHTS):
        design, target = np.sqrt(w) * preds[:, :, j], np.sqrt(w) * truth[:, j]
        if calibrate:
            ones = np.full((len(design), 1), np.sqrt(w))
            design = np.concatenate([design, ones, -ones], axis=1)
        else:
            big = 1e3 * max(float(np.sqrt((design**2).sum())), 1.0)
            design = np.vstack([design, np.full((1, members), big)])
            target = np.append(target, big)
        solution, _ = nnls(design, target)
        weights[j] = solution[:members]
        total = weights[j].sum()
        if total > 0:
            weights[j] /= total
        if calibrate:
            calibration[j] = (total, solution[members] - solution[members + 1])
    return BlendFit(weights, calibration)


def nested_oof(preds: np.ndarray, truth: np.ndarray, folds: np.ndarray, calibrate: bool = False) -> np.ndarray:
    """(N, 5) blend predictions where each fold's rows use weights fitted on the other folds' rows only."""
    out = np.zeros_like(np.asarray(truth, dtype=np.float64))
    for fold in np.unique(folds):
        held = folds == fold
        out[held] = fit_blend(preds[~held], truth[~held], calibrate).apply(preds[held])
    return out


# ---- experiments -> aligned OOF -----------------------------------------------------------------------------------
@dataclass
class Members:
    """Aligned OOF of the experiments: predictions (N, M, 5), truth (N, 5), fold (N,), image ids, sources."""

    paths: list[Path]
    image_ids: np.ndarray
    folds: np.ndarray
    preds: np.ndarray
    truth: np.ndarray
    sources: list[str]


def load_members(paths: list[str | Path]) -> Members:
    """Each experiment's one OOF prediction per image, aligned on the first's images; different folds: refused."""
    if len(paths) < 1:
        raise BiomassError("src.blend needs at least one experiment directory")
    frames, sources = [], []
    for path in paths:
        frame, source = per_image_predictions(Path(path), load_runs(path))
        frames.append(frame.set_index("image_id"))
        sources.append(source)
    first = frames[0]
    for path, frame in zip(paths[1:], frames[1:]):
        same_images = set(frame.index) == set(first.index)
        if not same_images or not (frame.loc[first.index, "fold"].to_numpy() == first["fold"].to_numpy()).all():
            detail = "other images" if not same_images else "other folds for the same images"
            raise BiomassError(
                f"{path}: its OOF predictions come from {detail} than {paths[0]}; a blend needs experiments trained "
                "on the same folds file (train them with the same --folds)"
            )
    ids = first.index.to_numpy()
    preds = np.stack([f.loc[ids, list(TARGETS)].to_numpy(np.float64) for f in frames], axis=1)
    truth = first[list(TRUE_COLUMNS)].to_numpy(np.float64)
    return Members([Path(p) for p in paths], ids, first["fold"].to_numpy(), preds, truth, sources)


def write_blend(members: Members, out: Path, calibrate: bool = False) -> dict:
    """Fit on all OOF rows, estimate by nested CV, write blend.yaml and oof_blend.csv (nested predictions)."""
    fit = fit_blend(members.preds, members.truth, calibrate)
    nested = nested_oof(members.preds, members.truth, members.folds, calibrate)
    in_sample = fit.apply(members.preds)
    singles = {str(p): score(members.truth, members.preds[:, m])["weighted_r2"] for m, p in enumerate(members.paths)}
    record = {
        "experiments": [str(p) for p in members.paths],
        "sources": members.sources,
        "calibrate": bool(calibrate),
        "weights": {
            t: {str(p): float(fit.weights[j, m]) for m, p in enumerate(members.paths)} for j, t in enumerate(TARGETS)
        },
        "calibration": {t: [float(v) for v in fit.calibration[j]] for j, t in enumerate(TARGETS)},
        "oof": {
            "nested_weighted_r2": float(score(members.truth, nested)["weighted_r2"]),
            "in_sample_weighted_r2": float(score(members.truth, in_sample)["weighted_r2"]),
            "members_weighted_r2": singles,
            "images": int(len(members.truth)),
            "folds": int(len(np.unique(members.folds))),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / BLEND_FILE, yaml.safe_dump(record, sort_keys=False))
    frame = pd.DataFrame({"image_id": members.image_ids, "fold": members.folds})
    for j, name in enumerate(TARGETS):
        frame[name] = nested[:, j]
    for j, name in enumerate(TARGETS):
        frame[f"true_{name}"] = members.truth[:, j]
    write_csv_atomic(frame, out / "oof_blend.csv")
    return record


def read_blend(directory: str | Path) -> tuple[list[Path], BlendFit]:
    """blend.yaml -> the member experiment directories and the fitted weights / calibration."""
    path = Path(directory) / BLEND_FILE
    try:
        record = yaml.safe_load(path.read_text())
        paths = [Path(p) for p in record["experiments"]]
        weights = np.array([[record["weights"][t][str(p)] for p in paths] for t in TARGETS], dtype=np.float64)
        calibration = np.array([record["calibration"][t] for t in TARGETS], dtype=np.float64)
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise BiomassError(
            f"{path}: not a readable blend ({type(err).__name__}: {err}); re-run python -m src.blend"
        ) from err
    if weights.shape != (len(TARGETS), len(paths)) or calibration.shape != (len(TARGETS), 2):
        raise BiomassError(f"{path}: weights or calibration of the wrong shape; re-run python -m src.blend")
    return paths, BlendFit(weights, calibration)


def is_blend(directory: str | Path) -> bool:
    return (Path(directory) / BLEND_FILE).is_file()


# ---- inference: infer.py --checkpoints checkpoints/<blend> (and head experiments) ---------------------------------
def _member_dir(path: Path, blend_dir: Path) -> Path:
    """A member as written in blend.yaml, else beside the blend directory (a moved checkpoints root, the kernel)."""
    return path if path.is_dir() else blend_dir.parent / path.name


def experiment_values(exp: Path, cfg: InferConfig, images: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(N, 5) grams of one experiment after its physics, and its clamp maxima: the network ensemble (seeds x folds x
    grids, `--tta`, training-median fallback for unreadable images) or its heads' mean over folds."""
    if head_runs(exp):
        heads = HeadEnsemble(exp, cache=Path(cfg.out).resolve().parent / "embedding_cache")
        upper = heads.max_grams
        return apply_physics(heads.predict(images), cfg.physics, upper), upper
    predictors = load_predictors(find_checkpoints([exp]), resolve_devices(cfg.device)[0], cfg.tta, cfg.amp, stream=True)
    pred = predict_ensemble(predictors, images, cfg.batch_size, None, cfg.on_bad_image, cfg.num_workers)
    upper = upper_bounds(predictors)
    values = apply_physics(pred.mean(cfg.tta), cfg.physics, upper)
    values[~pred.ok] = apply_physics(fallback_values(predictors)[None], cfg.physics, upper)
    if cfg.structural_zeros:  # the State head's probabilities, applied to each network member
        p_state = state_probabilities(predictors, images, cfg.batch_size, cfg.on_bad_image)
        values = apply_physics(structural_zeros(values, p_state), cfg.physics, upper)
    return values, upper


def blend_values(cfg: InferConfig, images: pd.DataFrame) -> np.ndarray | None:
    """Submission values for a blend directory (blend.yaml weights) or for experiments that include heads (equal
    shares per experiment); None when `--checkpoints` are networks only, which submit.py ensembles itself."""
    dirs = [Path(d) for d in cfg.checkpoints]
    if len(dirs) == 1 and is_blend(dirs[0]):
        paths, fit = read_blend(dirs[0])
        paths = [_member_dir(p, dirs[0]) for p in paths]
        log.info(f"blend {dirs[0]}: {len(paths)} experiments, weights from {dirs[0] / BLEND_FILE}")
    elif any(head_runs(d) for d in dirs):
        paths = dirs
        fit = BlendFit(np.full((len(TARGETS), len(dirs)), 1.0 / len(dirs)), np.tile([1.0, 0.0], (len(TARGETS), 1)))
    else:
        return None
    members = [experiment_values(p, cfg, images) for p in paths]
    preds = np.stack([values for values, _ in members], axis=1)
    upper = np.max([u for _, u in members], axis=0)
    return apply_physics(fit.apply(preds), cfg.physics, upper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="+", metavar="EXP", help="experiment directories (checkpoints/<exp>)")
    parser.add_argument("--out", required=True, help="blend directory to write (blend.yaml, oof_blend.csv)")
    parser.add_argument("--calibrate", action="store_true", help="also a per-target line y = a * blend + b")
    args = parser.parse_args(argv)
    record = write_blend(load_members(args.experiments), Path(args.out), args.calibrate)
    oof = record["oof"]
    best = max(oof["members_weighted_r2"].items(), key=lambda kv: kv[1])
    print(
        f"blend of {len(args.experiments)}: nested OOF weighted_r2={oof['nested_weighted_r2']:.4f} (in-sample "
        f"{oof['in_sample_weighted_r2']:.4f}; best single {best[0]} {best[1]:.4f}) -> {Path(args.out) / BLEND_FILE}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
