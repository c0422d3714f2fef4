"""python report.py checkpoints/<exp> [--data-dir DIR] | --compare EXP [EXP ...] [--baseline NAME] | --stress EXP

OOF report of one experiment (REPORT.md + plots), or one table comparing experiments. See src/report.py.
"""

from __future__ import annotations

from src.errors import run_cli
from src.report import main as report_main


def main(argv: list[str] | None = None) -> int:
    return report_main(argv)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
