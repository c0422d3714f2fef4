"""`--device` as a list: `auto` (every usable GPU, else the CPU), `cuda:0,cuda:1`, `cpu,cpu`: one worker each."""

from __future__ import annotations

import torch

from src.errors import BiomassError
from src.runtime import resolve_device


def gpu_usable(index: int) -> bool:
    """One small computation on GPU `index`: a GPU whose kernels are missing fails here, not mid-ensemble."""
    try:
        return float((torch.arange(8.0, device=f"cuda:{index}") * 2).sum().item()) == 56.0
    except Exception:  # noqa: BLE001 - any failure means: not usable
        return False


def resolve_devices(spec: str) -> list[torch.device]:
    """The devices one worker process each runs on (a single one: the ensemble runs in this process)."""
    if spec == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = [torch.device(f"cuda:{i}") for i in range(count) if gpu_usable(i)]
        return gpus or [torch.device("cpu")]
    names = [name.strip() for name in spec.split(",")]
    if not all(names):
        raise BiomassError(f"--device {spec!r}: an empty item; write e.g. cuda:0,cuda:1")
    return [resolve_device(name) for name in names]
