"""Issue 29: every CUDA-only path run once on a real GPU (`pytest -m gpu`; `make gpu-check` runs these first).

Skipped, with the reason, where no CUDA device is visible (tests/conftest.py), so CI on the CPU stays green. On a GPU
they run tiny random-init models on the session's synthetic data and real-shaped (random-weight) ViT backbones:
a fold in bf16 and in fp16 with a GradScaler (fp16 forced, as on a T4) with an overflow step and a resume; EMA and
the stage switch; NCCL (DDP) and train.py under torchrun, one process per GPU; infer.py on `cuda` and on two workers
sharing one GPU against the CPU result; the kernel's device check and test operation; an OOM forced with a memory cap;
the deadline with model-major streaming and `torch.cuda.empty_cache`.

Tolerances (stated once, used below): CUDA fp32 vs CPU fp32 within FP32_RTOL and FP32_ATOL_G (TF32 matmuls
stay off at inference, but cuDNN's convolutions may use TF32: `torch.backends.cudnn.allow_tf32` defaults to True);
one worker vs two on the same GPU within WORKERS_ATOL_G; CUDA bf16 autocast vs CPU fp32 within BF16_RTOL and
BF16_ATOL_G (bf16 keeps 8 mantissa bits in the backbone; the heads run in fp32); two runs of a CUDA training loop
are not bit-identical (atomics in the backward pass), so a resumed fold is held to the uninterrupted one within
RESUME_ATOL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from conftest import TINY_FLAGS, run_script
from test_gpu_robust import feature_batch, head_model, head_optimizer, tiny_cfg, weights
from test_training import EVEN_FOLD, split, tiny_config

import src.deadline
from bench.common import make_config, save_random_checkpoint
from kernels import kernel_template
from src import runtime, training
from src.data import load_test
from src.deadline import Deadline
from src.devices import gpu_usable, resolve_devices
from src.inference import ModelRef, Predictor, predict_ensemble
from src.model import build_model
from src.runtime import DistInfo, all_gather_objects, all_ranks_true, make_scaler
from src.training import fit, train_one_epoch

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
FP32_RTOL, FP32_ATOL_G = 2e-3, 2e-2  # cuDNN convolutions (the patch embedding) may use TF32 by default on Ampere+
WORKERS_ATOL_G = 1e-4  # one worker vs two on the same GPU: the same kernels, only the summation order of the mean
BF16_RTOL, BF16_ATOL_G = 0.05, 0.5
RESUME_ATOL = 1e-2


@pytest.fixture
def fp16_forced(monkeypatch):
    """The T4 path on a bf16 GPU: `amp_dtype` sees no native bf16, so autocast is fp16 and the GradScaler is on."""
    monkeypatch.setattr(runtime, "native_bf16", lambda device: device.type != "cuda")
    assert runtime.amp_dtype(CUDA) == torch.float16 and make_scaler(CUDA, True).is_enabled()


def cuda_config(synthetic_dir: Path, folds_csv: Path, *extra: str):
    cfg = tiny_config(synthetic_dir, folds_csv, "--device", "cuda", "--amp", *extra)
    assert cfg.train.amp is True and cfg.train.device == "cuda"
    return cfg


def _finite_history(history: list[dict]) -> None:
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["weighted_r2"]) for row in history)


# ---- training: bf16, fp16 + GradScaler (overflow, resume), EMA and the stage switch ----------------------------
def test_a_fold_trains_in_bf16_on_cuda(synthetic_dir: Path, folds_csv: Path, tmp_path: Path):
    cfg = cuda_config(synthetic_dir, folds_csv)
    train, val = split(synthetic_dir, folds_csv)
    assert training.precision_note(CUDA, True) == "bf16 autocast"
    result = fit(cfg, train, val, tmp_path, CUDA, fold=EVEN_FOLD)
    assert len(result.history) == cfg.train.epochs
    _finite_history(result.history)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "scaler" not in last  # bf16 needs no loss scaling
    assert next(result.model.parameters()).device.type == "cuda"
    # best.pt reloaded on the GPU, fp32: its validation predictions are finite grams
    predictor = Predictor(tmp_path / "best.pt", CUDA, tta="none")
    views = torch.randint(0, 256, (2, 3, *predictor.view_size), dtype=torch.uint8)
    values = predictor.predict_views(views, views)
    assert values.shape == (2, 1, 5) and np.isfinite(values).all() and (values >= 0).all()


@pytest.fixture(scope="module")
def fp16_uninterrupted(synthetic_dir: Path, folds_csv: Path, tmp_path_factory) -> Path:
    """Three epochs (frozen, finetune, finetune) in fp16 + GradScaler on the GPU, in one go."""
    patch = pytest.MonkeyPatch()
    patch.setattr(runtime, "native_bf16", lambda device: device.type != "cuda")
    try:
        cfg = cuda_config(synthetic_dir, folds_csv, "--epochs", "3")
        train, val = split(synthetic_dir, folds_csv)
        run_dir = tmp_path_factory.mktemp("fp16")
        fit(cfg, train, val, run_dir, CUDA, fold=EVEN_FOLD)
    finally:
        patch.undo()
    return run_dir


def test_a_fold_trains_in_fp16_with_a_grad_scaler_and_resumes(
    fp16_uninterrupted: Path, synthetic_dir: Path, folds_csv: Path, tmp_path: Path, monkeypatch, fp16_forced
):
    """Crash before epoch 2, --resume: the GradScaler's state comes back from last.pt; the run ends like the whole."""
    last = torch.load(fp16_uninterrupted / "last.pt", weights_only=True)
    assert last["scaler"]["scale"] > 0 and "fp16" in training.precision_note(CUDA, True)
    cfg = cuda_config(synthetic_dir, folds_csv, "--epochs", "3")
    train, val = split(synthetic_dir, folds_csv)
    real, calls = training.train_one_epoch, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg, train, val, tmp_path, CUDA, fold=EVEN_FOLD)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["state"]["epoch"] == 1 and saved["scaler"]["scale"] > 0
    monkeypatch.setattr(training, "train_one_epoch", real)
    scalers = []
    real_make = training.make_scaler
    monkeypatch.setattr(training, "make_scaler", lambda *a, **k: scalers.append(real_make(*a, **k)) or scalers[-1])
    loaded = []
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", _spy(torch.amp.GradScaler.load_state_dict, loaded))
    result = fit(cfg, train, val, tmp_path, CUDA, resume=True, fold=EVEN_FOLD)
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    assert scalers[0].is_enabled() and loaded and loaded[0]["scale"] == saved["scaler"]["scale"]
    _finite_history(result.history)
    ours = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    ref = last["model"]
    worst = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst <= RESUME_ATOL, f"resumed fp16 fold differs from the uninterrupted one by {worst:.2e}"


