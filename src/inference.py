"""Inference: one `Predictor` per checkpoint, batched TTA, the seed x fold x grid ensemble.

Averaging happens in grams (after expm1), over TTA views, seeds, folds and grids: the metric is a squared
error in grams, and the arithmetic mean of grams is what minimizes it; a log-space mean is a
geometric mean and biased low. The jobs that use it (submission, OOF scoring) live in `submit.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from src.artifacts import Cleaning
from src.checkpoint import load_checkpoint
from src.config import TTA_CHOICES, Config
from src.dataset import MultiSizeViewDataset, input_key
from src.deadline import Deadline, now
from src.errors import BiomassError
from src.flops import image_flops, tile_size_of
from src.logs import get_logger, progress
from src.model import FLIP_VARIANTS, build_model
from src.runtime import autocast, worker_init
from src.schema import TARGETS

log = get_logger(__name__)
TTA_MODES = {"none": 1, "flip": 3, "full": 4}  # views averaged per mode
assert tuple(TTA_MODES) == TTA_CHOICES
# view order of the per-view predictions: original, hflip, vflip, stereo swap
TTA_VIEWS = ("orig", "hflip", "vflip", "swap")


def _check_tta(tta: str) -> None:
    if tta not in TTA_MODES:  # InferConfig checks --tta; this guards the Python API
        raise BiomassError(f"unknown --tta {tta!r}; choose one of {', '.join(TTA_MODES)}")


def read_checkpoint(path: Path) -> dict:
    """A best.pt with the targets in today's order (each checks its own, so any set of them can be averaged)."""
    ckpt = load_checkpoint(path)
    if "target_stats" not in ckpt:  # last.pt carries optimizer state for --resume, not what inference needs
        raise BiomassError(f"{path}: a resume state (last.pt), not a best.pt; pass best.pt or the experiment directory")
    if list(ckpt.get("targets", [])) != list(TARGETS):
        raise BiomassError(f"{path}: target order {ckpt.get('targets')} differs from {list(TARGETS)}; re-train it")
    return ckpt


def _set_metadata(member, ckpt: dict) -> None:
    """What the ensemble knows of a checkpoint without its weights: config, statistics, fold, seed, split, cleaning."""
    member.cfg = Config.from_dict(ckpt["config"], source=str(member.path))
    member.stats = {k: np.asarray(v, dtype=np.float64) for k, v in ckpt["target_stats"].items()}
    member.fold = ckpt.get("fold")
    member.seed = member.cfg.train.seed
    member.val_metric = ckpt.get("val_metric")
    member.split = ckpt.get("split")  # id hashes of its training / validation images (None: older checkpoints)
    # the image cleaning the checkpoint was trained with (--clean-stamps, --crop-bottom), and so its batch key
    member.cleaning = Cleaning.from_config(member.cfg.data)
    member.jpeg_reduce = bool(member.cfg.data.jpeg_reduce)  # decode as it trained: reduced JPEG decode or full
    # the resolved geometry stored at save (issue 25): no backbone build to learn it; None for older checkpoints
    member.tile_size = ckpt.get("tile_size")
    member.tile_flops = ckpt.get("tile_flops")
    member.timm_version = ckpt.get("timm_version")
    if member.tile_size and not member.cfg.model.tile_size:  # the native tile, resolved at save: build at it
        member.cfg.model.tile_size = int(member.tile_size)


