"""Config resolution: defaults < preset < YAML < flags, flag parsing, unknown keys, YAML round trips."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import yaml

from src.config import (
    DEFAULT_BACKBONE,
    PRESETS,
    Config,
    InferConfig,
    add_config_flags,
    add_infer_flags,
    check_backbone_weights,
    check_config,
    leaves,
    load_yaml,
    resolve_config,
    resolve_infer_config,
    weights_file,
)
from src.errors import BiomassError, run_cli
from src.io_utils import save_config
from src.schema import TARGET_WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def _resolve(*argv: str) -> Config:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return resolve_config(parser.parse_args(list(argv)))


def _yaml(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_without_flags():
    cfg = _resolve()
    assert cfg == Config()
    assert cfg.model.backbone == DEFAULT_BACKBONE and cfg.model.grid == (2, 2) and cfg.train.lr == 1e-3
    assert cfg.train.target_weights == TARGET_WEIGHTS


def test_precedence_defaults_preset_yaml_flags(tmp_path: Path):
    tiny = PRESETS["tiny"]
    assert tiny["train"]["lr"] == 2e-3 and tiny["train"]["epochs"] == 16 and tiny["model"]["tile_size"] == 56
    config = _yaml(tmp_path, {"train": {"lr": 5e-3, "epochs": 7}, "exp": "from_yaml"})
    # preset over defaults
    cfg = _resolve("--preset", "tiny")
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.tile_size, cfg.train.batch_size) == (2e-3, 16, 56, 16)
    # YAML over preset; preset values the YAML does not mention survive
    cfg = _resolve("--preset", "tiny", "--config", config)
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.tile_size, cfg.exp) == (5e-3, 7, 56, "from_yaml")
    # flags over YAML; YAML values the flags do not mention survive
    cfg = _resolve("--preset", "tiny", "--config", config, "--lr", "7e-3", "--tile-size", "28", "--exp", "flag")
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.tile_size, cfg.exp) == (7e-3, 7, 28, "flag")
    assert cfg.train.batch_size == 16 and cfg.model.backbone == "vit_small_patch14_reg4_dinov2"  # preset
    assert cfg.train.weight_decay == 1e-2  # default
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.model.tile_size, int)


def test_flag_types():
    cfg = _resolve(
        "--grid", "3", "3", "--backbone-weights", "none", "--no-cache-features", "--amp", "--tile-size", "none",
        "--target-weights", "1", "0", "0", "2", "5", "--num-workers", "4", "--dropout", "0.25",
    )  # fmt: skip
    assert cfg.model.grid == (3, 3) and all(type(v) is int for v in cfg.model.grid)
    assert cfg.model.backbone_weights == "none"  # said on purpose: kept as the word, loads nothing
    assert cfg.train.cache_features is False and cfg.train.amp is True
    assert cfg.model.tile_size is None
    assert cfg.train.target_weights == (1.0, 0.0, 0.0, 2.0, 5.0)
    assert cfg.data.num_workers == 4 and cfg.model.dropout == 0.25
    assert _resolve("--backbone-weights", "w/vit.pth").model.backbone_weights == "w/vit.pth"
    assert _resolve("--cache-features").train.cache_features is True


def test_no_silent_random_backbone(tmp_path: Path, capsys):
    # a pretrained-size backbone without --backbone-weights: one line naming the flag and the export command
    export = "python -m src.weights export --name vit_base_patch14_reg4_dinov2.lvd142m --out weights/"
    with pytest.raises(BiomassError, match="--backbone-weights") as err:
        check_backbone_weights(_resolve())
    assert export in str(err.value) and "--backbone-weights none" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BiomassError, match="--backbone vit_large_patch16_dinov3.lvd1689m would start from random"):
        check_backbone_weights(_resolve("--backbone", "vit_large_patch16_dinov3.lvd1689m"))
    # said on purpose (flag or YAML), a file, or a reshaped (tiny) backbone: no error
    cfg = check_backbone_weights(_resolve("--backbone-weights", "none"))
    assert cfg.model.backbone_weights == "none" and weights_file(cfg.model) is None
    cfg = check_backbone_weights(_resolve("--config", _yaml(tmp_path, {"model": {"backbone_weights": "none"}})))
    assert cfg.model.backbone_weights == "none" and weights_file(cfg.model) is None
    assert weights_file(check_backbone_weights(_resolve("--backbone-weights", "w/v.pth")).model) == "w/v.pth"
    for preset in ("tiny", "tiny-dinov3"):
        assert weights_file(check_backbone_weights(_resolve("--preset", preset)).model) is None
    # YAML null is "not given", like no key at all
    with pytest.raises(BiomassError, match="would start from random weights"):
        check_backbone_weights(_resolve("--config", _yaml(tmp_path, {"model": {"backbone_weights": None}}, "n.yaml")))
    # train.py refuses before it reads any data: exit 1, one error line
    train = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location("t", REPO / "train.py"))
    spec.loader.exec_module(train)
    assert run_cli(train.main, ["--fold", "0", "--data-dir", str(tmp_path / "absent")]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --backbone vit_base") and export in lines[0]


def test_bad_flag_values_raise():
    with pytest.raises(BiomassError, match="command line: train.epochs: expected int, got 'ten'"):
        _resolve("--epochs", "ten")
    with pytest.raises(SystemExit):  # argparse: --grid needs two values
        _resolve("--grid", "3")


def test_unknown_yaml_keys_raise_naming_the_key(tmp_path: Path):
    config = _yaml(tmp_path, {"model": {"tile_sz": 56}})
    with pytest.raises(BiomassError, match=r"cfg.yaml: unknown key model.tile_sz; valid keys: .*tile_size"):
        _resolve("--config", config)
    config = _yaml(tmp_path, {"optimizer": {"lr": 1}}, "top.yaml")
    with pytest.raises(BiomassError, match="top.yaml: unknown key 'optimizer'"):
        _resolve("--config", config)
    config = _yaml(tmp_path, {"train": {"cache_features": "yes"}}, "bool.yaml")
    with pytest.raises(BiomassError, match="bool.yaml: train.cache_features: expected true/false, got 'yes'"):
        _resolve("--config", config)


def test_yaml_with_preset_key(tmp_path: Path):
    config = _yaml(tmp_path, {"preset": "tiny", "train": {"epochs": 3}})
    cfg = _resolve("--config", config)
    assert (cfg.model.tile_size, cfg.train.lr, cfg.train.epochs, cfg.data.num_workers) == (56, 2e-3, 3, 0)
    assert cfg.model.backbone_kwargs == {"depth": 2, "embed_dim": 64, "num_heads": 2}
    with pytest.raises(BiomassError, match="unknown preset 'huge'"):
        _resolve("--config", _yaml(tmp_path, {"preset": "huge"}, "huge.yaml"))


def test_preset_flag_overrides_yaml_preset(tmp_path: Path):
    # flags > YAML: `--preset base` wins over the file's `preset: tiny` (the YAML's other keys still apply)
    config = _yaml(tmp_path, {"preset": "tiny", "train": {"epochs": 3}})
    cfg = _resolve("--config", config, "--preset", "base")
    assert cfg.model.tile_size is None and cfg.model.backbone == DEFAULT_BACKBONE and cfg.train.epochs == 3


def test_to_dict_from_dict_round_trip():
    cfg = _resolve("--preset", "tiny", "--grid", "1", "3", "--backbone-weights", "w.safetensors", "--no-amp")
    data = cfg.to_dict()
    assert data["model"]["grid"] == [1, 3] and isinstance(data["train"]["target_weights"], list)
    assert set(data) == {"data", "model", "train", "head", "exp", "out_dir"}
    back = Config.from_dict(data)
    assert back == cfg and back.model.grid == (1, 3) and isinstance(back.train.target_weights, tuple)
    with pytest.raises(BiomassError, match="unknown key train.learning_rate"):
        Config.from_dict({"train": {"learning_rate": 1.0}})


def test_save_config_writes_yaml_that_round_trips(tmp_path: Path):
    cfg = _resolve("--preset", "tiny", "--grid", "3", "2", "--exp", "e1", "--backbone-weights", "none")
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    assert yaml.safe_load(path.read_text())["model"]["grid"] == [3, 2]  # plain YAML, no python tags
    loaded = load_yaml(path)
    assert loaded == cfg.to_dict()
    assert Config.from_dict(loaded, str(path)) == cfg
    # the saved file is itself a valid --config
    assert _resolve("--config", str(path)) == cfg


# ---- InferConfig: infer.py's flags, YAML and checks come from one dataclass --------------------------------------
def _resolve_infer(*argv: str, preset: str | None = None) -> InferConfig:
    parser = argparse.ArgumentParser()
    add_infer_flags(parser)
    return resolve_infer_config(parser.parse_args(list(argv)), preset)


def test_infer_flags_are_generated_from_the_dataclass():
    parser = argparse.ArgumentParser()
    add_infer_flags(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    expected = {leaf.flag for leaf in leaves(InferConfig())}
    assert expected <= flags and {"--pseudo-label-epochs", "--pseudo-label-fold", "--time-budget", "--tta"} <= expected
    cfg = _resolve_infer(
        "--tta", "flip", "--checkpoints", "a", "b", "--grid-weights", "2x2=1", "--pseudo-label-epochs", "2"
    )
    assert (cfg.tta, cfg.checkpoints, cfg.grid_weights, cfg.pseudo_label.epochs) == ("flip", ["a", "b"], ["2x2=1"], 2)
    assert cfg.pseudo_label.enabled and _resolve_infer() == InferConfig()


def test_infer_config_precedence_defaults_preset_yaml_flags(tmp_path: Path):
    assert (InferConfig().amp, InferConfig().on_bad_image) == (False, "error")
    kaggle = _resolve_infer(preset="kaggle")
    assert (kaggle.amp, kaggle.on_bad_image) == (True, "fallback")
    config = _yaml(tmp_path, {"physics": "seed", "pseudo_label": {"blend": 0.5}, "amp": False})
    cfg = _resolve_infer("--config", config, preset="kaggle")
    assert (cfg.physics, cfg.pseudo_label.blend, cfg.amp, cfg.on_bad_image) == ("seed", 0.5, False, "fallback")
    cfg = _resolve_infer("--config", config, "--physics", "none", "--amp", preset="kaggle")
    assert (cfg.physics, cfg.amp) == ("none", True)
    # the saved config is a valid --config and round-trips
    path = save_config(cfg, tmp_path / "submission.yaml")
    assert _resolve_infer("--config", str(path)) == cfg == InferConfig.from_dict(load_yaml(path))


def test_infer_yaml_unknown_keys_and_bad_values_raise(tmp_path: Path):
    valid = "blend, epochs, fold, lr_scale, weight"
    with pytest.raises(BiomassError, match=f"unknown key pseudo_label.epoch; valid keys: {valid}"):
        _resolve_infer("--config", _yaml(tmp_path, {"pseudo_label": {"epoch": 1}}))
    with pytest.raises(BiomassError, match="unknown key 'tta_mode'"):
        _resolve_infer("--config", _yaml(tmp_path, {"tta_mode": "full"}, "top.yaml"))
    with pytest.raises(BiomassError, match="unknown --physics 'projected'; choose one of none, seed, project"):
        _resolve_infer("--config", _yaml(tmp_path, {"physics": "projected"}, "phys.yaml"))
    with pytest.raises(BiomassError, match="--batch-size 0: must be >= 1"):
        _resolve_infer("--batch-size", "0")
    with pytest.raises(BiomassError, match="--device 'gpu'|--device gpu: must be cpu, cuda, cuda:N or auto"):
        _resolve_infer("--device", "gpu")


CHOICE_FIELDS = [
    (cls.__name__, leaf) for cls in (Config, InferConfig) for leaf in leaves(cls()) if leaf.meta.get("choices")
]


@pytest.mark.parametrize("owner,leaf", CHOICE_FIELDS, ids=[f"{o}:{leaf.dotted}" for o, leaf in CHOICE_FIELDS])
def test_every_choice_field_is_checked_when_resolved_with_the_allowed_values_named(owner, leaf):
    cls = Config if owner == "Config" else InferConfig
    data: dict = {}
    target = data
    for part in leaf.path[:-1]:
        target = target.setdefault(part, {})
    target[leaf.path[-1]] = "bogus"
    with pytest.raises(BiomassError) as err:
        cls.from_dict(data, "test.yaml")
    message = str(err.value)
    assert f"unknown {leaf.flag} 'bogus'; choose one of {', '.join(leaf.meta['choices'])}" in message
    assert "\n" not in message
    # and a hand-built config (Python API) is refused by the same check
    cfg = cls()
    obj = cfg
    for part in leaf.path[:-1]:
        obj = getattr(obj, part)
    setattr(obj, leaf.path[-1], "bogus")
    with pytest.raises(BiomassError, match=f"unknown {leaf.flag} 'bogus'"):
        check_config(cfg)


def test_ranges_are_checked_once_when_resolved():
    with pytest.raises(BiomassError, match="--crop-bottom 0.7: must be a fraction in"):
        _resolve("--crop-bottom", "0.7")
    with pytest.raises(BiomassError, match="--aug-artifacts 2.0: must be a probability"):
        _resolve("--aug-artifacts", "2")
    with pytest.raises(BiomassError, match="--aux-bins 1: needs at least 2 bins"):
        _resolve("--aux-bins", "1")
    with pytest.raises(BiomassError, match="--grid 0 2: needs rows, cols >= 1"):
        _resolve("--grid", "0", "2")
