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


def autocast(device: torch.device, enabled: bool, training: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU (3.4x on AVX-512 bf16, never fp16 there); on CUDA bf16 where the tensor cores have it.

    Pre-Ampere GPUs (T4, P100) "support" bf16 only by slow emulation: inference takes fp16 there. Training keeps
    bf16 (emulated if need be) because fp16 gradients would need loss scaling, which the loop does not do.
    """
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        dtype = torch.bfloat16 if native or (training and torch.cuda.is_bf16_supported()) else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", dtype=torch.bfloat16)


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
