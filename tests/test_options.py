"""The options beyond the seed design (docs/OPTIONS.md): each test shows its option changes what it claims.

Derived heads, frozen blocks, layer decay, EMA, SWA, raw-space loss, fusion variants, auxiliary NDVI/height/bin
heads, DINOv3 (patch 16) and grid 1x1 end to end, and the ablation script's smoke run. Tiny random-init ViTs at
28/32 px tiles on the session's synthetic data, so the file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_FLAGS, run_script

from src import training
from src.averaging import average_state_dicts, keep_top_k
from src.checkpoint import CHECKPOINT_FORMAT, check_resume, target_stats
from src.config import resolve_config
from src.data import load_train
from src.errors import BiomassError
from src.folds import load_folds
from src.inference import Predictor, predict_ensemble
from src.losses import aux_bin_labels, aux_loss, bin_labels, quantile_bin_edges, target_loss
from src.metric import weighted_r2
from src.model import build_model
from src.schema import TARGET_WEIGHTS, TARGETS
from src.training import check_options, fit

CPU = torch.device("cpu")
FOLD = 1  # 26 train / 14 val images of the session folds
# subprocesses on 2 shared cores: one thread avoids OpenMP spin-waiting (3x faster under load)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
NO_AUX = ["--aux-state-weight", "0", "--aux-month-weight", "0", "--aux-species-weight", "0"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = _script("train")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops on 2 shared cores


def config(synthetic_dir: Path, folds_csv: Path, *extra: str):
    """The config train.py resolves from TINY_FLAGS + extra flags (the real parser)."""
    argv = [
        "--fold",
        str(FOLD),
        *TINY_FLAGS,
        "--data-dir",
        str(synthetic_dir),
        "--folds",
        str(folds_csv),
        "--device",
        "cpu",
        *extra,
    ]
    return resolve_config(train_script.parse_args(argv))


def split(synthetic_dir: Path, folds_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    wide = load_train(synthetic_dir)
    wide = wide.merge(load_folds(folds_csv, wide), on="image_id")
    return wide[wide["fold"] != FOLD].reset_index(drop=True), wide[wide["fold"] == FOLD].reset_index(drop=True)


def model_of(cfg, seed: int = 0, stats: dict | None = None):
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    if stats is not None:
        model.init_from_stats(stats)
    return model


def feature_batch(model, batch: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Cached-feature inputs with consistent grams targets and every label kind (some unknown)."""
    g = torch.Generator().manual_seed(seed)
    n_tiles = model.grid[0] * model.grid[1]
    parts = torch.rand(batch, 3, generator=g) * 60  # green dead clover
    green, dead, clover = parts.unbind(-1)
    targets = torch.stack([green, dead, clover, green + clover, green + dead + clover], dim=-1)
    return {
        "left": torch.randn(batch, n_tiles, model.feature_dim, generator=g),
        "right": torch.randn(batch, n_tiles, model.feature_dim, generator=g),
        "targets": targets,
        "index": torch.arange(batch),
        "state": torch.zeros(batch, dtype=torch.long),
        "month": torch.zeros(batch, dtype=torch.long),
        "species": torch.zeros(batch, dtype=torch.long),
        "ndvi": torch.tensor([0.5, -1.0, float("nan"), 2.0, 0.0, 1.5])[:batch],
        "height": torch.tensor([-0.5, 1.0, 0.3, float("nan"), 0.2, -2.0])[:batch],
        "bins": torch.tensor(
            [[0, 1, 2, 3, 0], [3, 3, 3, 3, 3], [1, -1, 0, 2, 1], [2, 0, 1, 1, 2], [0, 0, 0, 0, 0], [1, 2, 3, 0, 1]]
        )[:batch],
    }


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def val_score(checkpoint: Path, val: pd.DataFrame) -> float:
    """Weighted R2 of a checkpoint on the held-out images through the inference path."""
    predictor = Predictor(checkpoint, "cpu", tta="none")
    pred = predict_ensemble([predictor], val, batch_size=8, show=False).mean("none")
    return weighted_r2(val[list(TARGETS)].to_numpy(dtype=np.float64), pred)