def _spy(method, seen: list):
    def wrapper(self, state):
        seen.append(dict(state))
        return method(self, state)

    return wrapper


def test_an_overflowing_fp16_step_is_skipped_on_cuda(fp16_forced):
    cfg = tiny_cfg()
    cfg.train.amp = True
    model = head_model(cfg).to(CUDA)
    batch = feature_batch(model, 1)
    start = weights(model)
    huge = make_scaler(CUDA, True, init_scale=2.0**127)  # the scaled loss overflows: the step must be skipped
    optimizer, scheduler = head_optimizer(cfg, model)
    stats = train_one_epoch(model, [batch], optimizer, scheduler, cfg, CUDA, True, DistInfo(), 0, scaler=huge)
    assert stats["overflow_steps"] == 1 and stats["bad_steps"] == 0 and huge.get_scale() == 2.0**126
    assert all(torch.equal(weights(model)[k], start[k]) for k in start)
    normal = make_scaler(CUDA, True)
    stats = train_one_epoch(model, [batch, batch], optimizer, scheduler, cfg, CUDA, True, DistInfo(), 1, scaler=normal)
    assert stats["overflow_steps"] == 0 and any(not torch.equal(weights(model)[k], start[k]) for k in start)


@pytest.mark.parametrize("fp16", [False, True], ids=["bf16", "fp16-scaler"])
@pytest.mark.parametrize(
    "backbone,grid,tile,ckpt",
    [("vit_base_patch14_reg4_dinov2", (2, 2), 504, False), ("vit_large_patch16_dinov3", (1, 1), 768, True)],
    ids=["vitb-2x2-504", "vitl-1x1-768-ckpt"],
)
def test_real_shaped_backbone_trains_two_steps(backbone, grid, tile, ckpt, fp16, monkeypatch):
    """Random-weight ViT-B/14 (seed recipe) and ViT-L/16 (top recipe, grad checkpointing): two finite steps."""
    if fp16:
        monkeypatch.setattr(runtime, "native_bf16", lambda device: device.type != "cuda")
    cfg = make_config("vit_b", grid=grid, tile_size=tile, backbone=backbone, grad_checkpointing=ckpt)
    cfg.train.amp, cfg.train.mixup_prob, cfg.train.batch_size = True, 0.0, 2
    torch.manual_seed(0)
    model = build_model(cfg.model, load_backbone_weights=False).to(CUDA)
    model.unfreeze_backbone()
    groups = model.param_groups(cfg.train.lr, cfg.train.backbone_lr, cfg.train.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "left": torch.randint(0, 256, (2, 3, *model.view_size), dtype=torch.uint8, generator=gen),
        "right": torch.randint(0, 256, (2, 3, *model.view_size), dtype=torch.uint8, generator=gen),
        "targets": torch.tensor([[10.0, 5.0, 2.0, 12.0, 17.0], [30.0, 8.0, 0.0, 30.0, 38.0]]),
        "index": torch.arange(2),
        "state": torch.tensor([0, 1]),
        "month": torch.tensor([2, 3]),
        "species": torch.tensor([1, 4]),
    }
    last_block = next(p for p in model.backbone.blocks[-1].parameters() if p.ndim == 2)  # a weight of the top block
    block = last_block.detach().clone()
    scaler = make_scaler(CUDA, True)
    assert scaler.is_enabled() == fp16
    stats = train_one_epoch(model, [batch, batch], optimizer, scheduler, cfg, CUDA, False, DistInfo(), 0, scaler=scaler)
    assert stats["bad_steps"] == 0 and np.isfinite(stats["train_loss"]) and stats["overflow_steps"] < 2
    assert torch.isfinite(last_block).all() and not torch.equal(last_block, block)  # the backbone took a step


