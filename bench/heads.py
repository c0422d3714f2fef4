"""Benchmark: frozen-feature heads and the OOF blend vs training the network, on the same synthetic images and folds.

Arms, each through its real command path (`train.py` in process, `src.blend`):
- network: `train.py --fold all` with the tiny preset (random-init ViT, tile 56, grid 2x2), wall time and OOF;
- embedding: the backbone embeddings of every image once (`src.embeddings`, fresh cache), wall time;
- heads: `train.py --regressor ridge --features colour|backbone` and `--regressor hgb --features both` (the
  embedding cache already filled: the head fits alone), wall time and OOF;
- blends: `src.blend` of the network and the colour head, and of all arms; nested-CV OOF vs the best single one.
Bars (issue 20): the nested blend of all four arms (fixed in advance, not the better of the two blends) beats the
best single experiment (paired bootstrap interval over the images above 0); the embedding costs no more than one
epoch of stage-2 (finetune) training (median finetune epoch of the network's metrics.csv, same images).
One seed: a difference smaller than the seed-to-seed spread (not measured here) is "can't tell".
The network's ensemble is also scored by `infer.py --oof --structural-zeros` (State-head zeros off and on).

    python bench/heads.py [--quick] [--images 100] [--epochs 6]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repo root (not bench/) on the import path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import infer as infer_script  # noqa: E402
import train as train_script  # noqa: E402
from bench import common  # noqa: E402
from src.blend import load_members, write_blend  # noqa: E402
from src.bootstrap import image_terms, paired_bootstrap  # noqa: E402
from src.config import PRESETS, Config  # noqa: E402
from src.data import load_train  # noqa: E402
from src.embeddings import backbone_embeddings  # noqa: E402
from src.folds import make_folds, save_folds  # noqa: E402
from src.metric import score  # noqa: E402
from src.report import load_runs, pooled_oof  # noqa: E402
from src.schema import TARGETS  # noqa: E402

IMAGE_SIZE = (1000, 500)  # the repo's demo data size (real images are 2000x1000)
TILE = "56"


def _oof_r2(exp: Path) -> float:
    oof = pooled_oof(load_runs(exp))
    return score(oof[[f"true_{t}" for t in TARGETS]].to_numpy(), oof[list(TARGETS)].to_numpy())["weighted_r2"]


def main(argv: list[str] | None = None) -> str:
    p = common.parser(__doc__.split("\n\n")[0], repeats=1)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args(argv)
    common.setup(args)
    n_images, epochs, n_folds = (24, 2, 3) if args.quick else (args.images, args.epochs, 5)
    data = common.synthetic_dataset(n_images, (400, 200) if args.quick else IMAGE_SIZE)
    work = Path(tempfile.mkdtemp(prefix="bench_heads_"))
    folds = work / "folds.csv"
    save_folds(make_folds(load_train(data), "group_month", n_folds=n_folds, seed=0), folds)
    base = ["--fold", "all", "--data-dir", str(data), "--folds", str(folds), "--out-dir", str(work), "--quiet"]
    tiny = ["--preset", "tiny", "--tile-size", TILE, "--seed", "0", "--embed-cache", str(work / "cache")]
    rows, seconds = [], {}

    def run(name: str, *flags: str) -> Path:
        start = time.perf_counter()
        with common.quiet():
            train_script.main([*base, "--exp", name, *tiny, *flags])
        seconds[name] = time.perf_counter() - start
        return work / name

    network = run("network", "--epochs", str(epochs), "--freeze-epochs", "1")
    # the embedding alone, into a fresh cache (the heads below then reuse it)
    cfg = Config.from_dict(
        {**{k: dict(v) for k, v in PRESETS["tiny"].items()}, "head": {"embed_cache": str(work / "cache")}}
    )
    cfg.model.tile_size, cfg.train.seed = int(TILE), 0
    cfg.data.data_dir, cfg.data.folds = str(data), str(folds)
    start = time.perf_counter()
    with common.quiet():
        backbone_embeddings(load_train(data), cfg, show=False)
    embed_s = time.perf_counter() - start
    colour = run("colour_ridge", "--regressor", "ridge", "--features", "colour")
    backbone = run("backbone_ridge", "--regressor", "ridge", "--features", "backbone")
    hgb = run("both_hgb", "--regressor", "hgb", "--features", "both", "--hgb-max-iter", "10" if args.quick else "50")
    metrics = pd.concat([pd.read_csv(r.path / "metrics.csv") for r in load_runs(network)])
    finetune = metrics[metrics["stage"] == "finetune"]["seconds"]
    epoch_s = float(np.median(finetune)) if len(finetune) else float("nan")
    singles = {"network": network, "colour_ridge": colour, "backbone_ridge": backbone, "both_hgb": hgb}
    for name, exp in singles.items():
        extra = f" (+ {embed_s:.1f} s embedding, cached)" if name in ("backbone_ridge", "both_hgb") else ""
        rows.append(
            {"experiment": name, "wall time": f"{seconds[name]:.1f} s{extra}", "OOF weighted R²": f"{_oof_r2(exp):.4f}"}
        )
    blends = {}
    for name, members in (("blend network + colour", [network, colour]), ("blend all four", list(singles.values()))):
        record = write_blend(load_members(members), work / name.replace(" ", "_").replace("+", "p"), calibrate=False)
        blends[name] = record["oof"]
        rows.append(
            {
                "experiment": name,
                "wall time": "< 1 s",
                "OOF weighted R²": f"{record['oof']['nested_weighted_r2']:.4f} nested "
                f"(in-sample {record['oof']['in_sample_weighted_r2']:.4f})",
            }
        )
    # the bar's blend is fixed in advance (all four arms): taking the better of the two blends would select on the
    # labels it is scored on. The single it must beat is the best of four on those labels (favours the single).
    blended = pd.read_csv(work / "blend_all_four" / "oof_blend.csv", dtype={"image_id": str}).set_index("image_id")
    members = load_members(list(singles.values()))
    nested = blended.loc[members.image_ids, list(TARGETS)].to_numpy(np.float64)
    single_r2 = [score(members.truth, members.preds[:, m])["weighted_r2"] for m in range(len(singles))]
    best_at = int(np.argmax(single_r2))
    best_name, best_single = list(singles)[best_at], single_r2[best_at]
    versus = paired_bootstrap(
        image_terms(members.truth, nested), image_terms(members.truth, members.preds[:, best_at]), draws=2000
    )
    # the network's fold x grid ensemble out of fold, with and without the structural zeros (no TTA, project physics)
    start = time.perf_counter()
    with common.quiet():
        infer_script.main(
            ["--oof", "--data-dir", str(data), "--checkpoints", str(network), "--folds", str(folds), "--device", "cpu",
             "--structural-zeros", "--quiet"]
        )  # fmt: skip
    zeros_s = time.perf_counter() - start
    report = pd.read_csv(network / "oof_report.csv")
    setting = report[(report["tta"] == "none") & (report["physics"] == "project")].set_index("structural_zeros")
    for zeros in (False, True):
        rows.append(
            {
                "experiment": f"network, infer.py --oof (tta none, physics project), zeros {'on' if zeros else 'off'}",
                "wall time": f"{zeros_s:.1f} s (both rows)",
                "OOF weighted R²": f"{setting.loc[zeros, 'weighted_r2']:.4f}",
            }
        )
    body = [
        f"{n_images} synthetic images ({'400x200' if args.quick else '1000x500'}), {n_folds} group_month folds, "
        "seed 0; "
        f"network = tiny preset (random-init ViT embed 64 depth 2), tile {TILE}, grid 2x2, {epochs} epochs "
        "(1 frozen); heads on the same random-init backbone's embeddings (no pretrained weights on this machine, so "
        "the backbone rows say little about DINOv2 features) and on the colour / vegetation features. OOF = pooled "
        "oof.csv rows (no TTA, no physics); blends: nested-CV OOF (weights fitted without the fold they score).",
        "",
        common.table(rows),
        "",
        "- "
        + common.bar_line(
            f"nested blend of all four {blends['blend all four']['nested_weighted_r2']:.4f} vs the best single "
            f"experiment ({best_name}) {best_single:.4f}: {versus.delta:+.4f}, paired bootstrap 95% interval over "
            f"the images [{versus.low:+.4f}, {versus.high:+.4f}]: {versus.verdict} (one seed: the interval carries "
            "no seed-to-seed spread; met only when the interval excludes 0 upwards)",
            versus.verdict == "better",
        ),
        "- "
        + common.bar_line(
            f"embedding of all {n_images} images {embed_s:.1f} s vs one finetune epoch {epoch_s:.1f} s (median over "
            "folds, training images of a fold only)",
            embed_s <= epoch_s if np.isfinite(epoch_s) else None,
        ),
        "- The issue's setting (ViT-S at 224, 5 folds) is not run: too slow for the 2 shared cores of this machine in "
        "the time of this change. The zeros rows use the network's own State head (an auxiliary head trained with "
        "weight 0.1); a gap below the seed-to-seed spread is can't tell.",
    ]
    common.report(args, argv, "Frozen-feature heads + OOF blend vs network training", "\n".join(body), common.machine())
    return "\n".join(body)


if __name__ == "__main__":
    main()
