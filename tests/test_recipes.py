"""configs/*.yaml: every recipe resolves through train.py's parser, says where its settings come from, and trains.

Each recipe trains one epoch per grid with the backbone overridden to the tiny one (configs/overrides/tiny.yaml),
through train.py's own main, so a recipe key can never go stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml

from bench import recipes as projection
from src.config import (
    Config,
    add_config_flags,
    check_backbone_weights,
    check_recipe,
    load_yaml,
    overlay,
    resolve_config,
)
from src.errors import BiomassError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
TINY = REPO / "configs" / "overrides" / "tiny.yaml"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = _script("train")


def _resolve(*argv: str) -> Config:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return resolve_config(parser.parse_args(list(argv)))


def test_the_recipes_exist():
    assert [p.stem for p in RECIPES] == ["gpu-smoke", "seed", "top-h", "top"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_and_says_where_its_settings_come_from(path: Path):
    lines = path.read_text().splitlines()
    header = [ln for ln in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("#"))]]
    assert header[0].startswith(f"# {path.name}:") and len(header) >= 4
    assert any("Source" in ln or "come from" in ln for ln in header)
    cfg = check_backbone_weights(_resolve("--config", str(path)))  # names a weights file: no random backbone
    assert cfg.exp == path.stem and cfg.train.amp is True
    weights = f"weights/{cfg.model.backbone}.safetensors"
    assert cfg.model.backbone_weights == weights
    assert f"# Weights: python -m src.weights export --name {cfg.model.backbone} --out weights/" in header
    recipe = check_recipe(load_yaml(path)["recipe"], str(path))
    assert recipe["grids"][0] == cfg.model.grid  # train.py alone trains the first grid


def test_recipe_values_are_the_designs_they_name():
    seed = _resolve("--config", str(REPO / "configs" / "seed.yaml"))
    assert seed.model.backbone == "vit_base_patch14_reg4_dinov2.lvd142m" and seed.model.target_space == "log1p"
    assert check_recipe(load_yaml(REPO / "configs" / "seed.yaml")["recipe"], "seed")["grids"] == [(2, 2), (3, 3)]
    assert seed.train.mixup_prob == 0.5 and 0 < seed.train.freeze_epochs < seed.train.epochs  # two stages
    # the repo's defaults are the seed design: the recipe only names the weights file (and amp)
    assert seed.model == dataclasses.replace(Config().model, backbone_weights=seed.model.backbone_weights)
    assert seed.train == dataclasses.replace(Config().train, amp=True)

    top = _resolve("--config", str(REPO / "configs" / "top.yaml"))
    assert top.model.backbone == "vit_large_patch16_dinov3.lvd1689m" and top.model.grid == (1, 1)
    assert top.model.tile_size >= 768 and top.model.tile_size % 16 == 0
    assert top.model.target_space == "raw" and top.train.huber_beta > 0
    with torch.device("meta"):
        depth = len(timm.create_model("vit_large_patch16_dinov3", pretrained=False, num_classes=0).blocks)
    assert top.train.freeze_blocks == depth // 2 == 12  # half the blocks
    # the winners where they agree (issue 28): 4th's 5e-5 on the unfrozen half, 8th's weight decay 0.2 and 15
    # head-only epochs, 9th's EMA 0.998 per step, 8th's Clover/GDM/Total heads; no month CE under month folds,
    # no mixup, augmentations that keep the label true, the 10th's drop list (empty: ids unknown here)
    assert top.train.backbone_lr == 5e-5 and top.train.layer_decay == 1.0 and top.train.weight_decay == 0.2
    assert top.train.freeze_epochs == 15 < top.train.epochs and top.train.cache_features
    assert top.train.ema_decay == 0.998 and top.train.ema_half_life == 0 and top.train.global_batch == 8
    assert top.model.heads == "clover-gdm-total" and top.train.aux_month_weight == 0
    assert top.train.mixup_prob == 0 and top.train.augment == "light"
    assert top.data.drop_ids == "configs/drop_ids_wa.txt" and (REPO / top.data.drop_ids).is_file()
    assert top.model.aux_ndvi_weight > 0 and top.model.aux_height_weight > 0
    assert top.data.clean_stamps and top.data.crop_bottom > 0
    huge = _resolve("--config", str(REPO / "configs" / "top-h.yaml"))
    assert huge.model.backbone == "vit_huge_plus_patch16_dinov3.lvd1689m" and huge.train.freeze_blocks == 16
    assert dataclasses.replace(huge.train, freeze_blocks=12) == top.train

    smoke_recipe = check_recipe(load_yaml(REPO / "configs" / "gpu-smoke.yaml")["recipe"], "smoke")
    smoke = _resolve("--config", str(REPO / "configs" / "gpu-smoke.yaml"))
    assert smoke_recipe["folds"] == [0] and smoke.train.epochs == 2


def test_recipe_section_is_checked(tmp_path: Path):
    with pytest.raises(BiomassError, match="unknown key recipe.grid; valid keys: grids, folds, seeds"):
        check_recipe({"grid": [[2, 2]]}, "x.yaml")
    with pytest.raises(BiomassError, match=r"recipe.grids must be a list of \[rows, cols\]"):
        check_recipe({"grids": [[2]]}, "x.yaml")
    with pytest.raises(BiomassError, match="recipe.folds must be 'all' or a list"):
        check_recipe({"folds": "0"}, "x.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"recipe": {"grids": [[2, 2]], "epochs": 3}}))
    with pytest.raises(BiomassError, match="bad.yaml: unknown key recipe.epochs"):  # train.py checks it too
        _resolve("--config", str(bad))
    assert check_recipe({}, "x") == {"grids": [], "folds": "all", "seeds": None}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_one_epoch_per_grid_with_the_tiny_backbone(path, synthetic_dir, folds_csv, tmp_path):
    data = overlay(load_yaml(path), load_yaml(TINY))
    if data["train"].get("freeze_blocks"):
        data["train"]["freeze_blocks"] = 1  # half of the tiny backbone's 2 blocks, as the recipe freezes half
    merged = tmp_path / path.name
    merged.write_text(yaml.safe_dump(data))
    recipe = check_recipe(data["recipe"], path.name)
    base = ["--config", str(merged), "--data-dir", str(synthetic_dir), "--folds", str(folds_csv)]
    for rows, cols in recipe["grids"]:
        argv = [*base, "--out-dir", str(tmp_path / "ckpt"), "--fold", "0", "--grid", str(rows), str(cols)]
        assert train_script.main(argv) == 0
        run = tmp_path / "ckpt" / path.stem / f"grid{rows}x{cols}" / "fold0"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert (run / "best.pt").is_file() and len((run / "metrics.csv").read_text().splitlines()) == 2  # 1 epoch
        # every recipe key but the tiny override's reached the run's config
        tiny = load_yaml(TINY)
        for section, values in load_yaml(path).items():
            if section == "recipe" or not isinstance(values, dict):
                continue
            for key, value in values.items():
                if key in tiny.get(section, {}) or key == "freeze_blocks" or key == "grid":
                    continue
                assert saved[section][key] == value, (path.name, section, key)
        assert saved["model"]["grid"] == [rows, cols] and saved["model"]["backbone_weights"] == "none"


def test_projection_of_docs_recipes_is_current_and_matches_a_hand_count():
    table, kernel = projection.compute()
    for name, fresh in (("recipes.csv", table), ("recipes_kernel.csv", kernel)):
        committed = pd.read_csv(REPO / "docs" / name)
        assert committed.astype(str).equals(fresh.astype(str)), f"docs/{name} is stale: run python bench/recipes.py"
    # ViT-B/14 reg4 at 504: 36 x 36 patches + 5 prefix tokens; per block 2 x 7,077,888 Linear weights x N + 4 N^2 x 768
    n, d = 36 * 36 + 5, 768
    linear = 3 * d * d + d * d + 2 * 4 * d * d
    tile = 12 * (2 * linear * n + 4 * n * n * d) + 2 * 3 * 14 * 14 * d * 36 * 36
    seed_t4 = table[(table.recipe == "seed") & (table.grid == "2x2") & (table.device == "T4")].iloc[0]
    fwd = 2 * 4 * tile  # 2 views x 4 tiles
    flops = (286 * 4 + 71) * fwd + 9 * (286 * 3 + 71) * fwd  # cache + 9 finetune epochs, backbone fully trained
    assert seed_t4.pflop_per_fold == pytest.approx(round(flops / 1e15, 2))
    assert seed_t4.minutes_per_fold == pytest.approx(round(flops / 10e12 / 60, 1))  # the T4 range's low end
    assert seed_t4.minutes_per_fold_fast == pytest.approx(round(flops / 15e12 / 60, 1))
    assert "x 1301 tokens" in seed_t4.arithmetic and seed_t4.runs == 5
    ens = kernel[kernel.recipe == "seed"].iloc[-1]
    assert ens.models == 10 and ens.pflop == pytest.approx(
        round(
            1000 * 3 * 5 * fwd / 1e15
            + 1000
            * 3
            * 5
            * (2 * 9 * (12 * (2 * linear * 581 + 4 * 581 * 581 * d) + 2 * 3 * 14 * 14 * d * 24 * 24))
            / 1e15,
            2,
        )
    )


# ---- issue 28: the measured memory model and the fit to the card ------------------------------------------------
SMALL = {"embed_dim": 64, "num_heads": 2}  # the tiny backbone's width at a 112 px tile: 69 tokens


def _direct_forward_bytes(depth: int, seqs: int, ckpt: bool) -> int:
    """Bytes a bf16-autocast forward leaves allocated, from the CPU profiler's allocation events (not the hooks)."""
    from torch.profiler import ProfilerActivity, profile

    from src.backbone import create_backbone

    torch.manual_seed(0)
    net = create_backbone("vit_small_patch14_reg4_dinov2", 112, grad_checkpointing=ckpt, depth=depth, **SMALL)
    x = torch.randn(seqs, 3, 112, 112)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net.forward_features(x)
    del out
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "grad-checkpointing"])
def test_measured_block_bytes_match_a_direct_measurement(ckpt: bool):
    from src.memory import measure_block_bytes

    measured = measure_block_bytes("vit_small_patch14_reg4_dinov2", 112, SMALL, backward=True)
    per_tw = measured["per_token_width_ckpt" if ckpt else "per_token_width"]
    unit = measured["tokens"] * measured["width"]
    assert measured["tokens"] == 69 and measured["width"] == 64
    # direct: 2 more blocks and 1 more sequence, differences of the allocator's own count
    d = {(k, s): _direct_forward_bytes(k, s, ckpt) for k in (2, 4) for s in (1, 2)}
    per_block_seq = ((d[4, 2] - d[4, 1]) - (d[2, 2] - d[2, 1])) / 2
    assert per_tw * unit == pytest.approx(per_block_seq, rel=0.03)
    assert (5.0 if ckpt else 60.0) > per_tw > (3.0 if ckpt else 34.0)  # ckpt: the fp32 residual; else > the old 34
    if not ckpt:  # extrapolated by depth and batch: 2 blocks x 2 sequences + 2 per-block constants
        projected = 2 * (per_tw * unit * 2 + measured["per_block_mb"] * 1e6)
        assert projected == pytest.approx(d[4, 2] - d[2, 2], rel=0.05)
        assert measured["per_block_mb"] * 1e6 == pytest.approx(2 * measured["block_params"], rel=0.05)  # bf16 copies