class Predictor:
    """A trained checkpoint ready to predict: the only inference API (infer.py, OOF, kernel, TTA)."""

    def __init__(
        self, checkpoint: str | Path, device: torch.device | str = "cpu", tta: str = "full", amp: bool = False
    ) -> None:
        _check_tta(tta)
        self.path = Path(checkpoint)
        ckpt = read_checkpoint(self.path)
        _set_metadata(self, ckpt)
        self.device = torch.device(device)
        self.model = build_model(self.cfg.model, load_backbone_weights=False)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0])[
                :200
            ]  # line 0 is "Error(s) in loading state_dict for ..."
            raise BiomassError(f"{self.path}: weights do not fit its own config ({detail}); re-train it") from err
        del ckpt
        self.model.to(self.device).eval()
        self.tta = tta
        self.amp = amp
        self.input_key = input_key(self.view_size, self.cleaning, self.jpeg_reduce)

    def open(self) -> Predictor:
        """Already resident: the member interface of `predict_ensemble` (see `ModelRef.open`)."""
        return self

    def flops_per_image(self) -> float:
        return image_flops(self.cfg.model, self.tta, self.tile_flops)

    def with_model(self, model: torch.nn.Module) -> Predictor:
        """This predictor (config, statistics, TTA) with other weights of the same model: test-time fine-tuning."""
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
        with autocast(self.device, self.amp):
            feats = self.model.encode_flips(left.to(self.device), right.to(self.device), FLIP_VARIANTS[:n_flips])
            outs = [self.model.head_from_features(feats[k, 0], feats[k, 1])["targets"] for k in range(n_flips)]
            if self.tta == "full":
                outs.append(self.model.head_from_features(feats[0, 1], feats[0, 0])["targets"])
        return self.model.to_grams(torch.stack(outs, dim=1)).cpu().numpy()  # any target space / head layout


class ModelRef:
    """A checkpoint as an ensemble member whose weights are loaded only when its turn comes (model-major streaming).

    It reads the checkpoint once to check it and keep what the ensemble needs up front (config, statistics, fold,
    grid, input size); `open()` builds the `Predictor` and the caller drops it after its pass.
    """

    def __init__(
        self, checkpoint: str | Path, device: torch.device | str = "cpu", tta: str = "full", amp: bool = False
    ) -> None:
        _check_tta(tta)
        self.path = Path(checkpoint)
        _set_metadata(self, read_checkpoint(self.path))
        self.device, self.tta, self.amp = torch.device(device), tta, amp
        self.grid = tuple(int(g) for g in self.cfg.model.grid)
        tile = tile_size_of(self.cfg.model)  # the stored one (see _set_metadata); a CPU build for old checkpoints
        self.view_size = (self.grid[0] * tile, self.grid[1] * tile)
        self.input_key = input_key(self.view_size, self.cleaning, self.jpeg_reduce)

    def open(self) -> Predictor:
        predictor = Predictor(self.path, self.device, self.tta, self.amp)
        if predictor.input_key != self.input_key:  # the config arithmetic and the built model must agree
            raise BiomassError(f"{self.path}: built input {predictor.input_key}, expected {self.input_key}")
        return predictor

    def flops_per_image(self) -> float:
        return image_flops(self.cfg.model, self.tta, self.tile_flops)


def load_predictors(paths: list[Path], device, tta: str, amp: bool, stream: bool = False) -> list:
    """Every checkpoint as a member: resident `Predictor`s, or `ModelRef`s (metadata only) when `stream`."""
    kind = ModelRef if stream else Predictor
    with progress(paths, desc="loading models", leave=False) as bar:  # closed (line cleared) before an error is printed
        return [kind(p, device, tta, amp) for p in bar]


def deadline_order(members: Sequence) -> list[int]:
    """Member indices in the order a deadline should meet them: one of every grid, then a second of every grid...

    A deadline that cuts the ensemble then keeps a mix of grids; the order never changes the full ensemble's mean.
    """
    seen: dict[tuple[int, int], int] = {}
    grids = list(dict.fromkeys(m.grid for m in members))
    keys = []
    for i, m in enumerate(members):
        keys.append((seen.get(m.grid, 0), grids.index(m.grid), i))
        seen[m.grid] = seen.get(m.grid, 0) + 1
    return [i for *_, i in sorted(keys)]


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
        raise BiomassError(
            f"--grid-weights names grid {unknown[0][0]}x{unknown[0][1]}, but no checkpoint has it (have {grids})"
        )
    total = sum(weights.values())
    if total <= 0:
        raise BiomassError("--grid-weights must sum to a positive number")
    return {g: w / total for g, w in weights.items()}


