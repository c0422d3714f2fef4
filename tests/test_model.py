"""src/model.py and src/backbone.py: shapes, tiling, offline weights, the encode/head split, stereo symmetry,
freezing, optimizer groups. Tiny random-init ViTs (embed 64, depth 2) on 28 px tiles: the module runs in
seconds on 2 cores and never touches the network.
"""

from __future__ import annotations

import copy
import socket
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from src.config import PRESETS, Config, ModelConfig, apply_overrides
from src.errors import BiomassError
from src.model import (
    FLIP_VARIANTS,
    AttentionPool,
    FiLM,
    build_model,
    default_tile_size,
    flip_views,
    log1p_to_grams,
    probe_patch_size,
    tile_views,
)

TILE = 28  # two patches of 14: the smallest tile that still has several patch tokens
DINOV2 = "vit_small_patch14_reg4_dinov2"
DINOV3 = "vit_small_patch16_dinov3"
TINY_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2}
AUX_SIZES = {"state": 4, "month": 10, "species": 8}
GRIDS = [(1, 1), (2, 2), (3, 3), (2, 3), (4, 4)]


def tiny_cfg(**overrides) -> ModelConfig:
    """The tiny preset's model section with 28 px tiles, plus overrides."""
    cfg = Config()
    apply_overrides(cfg, PRESETS["tiny"], "tiny")
    cfg.model.tile_size = TILE
    for key, value in overrides.items():
        setattr(cfg.model, key, value)
    return cfg.model


def make(seed: int = 0, eval_mode: bool = True, **overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(**overrides))
    return model.eval() if eval_mode else model.train()