def test_projected_peak_is_the_hand_count(tmp_path: Path, monkeypatch):
    from src import memory

    table = tmp_path / "constants.csv"
    table.write_text(
        "backbone,tile,tokens,width,per_token_width,per_token_width_ckpt,per_block_mb,block_params\n"
        "vit_small_patch14_reg4_dinov2,28,9,64,40.0,4.0,0.1,50112\n"
    )
    monkeypatch.setattr(memory, "CONSTANTS", table)
    memory._constants.cache_clear()
    cfg = Config.from_dict(
        {
            "model": {"backbone": "vit_small_patch14_reg4_dinov2", "backbone_kwargs": {"depth": 2, **SMALL}},
            "train": {"batch_size": 3, "freeze_blocks": 1, "ema_decay": 0.99},
        }  # fmt: skip
    )
    cfg.model.tile_size, cfg.model.grid = 28, [2, 2]
    shape = memory.backbone_shape(cfg.model)
    assert (shape["tokens"], shape["width"], shape["depth"]) == (9, 64, 2)
    seqs = 3 * 2 * 4  # batch x views x tiles
    unit, block = 9 * 64 * seqs, 40.0 * 9 * 64 * seqs + 0.1e6
    plain = memory.projected_peak_bytes(cfg)
    assert plain["sequences"] == seqs
    expected = 8 * shape["params"] + 12 * shape["block_params"] + block + 40.0 * unit + memory.OVERHEAD_BYTES
    assert plain["total"] == pytest.approx(expected)
    ckpt = memory.projected_peak_bytes(cfg, grad_checkpointing=True)
    assert ckpt["activations"] == pytest.approx(4.0 * unit + block)
    memory._constants.cache_clear()