def ensemble_groups(
    predictors: list[Predictor], grid_weights: dict[tuple[int, int], float] | None = None
) -> tuple[list[tuple], dict]:
    """Each model's place in the ensemble, (grid, fold), and each grid's weight (equal unless given).

    The mean is nested: seeds within a fold, folds within a grid (equal shares), grids by weight; so a fold
    trained with more seeds does not weigh more than the others. A checkpoint without a fold is a fold of its own.
    """
    groups = [(p.grid, p.fold if p.fold is not None else ("path", i)) for i, p in enumerate(predictors)]
    grids = list(dict.fromkeys(grid for grid, _ in groups))
    return groups, dict(grid_weights) if grid_weights else {g: 1.0 / len(grids) for g in grids}


def member_weights(
    predictors: list[Predictor], grid_weights: dict[tuple[int, int], float] | None = None
) -> list[float]:
    """Each model's share of the ensemble when every model is finite (see `ensemble_groups`)."""
    groups, weights = ensemble_groups(predictors, grid_weights)
    folds_per_grid = {g: len({f for g2, f in set(groups) if g2 == g}) for g, _ in groups}
    return [weights[g] / folds_per_grid[g] / groups.count((g, f)) for g, f in groups]


@dataclass
class EnsemblePrediction:
    """Per-TTA-view predictions of the ensemble in grams (N, V, 5) and which images got one.

    `ok`: readable and at least one model gave finite values (the others get the fallback). `readable`: the image
    could be read, cleaned and tiled. `models_used`: how many models went into each image's mean. `left_out`:
    checkpoint path -> images whose prediction by that model was non-finite (or whose batch raised) and was left out.
    """

    per_view: np.ndarray
    ok: np.ndarray
    seconds: float
    readable: np.ndarray | None = None
    models_used: np.ndarray | None = None
    left_out: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # members the deadline left out (skipped or cut)
    failed: dict[str, str] = field(default_factory=dict)  # members left out whole: path -> why
    members_ran: int = 0
    startup_seconds: float = 0.0  # of `seconds`: starting worker processes (src.parallel), else 0
    ran_paths: list[str] = field(default_factory=list)  # the members that predicted every image
    finite_members: int = 0  # of those, how many gave a finite prediction for at least one image

    def mean(self, tta: str = "full") -> np.ndarray:
        return self.per_view[:, : TTA_MODES[tta]].mean(axis=1)


@dataclass
class FiniteMean:
    """What `finite_ensemble_mean` returns: the mean (B, V, 5), NaN rows where no model was finite; used (M, B)."""

    values: np.ndarray
    used: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """Models that went into each image's mean (B,)."""
        return self.used.sum(axis=0)


def finite_ensemble_mean(
    preds: np.ndarray, groups: Sequence, group_weights: Mapping, finite: np.ndarray | None = None
) -> FiniteMean:
    """Ensemble mean of per-model predictions (M, B, V, 5) over the finite ones only, image by image.

    `groups[m]` is model m's place: a key of `group_weights` (a grid) or a tuple whose first item is one, the rest
    nested levels (fold, ...). The mean is nested: equal shares at every level below the top, `group_weights` at
    the top. A model whose values for an image are not all finite (`finite` (M, B), default from the values) is
    left out of that image's mean: its siblings take its share, a level with no finite member drops out and its
    siblings are renormalized. An image no model predicted finitely gets a NaN row, for the caller's fallback. Pure
    numpy: the one place that decides how partial ensembles are averaged, whatever loop produced the predictions.
    """
    preds = np.asarray(preds, dtype=np.float64)
    finite = np.isfinite(preds).all(axis=(2, 3)) if finite is None else np.asarray(finite, dtype=bool)
    if len(groups) != len(preds) or finite.shape != preds.shape[:2]:
        raise ValueError("one group per model and a finite mask of shape (models, images)")
    paths = [tuple(g) if isinstance(g, tuple) else (g,) for g in groups]
    values, some = _nested_mean(preds, finite, paths, group_weights)
    return FiniteMean(values, finite & some[None, :])


