"""The two jobs of infer.py: a submission (with the optional pseudo-label step) and OOF scoring.

They sit above `inference.py` (the ensemble) and `adapt.py` (the test-time fine-tune) and are the only
place that joins them, so neither of those two imports the other. Each job takes one resolved `InferConfig`,
writes it beside its output (`submission.yaml`, `oof_report.yaml`) and logs to `infer.log` there.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from src.adapt import pick_predictors, run_pseudo_label
from src.bias import corrected, nested_factors
from src.blend import blend_values
from src.checkpoint import experiment_dir, find_checkpoints, ids_hash
from src.config import PHYSICS_CHOICES, DataConfig, InferConfig
from src.data import load_sample_submission, load_test, read_test_csv
from src.deadline import Deadline
from src.devices import resolve_devices
from src.errors import BiomassError
from src.folds import drop_training_ids, load_fold_table
from src.inference import (
    TTA_MODES,
    Predictor,
    deadline_order,
    fallback_values,
    first_line,
    grid_weight_map,
    load_predictors,
    predict_ensemble,
    upper_bounds,
)
from src.io_utils import check_writable, save_config, write_csv_atomic
from src.logs import get_logger, log_file
from src.metric import score
from src.parallel import predict_parallel
from src.postprocess import apply_physics, structural_zeros
from src.report import load_runs, selection_table, to_markdown
from src.run_report import REPORT_NAME, RunReport
from src.schema import STATES, TARGETS
from src.state_probs import state_probabilities
from src.submission import build_submission, guard, write_submission

log = get_logger(__name__)
DEADLINE_MARGIN_S = 60.0  # kept free at the deadline for the last write of submission.csv and the exit


def run(cfg: InferConfig) -> pd.DataFrame:
    """infer.py: the OOF report under `--oof`, else the submission."""
    if cfg.oof and cfg.pseudo_label.enabled:
        raise BiomassError("--pseudo-label-epochs adapts to the test images; it does not go with --oof")
    return run_oof(cfg) if cfg.oof else run_submission(cfg)


def run_submission(cfg: InferConfig) -> pd.DataFrame:
    """test.csv -> ensemble -> physics -> (pseudo-label adaptation) -> guard -> submission.csv (atomic).

    Model-major: one checkpoint resident per device at a time (`ModelRef`), on every device of `--device`
    (`src.parallel` for more than one). submission.csv is written as soon as the first model has predicted every
    image and rewritten after each further one, so whatever `--deadline` cuts, a complete one exists. The resolved
    config is written beside it as `<out>.yaml`, the log as `infer.log` and the run's record as `run_report.json`.

    Under `--on-bad-image fallback` (the kernel) a failure once a valid submission exists (the State pass, the
    fine-tune, a worker, ...) is logged and recorded, and the last submission stands: Kaggle scores no notebook that
    errored. A checkpoint that cannot be read or loaded is one member lost. Returns the submission.
    """
    out = Path(cfg.out)
    check_writable(out)  # a read-only --out fails now, not after the whole ensemble ran
    deadline = Deadline(cfg.deadline)
    report = RunReport(out.with_name(REPORT_NAME))
    with log_file(out.with_name("infer.log")):
        with report.stage("read"):
            data_dir = Path(cfg.data_dir)
            test_long = read_test_csv(data_dir)  # test.csv and sample_submission.csv come from the rerun: lenient
            test_images = load_test(data_dir, check_images=cfg.on_bad_image == "error", test_long=test_long)
            sample = load_sample_submission(data_dir, test_long)
        blended = blend_values(cfg, test_images)  # issue 20: a blend.yaml directory or head experiments
        if blended is not None:
            if cfg.pseudo_label.enabled:
                raise BiomassError("--pseudo-label-epochs fine-tunes networks; it does not go with heads or a blend")
            sub = _Writer(cfg, [], test_images, test_long, sample, out, report).write(blended)
            save_config(cfg, out.with_suffix(".yaml"))
            log.info(f"wrote {out}: {len(sub)} rows for {len(test_images)} images")
            return sub
        paths = find_checkpoints(cfg.checkpoints)
        devices = resolve_devices(cfg.device)
        with report.stage("metadata"):
            members, paths = _readable_members(paths, devices[0], cfg, report)
        order = deadline_order(members)  # one fold of every grid first: what a cut ensemble keeps
        members, paths = [members[i] for i in order], [paths[i] for i in order]
        weights = grid_weight_map(members, cfg.grid_weights)
        writer = _Writer(cfg, members, test_images, test_long, sample, out, report)
        if deadline.active:
            log.info(f"{deadline.describe()}; {len(members)} model(s) in this order: " + ", ".join(map(str, paths)))
        stage = "predict"
        try:
            with report.stage(stage):
                pred = _predict(cfg, members, paths, devices, test_images, weights, deadline, writer)
            report.take(pred, paths)
            if pred.skipped:
                log.warning(
                    f"the deadline left out {len(pred.skipped)} of {len(members)} model(s): {', '.join(pred.skipped)}"
                )
            values = _fill_fallback(apply_physics(pred.mean(cfg.tta), cfg.physics, upper_bounds(members)), pred,
                                    test_images, members, cfg)  # fmt: skip
            writer.write(values)  # also when no member ran: the fallback everywhere, which push.py --submit refuses
            if cfg.structural_zeros and pred.members_ran:  # issue 20: the State head zeros Dead in WA, Clover in NSW
                stage = "structural_zeros"
                with report.stage(stage):
                    p_state = state_probabilities(members, test_images, cfg.batch_size, cfg.on_bad_image)
                    values = apply_physics(structural_zeros(values, p_state), cfg.physics, upper_bounds(members))
                    writer.write(values)
            if cfg.pseudo_label.enabled and pred.members_ran:
                stage = "pseudo_label"
                with report.stage(stage):
                    values = _pseudo_label_or_plain(cfg, members, test_images, values, pred, weights, deadline)
            stage = "write"
            sub = writer.write(values)
        except Exception as err:  # noqa: BLE001 - under fallback: the last valid submission stands (see above)
            if cfg.on_bad_image != "fallback":
                raise
            sub = _survive(err, stage, writer, members, test_images, cfg, report)
        save_config(cfg, out.with_suffix(".yaml"))
        report.write()
        log.info(f"wrote {out}: {len(sub)} rows for {len(test_images)} images; {report.path.name} beside it")
    return sub


def _readable_members(paths: list[Path], device, cfg: InferConfig, report: RunReport) -> tuple[list, list[Path]]:
    """Every checkpoint's metadata (`ModelRef`); under fallback one that cannot be read is a failed member."""
    if cfg.on_bad_image != "fallback":
        return load_predictors(paths, device, cfg.tta, cfg.amp, stream=True), list(paths)
    members, kept = [], []
    for path in paths:
        try:
            members.append(load_predictors([path], device, cfg.tta, cfg.amp, stream=True)[0])
            kept.append(path)
        except Exception as err:  # noqa: BLE001 - one unreadable checkpoint must not cost the submission
            log.warning(f"{path}: cannot be read ({first_line(err)}); left out of the ensemble")
            report.failed[str(path)] = f"cannot be read ({first_line(err)})"
    if not members:
        raise BiomassError(f"none of the {len(paths)} checkpoint(s) could be read: {report.failed}")
    return members, kept


