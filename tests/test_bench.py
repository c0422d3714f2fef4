"""Benchmark helpers: fast correctness checks, and a smoke run of every bench script at its --quick settings.

The smoke runs call each script's main() in this process (imports paid once) with --doc pointing at a
temp file, so docs/BENCHMARKS.md is never touched, and generated data goes to a temp BENCH_CACHE_DIR.
"""

from __future__ import annotations

import importlib
import os
import re

import numpy as np
import pytest
import torch

from bench import common

BENCHES = (
    "frozen_cache",
    "tta",
    "backbone_flops",
    "data_pipeline",
    "infer_e2e",
    "scaling",
    "amp",
    "sweep_speed",
    "heads",
    "stream",
    "pseudo_label",
    "train_robust",
)
NO_BAR = {"pseudo_label", "train_robust"}  # they report measurements without a bar (README: "no bar")


@pytest.fixture(scope="module", autouse=True)
def bench_env(tmp_path_factory):
    """Temp data cache; one torch thread (checks, not timings; 1 thread does not spin-wait on a busy box)."""
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


# Tolerances of the bf16 autocast speed-up (~3.4x on this AVX-512 bf16 CPU), relative, on grams.
# Whole Predictor under autocast: the heads run in bf16 too, and a bf16 log1p output in [4, 8) has an ulp of
# 2^-5, i.e. up to 1.6% in grams from that last rounding alone (measured 1.6%): 3% bounds it.
# Backbone-only autocast (what compute_feature_cache does: features cast back to fp32, heads in fp32):
# measured 0.07-0.17% on tiny / ViT-S: 0.5% bounds it.
AMP_RTOL_PREDICTOR = 0.03
AMP_RTOL_BACKBONE_ONLY = 0.005


def test_bf16_autocast_predictor_close_to_fp32(tmp_path):
    """Predictor(amp=True) vs amp=False on the same views stays within AMP_RTOL_PREDICTOR."""
    from src.inference import Predictor

    cfg = common.make_config("tiny_quick")
    path = common.save_random_checkpoint(cfg, tmp_path / "best.pt")
    fp32, bf16 = Predictor(path, "cpu", tta="full", amp=False), Predictor(path, "cpu", tta="full", amp=True)
    left, right = common.random_views(4, fp32.view_size, seed=2)
    ref, fast = fp32.predict_views(left, right), bf16.predict_views(left, right)
    assert ref.shape == fast.shape == (4, 4, 5)
    assert not np.array_equal(ref, fast)  # autocast really ran in bf16 (else this test checks nothing)
    np.testing.assert_allclose(fast, ref, rtol=AMP_RTOL_PREDICTOR, atol=0)


def test_bf16_feature_cache_close_to_fp32():
    """compute_feature_cache with train.amp on vs off: same features (cosine) and heads' grams within 0.5%."""
    from src.feature_cache import compute_feature_cache
    from src.model import build_model, log1p_to_grams

    cfg = common.make_config("tiny_quick")
    cfg.data.num_workers = 0
    frame = common.train_frame(4, (256, 128))
    torch.manual_seed(0)
    model = build_model(cfg.model, load_backbone_weights=False)
    model.init_target_bias(common.FAKE_STATS["mean_log1p"])
    feats = {}
    for amp in (False, True):
        cfg.train.amp = amp
        feats[amp] = compute_feature_cache(model, frame, cfg, torch.device("cpu"), show=False)
    assert feats[True].dtype == feats[False].dtype == torch.float32
    assert not torch.equal(feats[True], feats[False])
    cos = torch.nn.functional.cosine_similarity(feats[True], feats[False], dim=-1)
    assert float(cos.min()) > 1 - 1e-3
    with torch.no_grad():
        grams = {
            amp: log1p_to_grams(model.head_from_features(f[:, 0, 0], f[:, 0, 1])["targets"]).numpy()
            for amp, f in feats.items()
        }
    np.testing.assert_allclose(grams[True], grams[False], rtol=AMP_RTOL_BACKBONE_ONLY, atol=0)


# Reduced-resolution JPEG decode (libjpeg's DCT scaling instead of a full decode + INTER_AREA): measured mean
# absolute difference of the resized views 1-4 grey levels of 255; 6 bounds it.
REDUCED_DECODE_MEAN_ABS = 6.0


def test_reduced_decode_views_close_to_full_decode():
    """The data-pipeline speed-up (jpeg_reduce) changes the eval views by at most a few grey levels on average."""
    from src.data import jpeg_reduce_factor
    from src.dataset import ViewPairDataset
    from src.transforms import build_transform

    frame = common.train_frame(3, (512, 256))
    view = (56, 56)
    assert jpeg_reduce_factor((256, 512), view) == 4  # the test really exercises a reduced decode
    full, fast = (
        ViewPairDataset(frame, view, build_transform(view, train=False), jpeg_reduce=r) for r in (False, True)
    )
    for i in range(len(frame)):
        for side in ("left", "right"):
            a, b = full[i][side], fast[i][side]
            assert a.shape == b.shape == (3, *view) and a.dtype == b.dtype == torch.uint8
            assert float((a.float() - b.float()).abs().mean()) < REDUCED_DECODE_MEAN_ABS


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
    assert common.broken_records(text) == []  # both appended sections are sealed by what append_section wrote
    assert text.count("<!-- record sha256:") == 2