def _nested_mean(preds: np.ndarray, finite: np.ndarray, paths: list[tuple], weights: Mapping | None) -> tuple:
    """Weighted mean over the first level of `paths` (equal when `weights` is None), recursing into the rest.

    Returns the mean (B, V, 5), NaN where nothing was finite, and which images got one (B,). Keys are visited in
    first-seen order, so the summation order is the same on every call.
    """
    acc = np.zeros(preds.shape[1:])
    total = np.zeros(preds.shape[1])
    for key in dict.fromkeys(path[0] for path in paths):
        members = [m for m, path in enumerate(paths) if path[0] == key]
        if all(len(paths[m]) == 1 for m in members):  # leaves: the models themselves, equal shares
            mask = finite[members]
            count = mask.sum(axis=0)
            value = (
                np.where(mask[:, :, None, None], preds[members], 0.0).sum(axis=0) / np.maximum(count, 1)[:, None, None]
            )
            has = count > 0
        else:
            value, has = _nested_mean(preds[members], finite[members], [paths[m][1:] or ("",) for m in members], None)
        weight = (1.0 if weights is None else float(weights[key])) * has
        acc += weight[:, None, None] * np.where(has[:, None, None], value, 0.0)
        total += weight
    values = np.full_like(acc, np.nan)
    some = total > 0
    values[some] = acc[some] / total[some, None, None]
    return values, some


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA (or CPU allocator) out-of-memory error: worth a retry at a smaller batch, unlike any other failure."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (bool(oom) and isinstance(err, oom)) or "out of memory" in str(err).lower()


def first_line(err: BaseException) -> str:
    """`Type: first line` of an exception, at most 200 characters: what the logs and run_report.json say."""
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


