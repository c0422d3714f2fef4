"""python infer.py [--checkpoints checkpoints/<exp> ...] [--config infer.yaml]: ensemble + TTA -> submission.csv.

--oof scores each fold's models on their held-out images for every TTA/physics setting instead.
Every flag is a field of `src.config.InferConfig`; the resolved config is saved beside the output.
"""

from __future__ import annotations

import argparse

import src.deadline  # noqa: F401  first: its PROCESS_START is what --deadline counts from
from src.config import InferConfig, add_infer_flags, resolve_infer_config
from src.errors import run_cli
from src.logs import add_quiet_flag
from src.submit import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_infer_flags(parser)
    add_quiet_flag(parser)
    return parser.parse_args(argv)


def config_from_args(argv: list[str] | None) -> InferConfig:
    """defaults < --preset < --config YAML < flags."""
    return resolve_infer_config(parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    run(config_from_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
