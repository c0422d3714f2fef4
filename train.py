"""python train.py --fold K [--preset tiny] [...]: train one fold (or --fold all) of the stereo tile model.

--seeds 0 1 2 trains each fold once per seed into <exp>/grid<R>x<C>/fold<K>/seed<S>/ (infer.py and report.py
average the seeds of a fold); without it (--seed S or the config's seed) a run keeps fold<K>/.
Multi-GPU: torchrun --nproc_per_node N train.py --fold K ...
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

from src.backbone import check_backbone_name
from src.config import add_config_flags, check_backbone_weights, resolve_config
from src.errors import BiomassError, run_cli
from src.folds import fold_numbers, load_fold_table
from src.head_training import train_heads
from src.logs import add_quiet_flag
from src.training import train_fold


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", required=True, help="fold index, or 'all' for every fold in turn")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in the fold directory")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        metavar="S",
        help="train every fold once per seed, into fold<K>/seed<S>/ (a run axis, like --fold; not with --seed)",
    )
    add_config_flags(parser)
    add_quiet_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    check_backbone_name(cfg.model.backbone)
    check_backbone_weights(cfg)
    command = "python train.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.fold == "all":
        folds = fold_numbers(load_fold_table(cfg.data, check_images=False))
    else:
        try:
            folds = [int(args.fold)]
        except ValueError as err:
            raise BiomassError(f"--fold must be an integer or 'all', got {args.fold!r}") from err
    if args.seeds is not None and getattr(args, "train.seed") is not None:
        raise BiomassError("give --seed S (one run in fold<K>/) or --seeds S [S ...] (fold<K>/seed<S>/), not both")
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds is not None else [None]
    if cfg.head.regressor != "network":  # frozen-feature heads (src/head_training.py): same run layout
        train_heads(cfg, folds, seeds, resume=args.resume, overwrite=args.overwrite, command=command)
        return 0
    for seed in seeds:
        run_cfg = copy.deepcopy(cfg)
        if seed is not None:
            run_cfg.train.seed = seed
        for fold in folds:
            train_fold(
                run_cfg, fold, resume=args.resume, overwrite=args.overwrite, command=command, seed_dir=seed is not None
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