class BatchPredictor:
    """One model over the batches of one pass: an out-of-memory batch is retried in halves down to single images
    (the smaller size is kept for the rest of the pass); under `--on-bad-image fallback` any other exception leaves
    the model out for that batch (NaN), and a model whose first `FAIL_FAST` batches all raised is given up whole."""

    FAIL_FAST = 2

    def __init__(self, predictor, on_bad_image: str, errors: dict[str, str]) -> None:
        self.predictor, self.on_bad_image, self.errors = predictor, on_bad_image, errors
        self.chunk: int | None = None  # the batch size that fits, once an OOM taught it
        self.batches = self.raised = 0

    def __call__(self, pair: torch.Tensor) -> np.ndarray:
        self.batches += 1
        try:
            return self._halving(pair)
        except Exception as err:  # noqa: BLE001 - the kernel's rerun must end with a submission, whatever breaks
            if self.on_bad_image != "fallback":
                raise
            self.raised += 1
            self.errors.setdefault(str(self.predictor.path), first_line(err))
            return np.full((len(pair), TTA_MODES[self.predictor.tta], len(TARGETS)), np.nan)

    @property
    def given_up(self) -> bool:
        """Every one of the first FAIL_FAST batches raised: a systematic failure, not a bad image."""
        return self.raised >= self.FAIL_FAST and self.raised == self.batches

    @property
    def all_raised(self) -> bool:
        """Every batch of the pass raised (also when there were fewer than FAIL_FAST)."""
        return self.batches > 0 and self.raised == self.batches

    def _halving(self, pair: torch.Tensor) -> np.ndarray:
        outs, lo = [], 0
        while lo < len(pair):
            size = min(self.chunk or len(pair), len(pair) - lo)
            part = pair[lo : lo + size]
            try:
                outs.append(self.predictor.predict_views(part[:, 0], part[:, 1]))
            except Exception as err:
                if not is_out_of_memory(err) or size == 1:
                    raise
                self.chunk = max(size // 2, 1)
                log.warning(f"{self.predictor.path}: out of memory at batch {size}; retrying at {self.chunk}")
                if getattr(self.predictor, "device", torch.device("cpu")).type == "cuda":
                    torch.cuda.empty_cache()
                continue
            lo += size
        return np.concatenate(outs)


class CachedViews:
    """The images decoded once for the whole ensemble, kept in RAM as uint8 view pairs at each model input's size.

    Memory is images x inputs (distinct view size x cleaning), never x checkpoints; every model reads its batches
    from here. Measured against decoding again per model in bench/stream.py (docs/BENCHMARKS.md).
    """

    def __init__(self, frame, members, batch_size, on_bad_image, num_workers, jpeg_reduce, show) -> None:
        dataset = MultiSizeViewDataset(
            frame, [m.view_size for m in members], [jpeg_reduce and m.jpeg_reduce for m in members], on_bad_image,
            [m.cleaning for m in members],
        )  # fmt: skip
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, worker_init_fn=worker_init)
        n = len(frame)
        self.views = {input_key(v, c, r): torch.empty((n, 2, 3, *v), dtype=torch.uint8) for v, c, r in dataset.inputs}
        self.readable = np.ones(n, dtype=bool)
        self.batch_size, self.jpeg_reduce = batch_size, jpeg_reduce
        for batch in progress(loader, desc="decoding", disable=not show):
            idx = batch["index"].numpy()
            self.readable[idx] = batch["ok"].numpy()
            for key, tensor in self.views.items():
                tensor[idx] = batch[key]

    def batches(self, member) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        views = self.views[input_key(member.view_size, member.cleaning, self.jpeg_reduce and member.jpeg_reduce)]
        for lo in range(0, len(views), self.batch_size):
            yield np.arange(lo, min(lo + self.batch_size, len(views))), views[lo : lo + self.batch_size]


class RedecodedViews:
    """The alternative to `CachedViews`: each model decodes the images again (no RAM but the batch in flight)."""

    def __init__(self, frame, members, batch_size, on_bad_image, num_workers, jpeg_reduce, show) -> None:
        self.frame, self.batch_size, self.on_bad_image = frame, batch_size, on_bad_image
        self.num_workers, self.jpeg_reduce = num_workers, jpeg_reduce
        self.readable = np.ones(len(frame), dtype=bool)

    def batches(self, member) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        dataset = MultiSizeViewDataset(
            self.frame, [member.view_size], [self.jpeg_reduce and member.jpeg_reduce], self.on_bad_image,
            [member.cleaning],
        )  # fmt: skip
        loader = DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, worker_init_fn=worker_init
        )
        for batch in loader:
            idx = batch["index"].numpy()
            self.readable[idx] = batch["ok"].numpy()
            yield idx, batch[input_key(member.view_size, member.cleaning, self.jpeg_reduce and member.jpeg_reduce)]


VIEW_SOURCES = {"cache": CachedViews, "redecode": RedecodedViews}