def views(model, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random left/right pair of [0, 1] float views at the model's view size."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *model.view_size, generator=g), torch.rand(batch, 3, *model.view_size, generator=g)


def assert_outputs_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any socket connection fails the test: weights must come from local files only."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def model():
    """The shared tiny 2x2 model in eval mode; tests that change weights deep-copy it."""
    return make()


@pytest.fixture(scope="module")
def pair(model):
    return views(model)


# ---- tile geometry ---------------------------------------------------------------------------------------
def test_default_tile_size_is_native_resolution_rounded_to_patch():
    assert default_tile_size((2, 2), 14) == 504
    assert default_tile_size((3, 3), 14) == 336
    assert default_tile_size((1, 1), 14) == 994  # 1000 / 14 = 71.4 -> 71 patches
    assert default_tile_size((2, 2), 16) == 496
    assert default_tile_size((4, 4), 14, view_px=100) == 28


@pytest.mark.parametrize("grid", [(2, 2), (2, 3), (3, 1)])
def test_tile_views_places_constant_colour_tiles_row_major(grid):
    rows, cols = grid
    image = torch.zeros(2, 3, rows * TILE, cols * TILE)
    for r in range(rows):
        for c in range(cols):
            for ch in range(3):
                image[:, ch, r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = 10 * (r * cols + c) + ch
    tiles = tile_views(image, grid, TILE)
    assert tiles.shape == (2, rows * cols, 3, TILE, TILE)
    for k in range(rows * cols):
        for ch in range(3):
            assert torch.all(tiles[:, k, ch] == 10 * k + ch), f"tile {k} channel {ch}"


def test_tile_views_resizes_a_different_size_once(monkeypatch):
    rows, cols, block_h, block_w = 2, 3, 50, 30  # a 100x90 view -> 56x84 before cutting 28 px tiles
    image = torch.zeros(1, 3, rows * block_h, cols * block_w)
    for r in range(rows):
        for c in range(cols):
            image[:, :, r * block_h : (r + 1) * block_h, c * block_w : (c + 1) * block_w] = r * cols + c
    calls = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    tiles = tile_views(image, (rows, cols), TILE)
    assert calls == [image.shape]
    assert tiles.shape == (1, 6, 3, TILE, TILE)
    # antialiased bilinear blends only near block borders: tile centres keep their block's colour
    centres = tiles[0, :, :, 8:20, 8:20]
    expected = torch.arange(6.0).view(6, 1, 1, 1).expand_as(centres)
    torch.testing.assert_close(centres, expected, atol=1e-4, rtol=0)
    calls.clear()
    tile_views(torch.zeros(1, 3, 2 * TILE, 3 * TILE), (2, 3), TILE)
    assert calls == [], "a view already at the grid size must not be resized"


@pytest.mark.parametrize("hflip,vflip", FLIP_VARIANTS)
def test_flipping_a_view_permutes_and_flips_its_tiles(hflip, vflip):
    """What the flip TTA/cache variants mean for tiles: tile (r, c) lands at the mirrored grid cell, flipped."""
    rows, cols = 2, 3
    image = torch.rand(1, 3, rows * TILE, cols * TILE)
    tiles = tile_views(image, (rows, cols), TILE)
    flipped = tile_views(flip_views(image, hflip, vflip), (rows, cols), TILE)
    for r in range(rows):
        for c in range(cols):
            src = r * cols + c
            dst = (rows - 1 - r if vflip else r) * cols + (cols - 1 - c if hflip else c)
            torch.testing.assert_close(flipped[:, dst], flip_views(tiles[:, src], hflip, vflip), atol=0, rtol=0)


def test_tile_size_not_multiple_of_patch_raises():
    with pytest.raises(BiomassError, match=r"tile size 30 is not a multiple of .* patch size 14; use e.g. 28"):
        build_model(tiny_cfg(tile_size=30))


def test_patch_size_is_read_from_the_model():
    """A DINOv3-shaped tiny backbone (timm Eva, RoPE, patch 16) gets patch 16 and tiles of 16 px multiples."""
    dinov3 = {"backbone": DINOV3, "backbone_kwargs": dict(TINY_KWARGS)}
    assert probe_patch_size(tiny_cfg(**dinov3)) == 16
    assert probe_patch_size(tiny_cfg()) == 14
    default = build_model(tiny_cfg(tile_size=None, **dinov3))
    assert (default.patch, default.tile_size, default.view_size) == (16, 496, (992, 992))
    small = build_model(tiny_cfg(tile_size=32, **dinov3)).eval()
    assert type(small.backbone).__name__ == "Eva" and small.backbone.num_prefix_tokens == 5
    left, right = views(small)
    with torch.no_grad():
        assert small.encode_tiles(left).shape == (2, 4, 128)
        assert small(left, right)["targets"].shape == (2, 5)
    with pytest.raises(BiomassError, match="patch size 16"):
        build_model(tiny_cfg(tile_size=TILE, **dinov3))


# ---- shapes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_output_shapes_per_grid(grid):
    model = make(grid=grid)
    left, right = views(model, batch=3)
    with torch.no_grad():
        out = model(left, right)
    n_tiles = grid[0] * grid[1]
    assert out["targets"].shape == (3, 5)
    assert {k: tuple(out[k].shape) for k in AUX_SIZES} == {k: (3, n) for k, n in AUX_SIZES.items()}
    assert out["attention"].shape == (3, 2 * n_tiles)
    torch.testing.assert_close(out["attention"].sum(dim=1), torch.ones(3))
    assert model.tile_pos.shape == (n_tiles, model.cfg.fusion_dim)


def test_no_aux_heads_when_disabled():
    model = make(use_aux_heads=False)
    with torch.no_grad():
        out = model(*views(model))
    assert set(out) == {"targets", "attention"}


@pytest.fixture(scope="module")
def feature_models():
    """One model per per-tile feature, same seed -> the same backbone weights."""
    return {feature: make(feature=feature) for feature in ("cls", "mean", "cls_mean")}


def test_encode_tiles_shape_and_feature_definitions(feature_models, pair):
    left = pair[0]
    ref = feature_models["cls"].backbone.state_dict()
    for m in feature_models.values():
        assert all(torch.equal(ref[k], v) for k, v in m.backbone.state_dict().items())
    embed = TINY_KWARGS["embed_dim"]
    with torch.no_grad():
        feats = {name: m.encode_tiles(left) for name, m in feature_models.items()}
        # the mean is over patch tokens only: CLS + 4 registers (num_prefix_tokens=5) are left out
        m = feature_models["mean"]
        tiles = tile_views(m.normalize(left), m.grid, m.tile_size).flatten(0, 1)
        tokens = m.backbone.forward_features(tiles)
    assert m.backbone.num_prefix_tokens == 5
    assert feats["cls"].shape == (2, 4, embed) and feature_models["cls"].feature_dim == embed
    assert feats["mean"].shape == (2, 4, embed) and feature_models["mean"].feature_dim == embed
    assert feats["cls_mean"].shape == (2, 4, 2 * embed) and feature_models["cls_mean"].feature_dim == 2 * embed
    torch.testing.assert_close(feats["cls"], tokens[:, 0].view(2, 4, embed), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats["mean"], tokens[:, 5:].mean(dim=1).view(2, 4, embed), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        feats["cls_mean"], torch.cat([feats["cls"], feats["mean"]], dim=-1), atol=1e-5, rtol=1e-5
    )


def test_unknown_feature_raises():
    with pytest.raises(BiomassError, match="unknown --feature 'gem'"):
        build_model(tiny_cfg(feature="gem"))


def test_uint8_views_equal_float_views(model):
    u8 = torch.randint(0, 256, (2, 3, *model.view_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_tiles(u8), model.encode_tiles(u8.float() / 255.0), atol=1e-6, rtol=1e-6)


def test_backbone_chunking_does_not_change_features(model, pair):
    chunked = copy.deepcopy(model)
    chunked.cfg = copy.deepcopy(model.cfg)
    chunked.cfg.max_tiles_per_call = 3  # 8 tiles -> calls of 3, 3, 2
    with torch.no_grad():
        torch.testing.assert_close(chunked.encode_tiles(pair[0]), model.encode_tiles(pair[0]), atol=1e-5, rtol=1e-5)


def test_normalization_constants_come_from_timm(model):
    resolved = timm.data.resolve_data_config(model=model.backbone)
    assert model.mean.flatten().tolist() == pytest.approx(list(resolved["mean"]))
    assert model.std.flatten().tolist() == pytest.approx(list(resolved["std"]))
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert model.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    assert "mean" not in model.state_dict(), "constants are rebuilt from timm, not saved in checkpoints"


# ---- offline weights -------------------------------------------------------------------------------------
def tiny_backbone(name: str = DINOV2, img_size: int = TILE, seed: int = 5, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **{**TINY_KWARGS, **kwargs})


def save(state: dict, path) -> str:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize(
    "name,filename,patch", [(DINOV2, "w.pth", 14), (DINOV2, "w.safetensors", 14), (DINOV3, "w.pth", 16)]
)
def test_backbone_weights_load_from_local_file(tmp_path, name, filename, patch):
    tile = 2 * patch
    saved = tiny_backbone(name, img_size=tile).state_dict()
    path = save(saved, tmp_path / filename)
    model = build_model(
        tiny_cfg(backbone=name, backbone_kwargs=dict(TINY_KWARGS), tile_size=tile, backbone_weights=path)
    )
    loaded = model.backbone.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    # the default (load_backbone_weights=False, as inference rebuilding from a checkpoint does) ignores the file
    torch.manual_seed(123)
    fresh = build_model(
        tiny_cfg(backbone=name, backbone_kwargs=dict(TINY_KWARGS), tile_size=tile, backbone_weights=path),
        load_backbone_weights=False,
    )
    assert not torch.equal(fresh.backbone.patch_embed.proj.weight, saved["patch_embed.proj.weight"])


def test_backbone_weights_saved_at_another_size_resample_pos_embed(tmp_path):
    saved = tiny_backbone(img_size=56).state_dict()  # 4x4 patch grid
    path = save(saved, tmp_path / "w56.pth")
    model = build_model(tiny_cfg(backbone_weights=path))  # 28 px tiles: 2x2 patch grid
    loaded = model.backbone.state_dict()
    assert saved["pos_embed"].shape == (1, 16, 64) and loaded["pos_embed"].shape == (1, 4, 64)
    expected = resample_abs_pos_embed(
        saved["pos_embed"], new_size=(2, 2), num_prefix_tokens=0, interpolation="bicubic", antialias=True
    )
    torch.testing.assert_close(loaded["pos_embed"], expected)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items() if k != "pos_embed")
    with torch.no_grad():
        assert torch.isfinite(model.eval()(*views(model))["targets"]).all()


def test_backbone_weights_of_another_architecture_list_mismatched_keys(tmp_path):
    path = save(tiny_backbone(embed_dim=96).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(BiomassError) as err:
        build_model(tiny_cfg(backbone_weights=path))
    msg = str(err.value)
    assert path in msg and DINOV2 in msg
    assert "size mismatch for cls_token" in msg and "torch.Size([1, 1, 96])" in msg
    deeper = save(tiny_backbone(depth=3).state_dict(), tmp_path / "deep.safetensors")
    with pytest.raises(BiomassError, match=r'Unexpected key\(s\).*"blocks\.2\.'):
        build_model(tiny_cfg(backbone_weights=deeper))


def test_backbone_weights_missing_or_corrupt_file_raises(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BiomassError, match=r"nope\.safetensors: backbone weights file not found"):
        build_model(tiny_cfg(backbone_weights=str(missing)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BiomassError, match=r"junk\.pth: "):
        build_model(tiny_cfg(backbone_weights=str(junk)))
    good = save(tiny_backbone().state_dict(), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(good, "rb").read()[:5000])
    with pytest.raises(BiomassError, match=r"truncated\.safetensors: cannot load backbone weights"):
        build_model(tiny_cfg(backbone_weights=str(truncated)))


def test_unknown_backbone_name_raises():
    with pytest.raises(BiomassError, match="unknown backbone 'vit_tiny_patch99_nonexistent'"):
        build_model(tiny_cfg(backbone="vit_tiny_patch99_nonexistent"))
    with pytest.raises(BiomassError, match="unknown backbone"):
        build_model(tiny_cfg(backbone="vit_tiny_patch99_nonexistent", tile_size=None))


# ---- FiLM and attention pooling --------------------------------------------------------------------------
def test_film_is_exactly_identity_at_init_and_can_learn(model):
    torch.manual_seed(0)
    tokens = torch.randn(3, 5, 64)
    for film in (FiLM(64), model.film_from_right, model.film_from_left):
        for context in (torch.randn(3, 64), 100 * torch.randn(3, 64), torch.zeros(3, 64)):
            assert torch.equal(film(tokens, context), tokens)
    film = FiLM(64)
    (film(tokens, torch.randn(3, 64)) * torch.randn(3, 5, 64)).sum().backward()
    assert film.net[-1].weight.grad.abs().sum() > 0 and film.net[-1].bias.grad.abs().sum() > 0


def test_attention_pool_is_a_convex_combination():
    torch.manual_seed(0)
    pool = AttentionPool(16)
    tokens = torch.randn(4, 7, 16)
    pooled, weights = pool(tokens)
    assert weights.shape == (4, 7) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(pooled, (weights.unsqueeze(-1) * tokens).sum(dim=1))


# ---- the encode_tiles / head_from_features split -----------------------------------------------------------
def test_split_path_equals_full_forward(model, pair):
    left, right = pair
    with torch.no_grad():
        full = model(left, right)
        fl, fr = model.encode_tiles(left), model.encode_tiles(right)
        assert_outputs_close(full, model.head_from_features(fl, fr))
        assert_outputs_close(full, model(fl, fr, features=True))


def test_stacked_flip_batches_match_per_variant_forward(model, pair):
    """The layout training's feature cache and inference's TTA use: cat(flips of cat([left, right])) in one call."""
    left, right = pair
    batch = left.shape[0]
    with torch.no_grad():
        stacked = torch.cat([flip_views(torch.cat([left, right]), h, v) for h, v in FLIP_VARIANTS])
        feats = model.encode_tiles(stacked).reshape(len(FLIP_VARIANTS), 2, batch, 4, -1)
        for k, (h, v) in enumerate(FLIP_VARIANTS):
            direct = model(flip_views(left, h, v), flip_views(right, h, v))
            assert_outputs_close(direct, model.head_from_features(feats[k, 0], feats[k, 1]), atol=1e-5)


def test_stereo_swap_asymmetry_is_only_view_embedding_and_film_direction(model, pair):
    """Swapping cached features equals re-encoding the swapped views. After that swap the output changes, and
    the only reasons are (a) view_embed (left/right identity) and (b) the two FiLM directions being separate
    modules: tile_pos is shared by both views and attention pooling is order-free over the 2*R*C tokens, so
    with view_embed zeroed and film_from_left = film_from_right the swapped pair gives the same targets and aux
    logits, and attention weights whose left and right halves are exchanged. Zeroing only one of the two
    leaves the swap a different input, which is what keeps stereo swap a real augmentation / TTA view.
    """
    m = copy.deepcopy(model)
    torch.manual_seed(7)
    for film in (m.film_from_right, m.film_from_left):  # at init FiLM is the identity: make both directions act
        torch.nn.init.normal_(film.net[-1].weight, std=0.3)
        torch.nn.init.normal_(film.net[-1].bias, std=0.3)
    left, right = pair
    n = m.grid[0] * m.grid[1]

    def gap(a, b) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in ("targets", *AUX_SIZES))

    with torch.no_grad():
        fl, fr = m.encode_tiles(left), m.encode_tiles(right)
        swapped = m(right, left)
        assert_outputs_close(swapped, m.head_from_features(fr, fl))
        assert gap(swapped, m(left, right)) > 1e-3
        with_film_tied = copy.deepcopy(m)
        with_film_tied.film_from_left.load_state_dict(m.film_from_right.state_dict())
        assert gap(with_film_tied.head_from_features(fl, fr), with_film_tied.head_from_features(fr, fl)) > 1e-4
        m.view_embed.zero_()
        assert gap(m.head_from_features(fl, fr), m.head_from_features(fr, fl)) > 1e-4
        m.film_from_left.load_state_dict(m.film_from_right.state_dict())
        a, b = m.head_from_features(fl, fr), m.head_from_features(fr, fl)
        for key in ("targets", *AUX_SIZES):
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            b["attention"], torch.cat([a["attention"][:, n:], a["attention"][:, :n]], dim=1), atol=1e-6, rtol=1e-5
        )


# ---- training support ----------------------------------------------------------------------------------
def _backward(m, left, right) -> None:
    out = m(left, right)
    loss = out["targets"].square().sum() + sum(out[k].logsumexp(-1).sum() for k in AUX_SIZES)
    loss.backward()


def test_frozen_backbone_gets_no_grads_and_stays_in_eval(pair):
    m = make(eval_mode=False)
    left, right = pair
    m.freeze_backbone()
    m.train()
    assert m.training and m.heads.training and m.proj.training
    assert not any(mod.training for mod in m.backbone.modules())
    m.eval()
    m.train()
    assert not m.backbone.training, "eval() -> train() must not wake a frozen backbone"
    _backward(m, left, right)
    assert all(p.grad is None for p in m.backbone.parameters())
    head_params = [(n, p) for n, p in m.named_parameters() if not n.startswith("backbone.")]
    assert all(p.grad is not None for _, p in head_params), [n for n, p in head_params if p.grad is None]

    m.unfreeze_backbone()
    assert m.backbone.training  # unfreezing in train mode puts the backbone back in train mode
    m.zero_grad(set_to_none=True)
    _backward(m, left, right)
    missing = [n for n, p in m.backbone.named_parameters() if p.grad is None]
    assert missing == []
    assert m.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    m.eval()
    m.unfreeze_backbone()
    assert not m.backbone.training  # and in eval mode leaves it in eval mode


def test_param_groups_cover_every_parameter_once(model):
    names = {id(p): n for n, p in model.named_parameters()}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    groups = model.param_groups(lr=1e-3, backbone_lr=1e-5, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == set(names)
    assert {g["name"] for g in groups} == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    decay_of = {}
    for g in groups:
        is_backbone = g["name"].startswith("backbone")
        assert g["lr"] == (1e-5 if is_backbone else 1e-3)
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.05)
        for p in g["params"]:
            assert (id(p) in backbone_ids) == is_backbone, names[id(p)]
            decay_of[names[id(p)]] = g["weight_decay"]
    for name, p in model.named_parameters():
        if p.ndim < 2:  # biases, LayerNorm weights, layer-scale gammas
            assert decay_of[name] == 0.0, name
    no_decay = ["tile_pos", "view_embed", "backbone.cls_token", "backbone.reg_token", "backbone.pos_embed"]
    decayed = ["proj.1.weight", "heads.0.net.0.weight", "pool.score.0.weight", "backbone.blocks.0.attn.qkv.weight"]
    assert [decay_of[n] for n in no_decay] == [0.0] * len(no_decay)
    assert [decay_of[n] for n in decayed] == [0.05] * len(decayed)

    heads_only = model.param_groups(1e-3, 1e-5, 0.05, include_backbone=False)
    head_ids = {id(p) for g in heads_only for p in g["params"]}
    assert head_ids == set(names) - backbone_ids
    assert {g["name"] for g in heads_only} == {"head", "head_no_decay"}
    torch.optim.AdamW(groups)  # no parameter in two groups, no empty group


def test_patch_embedding_conv_weight_is_decayed(model):
    """timm's convention (no_weight_decay = pos_embed/cls_token/reg_token) decays the patch-embedding conv."""
    decay_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in model.param_groups(1e-3, 1e-5, 0.05):
        decay_of.update({names[id(p)]: g["weight_decay"] for p in g["params"]})
    assert decay_of["backbone.patch_embed.proj.weight"] == 0.05


def test_init_target_bias_sets_the_last_layer_bias(model, pair):
    m = copy.deepcopy(model)
    values = [3.1, 2.5, 0.5, 3.4, 4.0]
    m.init_target_bias(torch.tensor(values, dtype=torch.float64).numpy())
    assert [head.net[-1].bias.item() for head in m.heads] == pytest.approx(values)
    for head in m.heads:  # with no hidden contribution the heads output exactly the bias
        torch.nn.init.zeros_(head.net[-1].weight)
    with torch.no_grad():
        out = m(*pair)["targets"]
    torch.testing.assert_close(out, torch.tensor(values).expand(2, 5))


def test_log1p_to_grams_inverts_log1p_and_clamps():
    x = torch.tensor([[0.0, 1e-3, 0.5, 10.0, 1234.5], [1e4, 7.0, 0.0, 42.0, 185.7]], dtype=torch.float64)
    torch.testing.assert_close(log1p_to_grams(torch.log1p(x)), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log1p_to_grams(torch.log1p(x.float())), x.float(), rtol=1e-6, atol=1e-6)
    negative = log1p_to_grams(torch.tensor([-1e-6, -0.5, -3.0, -50.0]))
    assert torch.equal(negative, torch.zeros(4))


def test_gradient_checkpointing_matches_plain_backward(pair):
    plain = make(eval_mode=False)
    ckpt = make(eval_mode=False, grad_checkpointing=True)
    assert ckpt.backbone.grad_checkpointing and not plain.backbone.grad_checkpointing
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):
        _backward(m, *pair)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_tiny_preset_builds_fast():
    cfg = Config()
    apply_overrides(cfg, PRESETS["tiny"], "tiny")
    build_model(cfg.model)  # warm-up: first-call costs of timm/torch are not the model's
    start = time.perf_counter()
    model = build_model(cfg.model)
    seconds = time.perf_counter() - start
    print(f"tiny preset build: {seconds:.3f} s, {sum(p.numel() for p in model.parameters()):,} parameters")
    assert model.tile_size == 56 and model.patch == 14
    assert seconds < 2.0
