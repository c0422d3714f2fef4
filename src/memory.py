"""Training memory of a recipe: bytes measured per block on the CPU, projected per step, and fitted to a card.

Why measured: an assumed 34 bytes per token x width per block under-counted what autocast really keeps for
backward (the fp32 residual stream, fp32 LayerNorm outputs, bf16 copies of every matmul input), and an
under-count means an out-of-memory at the first finetune step, after the feature cache and the frozen epochs.

`measure_block_bytes` runs a real bf16-autocast forward + backward of a few random-init blocks at a recipe's
width and token count on the CPU and counts the bytes kept for backward: with `torch.autograd.graph
.saved_tensors_hooks` (every tensor autograd saves, deduplicated by storage), and under grad checkpointing the
input each checkpointed block keeps (timm's non-reentrant checkpoint keeps its arguments, saves nothing inside).
`python -m src.memory` writes the constants to docs/memory_constants.csv; `projected_peak_bytes` (the issue-29
GPU check calls it against CUDA peak memory) and `fit_to_memory` read them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
from pathlib import Path

import pandas as pd
import torch

from src.backbone import create_backbone
from src.config import Config, ModelConfig
from src.errors import BiomassError, run_cli
from src.flops import N_VIEWS, tile_size_of
from src.io_utils import write_csv_atomic

CONSTANTS = Path(__file__).resolve().parents[1] / "docs" / "memory_constants.csv"
# what the measured constants are measured at: every backbone x tile of configs/*.yaml (python -m src.memory)
MEASURED = [
    ("vit_base_patch14_reg4_dinov2", 504),  # seed 2x2, gpu-smoke
    ("vit_base_patch14_reg4_dinov2", 336),  # seed 3x3
    ("vit_large_patch16_dinov3", 768),  # top
    ("vit_huge_plus_patch16_dinov3", 768),  # top-h
]
OVERHEAD_BYTES = 1.0e9  # assumed: CUDA context (~0.4-0.6 GB), cuBLAS workspace, fusion/heads, allocator slack
MARGIN = 0.10  # the fit keeps the projected peak under (1 - MARGIN) x the card: the projection is not exact


@dataclasses.dataclass(frozen=True)
class BlockBytes:
    """Bytes one trainable block keeps for backward: per token x width per sequence, plus a per-block constant."""

    per_token_width: float  # without grad checkpointing: every saved activation
    per_token_width_ckpt: float  # with grad checkpointing: the block input kept for the recompute
    per_block: float  # independent of the batch (bf16 copies of the weights that autocast saves)


# ---- measurement -------------------------------------------------------------------------------------------------
def _block_saved_bytes(net: torch.nn.Module, tile: int, ckpt: bool, backward: bool) -> tuple[int, int]:
    """(activation bytes, weight-copy bytes) that the first block of `net` keeps for backward, one tile, bf16 autocast.

    Counted while the block runs: every tensor autograd saves (one count per storage); a 2-D bf16 tensor shaped
    like one of the block's parameters (or its transpose) is autocast's weight copy (independent of the batch).
    With grad checkpointing nothing inside is saved; the block keeps its input until the recompute.
    """
    block = net.blocks[0]
    shapes = {shape for p in block.parameters() for shape in (tuple(p.shape), tuple(p.shape)[::-1])}  # W or W^T
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, tuple[int, bool]] = {}
    inside = {"on": False, "forward": True}

    def remember(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in params:
            return  # fp32 parameters exist anyway
        weight = tensor.dim() <= 2 and tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in shapes
        seen[storage.data_ptr()] = (storage.nbytes(), weight)

    def pack(tensor: torch.Tensor):
        if inside["on"]:
            remember(tensor)
        return tensor

    def enter(_module, args):
        inside["on"] = inside["forward"]
        if ckpt and inside["forward"] and torch.is_grad_enabled():
            remember(args[0])  # the checkpointed block's argument, kept until its recompute

    def leave(_module, _args, _out):
        inside["on"] = False

    hooks = [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net.forward_features(torch.randn(1, 3, tile, tile))
        inside["forward"] = False
        if backward:  # the saved set is fixed by the forward; the backward only shows it is a real training step
            out.float().sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    activations = sum(n for n, weight in seen.values() if not weight)
    return activations, sum(n for n, weight in seen.values() if weight)


def measure_block_bytes(backbone: str, tile: int, kwargs: dict | None = None, backward: bool = False) -> dict:
    """Measure what one block of a backbone keeps for backward at a tile size (one block, one tile, real width and
    token count, so attention's share is the real one), without and with grad checkpointing."""
    counts = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = create_backbone(backbone, tile, grad_checkpointing=ckpt, **{**(kwargs or {}), "depth": 1}).train()
        counts[ckpt] = _block_saved_bytes(net, tile, ckpt, backward)
    width = int(net.embed_dim)
    tokens = (tile // _patch(net)) ** 2 + int(net.num_prefix_tokens)
    return {
        "backbone": backbone,
        "tile": tile,
        "tokens": tokens,
        "width": width,
        "per_token_width": round(counts[False][0] / (tokens * width), 2),
        "per_token_width_ckpt": round(counts[True][0] / (tokens * width), 2),
        "per_block_mb": round(counts[False][1] / 1e6, 2),
        "block_params": sum(p.numel() for p in net.blocks[0].parameters()),
    }


def _patch(net: torch.nn.Module) -> int:
    size = net.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ---- projection --------------------------------------------------------------------------------------------------
def _base(name: str) -> str:
    return name.split(".", 1)[0]


@functools.lru_cache(maxsize=4)
def _constants(path: str) -> pd.DataFrame:
    if not Path(path).is_file():
        raise BiomassError(f"{path}: memory constants not found; run python -m src.memory to measure them")
    return pd.read_csv(path)


def block_bytes(backbone: str, path: Path | None = None) -> BlockBytes:
    """The measured constants of a backbone (its largest over the measured tiles); an unmeasured one gets the
    largest of all rows (conservative), its per-block constant scaled from bf16 weight copies (2 bytes/param)."""
    table = _constants(str(path or CONSTANTS))
    rows = table[table["backbone"] == _base(backbone)]
    if len(rows):
        return BlockBytes(
            float(rows["per_token_width"].max()),
            float(rows["per_token_width_ckpt"].max()),
            float(rows["per_block_mb"].max()) * 1e6,
        )
    return BlockBytes(float(table["per_token_width"].max()), float(table["per_token_width_ckpt"].max()), -1.0)


@functools.lru_cache(maxsize=64)
def _shape(backbone: str, tile: int, kwargs_json: str) -> dict:
    with torch.device("meta"):
        net = create_backbone(backbone, tile, **json.loads(kwargs_json))
    return {
        "depth": len(net.blocks),
        "width": int(net.embed_dim),
        "tokens": (tile // _patch(net)) ** 2 + int(net.num_prefix_tokens),
        "params": sum(p.numel() for p in net.parameters()),
        "block_params": sum(p.numel() for p in net.blocks[0].parameters()),
    }


def backbone_shape(cfg: ModelConfig, tile: int | None = None) -> dict:
    """Depth, width, tokens per tile and parameter counts of cfg's backbone at its tile (meta device: no memory)."""
    tile = tile or tile_size_of(cfg)
    return dict(_shape(cfg.backbone, tile, json.dumps(cfg.backbone_kwargs, sort_keys=True)), tile=tile)


def projected_peak_bytes(
    cfg: Config,
    batch_size: int | None = None,
    grad_checkpointing: bool | None = None,
    tile: int | None = None,
    grid: tuple[int, int] | None = None,
) -> dict:
    """Projected peak GPU bytes of one finetune step of cfg (or of the given batch / checkpointing / tile / grid).

    fp32 weights (x2 with EMA) + fp32 grads and AdamW moments of the trainable part + the saved activations of
    every trainable block (measured bytes x tokens x width x sequences, + the per-block constant), with grad
    checkpointing the kept block inputs + one block recomputed; + one block's worth of backward workspace;
    + OVERHEAD_BYTES. Sequences per step = batch x 2 views x tiles. Returns the parts and "total".
    """
    mc, tc = cfg.model, cfg.train
    grid = tuple(grid or mc.grid)
    batch = batch_size or tc.batch_size
    ckpt = mc.grad_checkpointing if grad_checkpointing is None else grad_checkpointing
    shape = backbone_shape(mc if grid == tuple(mc.grid) else dataclasses.replace(mc, grid=list(grid)), tile)
    const = block_bytes(mc.backbone)
    depth = shape["depth"]
    trainable_blocks = depth - min(tc.freeze_blocks, depth)
    trainable = trainable_blocks * shape["block_params"]
    ema = tc.ema_decay > 0 or tc.ema_half_life > 0
    seqs = batch * N_VIEWS * grid[0] * grid[1]
    unit = shape["tokens"] * shape["width"] * seqs
    per_block_const = const.per_block if const.per_block >= 0 else 2.0 * shape["block_params"]
    full_block = const.per_token_width * unit + per_block_const
    if ckpt:
        activations = trainable_blocks * (const.per_token_width_ckpt * unit) + full_block
    else:
        activations = trainable_blocks * full_block
    parts = {
        "weights": 4.0 * shape["params"] * (2 if ema else 1),
        "grads_optimizer": 12.0 * trainable,
        "activations": activations,
        "workspace": const.per_token_width * unit if trainable_blocks else 0.0,
        "overhead": OVERHEAD_BYTES,
    }
    parts["total"] = sum(parts.values())
    return {**parts, "sequences": seqs, "tokens": shape["tokens"], "width": shape["width"], "depth": depth}


# ---- the fit -----------------------------------------------------------------------------------------------------
def device_memory_bytes(device: torch.device | None = None) -> float | None:
    """Total memory of the CUDA device training will use (None without one: nothing to fit)."""
    if not torch.cuda.is_available():
        return None
    device = device or torch.device("cuda", torch.cuda.current_device())
    return float(torch.cuda.get_device_properties(device).total_memory)


def parse_fit_memory(value: str) -> float | None:
    """'auto' -> the detected card's bytes (None without a GPU); 'off' or '' -> None; '16' -> 16e9 bytes."""
    text = str(value).strip().lower()
    if text in ("", "off", "none"):
        return None
    if text == "auto":
        return device_memory_bytes()
    try:
        gb = float(text)
    except ValueError:
        raise BiomassError(f"--fit-memory {value!r}: use a size in GB (e.g. 16), auto or off") from None
    if gb <= 0:
        raise BiomassError(f"--fit-memory {value!r}: must be positive GB, auto or off")
    return gb * 1e9


def _global(tc) -> int:
    return tc.global_batch if tc.global_batch > 0 else tc.batch_size * max(1, tc.accum)


def fit_to_memory(cfg: Config, budget: float, world: int = 1) -> tuple[Config, str]:
    """The config with grad checkpointing, batch and accumulation chosen so the projected peak stays under
    (1 - MARGIN) x budget bytes, keeping the images per optimizer step; and a line saying what was chosen.

    The recipe's own setting is kept when it fits. Otherwise, in order of speed: no checkpointing at the largest
    batch that fits, then checkpointing at the largest; a batch divides the global batch per process, and
    is at least 2 when mixup is on (mixup pairs images within a batch).
    """
    tc, limit = cfg.train, (1 - MARGIN) * budget
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    now = projected_peak_bytes(cfg)["total"]
    if now <= limit:
        return cfg, f"fit-memory: the recipe fits ({gb(now)} projected <= {gb(limit)} = 90% of {gb(budget)}): kept"
    per_process = _global(tc) // world if _global(tc) % world == 0 else tc.batch_size
    smallest = 2 if tc.mixup_prob > 0 else 1
    batches = [b for b in range(per_process, 0, -1) if per_process % b == 0 and b >= min(smallest, per_process)]
    for ckpt in (False, True):
        for batch in batches:
            total = projected_peak_bytes(cfg, batch_size=batch, grad_checkpointing=ckpt)["total"]
            if total <= limit:
                out = copy.deepcopy(cfg)
                out.model.grad_checkpointing = ckpt
                out.train.batch_size = batch
                if tc.global_batch > 0:
                    out.train.accum = 1
                else:
                    out.train.accum = _global(tc) // (batch * world) if _global(tc) % (batch * world) == 0 else 1
                    out.train.global_batch = 0 if out.train.accum * batch * world == _global(tc) else _global(tc)
                accum = out.train.global_batch // (batch * world) if out.train.global_batch > 0 else out.train.accum
                return out, (
                    f"fit-memory: {gb(now)} projected > {gb(limit)} (90% of {gb(budget)}): grad checkpointing "
                    f"{'on' if ckpt else 'off'}, batch {batch} x accumulation {accum} x {world} process(es) = "
                    f"{batch * accum * world} images per step as before; {gb(total)} projected"
                )
    least = projected_peak_bytes(cfg, batch_size=batches[-1], grad_checkpointing=True)["total"]
    raise BiomassError(
        f"--fit-memory: even grad checkpointing at batch {batches[-1]} projects {gb(least)} > {gb(limit)}; use a "
        "GPU with more memory, more --freeze-blocks, a smaller --tile-size or grid"
    )


def apply_fit_memory(cfg: Config, world: int = 1, device: torch.device | None = None) -> tuple[Config, str | None]:
    """train.py's --fit-memory: the config fitted to the card (GB given, or auto: the CUDA device); None = no note.

    auto without a CUDA device fits nothing (a CPU run has no card to overflow).
    """
    value = str(cfg.train.fit_memory).strip().lower()
    if value in ("", "off", "none"):
        return cfg, None
    if value == "auto":
        if device is None or device.type != "cuda":
            return cfg, None
        budget = device_memory_bytes(device)
    else:
        budget = parse_fit_memory(value)
    if budget is None:
        return cfg, None
    return fit_to_memory(cfg, budget, world)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(CONSTANTS), help="where the measured constants go (csv)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for backbone, tile in MEASURED:
        row = measure_block_bytes(backbone, tile)
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_csv_atomic(pd.DataFrame(rows), Path(args.out), index=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