class EnsembleRun:
    """Model-major ensemble state: each member's predictions of every image (M, N, V, 5), who ran, who was skipped.

    Members run one at a time (`run_member`: open, predict every image, release), so one checkpoint is resident
    per device. Before each member its time is projected from the throughput measured so far (seconds per backbone
    FLOP-image, `src.flops`); one that would cross the deadline is skipped and logged, one the deadline catches
    mid-way is dropped whole. The first member of the ensemble always runs (it is the minimum submission), unless
    the deadline has passed before it starts. `result()` is the nested finite mean over the members that ran.
    """

    def __init__(self, members, n_images, grid_weights=None, on_bad_image="error", deadline=None) -> None:
        self.members = list(members)
        self.n_views = max(TTA_MODES[m.tta] for m in self.members)
        self.groups, self.weights = ensemble_groups(self.members, grid_weights)
        self.preds = np.full((len(self.members), n_images, self.n_views, len(TARGETS)), np.nan)
        self.ran = np.zeros(len(self.members), dtype=bool)
        self.skipped: list[str] = []
        self.errors: dict[str, str] = {}
        self.failed: dict[str, str] = {}  # path -> why the member was left out whole (could not load, raised on all)
        self.on_bad_image = on_bad_image
        self.deadline = deadline or Deadline()
        self.spent = 0.0  # seconds measured over `flop_images` backbone FLOP-images: the throughput
        self.flop_images = 0.0
        self.started = now()

    def projected(self, m: int, n_images: int) -> float | None:
        """Seconds member m is projected to take on n_images (None before anything was measured)."""
        if self.flop_images <= 0:
            return None
        return self.spent / self.flop_images * self.members[m].flops_per_image() * n_images

    def may_start(self, m: int, n_images: int) -> bool:
        """Does the deadline leave time for member m? (logged when not)"""
        path = str(self.members[m].path)
        if not self.ran.any() and not self.deadline.passed():  # the first member to run: the minimum submission
            return True
        guess = self.projected(m, n_images)
        if self.deadline.passed() or (guess is not None and not self.deadline.fits(guess)):
            why = "passed" if guess is None else f"projected {guess:.0f}s, {max(self.deadline.left(), 0):.0f}s left"
            log.warning(f"{path}: skipped, it would cross the deadline ({why}; {self.deadline.describe()})")
            self.skipped.append(path)
            return False
        return True

    def run_member(self, m: int, views) -> bool:
        """Member m on every image of `views` (one resident at a time); False when skipped or cut by the deadline."""
        n_images = len(views.readable)
        if not self.may_start(m, n_images):
            return False
        start = now()
        member = self.members[m]
        first = not self.ran.any()
        try:
            predictor = member.open()
        except Exception as err:  # noqa: BLE001 - an unloadable checkpoint (or OOM at load) is one member lost
            if self.on_bad_image != "fallback":
                raise
            return self.fail(m, f"could not load ({first_line(err)})")
        batches = BatchPredictor(predictor, self.on_bad_image, self.errors)
        out = np.full((n_images, self.n_views, len(TARGETS)), np.nan)
        for idx, pair in views.batches(member):
            if not first and self.deadline.passed():
                log.warning(f"{member.path}: cut by the deadline mid-way and left out ({self.deadline.describe()})")
                self.skipped.append(str(member.path))
                return False
            out[idx] = batches(pair)
            if batches.given_up:
                break
        if batches.all_raised:
            del predictor, batches
            return self.fail(m, f"raised on every batch ({self.errors.get(str(member.path))})")
        del predictor, batches  # a ModelRef's weights go now: the next member loads into the freed memory
        if member.device.type == "cuda":
            torch.cuda.empty_cache()
        self.record(m, out, now() - start)
        return True

    def fail(self, m: int, why: str) -> bool:
        """Member m left out whole (logged, counted in run_report.json); the rest of the ensemble goes on."""
        path = str(self.members[m].path)
        log.warning(f"{path}: {why}; left out of the ensemble")
        self.failed[path] = why
        if self.members[m].device.type == "cuda":
            torch.cuda.empty_cache()
        return False

    def record(self, m: int, preds: np.ndarray, seconds: float, rows: np.ndarray | None = None) -> None:
        """Member m's predictions (of `rows`, default all) and the seconds they took (the throughput)."""
        self.preds[m, slice(None) if rows is None else rows] = preds
        self.ran[m] = True
        self.spent += seconds
        self.flop_images += self.members[m].flops_per_image() * len(preds)

    def result(self, readable: np.ndarray, show: bool = False) -> EnsemblePrediction:
        """The ensemble of the members that ran so far (NaN-left-out nested mean) and its counts."""
        ran = np.flatnonzero(self.ran)
        n_images = self.preds.shape[1]
        used = np.zeros((len(self.members), n_images), dtype=bool)
        out = np.full((n_images, self.n_views, len(TARGETS)), np.nan)
        if len(ran):
            mean = finite_ensemble_mean(self.preds[ran], [self.groups[m] for m in ran], self.weights)
            out, used[ran] = mean.values, mean.used
        left_out = {str(self.members[m].path): int((~used[m] & readable).sum()) for m in ran}
        left_out = {path: n for path, n in left_out.items() if n}
        if show:
            for path, n in left_out.items():
                why = f" ({self.errors[path]})" if path in self.errors else ""
                log.warning(
                    f"{path}: non-finite prediction for {n} of {int(readable.sum())} readable image(s), left out of "
                    f"their mean{why}"
                )
        counts = used.sum(axis=0)
        ok = readable & (counts > 0)
        return EnsemblePrediction(
            out, ok, now() - self.started, readable, counts, left_out, list(self.skipped), dict(self.failed), len(ran),
            ran_paths=[str(self.members[m].path) for m in ran], finite_members=int(used.any(axis=1).sum()),
        )  # fmt: skip