def _predict(cfg: InferConfig, members, paths, devices, test_images, weights, deadline, writer):
    """The ensemble on one device (`predict_ensemble`) or one worker per device (`predict_parallel`)."""
    if len(devices) > 1:
        return predict_parallel(
            paths, devices, test_images, cfg.tta, cfg.amp, cfg.batch_size, weights, cfg.on_bad_image,
            deadline=deadline, on_update=writer.update,
        )  # fmt: skip
    return predict_ensemble(
        members, test_images, cfg.batch_size, weights, cfg.on_bad_image, cfg.num_workers,
        deadline=deadline, on_update=writer.update,
    )  # fmt: skip


def _survive(err: Exception, stage: str, writer, members, test_images, cfg: InferConfig, report: RunReport):
    """After a failure under fallback: the last valid submission, else (nothing written yet) the fallback for every
    image, which run_report.json marks as having no finite model (push.py --submit refuses it)."""
    why = first_line(err)
    report.errors.append({"stage": stage, "error": why})
    if writer.last is not None:
        log.error(f"{stage} failed ({why}); the submission written before it stands")
        return writer.last
    log.error(f"{stage} failed before any submission ({why}); every image gets the training-median fallback")
    report.images, report.images_on_fallback, report.finite_models = len(test_images), len(test_images), 0
    values = np.repeat(_fallback_row(members, cfg), len(test_images), axis=0)
    return writer.write(values)


