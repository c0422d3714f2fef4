"""run_report.json: what one submission run did, written beside submission.csv each time that is (re)written.

Models used / skipped (deadline) / failed (with reasons), images on the fallback, minutes per stage, errors met
after a valid submission existed. `kernels/push.py --submit` reads it from the kernel's output and refuses a run
in which no model produced a finite prediction (`refusal`): such a submission is the training median everywhere.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from src.errors import BiomassError
from src.io_utils import write_text_atomic

REPORT_NAME = "run_report.json"


@dataclass
class RunReport:
    """The record of one infer.py submission run; `write()` puts it beside submission.csv (atomic, 0644)."""

    path: Path
    images: int = 0
    images_on_fallback: int = 0
    models_total: int = 0
    used: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    finite_models: int = 0  # models that gave a finite prediction for at least one image
    submission_written: bool = False
    errors: list[dict] = field(default_factory=list)  # {"stage", "error"}: failures the last submission survived
    minutes: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage into `minutes` (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.minutes[name] = round(self.minutes.get(name, 0.0) + (time.perf_counter() - start) / 60, 4)

    def take(self, pred, paths: list) -> None:
        """The ensemble's counts: which members ran, were skipped or failed, how many images got the fallback."""
        self.models_total = len(paths)
        self.used = list(pred.ran_paths)
        self.skipped = list(pred.skipped)
        self.failed = {**self.failed, **pred.failed}
        self.images = int(len(pred.ok))
        self.images_on_fallback = int((~pred.ok).sum())
        self.finite_models = int(pred.finite_members)

    def write(self) -> Path:
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        write_text_atomic(self.path, json.dumps(data, indent=1) + "\n")
        return self.path


def read_report(path: str | Path) -> dict:
    """A run_report.json as a dict; a missing or broken one is a one-line error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise BiomassError(f"{path}: no {REPORT_NAME}; the kernel did not finish a submission run") from err
    except ValueError as err:
        raise BiomassError(f"{path}: not valid JSON ({err}); re-run the kernel") from err
    if not isinstance(data, dict):
        raise BiomassError(f"{path}: not a run report (a JSON object expected)")
    return data


def refusal(report: dict) -> str | None:
    """Why a run's submission must not be submitted, or None. No submission written, or no model finite anywhere."""
    if not report.get("submission_written"):
        return "the run wrote no submission"
    if int(report.get("finite_models", 0)) == 0:
        failed = report.get("failed") or {}
        why = f"; failed: {'; '.join(f'{p}: {r}' for p, r in list(failed.items())[:3])}" if failed else ""
        return (
            f"no model produced a finite prediction: all {report.get('images', '?')} images got the training "
            f"median{why}"
        )
    return None
