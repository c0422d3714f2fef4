"""Benchmark helpers: fast correctness checks, and a smoke run of every bench script at its --quick settings.

The smoke runs call each script's main() in this process (imports paid once) with --doc pointing at a
temp file, so docs/BENCHMARKS.md is never touched, and generated data goes to a temp BENCH_CACHE_DIR.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

from bench import common

BENCHES = ("frozen_cache", "tta", "backbone_flops", "data_pipeline", "infer_e2e", "scaling")


@pytest.fixture(scope="module", autouse=True)
def bench_env(tmp_path_factory):
    """Temp data cache; one torch thread (these are checks, not timings, and 1 thread does not spin-wait on a busy box)."""
    old_cache, old_threads = os.environ.get("BENCH_CACHE_DIR"), torch.get_num_threads()
    os.environ["BENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("bench_cache"))
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old_threads)
    if old_cache is None:
        os.environ.pop("BENCH_CACHE_DIR", None)
    else:
        os.environ["BENCH_CACHE_DIR"] = old_cache


def test_batched_tta_equals_naive_four_forwards(tmp_path):
    from bench.tta import predict_with_tta
    from src.inference import Predictor

    cfg = common.make_config("tiny_quick")
    predictor = Predictor(common.save_random_checkpoint(cfg, tmp_path / "best.pt"), "cpu", tta="full")
    left, right = common.random_views(3, predictor.view_size, seed=1)
    batched, naive = predictor.predict_views(left, right), predict_with_tta(predictor.model, left, right)
    assert batched.shape == naive.shape == (3, 4, 5)
    np.testing.assert_allclose(batched, naive, rtol=0, atol=1e-5)
    predictor.tta = "none"
    np.testing.assert_allclose(predictor.predict_views(left, right)[:, 0], naive[:, 0], rtol=0, atol=1e-5)


def test_flop_count_includes_cpu_attention_and_matches_analytic():
    from bench.backbone_flops import analytic_vit_flops, build_encoder, count_flops, random_tiles

    model = build_encoder("tiny_quick", 28)
    tiles = random_tiles(model, 1)
    flops = count_flops(lambda: model.tile_features(tiles))
    assert flops["attention"] > 0  # the stock counter misses CPU SDPA; ours must not
    assert flops["total"] == flops["plain_counter"] + flops["attention"]
    assert flops["total"] == analytic_vit_flops(model.backbone, 28)


def test_interleaved_median_and_linear_fit():
    calls = []
    times = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # round-robin, warm-up round included
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    slope, intercept, resid = common.linear_fit([1, 2, 4], [5.0, 8.0, 14.0])
    assert slope == pytest.approx(3.0) and intercept == pytest.approx(2.0)
    assert np.abs(resid).max() < 1e-9


def test_append_section_appends_and_never_rewrites(tmp_path):
    doc = tmp_path / "BENCH.md"
    doc.write_text("# someone else's header\n\nTheir section.\n")
    info = {"cpu": "cpu X", "cores": "2", "torch": "t", "gpu": "none", "load": "0", "env": "OMP_NUM_THREADS=unset"}
    common.append_section(doc, "First", "python bench/x.py", "| a |\n|---|\n| 1 |", info)
    common.append_section(doc, "Second", "python bench/y.py --quick", "body 2", info, quick=True)
    text = doc.read_text()
    assert text.startswith("# someone else's header\n\nTheir section.\n")
    assert text.index("## First") < text.index("## Second")
    assert "- command: `python bench/x.py`" in text and "- machine: cpu X; 2; GPU: none" in text
    assert "- date: " in text and "(quick smoke settings, not a result)" in text


def test_peak_rss_reports_memory():
    common.reset_peak_rss()
    mem = common.peak_rss_mb()
    assert mem["ru_maxrss_mb"] > 10
    if "vmhwm_mb" in mem:
        assert mem["vmhwm_mb"] >= mem["vmrss_mb"] * 0.99


@pytest.mark.parametrize("name", BENCHES)
def test_bench_script_quick_smoke(name, tmp_path):
    module = importlib.import_module(f"bench.{name}")
    doc = tmp_path / "BENCH.md"
    result = module.main(["--quick", "--doc", str(doc)])
    assert result
    text = doc.read_text()
    assert text.count("\n## ") == 1 and "(quick smoke settings, not a result)" in text
    assert "- machine: " in text and "Bar" in text or "bar" in text