# ---- --heads: three parts, two derived -----------------------------------------------------------------------
@pytest.mark.parametrize("space", ["log1p", "raw"])
@pytest.mark.parametrize("heads", ["green-dead-clover", "clover-gdm-total"])
def test_derived_heads_satisfy_the_identities_exactly_and_are_non_negative(synthetic_dir, folds_csv, heads, space):
    cfg = config(synthetic_dir, folds_csv, "--heads", heads, "--target-space", space)
    train, _ = split(synthetic_dir, folds_csv)
    stats = target_stats(train)
    model = model_of(cfg, stats=stats).eval()
    assert len(model.heads) == 3
    with torch.no_grad():
        for head in model.heads:  # larger weights: raw head outputs well below and above 0
            head.net[-1].weight.normal_(0, 3.0)
        batch = feature_batch(model, batch=6)
        out = model(batch["left"], batch["right"], features=True)
        grams = model.to_grams(out["targets"])
    green, dead, clover, gdm, total = grams.unbind(-1)
    assert torch.equal(gdm, green + clover) and torch.equal(total, gdm + dead)
    assert bool((grams >= 0).all()) and float(grams.max()) > 1.0
    # the five outputs are the derived grams in the target space (the loss sees all five)
    expected = torch.log1p(grams) if space == "log1p" else grams / model.target_scale
    torch.testing.assert_close(out["targets"], expected, rtol=1e-4, atol=1e-4)
    if space == "raw":
        assert model.target_scale.tolist() == pytest.approx(stats["scale"])

    # at init (last-layer weights zeroed) each softplus part is its target's training mean
    fresh = model_of(cfg, stats=stats).eval()
    with torch.no_grad():
        for head in fresh.heads:
            head.net[-1].weight.zero_()
        parts = list(fresh.head_targets)
        pred = fresh.to_grams(fresh(batch["left"], batch["right"], features=True)["targets"])[0]
    mean = np.asarray(stats["mean"]) if space == "raw" else np.expm1(np.asarray(stats["mean_log1p"]))
    np.testing.assert_allclose(pred[parts].numpy(), mean[parts], rtol=1e-4)


def test_five_heads_do_not_enforce_the_identities(synthetic_dir, folds_csv):
    """The contrast: the default five independent heads break GDM = Green + Clover unless post-processed."""
    train, _ = split(synthetic_dir, folds_csv)
    model = model_of(config(synthetic_dir, folds_csv), stats=target_stats(train)).eval()
    with torch.no_grad():
        batch = feature_batch(model)
        grams = model.to_grams(model(batch["left"], batch["right"], features=True)["targets"])
    assert len(model.heads) == 5
    assert float((grams[:, 3] - grams[:, 0] - grams[:, 2]).abs().max()) > 1.0


# ---- --target-space raw --------------------------------------------------------------------------------------
def test_raw_space_loss_equals_a_hand_computation():
    grams = torch.tensor([[10.0, 0.0, 3.0, 13.0, 13.0], [50.0, 20.0, 0.0, 50.0, 70.0]])
    scale = torch.tensor([10.0, 5.0, 2.0, 20.0, 25.0])
    # errors in grams: inside beta = 5 g (quadratic) and outside (linear)
    err_grams = np.array([[1.0, -2.0, 0.5, 8.0, -30.0], [-12.0, 4.0, 0.0, 2.5, 6.0]])
    pred = (grams + torch.tensor(err_grams, dtype=torch.float32)) / scale
    w = np.asarray(TARGET_WEIGHTS)
    e = np.abs(err_grams)
    smooth = np.where(e < 5.0, 0.5 * e**2 / 5.0, e - 2.5) / scale.numpy()  # SmoothL1(5 g) in grams / scale
    by_hand = np.mean(np.sum(w * smooth, axis=1)) / w.sum()
    loss = target_loss(pred, grams, TARGET_WEIGHTS, space="raw", scale=scale, beta=5.0)
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    # rows: 0.1*0.01 + 0.1*0.08 + 0.1*0.0125 + 0.2*0.275 + 0.5*1.1 = 0.61525;
    #       0.1*0.95 + 0.1*0.32 + 0.2*0.03125 + 0.5*0.14
    assert by_hand == pytest.approx((0.61525 + 0.20325) / 2, rel=1e-6)
    torch_smooth = F.smooth_l1_loss(pred * scale, grams, beta=5.0, reduction="none") / scale
    assert float((torch_smooth * torch.tensor(w)).sum(1).mean() / w.sum()) == pytest.approx(by_hand, rel=1e-6)
    # beta 0: weighted L1 in grams / scale
    l1 = np.mean(np.sum(w * e / scale.numpy(), axis=1)) / w.sum()
    assert float(target_loss(pred, grams, TARGET_WEIGHTS, space="raw", scale=scale, beta=0.0)) == pytest.approx(
        l1, rel=1e-6
    )


