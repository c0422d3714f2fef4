"""Device, precision, seeding and torch.distributed set-up shared by training and inference."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from src.errors import BiomassError


def resolve_device(name: str) -> torch.device:
    """cpu | cuda | auto (cuda when available); asking for a missing GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BiomassError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise BiomassError(f"unknown --device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CPU autocast (AVX-512 bf16 here), Ampere and later GPUs; T4/P100/V100 only emulate it."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of training and inference: bf16 where native (CPU: never fp16), else fp16 (with a scaler)."""
    return torch.bfloat16 if native_bf16(device) else torch.float16


def autocast(device: torch.device, enabled: bool | None, training: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (3.4x on AVX-512 bf16, never fp16 there) and on bf16-native GPUs; fp16 on T4/P100/V100.

    Training on fp16 needs loss scaling: `training.fit` pairs it with `make_scaler` (`training` is kept for callers).
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(device))


def resolve_amp(amp: bool | None, device: torch.device) -> bool:
    """--amp unset: on for CUDA (bf16 or fp16 + scaler), off on CPU (fp32 reference runs)."""
    return device.type == "cuda" if amp is None else bool(amp)


def make_scaler(device: torch.device, amp: bool, init_scale: float = 2.0**16) -> torch.amp.GradScaler:
    """A GradScaler that is on only for fp16 autocast: an overflowing step is skipped and the scale halved."""
    enabled = bool(amp) and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=enabled)


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere+): fp32 runs several times faster at 10-bit mantissa inputs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU runs are then reproducible)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_init(worker_id: int) -> None:
    """DataLoader workers get distinct, reproducible seeds, albumentations' own RNG included."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    dataset = torch.utils.data.get_worker_info().dataset
    if hasattr(dataset, "set_random_seed"):  # ViewPairDataset: its paired and full-image transforms
        dataset.set_random_seed(seed)


@dataclass
class DistInfo:
    """This process's place in a torchrun job (world 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's object, in rank order (a one-item list when not distributed)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def all_ranks_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True only when `flag` holds on every rank (one all-reduce): ranks that skip a step must skip it together."""
    if not info.enabled:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed distinct per (seed, epoch, rank): seed * 1000 + epoch on rank 0, a far stream on each other rank."""
    return seed * 1000 + epoch + 1_000_003 * rank
