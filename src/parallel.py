"""The ensemble split over N devices: one spawned worker process per device (torch.multiprocessing).

Split by models (the default, `SPLIT`): the workers take the next member from one shared queue, so the ensemble's
order holds (the first member finishes first and the submission is written), a slow member does not hold the other
device up, and the deadline skips members the same way as in one process. Each worker decodes the images once for
its members (`CachedViews`). Split by images: each worker runs every member on its share of the images. Which is
faster for 10 checkpoints is measured by bench/stream.py (docs/BENCHMARKS.md). The parent assembles the
members' predictions with the same `EnsembleRun`, so the result equals one device's.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.multiprocessing as mp

from src.deadline import Deadline, now
from src.errors import BiomassError
from src.inference import CachedViews, EnsemblePrediction, EnsembleRun, ModelRef
from src.logs import PROJECT, get_logger

log = get_logger(__name__)
SPLITS = ("models", "images")
SPLIT = "models"  # bench/stream.py: see docs/BENCHMARKS.md
POLL_SECONDS = 1.0


class _ToParent(logging.Handler):
    """A worker's project log records (deadline skips, lost members, OOM retries), sent to the parent, which logs
    them under its own handlers, so they reach infer.log, not only the worker's stderr."""

    def __init__(self, results, rank: int) -> None:
        super().__init__()
        self.results, self.rank = results, rank

    def emit(self, record: logging.LogRecord) -> None:
        self.results.put(("log", self.rank, record.levelno, record.getMessage(), None, None))


def _worker(rank: int, job: dict, tasks, results) -> None:
    """One device: decode its images once, then run members from `tasks` until the None, reporting each."""
    logging.getLogger(PROJECT).handlers[:] = [_ToParent(results, rank)]  # the parent writes them (and infer.log)
    results.put(("started", rank, None, None, None, None))  # imports done: the rest is work
    try:
        if job["threads"]:
            torch.set_num_threads(job["threads"])
        members = [ModelRef(p, job["device"], job["tta"], job["amp"]) for p in job["paths"]]
        frame, rows = job["frame"], job["rows"]
        views = CachedViews(frame, members, job["batch_size"], job["on_bad_image"], 0, job["jpeg_reduce"], False)
        deadline = Deadline(job["deadline_minutes"], job["deadline_start"])
        run = EnsembleRun(members, len(frame), job["grid_weights"], job["on_bad_image"], deadline)
        results.put(("readable", rank, None, rows, views.readable, None))
        while (m := tasks.get()) is not None:
            done = run.run_member(m, views)
            path = str(members[m].path)
            if path in run.failed:  # could not load, or raised on every batch: lost whole, not cut by the deadline
                results.put(("failed", rank, m, rows, None, run.failed[path]))
                continue
            results.put(("member", rank, m, rows, run.preds[m] if done else None, run.errors.get(path)))
        results.put(("done", rank, None, None, None, None))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which decides (fallback or error)
        results.put(("error", rank, f"{type(err).__name__}: {str(err).strip()[:300]}", None, None, None))