def test_ema_and_the_stage_switch_on_cuda(synthetic_dir: Path, folds_csv: Path, tmp_path: Path):
    """2 epochs (frozen, finetune) of 26 images at batch 8 with EMA: head steps 8, backbone 4, EMA steps 8."""
    cfg = cuda_config(synthetic_dir, folds_csv, "--mixup-prob", "0", "--finetune-head-lr", "2e-4", "--ema-decay", "0.9")
    train, val = split(synthetic_dir, folds_csv)
    result = fit(cfg, train, val, tmp_path, CUDA, fold=EVEN_FOLD)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["stage"] == "finetune" and last["ema_steps"] == 8
    groups = {g["name"]: g for g in last["optimizer"]["param_groups"]}
    state = last["optimizer"]["state"]
    steps = {name: {int(state[i]["step"]) for i in g["params"] if i in state} for name, g in groups.items()}
    assert steps["head"] == {8} and steps["backbone"] == {4}
    assert groups["head"]["initial_lr"] == 2e-4
    # what was validated and saved is the EMA copy, on the GPU, and it differs from the raw weights
    assert next(result.model.parameters()).device.type == "cuda"
    averaged = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    raw = last["model"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw if raw[k].is_floating_point())


# ---- DDP: NCCL, torchrun ---------------------------------------------------------------------------------------
class _Forced(DistInfo):
    """A one-rank job that still goes through the collectives (DistInfo.enabled is False at world 1)."""

    @property
    def enabled(self) -> bool:
        return True


def test_nccl_collectives_and_ddp_on_this_gpu(tmp_path: Path):
    """NCCL on one rank: the all-reduce that skips bad steps together, all_gather_object, a DDP step on cuda:0."""
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        info = _Forced(0, 1)
        assert all_ranks_true(True, info, CUDA) is True and all_ranks_true(False, info, CUDA) is False
        assert all_gather_objects({"rank": 0}, info) == [{"rank": 0}]
        cfg = tiny_cfg()
        model = head_model(cfg).to(CUDA)
        ddp = DistributedDataParallel(model, device_ids=[0])
        optimizer, scheduler = head_optimizer(cfg, ddp)
        start = weights(ddp)
        stats = train_one_epoch(ddp, [feature_batch(model, 1)], optimizer, scheduler, cfg, CUDA, True, info, 0)
        assert stats["bad_steps"] == 0 and any(not torch.equal(weights(ddp)[k], start[k]) for k in start)
    finally:
        dist.destroy_process_group()


