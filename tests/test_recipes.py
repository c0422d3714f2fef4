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


def test_the_three_recipes_exist():
    assert [p.stem for p in RECIPES] == ["gpu-smoke", "seed", "top"]


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
    assert top.train.layer_decay < 1 and top.train.ema_half_life > 0 and top.train.global_batch == 8
    assert top.model.aux_ndvi_weight > 0 and top.model.aux_height_weight > 0
    assert top.data.clean_stamps and top.data.crop_bottom > 0

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
    assert seed_t4.minutes_per_fold == pytest.approx(round(flops / (65e12 * 0.30) / 60, 1))
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
