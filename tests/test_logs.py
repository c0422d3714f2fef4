"""Logging: console lines, --quiet, and the timestamped log files of a run (train.log, infer.log)."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest
from conftest import REPO

from src.errors import BiomassError, run_cli
from src.logs import get_logger, log_file, progress, set_quiet

spec = importlib.util.spec_from_file_location("infer_script_logs", REPO / "infer.py")
infer_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(infer_script)
log = get_logger("tests.logs")
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def test_console_lines_warnings_and_quiet(capsys):
    log.info("plain line")
    log.warning("careful")
    assert capsys.readouterr().out == "plain line\nwarning: careful\n"
    set_quiet(True)
    try:
        log.info("hidden")
        log.warning("still shown")
        assert capsys.readouterr().out == "warning: still shown\n" and progress(range(3)).disable
    finally:
        set_quiet(False)
    assert not progress(range(3)).disable and progress(range(3), disable=True).disable
    log.info("back")
    assert capsys.readouterr().out == "back\n"


def test_log_file_has_times_ends_with_the_error_and_creates_no_folder(tmp_path: Path, capsys):
    path = tmp_path / "run" / "train.log"
    with pytest.raises(BiomassError):
        with log_file(path):
            log.info("before the folder exists")
            raise BiomassError("something broke\nover two lines")
    assert not path.parent.exists()  # a job that never made its output folder leaves none behind
    with pytest.raises(BiomassError):
        with log_file(path):
            log.info("first")
            path.parent.mkdir()  # the job makes its folder: the waiting lines go to the file
            log.warning("second")
            raise BiomassError("something broke\nover two lines")
    lines = path.read_text().splitlines()
    assert [re.sub(STAMP, "T", ln) for ln in lines] == [
        "T INFO    first",
        "T WARNING second",
        "T ERROR   error: something broke over two lines",
    ]
    with log_file(path):
        log.info("appended")
    assert path.read_text().splitlines()[-1].endswith("INFO    appended") and len(path.read_text().splitlines()) == 4
    log.info("after")  # the handler is gone: nothing more reaches the file
    assert len(path.read_text().splitlines()) == 4
    assert not [h for h in logging.getLogger("i2b").handlers if type(h).__name__ == "_LogFileHandler"]


def test_infer_quiet_prints_nothing_but_the_log_keeps_everything(synthetic_dir, trained_exp, tmp_path, capsys):
    out = tmp_path / "sub" / "submission.csv"
    argv = ["--data-dir", str(synthetic_dir), "--checkpoints", str(trained_exp), "--out", str(out), "--quiet"]
    assert run_cli(infer_script.main, argv) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "predicting" not in captured.err  # no lines, no progress bars
    text = (out.parent / "infer.log").read_text()
    assert re.search(STAMP + r" INFO    predicted \d+ images with 4 models", text)
    assert f"wrote {out}: 30 rows for 6 images" in text
