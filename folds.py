"""python folds.py --data-dir DIR --out PATH [--scheme group_month] [--n-folds 5] [--seed 42]: write image_id,fold."""

from __future__ import annotations

import argparse

from src.data import load_train
from src.errors import run_cli
from src.folds import SCHEMES, fold_table, make_folds, save_folds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="data/synthetic", help="competition-layout data directory")
    parser.add_argument("--scheme", default="group_month", choices=SCHEMES, help="how images are grouped into folds")
    parser.add_argument("--n-folds", type=int, default=5, help="folds (ignored by the leave-one-out schemes)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="data/folds.csv", help="CSV to write (image_id,fold)")
    args = parser.parse_args(argv)
    wide = load_train(args.data_dir)
    folds = make_folds(wide, args.scheme, args.n_folds, args.seed)
    save_folds(folds, args.out)
    print(fold_table(wide, folds, args.scheme).to_string(index=False))
    print(f"wrote {args.out}: {len(folds)} images in {folds['fold'].nunique()} folds ({args.scheme})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