def test_train_py_under_torchrun_one_process_per_gpu(synthetic_dir: Path, folds_csv: Path, tmp_path: Path):
    gpus = torch.cuda.device_count()
    proc = run_script(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), "train.py",
        "--fold", str(EVEN_FOLD), *TINY_FLAGS, "--data-dir", str(synthetic_dir), "--folds", str(folds_csv),
        "--device", "cuda", "--out-dir", str(tmp_path), "--exp", "ddp", timeout=300,
    )  # fmt: skip
    run_dir = tmp_path / "ddp" / "grid2x2" / f"fold{EVEN_FOLD}"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 2 and np.isfinite(metrics["weighted_r2"]).all(), proc.stdout[-2000:]
    assert (run_dir / "best.pt").is_file() and "bf16 autocast" in (run_dir / "train.log").read_text()


# ---- infer.py on cuda and on two workers sharing one GPU ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_exp(tmp_path_factory) -> Path:
    """Random-init tiny checkpoints, grid 2x2 folds 0 and 1 and grid 1x2 fold 0: inference needs no training."""
    exp = tmp_path_factory.mktemp("tiny") / "exp"
    for grid, fold in (((2, 2), 0), ((2, 2), 1), ((1, 2), 0)):
        cfg = make_config("tiny_quick", grid=grid)
        save_random_checkpoint(cfg, exp / f"grid{grid[0]}x{grid[1]}" / f"fold{fold}" / "best.pt", fold=fold)
    return exp


def _infer(exp: Path, synthetic_dir: Path, out: Path, *flags: str) -> pd.Series:
    run_script(
        "infer.py", "--data-dir", str(synthetic_dir), "--checkpoints", str(exp), "--out", str(out), *flags,
        timeout=300,
    )  # fmt: skip
    return pd.read_csv(out).set_index("sample_id")["target"].sort_index()


def test_infer_py_on_cuda_and_two_workers_on_one_gpu_equal_the_cpu(tiny_exp: Path, synthetic_dir: Path, tmp_path):
    cpu = _infer(tiny_exp, synthetic_dir, tmp_path / "cpu.csv", "--device", "cpu")
    one = _infer(tiny_exp, synthetic_dir, tmp_path / "cuda.csv", "--device", "cuda")
    two = _infer(tiny_exp, synthetic_dir, tmp_path / "two.csv", "--device", "cuda:0,cuda:0")
    amp = _infer(tiny_exp, synthetic_dir, tmp_path / "amp.csv", "--device", "cuda", "--amp")
    assert cpu.index.equals(one.index) and cpu.index.equals(two.index) and len(cpu) > 0
    np.testing.assert_allclose(one, cpu, rtol=FP32_RTOL, atol=FP32_ATOL_G)
    np.testing.assert_allclose(two, cpu, rtol=FP32_RTOL, atol=FP32_ATOL_G)
    np.testing.assert_allclose(two, one, rtol=0, atol=WORKERS_ATOL_G)
    np.testing.assert_allclose(amp, cpu, rtol=BF16_RTOL, atol=BF16_ATOL_G)


# ---- the kernel's device check ---------------------------------------------------------------------------------
def test_the_kernel_device_check_and_test_operation_on_a_real_gpu():
    count = torch.cuda.device_count()
    lines, device = kernel_template.check_devices()
    assert device == ",".join(f"cuda:{i}" for i in range(count))
    assert sum("usable; runs the ensemble" in line for line in lines) == count
    capability = tuple(torch.cuda.get_device_capability(0))
    assert any(kernel_template.arch_runs_on(arch, capability) for arch in torch.cuda.get_arch_list())
    kernel_template._probe("cuda:0")  # the real test operation: 2 * sum(0..7) on the GPU
    assert gpu_usable(0) and resolve_devices("auto") == [torch.device(f"cuda:{i}") for i in range(count)]

    def broken(device: str) -> None:
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    lines, device = kernel_template.check_devices(probe=broken)
    assert device == "cpu" and sum("a test operation failed (RuntimeError: CUDA error" in ln for ln in lines) == count


# ---- OOM under a memory cap ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vits_checkpoints(tmp_path_factory) -> list[Path]:
    """Two random ViT-S/14 checkpoints at grid 2x2, tile 448 (view 896 px), every tile of a batch in one backbone call
    (so memory grows with the batch: about 0.4 GB at 1 image, 2 GB at 6)."""
    root = tmp_path_factory.mktemp("vits")
    cfg = make_config("vit_s", grid=(2, 2), tile_size=448, max_tiles_per_call=4096)
    return [save_random_checkpoint(cfg, root / f"fold{k}" / "best.pt", fold=k) for k in range(2)]


def _peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


