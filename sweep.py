"""python sweep.py --exp NAME [--preset tiny] [--fold 0] --lr 5e-4 1e-3 --dropout 0.1 0.2 [...]: stage-1 head sweep.

The cartesian product of the given values, trained on one shared feature cache per fold; results in
checkpoints/<exp>/sweep.csv (resumable). See src/sweep.py.
"""

from __future__ import annotations

from src.errors import run_cli
from src.sweep import main as sweep_main


def main(argv: list[str] | None = None) -> int:
    return sweep_main(argv)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