class _Writer:
    """Turns an ensemble (so far) into a guarded submission.csv, written atomically: called after every model.

    Each write also rewrites run_report.json, so the record on disk always describes the submission on disk.
    """

    def __init__(self, cfg, members, test_images, test_long, sample, out: Path, report: RunReport) -> None:
        self.cfg, self.members, self.test_images = cfg, members, test_images
        self.test_long, self.sample, self.out, self.report = test_long, sample, out, report
        self.last: pd.DataFrame | None = None  # the last submission written (what stands if a later stage fails)

    def update(self, pred) -> None:
        values = apply_physics(pred.mean(self.cfg.tta), self.cfg.physics, upper_bounds(self.members))
        out = np.array(values, dtype=np.float64, copy=True)
        if not pred.ok.all():
            out[~pred.ok] = _fallback_row(self.members, self.cfg)
        self.report.take(pred, [m.path for m in self.members])
        self.write(out)
        log.info(f"wrote {self.out} from {pred.members_ran} of {len(self.members)} model(s)")

    def write(self, values: np.ndarray) -> pd.DataFrame:
        sub = build_submission(self.test_images["image_id"], values, self.test_long, self.sample)
        guard(sub, self.test_long, self.sample, physics=self.cfg.physics == "project")
        write_submission(sub, self.out)
        self.last = sub
        self.report.submission_written = True
        if not self.members:  # a blend or heads: every image has a value from its members (src.blend)
            self.report.images, self.report.finite_models = len(self.test_images), 1
        self.report.write()
        return sub


def _fallback_row(predictors, cfg: InferConfig) -> np.ndarray:
    return apply_physics(fallback_values(predictors)[None], cfg.physics, upper_bounds(predictors))


def _fill_fallback(
    values: np.ndarray, pred, test_images: pd.DataFrame, predictors: list, cfg: InferConfig
) -> np.ndarray:
    """The training-median prediction for images without one: unreadable, or no model gave finite values."""
    readable = pred.readable if pred.readable is not None else pred.ok
    unreadable = test_images["image_id"][~readable].tolist()
    if unreadable:
        log.warning(
            f"{len(unreadable)} unreadable image(s) got the training-median prediction: {', '.join(unreadable)}"
        )
    no_finite = test_images["image_id"][readable & ~pred.ok].tolist()
    if no_finite:
        log.warning(
            f"{len(no_finite)} image(s) with no finite prediction from any model got the training-median "
            f"prediction: {', '.join(no_finite)}"
        )
    n_ran = pred.members_ran or len(predictors)
    if pred.models_used is not None and pred.left_out:
        partial = int((pred.ok & (pred.models_used < n_ran)).sum())
        log.info(f"{partial} image(s) averaged over fewer than all {n_ran} models (non-finite left out)")
    out = np.array(values, dtype=np.float64, copy=True)
    if not pred.ok.all():
        out[~pred.ok] = _fallback_row(predictors, cfg)
    return out


def _pseudo_label_or_plain(cfg: InferConfig, members, test_images, values, pred, weights, deadline) -> np.ndarray:
    """The pseudo-label fine-tune's values; the plain ensemble's where they are not finite.

    Only the checkpoints it fine-tunes (one per grid) are loaded; with a deadline the fine-tune checks the clock at
    every step and stops when what is left would not cover re-predicting with them (then: the plain ensemble).

    Under --on-bad-image fallback (the kernel) a fine-tune that fails (say, train.csv missing on the rerun,
    or out of GPU memory) is a warning and the plain ensemble is submitted: the step is optional, the
    submission is not.
    """
    should_stop = None
    if deadline.active:
        chosen_share = len({m.grid for m in members}) / max(pred.members_ran, 1)
        reserve = pred.seconds * chosen_share + DEADLINE_MARGIN_S
        should_stop = lambda: deadline.left() < reserve  # noqa: E731
    try:
        chosen = pick_predictors(members, cfg.pseudo_label.fold)
        predictors = [m.open() if m in chosen else m for m in members]  # only those it fine-tunes are resident
        adapted = run_pseudo_label(cfg, predictors, test_images, values, pred, weights, should_stop)
    except Exception as err:  # noqa: BLE001 - see above; with --on-bad-image error it propagates
        if cfg.on_bad_image != "fallback":
            raise
        first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        log.warning(f"pseudo-label fine-tune failed ({type(err).__name__}: {first}); submitting the plain ensemble")
        return values
    adapted = np.asarray(adapted, dtype=np.float64)
    broken = ~np.isfinite(adapted).all(axis=1)
    if broken.any():
        log.warning(f"pseudo-label fine-tune gave non-finite values for {int(broken.sum())} image(s); kept the plain")
        adapted[broken] = values[broken]
    return adapted


