"""`python -m src.baseline [--colour] [--plain]`: out-of-fold scores of the peers every model must beat.

- train mean: each held-out image gets its training fold's per-target means (the metric's floor);
- colour ridge (`--colour`): ridge regression of log1p grams on `src.colour.colour_features` of each image
  (green and straw pixel fractions, channel means, hue histogram; per view and whole image), fitted per fold on
  the training images only (the ridge penalty by its own leave-one-out CV inside them), predictions clamped to
  the training fold's log1p range, then expm1'd. A network trained on these images should learn at least what
  the colour fractions tell.
- plain loop (`--plain`): the tiny preset's backbone trained end to end by its own short loop (`plain_loop_oof`),
  written apart from `src.training.fit` so that a fault in fit() cannot hide in it: each view resized to 2T x 2T
  and cut into 2x2 tiles of T; per tile the mean of its patch tokens, the mean over a view's tiles, both views
  concatenated, Linear-GELU-Linear to 5 log1p grams; metric-weighted MSE on log1p; AdamW (lr 1e-3, weight decay
  0.05, constant lr), batch 16, one random horizontal flip of both views per batch; nothing else (no frozen
  stage, mixup, swap, aux heads, EMA, early stopping, warm-up). Scored at its last epoch: no choice saw the
  held-out fold, whose labels the fold's training never receives.

`--out DIR` writes `DIR/baselines.csv` (per fold and pooled weighted R²) and `DIR/oof_<name>.csv` (held-out
predictions, the layout of a fold's oof.csv), which `python -m src.docs demo` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from src.colour import colour_table
from src.data import load_train, read_image, split_views
from src.errors import run_cli
from src.folds import load_folds
from src.io_utils import write_csv_atomic
from src.logs import get_logger
from src.metric import score
from src.schema import TARGET_WEIGHTS, TARGETS

log = get_logger(__name__)
RIDGE_ALPHAS = np.logspace(-2, 4, 13)
# the plain loop's backbone: the tiny preset's random-init ViT (src/config.py PRESETS["tiny"])
PLAIN_BACKBONE = ("vit_small_patch14_reg4_dinov2", {"depth": 2, "embed_dim": 64, "num_heads": 2})
IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))


def mean_baseline_oof(wide: pd.DataFrame, folds: pd.DataFrame) -> np.ndarray:
    """Each held-out image gets the per-target mean of its fold's training images: (N, 5) in wide order."""
    merged = wide[["image_id", *TARGETS]].merge(folds, on="image_id")
    oof = np.zeros((len(merged), len(TARGETS)))
    for fold in merged["fold"].unique():
        held = (merged["fold"] == fold).to_numpy()
        oof[held] = merged.loc[~held, list(TARGETS)].mean().to_numpy()
    order = pd.Index(merged["image_id"]).get_indexer(wide["image_id"])
    return oof[order]


def colour_ridge_oof(wide: pd.DataFrame, folds: pd.DataFrame, features: np.ndarray | None = None) -> np.ndarray:
    """Held-out predictions (N, 5) of a ridge on log1p targets, one fit per fold on its training images only."""
    features = colour_table(wide) if features is None else features
    fold_of = wide[["image_id"]].merge(folds, on="image_id", how="left")["fold"].to_numpy()
    y = np.log1p(wide[list(TARGETS)].to_numpy(dtype=np.float64))
    oof = np.zeros_like(y)
    for fold in np.unique(fold_of):
        held = fold_of == fold
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
        model.fit(features[~held], y[~held])
        # a linear model extrapolates without bound and expm1 makes that explode: clamp to the training range
        low, high = y[~held].min(axis=0), y[~held].max(axis=0)
        oof[held] = np.expm1(np.clip(model.predict(features[held]), low, high))
    return oof


