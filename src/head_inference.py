"""A head experiment at inference: every fold's (and seed's) frozen-feature head of `checkpoints/<exp>`.

Features are computed once for the images with the experiment's own config (config.yaml of its runs: backbone,
weights file, grid, tile size, flips, cleaning), then each head predicts grams; the mean is nested like the
network ensemble's: seeds within a fold, then folds with equal shares. Backbone embeddings of test images go
to a cache under the output's directory (the experiment's own cache directory may be read-only, on Kaggle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from src.config import Config
from src.embeddings import image_features
from src.errors import BiomassError
from src.heads import HeadModel, load_head

HEAD_PATTERNS = ("grid*/fold*/head.json", "grid*/fold*/seed*/head.json")


def head_runs(exp_dir: str | Path) -> list[Path]:
    """The run directories of a head experiment (empty for a network experiment)."""
    exp_dir = Path(exp_dir)
    return sorted(p.parent for pattern in HEAD_PATTERNS for p in exp_dir.glob(pattern)) if exp_dir.is_dir() else []


class HeadEnsemble:
    """The heads of one experiment, ready to predict grams for a frame of images (`path`, `image_id`)."""

    def __init__(self, exp_dir: str | Path, cache: str | Path | None = None) -> None:
        self.path = Path(exp_dir)
        runs = head_runs(self.path)
        if not runs:
            raise BiomassError(f"{self.path}: no grid*/fold*/head.json inside; train it with train.py --regressor ...")
        self.heads: list[HeadModel] = [load_head(r) for r in runs]
        config_path = runs[0] / "config.yaml"
        if not config_path.is_file():
            raise BiomassError(f"{config_path}: missing; a head run needs its config.yaml to rebuild its features")
        self.cfg = Config.from_dict(yaml.safe_load(config_path.read_text()) or {}, source=str(config_path))
        if cache is not None:
            self.cfg.head.embed_cache = str(cache)
        names = [h.meta.get("feature_names") for h in self.heads]
        if any(n != names[0] for n in names):
            raise BiomassError(f"{self.path}: its folds' heads were trained on different features; re-train it")

    @property
    def max_grams(self) -> np.ndarray:
        """The largest training value of each target over the heads (the `seed` physics clamp)."""
        return np.max([h.meta["target_stats"]["max"] for h in self.heads], axis=0)

    def predict(self, frame: pd.DataFrame, show: bool = True) -> np.ndarray:
        """(N, 5) grams: seeds averaged within a fold, folds with equal shares."""
        features, _ = image_features(frame, self.cfg, show=show)
        by_fold: dict[int, list[np.ndarray]] = {}
        for head in self.heads:
            by_fold.setdefault(int(head.meta["fold"]), []).append(head.predict_grams(features))
        return np.mean([np.mean(preds, axis=0) for preds in by_fold.values()], axis=0)