def predict_parallel(
    paths: Sequence[Path],
    devices: Sequence[torch.device],
    frame: pd.DataFrame,
    tta: str = "full",
    amp: bool = False,
    batch_size: int = 8,
    grid_weights: dict | None = None,
    on_bad_image: str = "error",
    jpeg_reduce: bool = True,
    deadline: Deadline | None = None,
    on_update: Callable[[EnsemblePrediction], None] | None = None,
    split: str = SPLIT,
    threads: int | None = None,
) -> EnsemblePrediction:
    """The ensemble of `paths` on every device of `devices`, one worker process each; see the module docstring.

    `threads`: torch threads per worker (default this process's threads / workers, at least 1).
    """
    if split not in SPLITS:
        raise BiomassError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    frame = frame.reset_index(drop=True)
    members = [ModelRef(p, "cpu", tta, amp) for p in paths]  # metadata only: checks every checkpoint up front
    deadline = deadline or Deadline()
    run = EnsembleRun(members, len(frame), grid_weights, on_bad_image, deadline)
    n = len(devices)
    shards = np.array_split(np.arange(len(frame)), n) if split == "images" else [np.arange(len(frame))] * n
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    shared = ctx.Queue() if split == "models" else None
    task_queues = [shared if shared is not None else ctx.Queue() for _ in devices]
    for m in range(len(members)) if shared is not None else []:
        shared.put(m)
    for q in task_queues if shared is None else []:
        for m in range(len(members)):
            q.put(m)
    for q in task_queues if shared is None else [shared] * n:
        q.put(None)  # one stop sign per worker
    threads = threads or max(1, torch.get_num_threads() // n)
    procs = []
    for rank, device in enumerate(devices):
        job = {
            "paths": [str(p) for p in paths], "device": str(device), "tta": tta, "amp": amp, "threads": threads,
            "frame": frame.iloc[shards[rank]].reset_index(drop=True), "rows": shards[rank], "batch_size": batch_size,
            "on_bad_image": on_bad_image, "jpeg_reduce": jpeg_reduce, "grid_weights": grid_weights,
            "deadline_minutes": deadline.minutes, "deadline_start": deadline.start,
        }  # fmt: skip
        proc = ctx.Process(target=_worker, args=(rank, job, task_queues[rank], results), daemon=True)
        proc.start()
        procs.append(proc)
    readable = np.ones(len(frame), dtype=bool)
    parts = np.zeros(len(members), dtype=int)  # shards that predicted each member
    lost = np.zeros(len(members), dtype=bool)
    finished: set[int] = set()
    failures: list[str] = []
    started: set[int] = set()
    startup = 0.0  # seconds until every worker had imported torch and the repo (spawn start-up)
    try:
        while len(finished) < n:
            try:
                kind, rank, a, rows, preds, error = results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                for rank, proc in enumerate(procs):
                    if rank not in finished and not proc.is_alive():
                        failures.append(f"worker {rank} ({devices[rank]}) died (exit code {proc.exitcode})")
                        finished.add(rank)
                continue
            if kind == "started":
                started.add(rank)
                if len(started) == n:
                    startup = now() - run.started
            elif kind == "log":  # a worker's log record: into this process's handlers (console, infer.log)
                log.log(a, f"worker {rank} ({devices[rank]}): {rows}")
            elif kind == "readable":
                readable[rows] = preds
            elif kind == "failed":
                run.failed.setdefault(str(run.members[a].path), error)
                lost[a] = True
            elif kind == "member":
                _take(run, a, rows, preds, error, parts, lost, n if split == "images" else 1, on_update, readable)
            elif kind == "error":
                failures.append(f"worker {rank} ({devices[rank]}): {a}")
                finished.add(rank)
            else:
                finished.add(rank)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    for line in failures:
        if on_bad_image != "fallback" or not run.ran.any():
            raise BiomassError(f"parallel ensemble: {line}")
        log.warning(f"parallel ensemble: {line}; the members it had not finished are left out")
    result = run.result(readable, show=True)
    result.startup_seconds = startup
    log.info(
        f"predicted {len(frame)} images with {result.members_ran} models on {n} devices "
        f"({', '.join(str(d) for d in devices)}, split by {split}) in {result.seconds:.1f}s "
        f"({startup:.1f}s of it starting the workers)"
    )
    return result


def _take(run: EnsembleRun, m, rows, preds, error, parts, lost, needed, on_update, readable) -> None:
    """One worker's report of member m: its predictions of `rows`, or None when the deadline left it out."""
    if error:
        run.errors.setdefault(str(run.members[m].path), error)
    if preds is None:
        lost[m] = True
        if str(run.members[m].path) not in run.skipped:
            run.skipped.append(str(run.members[m].path))
        return
    run.preds[m, rows] = preds
    parts[m] += 1
    if parts[m] == needed and not lost[m]:
        run.ran[m] = True
        if on_update is not None:
            on_update(run.result(readable))
