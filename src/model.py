"""Stereo tile model: backbone on every tile of both views, FiLM between views, attention pooling, heads.

    left view  -> R x C tiles -> backbone -> tile feats -+-> proj + tile pos + view embed -> FiLM(right summary) -+
    right view -> R x C tiles -> backbone -> tile feats -+-> proj + tile pos + view embed -> FiLM(left summary)  -+
                                                        attention pooling over all 2*R*C tokens -> 5 heads (+ aux)

`encode_tiles` and `head_from_features` are the two halves of `forward`, so the frozen stage can cache
tile features and TTA can swap views without running the backbone again.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import nn

from src.backbone import create_backbone, patch_size, resolve_norm
from src.config import HEAD_LAYOUTS, ModelConfig, check_config, weights_file
from src.errors import BiomassError
from src.schema import MONTHS, SPECIES_GROUPS, STATES, TARGETS

AUX_CLASSES = {"state": len(STATES), "month": len(MONTHS), "species": len(SPECIES_GROUPS)}
# regression aux heads (training only): output key -> the ModelConfig weight that adds the head
AUX_REGRESSION = {"ndvi": "aux_ndvi_weight", "height": "aux_height_weight"}
# --heads: which targets (indices into TARGETS) the heads predict; with three, the other two are derived
HEAD_TARGETS = {"five": (0, 1, 2, 3, 4), "green-dead-clover": (0, 1, 2), "clover-gdm-total": (2, 3, 4)}
assert tuple(HEAD_TARGETS) == HEAD_LAYOUTS  # the config's --heads choices are exactly these layouts
NATIVE_VIEW_PX = 1000
# position/view embeddings and special tokens are not decayed (timm's convention); weights otherwise are
NO_DECAY = {
    "pos_embed",
    "tile_pos",
    "view_embed",
    "cls_token",
    "reg_token",
}  # a 2000x1000 image holds two 1000x1000 views


# geometric variants of a view pair: identity, hflip, vflip, both (the same flip on both views); the frozen
# stage caches all four per image, flip TTA uses the first three
FLIP_VARIANTS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))


def flip_views(views: torch.Tensor, hflip: bool, vflip: bool) -> torch.Tensor:
    """Flip a (B, 3, H, W) batch of views."""
    dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
    return views.flip(dims) if dims else views


def default_tile_size(grid: tuple[int, int], patch: int, view_px: int = NATIVE_VIEW_PX) -> int:
    """About the native tile resolution, rounded to the patch: 2x2 -> 504, 3x3 -> 336 for patch 14."""
    native = view_px / math.sqrt(grid[0] * grid[1])
    return max(patch, int(round(native / patch)) * patch)


def tile_views(images: torch.Tensor, grid: tuple[int, int], tile: int) -> torch.Tensor:
    """(B, 3, H, W) views -> (B, R*C, 3, T, T) tiles, row-major; one resize and one reshape, no loops."""
    rows, cols = grid
    batch = images.shape[0]
    if images.shape[-2:] != (rows * tile, cols * tile):
        images = F.interpolate(
            images, size=(rows * tile, cols * tile), mode="bilinear", antialias=True, align_corners=False
        )
    tiles = images.reshape(batch, 3, rows, tile, cols, tile).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(batch, rows * cols, 3, tile, tile)


def probe_patch_size(cfg: ModelConfig) -> int:
    """Patch size of cfg's backbone, read from a weightless copy built on the meta device (instant).

    timm 1.0.19 (Kaggle's image) cannot build a ViT on meta (`.item()` in its drop-path schedule): then a CPU build
    (seconds for a ViT-B). Inference reads the patch and tile size from the checkpoint and reaches this only for
    checkpoints saved before they were stored.
    """
    try:
        with torch.device("meta"):
            return patch_size(create_backbone(cfg.backbone, tile_size=224, **cfg.backbone_kwargs))
    except RuntimeError:
        return patch_size(create_backbone(cfg.backbone, tile_size=224, **cfg.backbone_kwargs))


class FiLM(nn.Module):
    """Per-channel scale and shift of one view's tokens from the other view's summary.

    The last layer starts at zero, so at init gamma = beta = 0 and FiLM is the identity.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2 * dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.net(context).chunk(2, dim=-1)
        return tokens * (1.0 + gamma.unsqueeze(1)) + beta.unsqueeze(1)


class CrossAttention(nn.Module):
    """One view's tokens attend to the other view's tokens (pre-norm, residual).

    The output projection starts at zero, so at init it is the identity, like FiLM.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=4 if dim % 4 == 0 else 1, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(context)
        out, _ = self.attn(self.norm_q(tokens), kv, kv, need_weights=False)
        return tokens + out


class AttentionPool(nn.Module):
    """Learned score per token, softmax over tokens, weighted sum: which tiles matter is learned."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.score(tokens).squeeze(-1).softmax(dim=-1)
        return torch.einsum("bn,bnd->bd", weights, tokens), weights


class Head(nn.Module):
    """One target: MLP with hidden ratio and dropout, one output."""

    def __init__(self, dim: int, hidden_ratio: float, dropout: float, out: int = 1) -> None:
        super().__init__()
        hidden = max(8, int(dim * hidden_ratio))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BiomassModel(nn.Module):
    """Five-target regressor over a stereo pair of views, each cut into a grid of tiles."""

    def __init__(self, cfg: ModelConfig, load_backbone_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = tuple(int(g) for g in cfg.grid)
        tile = cfg.tile_size or default_tile_size(self.grid, probe_patch_size(cfg))
        weights = weights_file(cfg) if load_backbone_weights else None
        self.backbone = create_backbone(
            cfg.backbone,
            tile_size=tile,
            weights=weights,
            grad_checkpointing=cfg.grad_checkpointing,
            **cfg.backbone_kwargs,
        )
        self.patch = patch_size(self.backbone)
        if tile % self.patch:
            raise BiomassError(
                f"tile size {tile} is not a multiple of {cfg.backbone}'s patch size {self.patch}; use e.g. "
                f"{tile // self.patch * self.patch or self.patch}"
            )
        self.tile_size = tile
        mean, std, source = resolve_norm(cfg.backbone, self.backbone, weights, cfg.norm_mean, cfg.norm_std)
        if source == "file":  # recorded in the config (and so in best.pt): inference rebuilds without the file
            cfg.norm_mean, cfg.norm_std = list(mean), list(std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        embed = self.backbone.num_features
        self.feature_dim = embed * (2 if cfg.feature == "cls_mean" else 1)
        dim = cfg.fusion_dim
        n_tiles = self.grid[0] * self.grid[1]
        self.proj = nn.Sequential(nn.LayerNorm(self.feature_dim), nn.Linear(self.feature_dim, dim), nn.GELU())
        self.tile_pos = nn.Parameter(torch.randn(n_tiles, dim) * 0.02)
        self.view_embed = nn.Parameter(torch.randn(2, dim) * 0.02)
        if cfg.fusion == "film":
            self.film_from_right = FiLM(dim)  # right summary modulates left tokens
            self.film_from_left = FiLM(dim)
        elif cfg.fusion == "cross-attn":
            self.cross_from_right = CrossAttention(dim)  # left tokens attend to right tokens
            self.cross_from_left = CrossAttention(dim)
        else:  # concat: each view pooled alone, the two pooled tokens concatenated and projected
            self.fuse = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())
        self.pool = AttentionPool(dim)
        self.norm = nn.LayerNorm(dim)
        self.head_targets = HEAD_TARGETS[cfg.heads]
        self.heads = nn.ModuleList(Head(dim, cfg.hidden_ratio, cfg.dropout) for _ in self.head_targets)
        self.aux_heads = nn.ModuleDict(
            {name: nn.Linear(dim, n) for name, n in AUX_CLASSES.items()} if cfg.use_aux_heads else {}
        )
        self.aux_regression = nn.ModuleDict(
            {name: nn.Linear(dim, 1) for name, w in AUX_REGRESSION.items() if getattr(cfg, w) > 0}
        )
        # --aux-bins N: one Linear for all five targets' N-way interval classification (training only)
        self.aux_bin_head = nn.Linear(dim, len(TARGETS) * cfg.aux_bins) if cfg.aux_bins > 0 else None
        # per-target scale of raw-space targets (the training fold's std); saved in the state_dict only in raw space
        self.register_buffer("target_scale", torch.ones(len(TARGETS)), persistent=cfg.target_space == "raw")
        self.backbone_frozen = False

    # ---- input side -------------------------------------------------------------------------
    @property
    def view_size(self) -> tuple[int, int]:
        """(H, W) a view is resized to before tiling."""
        return self.grid[0] * self.tile_size, self.grid[1] * self.tile_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float views -> normalized float."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return (images - self.mean) / self.std

    def tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, T) normalized tiles -> (N, feature_dim)."""
        tokens = self.backbone.forward_features(tiles)
        prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        cls, patches = tokens[:, 0], tokens[:, prefix:].mean(dim=1)
        if self.cfg.feature == "cls":
            return cls
        if self.cfg.feature == "mean":
            return patches
        return torch.cat([cls, patches], dim=-1)

    def encode_tiles(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) views -> (B, R*C, feature_dim); all tiles of the batch in chunked backbone calls."""
        tiles = tile_views(self.normalize(images), self.grid, self.tile_size)
        batch, n_tiles = tiles.shape[:2]
        flat = tiles.reshape(batch * n_tiles, *tiles.shape[2:]).contiguous(memory_format=torch.channels_last)
        chunk = max(1, self.cfg.max_tiles_per_call)
        feats = torch.cat([self.tile_features(flat[i : i + chunk]) for i in range(0, len(flat), chunk)])
        return feats.reshape(batch, n_tiles, -1)

    def encode_flips(self, left: torch.Tensor, right: torch.Tensor, flips) -> torch.Tensor:
        """Both views under each (hflip, vflip) of `flips` in one backbone pass: (len(flips), 2, B, R*C, F).

        Index [k, 0] is the left view under flip k, [k, 1] the right one. The frozen stage's feature cache
        and flip TTA both go through here, so they cannot encode a flipped view differently.
        """
        batch = left.shape[0]
        views = torch.cat([left, right])
        feats = self.encode_tiles(torch.cat([flip_views(views, h, v) for h, v in flips]))
        return feats.reshape(len(flips), 2, batch, *feats.shape[1:])

    # ---- fusion and heads ---------------------------------------------------------------------
    def head_from_features(self, left_feats: torch.Tensor, right_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tile features of both views -> {'targets': (B, 5) in the target space, aux outputs...}.

        `to_grams(out['targets'])` gives grams whatever the target space and head layout. Runs in fp32 even under
        autocast: it is a small share of the FLOPs, and bf16 log1p outputs carry up to 1.6% noise in grams.
        """
        with torch.autocast(left_feats.device.type, enabled=False):
            return self._fuse_and_heads(left_feats.float(), right_feats.float())

    def _fuse_and_heads(self, left_feats: torch.Tensor, right_feats: torch.Tensor) -> dict[str, torch.Tensor]:
        left = self.proj(left_feats) + self.tile_pos + self.view_embed[0]
        right = self.proj(right_feats) + self.tile_pos + self.view_embed[1]
        if self.cfg.fusion == "film":
            left_summary, right_summary = left.mean(dim=1), right.mean(dim=1)
            left = self.film_from_right(left, right_summary)
            right = self.film_from_left(right, left_summary)
        elif self.cfg.fusion == "cross-attn":
            left, right = self.cross_from_right(left, right), self.cross_from_left(right, left)
        if self.cfg.fusion == "concat":
            (pooled_left, attn_left), (pooled_right, attn_right) = self.pool(left), self.pool(right)
            pooled = self.fuse(torch.cat([pooled_left, pooled_right], dim=-1))
            attn = torch.cat([attn_left, attn_right], dim=1) / 2  # each view's weights sum to 1/2, all to 1
        else:
            pooled, attn = self.pool(torch.cat([left, right], dim=1))
        pooled = self.norm(pooled)
        raw = torch.cat([head(pooled) for head in self.heads], dim=-1)
        out = {"targets": raw if self.cfg.heads == "five" else self._derived_targets(raw), "attention": attn}
        for name, head in self.aux_heads.items():
            out[name] = head(pooled)
        for name, head in self.aux_regression.items():
            out[name] = head(pooled).squeeze(-1)
        if self.aux_bin_head is not None:
            out["bins"] = self.aux_bin_head(pooled).view(len(pooled), len(TARGETS), self.cfg.aux_bins)
        return out

    # ---- target space and head layout ----------------------------------------------------------------
    def _derived_targets(self, raw: torch.Tensor) -> torch.Tensor:
        """Three heads -> softplus parts (non-negative, in the target space) -> grams -> all five -> target space."""
        parts = F.softplus(raw.float())
        idx = list(self.head_targets)
        grams = torch.expm1(parts) if self.cfg.target_space == "log1p" else parts * self.target_scale[idx]
        first, second, third = grams.unbind(-1)
        if self.cfg.heads == "green-dead-clover":
            five = assemble_targets(first, second, third)
        else:  # clover, gdm, total
            five = assemble_targets((second - first).clamp_min(0.0), (third - second).clamp_min(0.0), first)
        return self.grams_to_targets(five)

    def grams_to_targets(self, grams: torch.Tensor) -> torch.Tensor:
        """Grams (..., 5) -> the target space the loss works in: log1p grams, or grams / target_scale."""
        grams = grams.float().clamp_min(0.0)
        return torch.log1p(grams) if self.cfg.target_space == "log1p" else grams / self.target_scale

    def to_grams(self, targets: torch.Tensor) -> torch.Tensor:
        """Model outputs (..., 5) in the target space -> grams, clamped at 0.

        With three heads GDM and Total are re-added from the parts, so the identities hold bit for bit.
        """
        targets = targets.float()
        grams = (
            log1p_to_grams(targets)
            if self.cfg.target_space == "log1p"
            else (targets * self.target_scale).clamp_min(0.0)
        )
        if self.cfg.heads != "five":
            grams = assemble_targets(grams[..., 0], grams[..., 1], grams[..., 2])
        return grams

    def forward(self, left: torch.Tensor, right: torch.Tensor, features: bool = False) -> dict[str, torch.Tensor]:
        """Views (or, with features=True, cached tile features) -> outputs. One entry point for DDP."""
        if not features:
            left, right = self.encode_tiles(left), self.encode_tiles(right)
        return self.head_from_features(left, right)

    # ---- training support ----------------------------------------------------------------------
    @torch.no_grad()
    def init_target_bias(self, mean_log1p) -> None:
        """Start each head at the training mean (log1p): the first steps learn signal, not the offset."""
        if len(mean_log1p) != len(self.heads):
            raise BiomassError(f"init_target_bias needs {len(self.heads)} values, got {len(mean_log1p)}")
        for head, value in zip(self.heads, mean_log1p):
            head.net[-1].bias.fill_(float(value))

    @torch.no_grad()
    def init_from_stats(self, stats: dict) -> None:
        """Raw space: take the target scale from `stats['scale']`; every head starts at its target's mean."""
        if self.cfg.target_space == "raw":
            self.target_scale.copy_(torch.as_tensor(stats["scale"], dtype=torch.float32))
            mean = np.asarray(stats["mean"], dtype=np.float64) / np.asarray(stats["scale"], dtype=np.float64)
        else:
            mean = np.asarray(stats["mean_log1p"], dtype=np.float64)
        values = mean[list(self.head_targets)]
        if self.cfg.heads != "five":  # softplus heads: the bias whose softplus is the mean
            values = np.maximum(values, 1e-3)
            values = values + np.log(-np.expm1(-values))
        self.init_target_bias(values)

    def freeze_backbone(self) -> None:
        """Stage 1: no backbone gradients, backbone in eval mode (dropout/drop-path off)."""
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def unfreeze_backbone(self, keep_frozen_blocks: int = 0) -> None:
        """Stage 2: the backbone trains again (with its own, low learning rate).

        `keep_frozen_blocks` = N keeps the patch embedding, tokens and the first N blocks frozen.
        """
        self.backbone_frozen = False
        self.backbone.requires_grad_(True)
        self.backbone.train(self.training)
        if keep_frozen_blocks > 0:  # in range: training's check_options compared it with the depth
            layers = self.backbone_layers
            for name, param in self.backbone.named_parameters():
                layer = layers[name]
                if layer == 0 or (name.startswith("blocks.") and layer <= keep_frozen_blocks):
                    param.requires_grad_(False)

    @property
    def backbone_layers(self) -> dict[str, int]:
        """timm's layer index of every backbone parameter: 0 = patch/pos embedding and tokens, i + 1 = block i."""
        if not hasattr(self.backbone, "group_matcher"):
            raise BiomassError(f"{self.cfg.backbone} has no timm group_matcher: --freeze-blocks/--layer-decay need one")
        return group_parameters(self.backbone, self.backbone.group_matcher(coarse=False), reverse=True)

    def train(self, mode: bool = True) -> BiomassModel:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def param_groups(
        self,
        lr: float,
        backbone_lr: float,
        weight_decay: float,
        include_backbone: bool = True,
        layer_decay: float = 1.0,
    ) -> list[dict]:
        """AdamW groups: backbone vs the rest, each split into decayed weights and undecayed bias/norm/embeddings.

        Frozen backbone parameters are left out. `layer_decay` < 1 splits the backbone by timm layer
        (`backbone_layer{i}`), lr = backbone_lr * layer_decay ** (top layer - i): the last block keeps backbone_lr.
        """
        layers = self.backbone_layers if include_backbone and layer_decay != 1.0 else None
        top = max(layers.values()) if layers else 0
        groups: dict[tuple[str, bool], list] = {}
        for name, param in self.named_parameters():
            is_backbone = name.startswith("backbone.")
            if is_backbone and (not include_backbone or not param.requires_grad):
                continue
            decay = param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY
            part = "head"
            if is_backbone:
                part = f"backbone_layer{layers[name[len('backbone.') :]]}" if layers else "backbone"
            groups.setdefault((part, decay), []).append(param)
        out = []
        for (part, decay), params in groups.items():
            scale = (
                layer_decay ** (top - int(part[len("backbone_layer") :])) if part.startswith("backbone_layer") else 1.0
            )
            out.append(
                {
                    "name": f"{part}{'' if decay else '_no_decay'}",
                    "params": params,
                    "lr": lr if part == "head" else backbone_lr * scale,
                    "weight_decay": weight_decay if decay else 0.0,
                }
            )
        return out


def log1p_to_grams(pred_log1p: torch.Tensor) -> torch.Tensor:
    """Head outputs (log1p grams) -> grams, clamped at 0."""
    return torch.expm1(pred_log1p).clamp_min(0.0)


def assemble_targets(green: torch.Tensor, dead: torch.Tensor, clover: torch.Tensor) -> torch.Tensor:
    """The five targets from three parts: GDM = Green + Clover, Total = GDM + Dead (exactly, as computed)."""
    gdm = green + clover
    return torch.stack([green, dead, clover, gdm, gdm + dead], dim=-1)


def build_model(cfg: ModelConfig, load_backbone_weights: bool = True) -> BiomassModel:
    """The one constructor used by training, inference and tests (a hand-built ModelConfig gets the config's checks)."""
    check_config(cfg, "model config")
    return BiomassModel(cfg, load_backbone_weights=load_backbone_weights)