def plain_views(paths, tile: int) -> torch.Tensor:
    """(N, 2, 3, 2T, 2T) uint8: each image decoded once, split into its two views, each resized (area) to 2T."""
    out = np.zeros((len(paths), 2, 3, 2 * tile, 2 * tile), np.uint8)
    for i, path in enumerate(paths):
        for v, view in enumerate(split_views(read_image(path))):
            out[i, v] = cv2.resize(view, (2 * tile, 2 * tile), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    return torch.from_numpy(out)


class PlainNet(torch.nn.Module):
    """Tiny ViT per tile -> mean patch token -> mean over a view's 2x2 tiles -> both views -> 2-layer MLP."""

    def __init__(self, tile: int) -> None:
        super().__init__()
        name, kwargs = PLAIN_BACKBONE
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0, img_size=tile, **kwargs)
        self.tile = tile
        dim = self.backbone.num_features
        self.head = torch.nn.Sequential(torch.nn.Linear(2 * dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, 5))
        self.register_buffer("mean", torch.tensor(IMAGENET[0], dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET[1], dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3, 2T, 2T) uint8 -> (B, 5) log1p grams."""
        batch, t = views.shape[0], self.tile
        x = (views.reshape(batch * 2, 3, 2 * t, 2 * t).float() - self.mean) / self.std
        tiles = x.reshape(batch * 2, 3, 2, t, 2, t).permute(0, 2, 4, 1, 3, 5).reshape(batch * 8, 3, t, t)
        tokens = self.backbone.forward_features(tiles)[:, self.backbone.num_prefix_tokens :].mean(dim=1)
        return self.head(tokens.reshape(batch, 2, 4, -1).mean(dim=2).reshape(batch, -1))


def plain_fit_predict(
    train_views: torch.Tensor, train_grams: np.ndarray, test_views: torch.Tensor, tile: int, epochs: int, seed: int
) -> np.ndarray:
    """Train a PlainNet on the training views only and return grams (N_test, 5) at the last epoch.

    The held-out views come without labels: nothing of the held-out fold can steer training or selection.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = PlainNet(tile)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    target = torch.log1p(torch.as_tensor(train_grams, dtype=torch.float32))
    weights = torch.tensor(TARGET_WEIGHTS) / sum(TARGET_WEIGHTS)
    for _ in range(epochs):
        net.train()
        order = rng.permutation(len(train_views))
        for start in range(0, len(order), 16):
            idx = torch.from_numpy(order[start : start + 16])
            views = train_views[idx]
            if rng.random() < 0.5:
                views = views.flip(-1)  # the same horizontal flip of both views
            loss = (F.mse_loss(net(views), target[idx], reduction="none") * weights).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        preds = torch.cat([net(test_views[i : i + 32]) for i in range(0, len(test_views), 32)])
    return torch.expm1(preds).clamp_min(0).numpy().astype(np.float64)


def plain_loop_oof(
    wide: pd.DataFrame, folds: pd.DataFrame, tile: int = 84, epochs: int = 24, seed: int = 0
) -> np.ndarray:
    """Held-out predictions (N, 5) in grams of the plain loop, one network per fold, scored at its last epoch."""
    fold_of = wide[["image_id"]].merge(folds, on="image_id", how="left")["fold"].to_numpy()
    views = plain_views(wide["path"].tolist(), tile)
    grams = wide[list(TARGETS)].to_numpy(dtype=np.float64)
    oof = np.zeros_like(grams)
    for fold in np.unique(fold_of):
        held = fold_of == fold
        oof[held] = plain_fit_predict(views[~held], grams[~held], views[held], tile, epochs, seed + int(fold))
    return oof


def oof_frame(wide: pd.DataFrame, folds: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    """Held-out predictions in the layout of a fold's oof.csv (image_id, fold, predictions, true_ columns)."""
    out = wide[["image_id"]].merge(folds, on="image_id", how="left")[["image_id", "fold"]]
    for j, name in enumerate(TARGETS):
        out[name] = pred[:, j]
    for name in TARGETS:
        out[f"true_{name}"] = wide[name].to_numpy()
    return out


def fold_scores(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Weighted R² of each fold's held-out images and of all of them pooled."""
    rows = []
    parts = [(str(int(k)), part) for k, part in frame.groupby("fold", sort=True)] + [("pooled", frame)]
    for fold, part in parts:
        truth = part[[f"true_{t}" for t in TARGETS]].to_numpy(np.float64)
        pred = part[list(TARGETS)].to_numpy(np.float64)
        rows.append({"baseline": name, "fold": fold, "images": len(part), **score(truth, pred)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/synthetic")
    parser.add_argument("--folds", default="data/folds.csv")
    parser.add_argument("--colour", action="store_true", help="also the colour-feature ridge, fitted per fold")
    parser.add_argument("--plain", action="store_true", help="also the plain end-to-end loop of the tiny backbone")
    parser.add_argument("--plain-tile", type=int, default=84, help="tile side T of the plain loop (view 2T x 2T)")
    parser.add_argument("--plain-epochs", type=int, default=24, help="epochs of the plain loop (scored at the last)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the plain loop (one row each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="directory for baselines.csv and oof_<name>.csv")
    args = parser.parse_args(argv)
    wide = load_train(args.data_dir)
    folds = load_folds(args.folds, wide)
    frames = {"train_mean": oof_frame(wide, folds, mean_baseline_oof(wide, folds))}
    if args.colour:
        frames["colour_ridge"] = oof_frame(wide, folds, colour_ridge_oof(wide, folds))
    if args.plain:
        if args.threads:
            torch.set_num_threads(args.threads)
        for seed in args.seeds:
            name = f"plain_loop_seed{seed}"
            frames[name] = oof_frame(wide, folds, plain_loop_oof(wide, folds, args.plain_tile, args.plain_epochs, seed))
    table = pd.concat([fold_scores(frame, name) for name, frame in frames.items()], ignore_index=True)
    for name in frames:
        part = table[table["baseline"] == name].set_index("fold")
        per_fold = " ".join(f"{k}={v:.4f}" for k, v in part["weighted_r2"].items() if k != "pooled")
        label = {"train_mean": "train-mean baseline", "colour_ridge": "colour-ridge baseline"}.get(
            name, name.replace("_", "-") + " baseline"
        )
        print(f"{label} OOF: weighted_r2={part.loc['pooled', 'weighted_r2']:.4f} (per fold {per_fold})")
    if args.out is not None:
        out = Path(args.out)
        write_csv_atomic(table, out / "baselines.csv")
        for name, frame in frames.items():
            write_csv_atomic(frame, out / f"oof_{name}.csv")
        print(f"wrote {out / 'baselines.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