def run_oof(cfg: InferConfig) -> pd.DataFrame:
    """Score each fold's models on their own held-out images for every TTA x physics setting.

    Every checkpoint's recorded train/validation id hashes must be reproduced by the folds file (else a model
    could be scored on images it trained on); `seed` physics clamps each fold at its own models' training maxima.
    Writes `<exp>/oof_report.csv` (one row per setting), `<exp>/oof_ensemble.csv` (predictions of the
    full-TTA, project-physics ensemble), `<exp>/oof_selection.csv` (best-epoch vs fixed-schedule OOF from the
    training files, `src.report.selection_table`) and `<exp>/oof_report.yaml` next to the checkpoints; returns
    the report.
    """
    paths = find_checkpoints(cfg.checkpoints)
    exp_dir = experiment_dir(paths)
    with log_file(exp_dir / "infer.log"):
        predictors = load_predictors(paths, resolve_devices(cfg.device)[0], "full", cfg.amp, stream=True)
        folds_path = cfg.folds or predictors[0].cfg.data.folds
        wide = load_fold_table(DataConfig(data_dir=cfg.data_dir, folds=folds_path))
        check_splits(predictors, wide, folds_path)
        per_view = _oof_per_view(predictors, wide, cfg)
        scored = ~np.isnan(per_view[:, 0, 0])
        truth = wide.loc[scored, list(TARGETS)].to_numpy(dtype=np.float64)
        upper = fold_upper_bounds(predictors, wide.loc[scored, "fold"].to_numpy())
        # issue 20: with --structural-zeros every setting is also scored with the zeros (one more pass per model)
        p_state = _oof_state(predictors, wide, cfg)[scored] if cfg.structural_zeros else None
        rows = []
        for tta in TTA_MODES:
            mean = per_view[scored, : TTA_MODES[tta]].mean(axis=1)
            for physics in PHYSICS_CHOICES:
                for zeros in (False, True) if p_state is not None else (False,):
                    values = structural_zeros(mean, p_state) if zeros else mean
                    scores = score(truth, apply_physics(values, physics, upper))
                    row = {"tta": tta, "physics": physics, "images": int(scored.sum())}
                    row |= {"structural_zeros": zeros} if p_state is not None else {}
                    rows.append({**row, **scores})
            # issue 21: the same, times per-target factors fitted on the other folds' rows (src/bias.py)
            factors = nested_factors(mean, truth, wide.loc[scored, "fold"].to_numpy())
            scores = score(truth, apply_physics(corrected(mean, factors), "project", upper))
            row = {"tta": tta, "physics": "project+bias", "images": int(scored.sum())}
            row |= {"structural_zeros": False} if p_state is not None else {}
            rows.append({**row, **scores})
        report = pd.DataFrame(rows).sort_values("weighted_r2", ascending=False).reset_index(drop=True)
        write_csv_atomic(report, exp_dir / "oof_report.csv")
        best = apply_physics(per_view[scored].mean(axis=1), "project")
        ens = pd.DataFrame(
            {"image_id": wide.loc[scored, "image_id"].to_numpy(), "fold": wide.loc[scored, "fold"].to_numpy()}
        )
        for j, name in enumerate(TARGETS):
            ens[name] = best[:, j]
            ens[f"true_{name}"] = truth[:, j]
        write_csv_atomic(ens, exp_dir / "oof_ensemble.csv")
        save_config(cfg, exp_dir / "oof_report.yaml")
        log.info(report.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        _write_selection(exp_dir)
        log.info(f"wrote {exp_dir / 'oof_report.csv'}")
    return report


def _write_selection(exp_dir: Path) -> None:
    """oof_selection.csv: the training files' best-epoch OOF beside the fixed-schedule one (no TTA, no physics)."""
    try:
        table = selection_table(load_runs(exp_dir))
    except BiomassError as err:  # explicit .pt files outside an experiment: nothing to read
        log.info(f"no selection-honest OOF ({err})")
        return
    write_csv_atomic(table, exp_dir / "oof_selection.csv")
    log.info(
        "selection-honest OOF (oof.csv at the best epoch vs each fold at the median best epoch of the other folds, "
        "from oof_epochs.csv; no TTA, no physics):\n" + to_markdown(table)
    )


def check_splits(predictors: list[Predictor], wide: pd.DataFrame, folds_path) -> None:
    """Each checkpoint's fold must hold exactly the images it validated on, and the rest exactly those it trained
    on (less its --drop-ids): a regenerated folds file would otherwise score models on their own training images."""
    for p in predictors:
        split = p.split
        if not split or p.fold is None:
            continue  # checkpoints from before the split was recorded: nothing to check against
        fold = int(p.fold)
        val = wide.loc[wide["fold"] == fold, "image_id"]
        train = wide[wide["fold"] != fold]
        if p.cfg.data.drop_ids and Path(p.cfg.data.drop_ids).is_file():
            train, _ = drop_training_ids(train, wide[wide["fold"] == fold], p.cfg.data.drop_ids, wide["image_id"])
        elif p.cfg.data.drop_ids:
            train = None  # its --drop-ids file is gone: only the validation images can be checked
        problems = []
        if "val_ids" in split and ids_hash(val) != split["val_ids"]:
            problems.append(f"its {split.get('n_val')} validation images are not the {len(val)} of fold {fold} here")
        if train is not None and ids_hash(train["image_id"]) != split["train_ids"]:
            problems.append(f"its {split.get('n_train')} training images are not the {len(train)} outside fold {fold}")
        if problems:
            raise BiomassError(
                f"fold {fold}: {folds_path} does not reproduce the split of {p.path} ({'; '.join(problems)}); "
                "pass the folds file it was trained with (--folds)"
            )


def fold_upper_bounds(predictors: list[Predictor], row_folds: np.ndarray) -> np.ndarray:
    """(rows, 5) `seed`-physics clamp of each OOF row: the training maxima of its own fold's models only.

    The maxima over every fold's models would include each fold's held-out labels (they train the other folds).
    """
    by_fold: dict[int, list[Predictor]] = defaultdict(list)
    for p in predictors:
        by_fold[int(p.fold)].append(p)
    out = np.zeros((len(row_folds), len(TARGETS)))
    for fold, members in by_fold.items():
        out[np.asarray(row_folds) == fold] = upper_bounds(members)
    return out


def _oof_state(predictors: list[Predictor], wide: pd.DataFrame, cfg: InferConfig) -> np.ndarray:
    """(N, 4) State probabilities of each fold's models on that fold's images."""
    out = np.zeros((len(wide), len(STATES)))
    by_fold: dict[int, list[Predictor]] = defaultdict(list)
    for p in predictors:
        by_fold[int(p.fold)].append(p)
    for fold, members in sorted(by_fold.items()):
        mask = (wide["fold"] == fold).to_numpy()
        out[mask] = state_probabilities(members, wide[mask].reset_index(drop=True), cfg.batch_size)
    return out


def _oof_per_view(predictors: list[Predictor], wide: pd.DataFrame, cfg: InferConfig) -> np.ndarray:
    """(N, 4 TTA views, 5) held-out predictions of each fold's models on that fold's images (NaN = no model)."""
    per_view = np.full((len(wide), TTA_MODES["full"], len(TARGETS)), np.nan)
    by_fold: dict[int, list[Predictor]] = defaultdict(list)
    for p in predictors:
        if p.fold is None:
            raise BiomassError(f"{p.path}: has no fold; OOF scoring needs fold checkpoints from train.py")
        by_fold[int(p.fold)].append(p)
    for fold, members in sorted(by_fold.items()):
        mask = (wide["fold"] == fold).to_numpy()
        if not mask.any():
            raise BiomassError(
                f"fold {fold} of the checkpoints has no images in the folds file; pass the folds used in training"
            )
        frame = wide[mask].reset_index(drop=True)
        weights = grid_weight_map(members, None)
        per_view[mask] = predict_ensemble(
            members, frame, cfg.batch_size, weights, num_workers=cfg.num_workers, show=False
        ).per_view
    return per_view