def test_benchmark_records_are_what_their_scripts_wrote():
    """docs/BENCHMARKS.md is append-only: every section carries the sha256 of its text as its script wrote it."""
    doc = common.DOC.read_text()
    assert common.broken_records(doc) == []
    # positive controls: a changed figure, a renamed command, a section pasted without a seal
    first = doc.index("\n## ")
    edited = doc.replace("- command: `python bench/", "- command: `python  bench/", 1)
    assert len(common.broken_records(edited)) == 1 and "sha256 differs" in common.broken_records(edited)[0]
    digit = next(i for i in range(first + 5, len(doc)) if doc[i].isdigit())
    changed = doc[:digit] + str((int(doc[digit]) + 1) % 10) + doc[digit + 1 :]
    assert len(common.broken_records(changed)) == 1
    pasted = doc + "\n## Pasted — 2026-12-04 10:00 UTC\n\n- **Bar met**: 99x\n"
    assert common.broken_records(pasted) == ["## Pasted — 2026-12-04 10:00 UTC: no record line (a section not "
                                             "written by bench/common.append_section)"]  # fmt: skip


def test_peak_rss_reports_memory():
    """A 256 MiB buffer, touched, raises the peak by about that much (a wrong unit or field would not)."""
    if not common.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs: VmHWM cannot be reset here")
    before = common.peak_rss_mb()
    buffer = np.ones(256 * 2**20, dtype=np.uint8)  # written: resident, not just reserved
    after = common.peak_rss_mb()
    assert 240 <= after["vmhwm_mb"] - before["vmhwm_mb"] <= 300
    assert after["vmrss_mb"] - before["vmrss_mb"] >= 240 and after["vmhwm_mb"] >= after["vmrss_mb"]
    assert after["ru_maxrss_mb"] >= after["vmhwm_mb"] - 1  # the whole-life peak is never below the reset one
    del buffer


def test_bar_lines_every_verdict_and_impossible_ratios_are_invalid():
    from src import docs

    assert common.impossible(3.02, 2, "a speed-up from 2 processes of") == (
        "a speed-up from 2 processes of 3.02 exceeds its physical limit 2"
    )
    assert common.impossible(1.99, 2, "x") is None and common.impossible(1.0, 1.0, "x") is None
    assert common.impossible(1.04, 1.0, "a share of the measured peak of") is not None
    met = common.bar_line("3.02x (>= 1.7x)", True, common.impossible(3.02, 2, "a speed-up of"))
    assert met.startswith("**Bar invalid**: 3.02x (>= 1.7x) (invalid measurement: a speed-up of 3.02 exceeds")
    lines = [common.bar_line("a", True), "- " + common.bar_line("b", False), "- " + common.bar_line("c", None), met]
    parsed = docs.latest_benchmarks("## T — today\n" + "\n".join(lines) + "\n- **Bar**: no verdict\n")
    assert parsed == {"T": ("today", ["met: a", "NOT met: b", "not measured: c", f"invalid: {met[17:]}"])}


def _bar_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "**Bar" in line]


@pytest.mark.parametrize("name", BENCHES)
def test_bench_script_quick_smoke(name, tmp_path):
    """Each script's quick run appends one section whose every bar line reaches README's table (src/docs.py)."""
    from src import docs

    module = importlib.import_module(f"bench.{name}")
    doc = tmp_path / "BENCH.md"
    module.main(["--quick", "--doc", str(doc)])
    text = doc.read_text()
    assert text.count("\n## ") == 1 and "(quick smoke settings, not a result)" in text
    assert "- machine: " in text and "- command: `python bench/" in text
    raw = _bar_lines(text)
    assert bool(raw) == (name not in NO_BAR)  # every other benchmark states a bar: met / NOT met / not measured
    ((title, (date, bars)),) = docs.latest_benchmarks(text).items()
    assert len(bars) == len(raw), f"bar lines README cannot read: {raw}"
    assert all(b.split(": ", 1)[1] in line for b, line in zip(bars, raw))
    assert re.search(r"\| [^|]*\d", text), "no table row with a number: nothing was measured"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "BENCHMARKS.md").write_text(text)
    readme_table = docs._benchmarks(tmp_path)  # what `python -m src.docs` puts in README
    assert all(b in readme_table for b in bars) and (bars or "no bar: see the section" in readme_table)


def test_infer_e2e_holds_infer_py_against_the_encoder_measured_in_the_same_run(tmp_path):
    """Issue 18: the end-to-end rate is a share of the encoder's own rate from the same run, with both bars stated."""
    from bench import infer_e2e

    doc = tmp_path / "BENCH.md"
    result = infer_e2e.main(["--quick", "--doc", str(doc)])
    row = result["rows"][0]
    assert result["encoder_share"] > 0 and float(row["encoder alone GFLOP/s"]) >= 0
    text = doc.read_text()
    assert f"= {result['encoder_share']:.0%} of the encoder alone in this run" in text
    assert "checkpoints (bar < 10 s)" in text and "one checkpoint resident at a time" in text
