"""python infer.py [--checkpoints checkpoints/<exp> ...]: fold x grid ensemble with TTA -> submission.csv.

--oof scores each fold's models on their held-out images for every TTA/physics setting instead.
"""

from __future__ import annotations

import argparse

from src.errors import run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="data/synthetic", help="competition-layout data directory")
    parser.add_argument("--checkpoints", nargs="+", default=["checkpoints/default"], help="experiment dirs or best.pt files")
    parser.add_argument("--out", default="submission.csv", help="submission file to write")
    parser.add_argument("--tta", default="full", choices=["none", "flip", "full"], help="none | flip (orig+h+v) | full (+stereo swap)")
    parser.add_argument("--physics", default="project", choices=["none", "seed", "project"], help="post-processing of the 5 targets")
    parser.add_argument("--grid-weights", nargs="*", default=None, help="RxC=W per grid, e.g. 2x2=1 3x3=0.5 (default equal)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CPU and CUDA)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for decoding")
    parser.add_argument("--oof", action="store_true", help="score the checkpoints out of fold instead of writing a submission")
    parser.add_argument("--folds", default=None, help="folds CSV for --oof (default: the one the checkpoints were trained with)")
    parser.add_argument("--on-bad-image", default="error", choices=["error", "fallback"], help="fallback: training-median prediction + warning")
    adapt = parser.add_argument_group("test-time adaptation (src/adapt.py)")
    adapt.add_argument("--pseudo-label-epochs", type=int, default=0, help="fine-tune one model per grid on train + pseudo-labelled test images (0 = off)")
    adapt.add_argument("--pseudo-label-weight", type=float, default=1.0, help="loss weight of a pseudo-labelled test image (a training image weighs 1)")
    adapt.add_argument("--pseudo-label-blend", type=float, default=0.8, help="submission = B * adapted + (1 - B) * ensemble")
    adapt.add_argument("--pseudo-label-fold", default="best", help="which fold's checkpoint of each grid is fine-tuned: best (by val score) or K")
    adapt.add_argument("--time-budget", type=float, default=None, help="minutes the fine-tune may take; over the estimate it is skipped with a warning")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from src.adapt import PseudoLabelSettings
    from src.errors import BiomassError
    from src.inference import run_oof, run_submission

    pseudo = PseudoLabelSettings(args.pseudo_label_epochs, args.pseudo_label_weight, args.pseudo_label_blend, args.pseudo_label_fold, args.time_budget)
    if args.oof and pseudo.enabled:
        raise BiomassError("--pseudo-label-epochs adapts to the test images; it does not go with --oof")
    if args.oof:
        run_oof(args.data_dir, args.checkpoints, args.batch_size, args.device, args.amp, args.folds, args.num_workers)
    else:
        run_submission(
            args.data_dir, args.checkpoints, args.out, args.tta, args.physics, args.grid_weights,
            args.batch_size, args.device, args.amp, args.on_bad_image, args.num_workers, pseudo,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
