"""The State head's probabilities at inference, for `--structural-zeros` (Dead = 0 in WA, Clover = 0 in NSW).

Training uses the State head only as an auxiliary loss; here it is read out: softmax of the State logits of the
original views (no TTA), averaged over the models given. A second pass over the images (the target predictions
come from `predict_ensemble`), so the option costs one more backbone pass per model without TTA.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from src.dataset import MultiSizeViewDataset
from src.errors import BiomassError
from src.inference import ModelRef, Predictor
from src.logs import progress
from src.runtime import autocast
from src.schema import STATES


@torch.no_grad()
def state_probabilities(
    members: list[Predictor | ModelRef], frame: pd.DataFrame, batch_size: int = 8, on_bad_image: str = "error"
) -> np.ndarray:
    """(N, 4) mean State probabilities of the models for `frame`'s images; 0 rows for unreadable images.

    Model-major like the ensemble: a `ModelRef` is opened for its pass and dropped before the next one loads.
    """
    total = np.zeros((len(frame), len(STATES)))
    for member in members:
        p = member.open() if isinstance(member, ModelRef) else member
        if "state" not in p.model.aux_heads:
            raise BiomassError(
                f"{p.path}: has no State head (trained with --no-use-aux-heads); --structural-zeros needs one"
            )
        dataset = MultiSizeViewDataset(frame, [p.view_size], [p.jpeg_reduce], on_bad_image, [p.cleaning])
        for batch in progress(DataLoader(dataset, batch_size=batch_size), desc="State head", leave=False):
            idx, ok = batch["index"].numpy(), batch["ok"].numpy().astype(bool)
            pair = batch[p.input_key]
            with autocast(p.device, p.amp):
                left = p.model.encode_tiles(pair[:, 0].to(p.device))
                right = p.model.encode_tiles(pair[:, 1].to(p.device))
                logits = p.model.head_from_features(left, right)["state"]
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            total[idx] += np.where(ok[:, None] & np.isfinite(probs).all(axis=1, keepdims=True), probs, 0.0)
        del p
    return total / max(len(members), 1)