def predict_ensemble(
    members: Sequence,
    frame: pd.DataFrame,
    batch_size: int = 8,
    grid_weights: dict[tuple[int, int], float] | None = None,
    on_bad_image: str = "error",
    num_workers: int = 0,
    jpeg_reduce: bool = True,
    show: bool = True,
    deadline: Deadline | None = None,
    on_update: Callable[[EnsemblePrediction], None] | None = None,
    views: str = "cache",
) -> EnsemblePrediction:
    """Model-major: decode the images once, then each member in turn predicts all of them; the nested mean.

    `members`: `Predictor`s (resident) or `ModelRef`s (loaded one at a time: streaming). Mean over seeds in a
    fold, folds in a grid, grids by weight; a member's non-finite values for an image are left out of that image's
    mean (`finite_ensemble_mean`). `on_update` gets the ensemble so far after each member (the submission is
    rewritten then); `deadline` skips members that would cross it (`EnsembleRun`).
    """
    if not members:
        raise BiomassError("no models to ensemble")
    if len({TTA_MODES[m.tta] for m in members}) > 1:
        raise BiomassError("all predictors of an ensemble must use the same --tta")
    run = EnsembleRun(members, len(frame), grid_weights, on_bad_image, deadline)
    source = VIEW_SOURCES[views](frame, members, batch_size, on_bad_image, num_workers, jpeg_reduce, show)
    with progress(range(len(members)), desc="models", disable=not show) as bar:
        for m in bar:
            if run.run_member(m, source) and on_update is not None:
                on_update(run.result(source.readable))
    result = run.result(source.readable, show=True)
    if show:
        rate = len(frame) / max(result.seconds, 1e-9)
        skipped = f"; {len(result.skipped)} skipped by the deadline" if result.skipped else ""
        log.info(
            f"predicted {len(frame)} images with {result.members_ran} models in {result.seconds:.1f}s "
            f"({rate:.2f} images/s){skipped}"
        )
    return result


def fallback_values(predictors: list[Predictor]) -> np.ndarray:
    """Training-median prediction (mean over the ensemble's checkpoints) for unreadable images."""
    return np.mean([p.stats["median"] for p in predictors], axis=0)


def upper_bounds(predictors: list[Predictor]) -> np.ndarray:
    """Clamp bounds for `seed` physics: the largest training value of each target seen by any of these models.

    Out of fold, pass one fold's models only: every fold's maxima together include that fold's held-out labels.
    """
    return np.max([p.stats["max"] for p in predictors], axis=0)