def _recipe_cfg(name: str) -> Config:
    return _resolve("--config", str(REPO / "configs" / f"{name}.yaml"))


T4 = 15.64e9


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_fits_a_t4_keeping_its_global_batch_or_is_refused(path: Path):
    from src.memory import MARGIN, fit_to_memory, projected_peak_bytes

    cfg = _resolve("--config", str(path))
    grids = check_recipe(load_yaml(path)["recipe"], path.name)["grids"] or [tuple(cfg.model.grid)]
    for grid in grids:
        cfg.model.grid = list(grid)
        images = cfg.train.global_batch or cfg.train.batch_size * cfg.train.accum
        try:
            fitted, note = fit_to_memory(cfg, T4)
        except BiomassError as err:
            assert path.stem == "top-h" and "GB" in str(err)  # ViT-H+ needs an 80 GB card (docs/RECIPES.md)
            continue
        tc = fitted.train
        assert projected_peak_bytes(fitted)["total"] <= (1 - MARGIN) * T4 and "fit-memory" in note
        assert (tc.global_batch or tc.batch_size * tc.accum) == images
        assert tc.batch_size >= 2 or tc.mixup_prob == 0  # mixup pairs images within a batch


def test_the_fit_prefers_no_checkpointing_at_a_smaller_batch_and_says_so():
    from src.memory import MARGIN, fit_to_memory, projected_peak_bytes

    seed = _recipe_cfg("seed")
    assert projected_peak_bytes(seed)["total"] > 30e9  # the default that ran out of memory on every 16-24 GB card
    half = projected_peak_bytes(seed, batch_size=4, grad_checkpointing=False)["total"]
    fitted, note = fit_to_memory(seed, half / (1 - MARGIN) + 1e6)
    assert not fitted.model.grad_checkpointing and (fitted.train.batch_size, fitted.train.accum) == (4, 2)
    assert "batch 4 x accumulation 2" in note and "8 images per step" in note
    on_t4, _ = fit_to_memory(seed, T4)  # batch 2 without checkpointing fits 16 GB: no recompute, same 8 per step
    assert not on_t4.model.grad_checkpointing and (on_t4.train.batch_size, on_t4.train.accum) == (2, 4)
    tight, _ = fit_to_memory(seed, 8e9)  # no batch >= 2 fits without it (mixup needs 2): checkpointing
    assert tight.model.grad_checkpointing and tight.train.batch_size * tight.train.accum == 8
    same, note = fit_to_memory(seed, 200e9)
    assert same is seed and "kept" in note


@pytest.mark.parametrize("name", ["seed", "top", "top-h"])
def test_every_setting_of_a_recipe_cites_its_source(name: str):
    import re

    source = re.compile(
        r"\d+th|this repo's choice|seed design|OPTIONS\.md|bundle|issue 12|top teams|as top\.yaml|as aux_"
    )
    settings = 0
    for line in (REPO / "configs" / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#") or not line.strip() or line.rstrip().endswith(":"):
            continue  # header comments and section names
        settings += 1
        value, _, comment = line.partition(" # ")
        assert comment.strip() and source.search(comment), (
            f"{name}.yaml: {value.strip()!r} says not where it comes from"
        )
    assert settings >= 12