class MemoryCap:
    """torch.cuda.set_per_process_memory_fraction for `limit` bytes, lifted on exit (a 16 GB T4 rehearsed)."""

    def __init__(self, limit: int) -> None:
        self.fraction = limit / torch.cuda.get_device_properties(0).total_memory

    def __enter__(self) -> MemoryCap:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(self.fraction, 0)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def oom_setting(vits_checkpoints, synthetic_dir: Path) -> dict:
    """The uncapped predictions, the peaks at batch 1 and 6, and a cap half-way between them."""
    frame = load_test(synthetic_dir)
    predictor = Predictor(vits_checkpoints[0], CUDA, tta="full")
    views = torch.randint(0, 256, (len(frame), 3, *predictor.view_size), dtype=torch.uint8)
    small = _peak(lambda: predictor.predict_views(views[:1], views[:1]))
    big = _peak(lambda: predictor.predict_views(views, views))
    predictor = None  # its weights go before the reference run
    torch.cuda.empty_cache()
    reference = predict_ensemble([ModelRef(vits_checkpoints[0], CUDA)], frame, batch_size=len(frame), show=False)
    assert big > 3 * small, f"batch {len(frame)} peaks at {big / 2**20:.0f} MiB, batch 1 at {small / 2**20:.0f} MiB"
    return {"frame": frame, "small": small, "big": big, "cap": (small + big) // 2, "reference": reference}


def test_a_memory_cap_forces_an_oom_at_full_batch_only(vits_checkpoints, oom_setting):
    predictor = Predictor(vits_checkpoints[0], CUDA, tta="full")
    n = len(oom_setting["frame"])
    views = torch.randint(0, 256, (n, 3, *predictor.view_size), dtype=torch.uint8)
    with MemoryCap(oom_setting["cap"]):
        assert np.isfinite(predictor.predict_views(views[:1], views[:1])).all()
        with pytest.raises(torch.cuda.OutOfMemoryError):
            predictor.predict_views(views, views)


def test_an_oom_retries_at_half_batch_and_keeps_the_model(vits_checkpoints, oom_setting):
    """Under the cap the batch OOMs; the retry at half size (BatchPredictor) gives the uncapped predictions."""
    frame = oom_setting["frame"]
    with MemoryCap(oom_setting["cap"]):
        pred = predict_ensemble(
            [ModelRef(vits_checkpoints[0], CUDA)], frame, batch_size=len(frame), on_bad_image="fallback", show=False
        )
    assert pred.left_out == {} and pred.ok.all(), f"the OOM model was left out: {pred.left_out}"
    np.testing.assert_allclose(pred.per_view, oom_setting["reference"].per_view, rtol=FP32_RTOL, atol=FP32_ATOL_G)


# ---- the deadline with streaming and empty_cache ---------------------------------------------------------------
def test_streaming_frees_each_model_and_the_deadline_cuts_on_cuda(vits_checkpoints, synthetic_dir: Path, monkeypatch):
    frame = load_test(synthetic_dir)
    members = [ModelRef(p, CUDA) for p in vits_checkpoints]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base_alloc, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    seen = []

    def after_member(_pred) -> None:
        seen.append((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))

    full = predict_ensemble(members, frame, batch_size=2, show=False, on_update=after_member)
    assert full.members_ran == 2 and full.ok.all() and len(seen) == 2
    for alloc, reserved in seen:  # no model resident after its pass; empty_cache handed the cached blocks back
        assert alloc - base_alloc < 2**20 and reserved - base_reserved < 2**20 * 64, (alloc, reserved)
    # a clock that stands still until the first member is done, then jumps past the deadline: the second is skipped
    t = {"now": 0.0}
    monkeypatch.setattr(src.deadline, "clock", lambda: t["now"])
    cut = predict_ensemble(
        members, frame, batch_size=2, show=False, deadline=Deadline(1.0, start=0.0),
        on_update=lambda _pred: t.update(now=1000.0),
    )  # fmt: skip
    assert cut.members_ran == 1 and cut.skipped == [str(vits_checkpoints[1])]
    alone = predict_ensemble(members[:1], frame, batch_size=2, show=False)
    np.testing.assert_allclose(cut.per_view, alone.per_view, rtol=0, atol=1e-6)


def test_the_memory_cap_is_lifted_after_the_oom_tests():
    """The next stage of gpu-check measures peaks: no cap may be left behind (a quarter of the card allocates)."""
    torch.cuda.empty_cache()
    big = torch.empty(torch.cuda.get_device_properties(0).total_memory // 4, dtype=torch.uint8, device=CUDA)
    assert big.numel() > 0
    del big
    torch.cuda.empty_cache()
