"""Benchmark 2: batched full TTA (`Predictor.predict_views`, tta='full') vs the naive four-forward TTA vs
no TTA (tta='none'), tiny preset and ViT-S/14 at tile 224, fp32.

Batched: the three flips of both views go through the backbone in one call and the stereo swap reuses
the original tile features, so it runs 3 backbone passes where the naive way runs 4: expect ~0.75x.
Bar: full <= 0.8x naive, per-view predictions identical within 1e-5 (fp32).

    python bench/tta.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import common  # noqa: E402
from src.inference import Predictor  # noqa: E402
from src.model import log1p_to_grams  # noqa: E402

BAR_RATIO = 0.8
TOLERANCE = 1e-5


@torch.no_grad()
def predict_with_tta(model, left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
    """The naive reference: four full forwards (orig, hflip, vflip, stereo swap) -> (B, 4, 5) grams."""

    calls = [
        (left, right),
        (left.flip(-1), right.flip(-1)),
        (left.flip(-2), right.flip(-2)),
        (right, left),
    ]
    outs = [model(a, b)["targets"] for a, b in calls]
    return log1p_to_grams(torch.stack(outs, dim=1).float()).cpu().numpy()


def compare(kind: str, batch: int, repeats: int, workdir: Path) -> dict:
    """Time full / naive / none on the same random views and check that their predictions agree."""

    cfg = common.make_config(kind)
    ckpt = common.save_random_checkpoint(cfg, workdir / kind / "best.pt")
    full = Predictor(ckpt, "cpu", tta="full", amp=False)
    none = copy.copy(full)  # same model object, other TTA mode
    none.tta = "none"
    left, right = common.random_views(batch, full.view_size)
    batched, naive, single = (
        full.predict_views(left, right),
        predict_with_tta(full.model, left, right),
        none.predict_views(left, right),
    )
    diff = float(max(np.abs(batched - naive).max(), np.abs(single[:, 0] - naive[:, 0]).max()))
    times = common.interleaved(
        {
            "full": lambda: full.predict_views(left, right),
            "naive": lambda: predict_with_tta(full.model, left, right),
            "none": lambda: none.predict_views(left, right),
        },
        repeats,
    )
    med = {k: common.median(v) for k, v in times.items()}
    tiles = full.grid[0] * full.grid[1]
    ratio = med["full"] / med["naive"]
    return {
        "model": f"{kind} ({cfg.model.backbone}, tile {full.model.tile_size}, grid {full.grid[0]}x{full.grid[1]})",
        "images/call": batch,
        "backbone tiles full / naive / none": f"{3 * 2 * batch * tiles} / {4 * 2 * batch * tiles} / "
        f"{2 * batch * tiles}",
        "full TTA": common.spread(times["full"]),
        "naive 4x forward": common.spread(times["naive"]),
        "none": common.spread(times["none"]),
        "full / naive": f"{ratio:.3f}",
        "none / naive": f"{med['none'] / med['naive']:.3f}",
        "max abs diff (g)": f"{diff:.2e}",
        "max |pred| (g)": f"{np.abs(naive).max():.1f}",
        "_ratio": ratio,
        "_diff": diff,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0], repeats=5).parse_args(argv)
    common.setup(args)
    info = common.machine()
    plan = [("tiny_quick", 2)] if args.quick else [("tiny", 16), ("vit_s", 4)]
    repeats = args.repeats or (1 if args.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            compare(kind, batch, repeats if kind != "vit_s" else max(1, min(repeats, 3)), Path(tmp))
            for kind, batch in plan
        ]
    cols = [c for c in rows[0] if not c.startswith("_")]
    lines = [
        "Batched full TTA vs four separate forwards vs one view; random uint8 views, random-init weights, fp32, "
        "wall time per `predict_views` call (median (min-max, n) of round-robin repeats in one process; "
        "ViT-S uses at most 3 repeats).",
        "",
        common.table(rows, cols),
        "",
    ]
    for r in rows:
        met = r["_ratio"] <= BAR_RATIO and r["_diff"] <= TOLERANCE
        lines.append(
            "- "
            + common.bar_line(
                f"{r['model']}: full = {r['_ratio']:.3f}x naive (bar <= {BAR_RATIO}), max abs prediction difference "
                f"{r['_diff']:.1e} g (bar <= {TOLERANCE:g})",
                met,
            )
        )
    lines.append("- GPU: not measured (no GPU lent to this session).")
    common.report(args, argv, "TTA: batched full vs naive 4x forward vs none", "\n".join(lines), info)
    return rows


if __name__ == "__main__":
    main()