def test_raw_space_model_trains_on_the_training_fold_scale(synthetic_dir, folds_csv):
    cfg = config(synthetic_dir, folds_csv, "--target-space", "raw", *NO_AUX)
    train, _ = split(synthetic_dir, folds_csv)
    stats = target_stats(train)
    assert stats["scale"] == pytest.approx(np.maximum(train[list(TARGETS)].to_numpy().std(axis=0), 1.0).tolist())
    model = model_of(cfg, stats=stats).eval()
    batch = feature_batch(model)
    with torch.no_grad():
        out = model(batch["left"], batch["right"], features=True)
        loss = training.batch_loss(model, batch, cfg, CPU, True, None)
    scale = torch.tensor(stats["scale"], dtype=torch.float32)
    torch.testing.assert_close(model.to_grams(out["targets"]), (out["targets"] * scale).clamp_min(0))
    expected = target_loss(
        out["targets"], batch["targets"], cfg.train.target_weights, space="raw", scale=scale, beta=cfg.train.huber_beta
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert "target_scale" in model.state_dict()  # a raw checkpoint carries its scale; log1p ones do not
    assert "target_scale" not in model_of(config(synthetic_dir, folds_csv)).state_dict()


# ---- --fusion ----------------------------------------------------------------------------------------------------
def test_fusion_variants_build_and_differ(synthetic_dir, folds_csv):
    models = {
        f: model_of(config(synthetic_dir, folds_csv, "--fusion", f)).eval() for f in ("film", "concat", "cross-attn")
    }
    modules = {f: {name.split(".")[0] for name, _ in m.named_parameters()} for f, m in models.items()}
    assert {"film_from_right", "film_from_left"} <= modules["film"] and "fuse" in modules["concat"]
    assert {"cross_from_right", "cross_from_left"} <= modules["cross-attn"]
    batch = feature_batch(models["film"])
    with torch.no_grad():
        outs = {f: m(batch["left"], batch["right"], features=True) for f, m in models.items()}
    for out in outs.values():
        assert out["targets"].shape == (6, 5) and out["attention"].shape == (6, 8)
        torch.testing.assert_close(out["attention"].sum(dim=1), torch.ones(6))
    # concat pools each view alone: each view's attention weights sum to exactly 1/2
    torch.testing.assert_close(outs["concat"]["attention"][:, :4].sum(dim=1), torch.full((6,), 0.5))
    assert not torch.allclose(outs["concat"]["targets"], outs["film"]["targets"], atol=1e-4)


def test_cross_attention_is_the_identity_at_init_and_learns_cross_view_effects(synthetic_dir, folds_csv):
    film = model_of(config(synthetic_dir, folds_csv)).eval()
    cross = model_of(config(synthetic_dir, folds_csv, "--fusion", "cross-attn"), seed=1).eval()
    shared = {k: v for k, v in film.state_dict().items() if not k.startswith("film_")}
    missing, unexpected = cross.load_state_dict(shared, strict=False)
    assert all(k.startswith("cross_") for k in missing) and not unexpected
    batch = feature_batch(film)
    with torch.no_grad():
        # FiLM and cross-attention are both exactly the identity at init: same shared weights, same outputs
        torch.testing.assert_close(
            cross(batch["left"], batch["right"], features=True)["targets"],
            film(batch["left"], batch["right"], features=True)["targets"],
            rtol=0,
            atol=1e-6,
        )
        tokens, context = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
        block = cross.cross_from_right
        assert torch.equal(block(tokens, context), tokens)
        block.attn.out_proj.weight.normal_(0, 0.5)
        moved = block(tokens, context)
        assert not torch.allclose(moved, tokens, atol=1e-3)
        assert not torch.allclose(
            block(tokens, context.flip(0)), moved, atol=1e-3
        )  # the tokens now read the other view
        assert not torch.allclose(
            cross(batch["left"], batch["right"], features=True)["targets"],
            film(batch["left"], batch["right"], features=True)["targets"],
            atol=1e-4,
        )


# ---- --freeze-blocks and --layer-decay ---------------------------------------------------------------------------
def test_frozen_blocks_get_no_gradients_in_stage_2_and_later_blocks_do(synthetic_dir, folds_csv):
    cfg = config(synthetic_dir, folds_csv, "--freeze-blocks", "1", "--mixup-prob", "0")
    train, val = split(synthetic_dir, folds_csv)
    model = model_of(cfg, stats=target_stats(train))
    model.unfreeze_backbone(cfg.train.freeze_blocks)
    left = torch.rand(2, 3, *model.view_size)
    model.train()
    model(left, left.flip(-1))["targets"].sum().backward()
    frozen = [n for n, p in model.backbone.named_parameters() if p.grad is None]
    trained = [n for n, p in model.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert frozen and all(
        n.startswith(("blocks.0.", "patch_embed", "cls_token", "reg_token", "pos_embed")) for n in frozen
    )
    assert {n for n in frozen if n.startswith("blocks.0.")} == {
        n for n, _ in model.backbone.blocks[0].named_parameters(prefix="blocks.0")
    }
    assert any(n.startswith("blocks.1.") for n in trained) and any(n.startswith("norm.") for n in trained)
    groups = model.param_groups(1e-3, 1e-4, 0.01, include_backbone=True)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_groups for n, p in model.backbone.named_parameters() if n in frozen)

    # through fit: one stage-1 and one stage-2 epoch leave block 0 and the embeddings bit-identical
    model = model_of(cfg, stats=target_stats(train))
    before = state_of(model.backbone)
    fit(cfg, train, val, None, CPU, model=model, fold=FOLD)
    after = state_of(model.backbone)
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == name.startswith(("blocks.0.", "patch_embed", "cls_token", "reg_token", "pos_embed")), name
    with pytest.raises(BiomassError, match="--freeze-blocks 3: vit_small_patch14_reg4_dinov2 has 2 blocks"):
        check_options(config(synthetic_dir, folds_csv, "--freeze-blocks", "3"), model_of(cfg))  # one check, before work


def test_layer_decay_gives_backbone_lr_times_decay_to_the_depth_below_the_top(synthetic_dir, folds_csv):
    model = model_of(config(synthetic_dir, folds_csv))
    model.unfreeze_backbone()
    groups = model.param_groups(lr=1e-3, backbone_lr=8e-4, weight_decay=0.01, include_backbone=True, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    # depth 2: stem (patch/pos embedding, tokens) = layer 0, block i = layer i + 1, final norm with the top block
    expected = {
        "patch_embed": 2e-4,
        "cls_token": 2e-4,
        "reg_token": 2e-4,
        "pos_embed": 2e-4,
        "blocks.0": 4e-4,
        "blocks.1": 8e-4,
        "norm": 8e-4,
    }
    for name, param in model.backbone.named_parameters():
        key = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]
        assert lr_of[id(param)] == pytest.approx(expected[key]), name
    assert all(lr_of[id(p)] == 1e-3 for n, p in model.named_parameters() if not n.startswith("backbone."))
    # decay 1 is the plain two-group layout
    plain = model.param_groups(lr=1e-3, backbone_lr=8e-4, weight_decay=0.01, include_backbone=True)
    assert {g["name"] for g in plain} == {"backbone", "backbone_no_decay", "head", "head_no_decay"}


# ---- --ema-decay and --swa-top-k ----------------------------------------------------------------------------------
def test_ema_weights_are_validated_selected_and_saved(synthetic_dir, folds_csv, tmp_path):
    # one stage-1 epoch, one optimizer step (batch > 26 training images): EMA = d * init + (1 - d) * trained
    decay = 0.6
    cfg = config(
        synthetic_dir, folds_csv, "--epochs", "1", "--batch-size", "32", "--ema-decay", str(decay), "--no-ema-warmup"
    )
    train, val = split(synthetic_dir, folds_csv)
    model = model_of(cfg, stats=target_stats(train))
    init = state_of(model)
    fit(cfg, train, val, tmp_path, CPU, model=model, fold=FOLD)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    raw = last["model"]
    assert best["model"].keys() == raw.keys() == last["ema"].keys()
    for key, value in raw.items():
        if value.is_floating_point():
            torch.testing.assert_close(best["model"][key], decay * init[key] + (1 - decay) * value, rtol=0, atol=1e-6)
        assert torch.equal(best["model"][key], last["ema"][key])
    changed = [k for k in raw if not torch.equal(raw[k], init[k])]
    assert changed and all(not torch.equal(best["model"][k], raw[k]) for k in changed)
    assert all(
        torch.equal(best["model"][k], raw[k]) for k in raw if k.startswith("backbone.")
    )  # frozen: EMA of a constant
    # the recorded validation score is the EMA weights' score, not the raw weights'
    ema_score = val_score(tmp_path / "best.pt", val)
    torch.save({**best, "model": raw}, tmp_path / "raw.pt")
    assert best["val_metric"] == pytest.approx(ema_score, abs=1e-4)
    assert abs(val_score(tmp_path / "raw.pt", val) - ema_score) > 1e-3
    assert pd.read_csv(tmp_path / "metrics.csv")["weighted_r2"].iloc[0] == pytest.approx(best["val_metric"], abs=1e-12)
    with pytest.raises(BiomassError, match="--ema-decay 1.0"):
        config(synthetic_dir, folds_csv, "--ema-decay", "1")


def test_keep_top_k_and_average_state_dicts_by_hand():
    top: list[dict] = []
    linear = torch.nn.Linear(2, 1)
    for epoch, metric in enumerate([0.1, 0.5, float("nan"), 0.3, 0.2, 0.6]):
        with torch.no_grad():
            linear.weight.fill_(epoch)
        keep_top_k(top, metric, epoch, linear, 2)
    assert [(t["epoch"], t["metric"]) for t in top] == [(5, 0.6), (1, 0.5)]
    assert torch.equal(top[1]["model"]["weight"], torch.full((1, 2), 1.0))
    states = [
        {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)},
        {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)},
    ]
    avg = average_state_dicts(states)
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and int(avg["n"]) == 3


