"""Model-major streaming, the deadline (fake clock) and the 2-process split of the ensemble (issue 18)."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import infer
import src.deadline
from bench import common
from bench.stream import predict_image_major
from kernels import build, plan
from kernels import kernel_template as kt
from src.config import InferConfig
from src.data import load_test
from src.deadline import Deadline
from src.devices import resolve_devices
from src.errors import BiomassError
from src.flops import T4_FP16_FLOPS, image_flops, tile_flops
from src.inference import ModelRef, Predictor, deadline_order, predict_ensemble
from src.parallel import predict_parallel

pytestmark = pytest.mark.usefixtures("one_thread")
# build order of the kernel: one fold of every grid first, then the rest
LAYOUT = [((2, 2), 0), ((1, 2), 0), ((2, 2), 1), ((1, 2), 1)]
SECONDS_PER_TILE = 2.5  # fake seconds per tile per batch: a 2x2 model's batch takes 10 s, a 1x2 one 5 s


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[Path]:
    """Four random-init tiny checkpoints (2 grids x 2 folds) in the build order: no training needed."""
    root = tmp_path_factory.mktemp("stream_exp") / "exp"
    out = []
    for grid, fold in LAYOUT:
        cfg = common.make_config("tiny_quick", grid=grid)
        out.append(common.save_random_checkpoint(cfg, root / f"grid{grid[0]}x{grid[1]}/fold{fold}/best.pt", fold))
    return out


@pytest.fixture(scope="module")
def images(synthetic_dir) -> pd.DataFrame:
    return load_test(synthetic_dir)


def test_streaming_equals_image_major_with_one_model_resident(paths, images, monkeypatch):
    # the reference averages by hand (not with the ensemble code under test): each model alone, then the nested
    # mean written out: folds equal within a grid, the two grids equal -> 1/4 each here
    single = [predict_image_major([Predictor(p, "cpu", "full")], images, batch_size=4).per_view for p in paths]
    reference = predict_image_major([Predictor(p, "cpu", "full") for p in paths], images, batch_size=4)
    np.testing.assert_allclose(reference.per_view, np.mean(single, axis=0), rtol=1e-6, atol=1e-5)
    # an unbalanced ensemble (2x2 folds 0 and 1, 1x2 fold 0): 1/4, 1/4, 1/2, not a flat third each
    uneven = predict_ensemble([ModelRef(paths[m], "cpu", "full") for m in (0, 2, 1)], images, show=False).per_view
    np.testing.assert_allclose(uneven, 0.25 * single[0] + 0.25 * single[2] + 0.5 * single[1], rtol=1e-6, atol=1e-5)
    assert not np.allclose(uneven, (single[0] + single[1] + single[2]) / 3, rtol=1e-6, atol=1e-5)
    alive: list[weakref.ref] = []
    most = []
    real_open = ModelRef.open

    def counting_open(self):
        gc.collect()
        most.append(sum(r() is not None for r in alive))  # predictors still alive when the next one loads
        predictor = real_open(self)
        alive.append(weakref.ref(predictor))
        return predictor

    monkeypatch.setattr(ModelRef, "open", counting_open)
    for views in ("cache", "redecode"):
        members = [ModelRef(p, "cpu", "full") for p in paths]
        got = predict_ensemble(members, images, batch_size=4, show=False, views=views)
        np.testing.assert_allclose(got.per_view, reference.per_view, rtol=0, atol=1e-6)
        assert got.ok.all() and (got.models_used == 4).all() and got.members_ran == 4 and not got.skipped
    assert len(most) == 8 and max(most) == 0  # the previous checkpoint was gone before the next one loaded


class FakeClock:
    """Time that moves only when a model predicts: SECONDS_PER_TILE per tile of each batch (and per `tick`)."""

    def __init__(self, monkeypatch) -> None:
        self.t = 0.0
        monkeypatch.setattr(src.deadline, "clock", lambda: self.t)
        monkeypatch.setattr(src.deadline, "PROCESS_START", 0.0)
        real = Predictor.predict_views

        def timed(predictor, left, right):
            self.t += SECONDS_PER_TILE * predictor.grid[0] * predictor.grid[1]
            return real(predictor, left, right)

        monkeypatch.setattr(Predictor, "predict_views", timed)


def alone(paths, images, keep: list[int]) -> np.ndarray:
    """The ensemble of the members `keep` only (no deadline): what a cut ensemble must equal."""
    return predict_ensemble([ModelRef(paths[m], "cpu", "full") for m in keep], images, show=False).per_view


@pytest.mark.parametrize(
    ("seconds", "kept"),
    [(12, [0]), (18, [0, 1]), (0.5, [0])],  # time for the first model only; mid-way; less than the first
)
def test_the_deadline_skips_the_models_projected_past_it(paths, images, monkeypatch, seconds, kept):
    clock = FakeClock(monkeypatch)
    members = [ModelRef(p, "cpu", "full") for p in paths]
    updates = []
    got = predict_ensemble(
        members, images, batch_size=8, show=False, deadline=Deadline(seconds / 60), on_update=updates.append
    )
    assert got.members_ran == len(kept) and got.skipped == [str(paths[m]) for m in range(4) if m not in kept]
    assert [u.members_ran for u in updates] == list(range(1, len(kept) + 1))  # a submission after each model
    assert clock.t == sum(10 if LAYOUT[m][0] == (2, 2) else 5 for m in kept)  # nothing ran past its projection
    np.testing.assert_allclose(got.per_view, alone(paths, images, kept), atol=1e-6)


def run_infer(synthetic_dir, paths, out: Path, *flags: str) -> pd.DataFrame:
    args = ["--data-dir", str(synthetic_dir), "--checkpoints", *map(str, paths), "--out", str(out / "sub.csv")]
    assert infer.main([*args, "--tta", "full", "--on-bad-image", "fallback", *flags]) == 0
    return pd.read_csv(out / "sub.csv")


def test_infer_deadline_writes_a_complete_submission_of_the_models_that_fit(
    synthetic_dir, paths, tmp_path, monkeypatch
):
    plain = run_infer(synthetic_dir, paths[:2], tmp_path / "two", "--device", "cpu")
    FakeClock(monkeypatch)
    cut = run_infer(synthetic_dir, paths, tmp_path / "cut", "--device", "cpu", "--deadline", str(18 / 60))
    pd.testing.assert_frame_equal(cut, plain, rtol=1e-6)
    assert cut["target"].notna().all() and len(cut) == 5 * len(load_test(synthetic_dir))


def test_the_deadline_stops_the_fine_tune_and_keeps_the_plain_ensemble(
    synthetic_dir, paths, tmp_path, monkeypatch, caplog
):
    plain = run_infer(synthetic_dir, paths, tmp_path / "plain", "--device", "cpu")
    clock = FakeClock(monkeypatch)
    steps = []
    real_forward = torch.nn.Module.__call__
    from src.model import BiomassModel

    def training_forward(self, *args, **kwargs):  # each fine-tune step costs 5 fake seconds
        if isinstance(self, BiomassModel):
            steps.append(clock.t)
            clock.t += 5
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", training_forward)
    # the ensemble takes 30 s; the fine-tune may start (reserve: 15 s re-predict + 60 s); its clock check sees 35,
    # 40, 45 (75 s left: goes on) and 50 (70 s left < 75: stops), so epoch 0 (3 steps of 16) ran, epoch 1 is cut
    flags = ("--device", "cpu", "--deadline", str(120 / 60), "--pseudo-label-epochs", "2")
    adapted = run_infer(synthetic_dir, paths, tmp_path / "adapted", *flags)
    assert "pseudo-label fine-tune stopped by the deadline" in caplog.text
    assert steps == [30, 35, 40, 45]  # 3 steps ran, the 4th was stopped by the clock check
    pd.testing.assert_frame_equal(adapted, plain, rtol=1e-6)


def test_two_cpu_worker_processes_equal_one_device(synthetic_dir, paths, images, tmp_path):
    one = predict_ensemble([ModelRef(p, "cpu", "full") for p in paths], images, show=False)
    two = predict_parallel(paths, [torch.device("cpu")] * 2, images, "full", split="models", threads=1)
    np.testing.assert_allclose(two.per_view, one.per_view, atol=1e-6)
    assert two.members_ran == 4 and two.ok.all()  # (split by images: bench/stream.py compares it too)


def test_worker_log_records_reach_the_parents_log(paths, images, caplog):
    """issue 25 item 7: a worker's warnings (here: every member skipped by a deadline already passed) are logged by
    the parent (so infer.log has them), prefixed with the worker; nothing ran, so no image has a prediction."""
    got = predict_parallel(paths[:2], [torch.device("cpu")] * 2, images, "none", on_bad_image="fallback",
                           deadline=Deadline(1e-9), threads=1)  # fmt: skip
    assert got.members_ran == 0 and not got.ok.any()
    lines = [r.getMessage() for r in caplog.records if "skipped, it would cross the deadline" in r.getMessage()]
    assert len(lines) == 2 and all(re.match(r"worker [01] \(cpu\): ", line) for line in lines), lines


def test_deadline_order_takes_one_fold_of_every_grid_first(paths):
    members = [ModelRef(p, "cpu", "none") for p in sorted(paths)]  # find_checkpoints order: grid by grid
    order = [members[i] for i in deadline_order(members)]
    assert [(m.grid, m.fold) for m in order] == [((1, 2), 0), ((2, 2), 0), ((1, 2), 1), ((2, 2), 1)]


def test_device_lists(monkeypatch):
    assert resolve_devices("cpu,cpu") == [torch.device("cpu")] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_devices("auto") == [torch.device("cpu")]
    with pytest.raises(BiomassError, match="--device gpu,cpu: must be"):
        InferConfig.from_dict({"device": "gpu,cpu"}, "command line")


def test_the_kernel_runs_every_usable_gpu_and_passes_the_minutes_left(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    lines, device = kt.check_devices(probe=lambda d: None)
    assert device == "cuda:0,cuda:1" and lines[1].endswith("usable; runs the ensemble (a worker each)")
    monkeypatch.setattr(kt, "BUILD", {"infer": {"device": "auto", "deadline": 495.0}, "experiments": ["e"]})
    monkeypatch.setattr(kt, "KERNEL_START", kt.time.time() - 30 * 60)  # the kernel spent 30 min before infer.py
    config = kt.infer_config(tmp_path, tmp_path, tmp_path, device)
    assert config["device"] == "cuda:0,cuda:1" and 464.9 <= config["deadline"] <= 465.0


def test_the_plan_is_flops_times_images_over_the_stated_rate(paths, capsys):
    cfg = common.make_config("tiny_quick", grid=(2, 2)).model
    tile = tile_flops(cfg)
    assert image_flops(cfg, "full") == 4 * 2 * 3 * tile and image_flops(cfg, "none") == 4 * 2 * tile
    p = plan.project([cfg] * 5, "flip", images=1000)
    assert p.seconds == pytest.approx(5 * 24 * tile * 1000 / (T4_FP16_FLOPS * 2))
    assert (
        build.main(["--checkpoints", str(paths[0].parents[2]), "--plan", "--tta", "none", "--time-budget", "1e-9"]) == 0
    )
    out = capsys.readouterr().out
    assert "plan: 4 checkpoint(s), TTA none, 1000 hidden-test images" in out and "warning: over the deadline" in out


def test_the_kaggle_md_plan_table_is_what_kernels_plan_prints():
    """docs/KAGGLE.md's projected-time table is `python kernels/plan.py`'s output: a change to the planner or the
    FLOP count that is not copied into the doc fails here instead of leaving a stale figure."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "KAGGLE.md").read_text()
    assert plan.reference_table() in doc, "rerun `python kernels/plan.py` and paste its table into docs/KAGGLE.md"