def test_swa_averages_the_k_best_epochs(synthetic_dir, folds_csv, tmp_path, monkeypatch):
    cfg = config(synthetic_dir, folds_csv, "--epochs", "4", "--freeze-epochs", "4", "--swa-top-k", "2")
    train, val = split(synthetic_dir, folds_csv)
    seen: dict[int, dict] = {}
    original = training.keep_top_k

    def recording(top, metric, epoch, model, k):
        seen[epoch] = state_of(model)
        original(top, metric, epoch, model, k)

    monkeypatch.setattr(training, "keep_top_k", recording)
    result = fit(cfg, train, val, tmp_path, CPU, fold=FOLD)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    best_two = sorted(int(e) for e in metrics.nlargest(2, "weighted_r2")["epoch"])
    swa = torch.load(tmp_path / "swa.pt", weights_only=True)
    assert swa["swa_epochs"] == best_two and sorted(seen) == [0, 1, 2, 3]
    for key, value in swa["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (seen[best_two[0]][key] + seen[best_two[1]][key]) / 2, rtol=0, atol=1e-7)
    assert not torch.equal(swa["model"]["heads.0.net.3.weight"], seen[best_two[0]]["heads.0.net.3.weight"])
    assert result.swa_metric == pytest.approx(swa["val_metric"]) and swa["val_metric"] == pytest.approx(
        val_score(tmp_path / "swa.pt", val), abs=1e-4
    )
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    if (
        result.swa_metric >= metrics["weighted_r2"].max()
    ):  # the average replaces best.pt only when it scores at least as well
        assert best.get("swa_epochs") == best_two and result.best_metric == pytest.approx(result.swa_metric)
    else:
        assert "swa_epochs" not in best and best["val_metric"] == pytest.approx(metrics["weighted_r2"].max())


# ---- auxiliary heads: NDVI, height, interval bins ---------------------------------------------------------------
def test_quantile_bins_by_hand():
    grams = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [1, 5], [2, 6], [3, 7], [4, 8]], dtype=np.float64)
    edges = quantile_bin_edges(grams, 4)
    np.testing.assert_allclose(edges, [[0.0, 0.5, 2.25], [2.75, 4.5, 6.25]])
    labels = bin_labels(np.array([[0.0, 1.0], [0.4, 4.5], [3.0, 9.0], [np.nan, 2.75]]), edges)
    # bin k holds edges[k-1] < g <= edges[k]: the many zeros land in bin 0, an edge value in the bin below it
    assert labels.tolist() == [[0, 0], [1, 1], [3, 3], [-1, 0]]


def _ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy over the labels >= 0 (numpy, by hand)."""
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    keep = labels >= 0
    return float(-logp[keep, labels[keep]].mean())


def test_aux_heads_add_hand_computed_loss_terms_and_leave_targets_alone(synthetic_dir, folds_csv):
    base_cfg = config(synthetic_dir, folds_csv, *NO_AUX, "--no-use-aux-heads")
    aux_cfg = config(
        synthetic_dir,
        folds_csv,
        *NO_AUX,
        "--no-use-aux-heads",
        "--aux-ndvi-weight",
        "0.3",
        "--aux-height-weight",
        "0.2",
        "--aux-bins",
        "4",
        "--aux-bins-weight",
        "0.5",
    )
    base, aux = model_of(base_cfg).eval(), model_of(aux_cfg, seed=1).eval()
    missing, _ = aux.load_state_dict(base.state_dict(), strict=False)
    assert sorted(missing) == [
        "aux_bin_head.bias",
        "aux_bin_head.weight",
        "aux_regression.height.bias",
        "aux_regression.height.weight",
        "aux_regression.ndvi.bias",
        "aux_regression.ndvi.weight",
    ]
    batch = feature_batch(base)
    with torch.no_grad():
        out_base = base(batch["left"], batch["right"], features=True)
        out = aux(batch["left"], batch["right"], features=True)
        assert torch.equal(out["targets"], out_base["targets"])  # the heads never change the predictions
        assert out["bins"].shape == (6, 5, 4) and out["ndvi"].shape == (6,)
        loss_base = float(training.batch_loss(base, batch, base_cfg, CPU, True, None))
        loss = float(training.batch_loss(aux, batch, aux_cfg, CPU, True, None))
        lam, perm = 0.3, torch.tensor([1, 2, 3, 4, 5, 0])
        loss_mix = float(training.batch_loss(aux, batch, aux_cfg, CPU, True, (lam, perm)))
        loss_base_mix = float(training.batch_loss(base, batch, base_cfg, CPU, True, (lam, perm)))
    assert loss_base == pytest.approx(
        float(target_loss(out_base["targets"], batch["targets"], TARGET_WEIGHTS)), rel=1e-6
    )

    def mse(pred, label):
        keep = np.isfinite(label)
        return float(np.mean((pred[keep] - label[keep]) ** 2))

    ndvi = mse(out["ndvi"].numpy(), batch["ndvi"].numpy())
    height = mse(out["height"].numpy(), batch["height"].numpy())
    logits, labels = out["bins"].numpy().reshape(-1, 4), batch["bins"].numpy().reshape(-1)
    bins = _ce(logits, labels)  # mean over images x targets, the -1 label ignored
    assert loss - loss_base == pytest.approx(0.3 * ndvi + 0.2 * height + 0.5 * bins, rel=1e-5)
    # under mixup the bin term is lam * CE(labels) + (1 - lam) * CE(labels[perm]) (regression labels arrive mixed)
    bins_mix = lam * bins + (1 - lam) * _ce(logits, batch["bins"][perm].numpy().reshape(-1))
    assert loss_mix - loss_base_mix == pytest.approx(0.3 * ndvi + 0.2 * height + 0.5 * bins_mix, rel=1e-5)
    expected = aux_loss(out["bins"].transpose(1, 2), batch["bins"], (lam, perm))
    assert float(expected) == pytest.approx(bins_mix, rel=1e-5)


def test_aux_bins_labels_come_from_the_training_fold_and_edges_are_saved(synthetic_dir, folds_csv, tmp_path):
    cfg = config(synthetic_dir, folds_csv, "--epochs", "1", "--aux-bins", "3", "--aux-ndvi-weight", "0.1")
    train, val = split(synthetic_dir, folds_csv)
    train_b, val_b, edges = aux_bin_labels(train, val, 3)
    np.testing.assert_allclose(edges, np.quantile(train[list(TARGETS)].to_numpy(), [1 / 3, 2 / 3], axis=0).T)
    counts = train_b["bin_Dry_Total_g"].value_counts().sort_index()
    assert counts.index.tolist() == [0, 1, 2] and counts.max() - counts.min() <= 1  # quantile bins: equal counts
    assert set(val_b["bin_Dry_Total_g"]) <= {0, 1, 2} and "bin_Dry_Total_g" not in train  # copies, inputs untouched
    fit(cfg, train, val, tmp_path, CPU, fold=FOLD)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    np.testing.assert_allclose(best["target_stats"]["bin_edges"], edges)
    assert best["model"]["aux_bin_head.weight"].shape == (15, cfg.model.fusion_dim)
    predictor = Predictor(
        tmp_path / "best.pt", tta="none"
    )  # inference rebuilds the head from the config and ignores it
    assert predictor.model.cfg.aux_bins == 3
    for bad in ("1", "-2"):
        with pytest.raises(BiomassError, match="needs at least 2 bins"):
            model_of(config(synthetic_dir, folds_csv, "--aux-bins", bad))


def test_resume_accepts_a_run_saved_before_the_newer_model_keys(synthetic_dir, folds_csv, tmp_path):
    """A last.pt whose config lacks keys added later (e.g. aux_bins) resumes: missing keys are their defaults."""
    cfg = config(synthetic_dir, folds_csv)
    old = cfg.to_dict()
    for key in ("aux_bins", "fusion", "heads"):
        del old["model"][key]
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "config": old}, tmp_path / "last.pt")
    assert check_resume(tmp_path / "last.pt", cfg) is not None
    with pytest.raises(BiomassError, match="aux_bins 0 -> 2"):
        check_resume(tmp_path / "last.pt", config(synthetic_dir, folds_csv, "--aux-bins", "2"))


def test_freeze_blocks_beyond_the_depth_fails_before_any_work(synthetic_dir, folds_csv, tmp_path):
    cfg = config(synthetic_dir, folds_csv, "--out-dir", str(tmp_path), "--freeze-blocks", "3")
    message = "--freeze-blocks 3: vit_small_patch14_reg4_dinov2 has 2 blocks; use 0 to 2"
    with pytest.raises(BiomassError, match=message):
        check_options(cfg, model_of(cfg))
    with pytest.raises(BiomassError, match=message):
        training.train_fold(cfg, FOLD)
    assert not any(tmp_path.iterdir())  # no run directory left behind


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--layer-decay", "0"], "--layer-decay 0.0: must be in"),
        (["--ema-decay", "1"], "--ema-decay 1.0: must be in"),
        (["--swa-top-k", "1"], "--swa-top-k 1: an average needs K >= 2"),
        (["--huber-beta", "-1"], "--huber-beta -1.0: must be >= 0"),
        (["--feature", "gem"], "argument --feature: invalid choice"),
        (["--freeze-epochs", "9", "--epochs", "3"], "--freeze-epochs 9 exceeds --epochs 3"),
    ],
)
def test_bad_option_values_fail_when_the_config_is_resolved(synthetic_dir, folds_csv, tmp_path, flags, message, capsys):
    """Ranges and choices are checked once, in src/config.py, before a model is built or a file written."""
    if "--feature" in flags:  # a choice is refused by argparse itself: usage line + exit 2
        with pytest.raises(SystemExit):
            config(synthetic_dir, folds_csv, "--out-dir", str(tmp_path), *flags)
        assert message in capsys.readouterr().err
    else:
        with pytest.raises(BiomassError, match=message):
            config(synthetic_dir, folds_csv, "--out-dir", str(tmp_path), *flags)
    assert not any(tmp_path.iterdir())


# ---- DINOv3 (patch 16) and grid 1x1, end to end ----------------------------------------------------------------------
def test_tiny_dinov3_preset_end_to_end_through_train_and_infer(synthetic_dir, folds_csv, tmp_path):
    flags = [
        "--preset",
        "tiny-dinov3",
        "--tile-size",
        "32",
        "--epochs",
        "2",
        "--freeze-epochs",
        "1",
        "--batch-size",
        "8",
        "--seed",
        "0",
    ]
    run_script(
        "train.py",
        "--fold",
        "0",
        "--data-dir",
        str(synthetic_dir),
        "--folds",
        str(folds_csv),
        "--out-dir",
        str(tmp_path),
        "--exp",
        "v3",
        *flags,
        env=ONE_THREAD,
    )
    run_dir = tmp_path / "v3" / "grid2x2" / "fold0"
    predictor = Predictor(run_dir / "best.pt", tta="none")
    assert predictor.cfg.model.backbone == "vit_small_patch16_dinov3" and predictor.model.patch == 16
    assert predictor.model.tile_size == 32 and predictor.model.backbone.num_prefix_tokens == 5
    assert np.isfinite(pd.read_csv(run_dir / "metrics.csv")["weighted_r2"]).all()
    out = tmp_path / "submission.csv"
    run_script(
        "infer.py",
        "--checkpoints",
        str(tmp_path / "v3"),
        "--data-dir",
        str(synthetic_dir),
        "--out",
        str(out),
        "--tta",
        "flip",
        env=ONE_THREAD,
    )
    sub = pd.read_csv(out)
    assert len(sub) == 6 * 5 and np.isfinite(sub["target"]).all() and (sub["target"] >= 0).all()
    # 28 px is a multiple of 14 but not of the patch 16 read from the model: refused, naming the fix
    with pytest.raises(BiomassError, match="not a multiple of vit_small_patch16_dinov3's patch size 16; use e.g. 16"):
        model_of(config(synthetic_dir, folds_csv, "--preset", "tiny-dinov3", "--tile-size", "28"))


def test_dinov3_gradient_checkpointing_keeps_the_gradients(synthetic_dir, folds_csv):
    grads = []
    for flag in ("--no-grad-checkpointing", "--grad-checkpointing"):
        model = model_of(config(synthetic_dir, folds_csv, "--preset", "tiny-dinov3", "--tile-size", "32", flag)).train()
        views = torch.rand(2, 3, *model.view_size, generator=torch.Generator().manual_seed(0))
        model(views, views.flip(-1))["targets"].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_grid_1x1_top_private_bundle_end_to_end(synthetic_dir, folds_csv, tmp_path):
    """Raw space, three-head derivation, EMA, NDVI/height aux, grid 1x1: train.py's and infer.py's own main()."""
    flags = [
        *TINY_FLAGS,
        "--grid",
        "1",
        "1",
        "--target-space",
        "raw",
        "--heads",
        "green-dead-clover",
        "--ema-decay",
        "0.5",
        "--aux-ndvi-weight",
        "0.1",
        "--aux-height-weight",
        "0.1",
    ]
    assert (
        train_script.main(
            [
                "--fold",
                "0",
                "--data-dir",
                str(synthetic_dir),
                "--folds",
                str(folds_csv),
                "--out-dir",
                str(tmp_path),
                "--exp",
                "bundle",
                *flags,
            ]
        )
        == 0
    )
    best = tmp_path / "bundle" / "grid1x1" / "fold0" / "best.pt"
    predictor = Predictor(best, tta="none")
    assert predictor.grid == (1, 1) and predictor.view_size == (28, 28)
    assert {"film_from_left", "aux_regression"} <= {n.split(".")[0] for n, _ in predictor.model.named_parameters()}
    out = tmp_path / "sub.csv"
    assert (
        _script("infer").main(
            [
                "--checkpoints",
                str(tmp_path / "bundle"),
                "--data-dir",
                str(synthetic_dir),
                "--out",
                str(out),
                "--physics",
                "none",
                "--tta",
                "none",
            ]
        )
        == 0
    )
    wide = pd.read_csv(out).assign(
        image=lambda d: d["sample_id"].str.split("__").str[0], t=lambda d: d["sample_id"].str.split("__").str[1]
    )
    grams = wide.pivot(index="image", columns="t", values="target")[list(TARGETS)].to_numpy()
    assert grams.shape == (6, 5) and (grams >= 0).all()
    # with --physics none the identities hold from the heads alone (to 4 decimals of the written file)
    np.testing.assert_allclose(grams[:, 3], grams[:, 0] + grams[:, 2], atol=2e-4)
    np.testing.assert_allclose(grams[:, 4], grams[:, 3] + grams[:, 1], atol=2e-4)


# ---- the ablation script ---------------------------------------------------------------------------------------------
def test_ablation_quick_writes_table_and_csv(synthetic_dir, folds_csv, tmp_path):
    from bench import ablate

    doc, csv = tmp_path / "ABLATION.md", tmp_path / "ablation.csv"
    ablate.main(
        [
            "--quick",
            "--data-dir",
            str(synthetic_dir),
            "--folds",
            str(folds_csv),
            "--out-dir",
            str(tmp_path / "ck"),
            "--doc",
            str(doc),
            "--csv",
            str(csv),
            "--seeds",
            "0",
            "1",
        ]
    )
    table = pd.read_csv(csv)
    assert set(table["experiment"]) == {"default", "top-private"}
    assert table.loc[table["baseline"], "experiment"].tolist() == ["default"]
    for col in ("weighted_r2", "seed_std", "delta", "train_s", *(f"r2_{t}" for t in TARGETS)):
        assert col in table and np.isfinite(table[col]).all(), col
    assert table["fixed_r2"].isna().all()  # one fold: no other fold to fix its epoch
    assert (table["seeds"] == 2).all()
    assert sorted(p.parent.name for p in (tmp_path / "ck" / "default").glob("grid2x2/fold*/seed*/best.pt")) == [
        "seed0",
        "seed1",
    ]
    assert table.loc[table["experiment"] == "default", "delta"].item() == 0.0
    other = table[table["experiment"] == "top-private"].iloc[0]
    assert other["ci_low"] <= other["delta"] <= other["ci_high"]
    assert other["verdict"] in ("better", "worse", "can't tell")
    text = doc.read_text()
    assert "| default *" in text and "top-private" in text and "python bench/ablate.py --quick" in text
    assert "<!-- generated:ablation -->" in text and "95% CI" in text and "--seeds 0 1" in text
    meta = json.loads(csv.with_suffix(".json").read_text())
    assert meta["seeds"] == 2 and meta["quick"] is True
    from src.docs import render_ablation, sections

    assert sections(text)[0][1].strip() == render_ablation(table, meta).strip()  # the doc is its sources, rendered
