"""Issue 29 on the CPU: make gpu-check up to its first CUDA call, and docs/GPU.md's section from a results file.

The results file used here, tests/fixtures/gpu_results_sample.json, is a fixture with invented numbers (kind
"fixture"): it tests the renderer, and docs/gpu.json refuses it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from bench import gpu_check, gpu_measure
from src import docs
from src.errors import BiomassError, run_cli

SAMPLE = REPO / "tests" / "fixtures" / "gpu_results_sample.json"


def sample() -> dict:
    return json.loads(SAMPLE.read_text())


# ---- the generated section ---------------------------------------------------------------------------------------
def test_the_section_renders_the_machine_tests_memory_flops_and_infer_rows():
    text = docs.render_gpu(sample())
    first = text.splitlines()[0]
    assert first.startswith("**FIXTURE, not a measurement**") and "tests/fixtures/gpu_results_sample.json" in first
    for value in ("FIXTURE-GPU (not a measurement)", "driver 000.00.00-fixture", "torch 0.0.0-fixture (CUDA 0.0)",
                  "timm 0.0.0-fixture", "1970-01-01 00:00 UTC", "took 300 s (budget 350 s)"):  # fmt: skip
        assert value in text, value
    assert "| flops | timeout | 40.0 | 40 |" in text
    assert "`pytest -m gpu`: 2 passed, 1 failed, 0 errors, 0 skipped, 1 expected failures." in text
    # the failing and the expected-failure tests are listed, a '|' in a message cannot break the table
    assert "| `tests.test_gpu::test_infer_py_on_cuda_and_two_workers_on_one_gpu_equal_the_cpu` | failed | " in text
    assert "Not equal to tolerance / fixture |" in text and "test_an_oom_retries_at_half_batch" in text
    assert "test_a_fold_trains_in_bf16_on_cuda" not in text  # passed tests are only counted
    # memory: measured, the model's projection, the ratio; a de-duplicated row names its twin; a skipped row shows '-'
    vitb, vitl = "`vit_base_patch14_reg4_dinov2.lvd142m`", "`vit_large_patch16_dinov3.lvd1689m`"
    assert f"| seed | {vitb} | 2x2 | 8 | off | 21.00 | 28.0 | 0.75 | ok (= gpu-smoke) |" in text
    assert f"| top | {vitl} | 1x1 | 4 | on | - | 8.0 | - | skipped: stage budget spent |" in text
    # throughput: the share of peak, and the T4 projection = share x 65 TFLOP/s (0.4 x 65 = 26.0)
    assert "| 504 | 64 | bfloat16 | fwd+bwd | 400.0 | 40.0% | 26.0 |" in text
    assert "| 504 | 64 | float16 | fwd | - | - | - |" in text
    assert "**40% of the encoder alone** (250.0 TFLOP/s" in text and "10 random ViT-B/14 checkpoints" in text


def test_without_results_the_section_says_nothing_was_measured_and_the_rest_is_assumed():
    text = docs.render_gpu(None)
    assert text.startswith("**No GPU has been measured yet.**") and "*assumed*" in text
    assert "RECIPES.md" in text and "KAGGLE.md" in text
    body = dict(docs.sections((REPO / "docs" / "GPU.md").read_text()))["gpu"]
    if not (REPO / "docs" / "gpu.json").is_file():  # the committed doc says so while no measurement is committed
        assert body.strip() == text


def _doc_repo(tmp_path: Path, results: dict | None) -> Path:
    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "README.md").write_text("# x\n")
    (tmp_path / "docs" / "GPU.md").write_text("# GPU\n\n<!-- generated:gpu -->\nold\n<!-- /generated -->\n")
    if results is not None:
        (tmp_path / "docs" / "gpu.json").write_text(json.dumps(results))
    return tmp_path


def test_docs_rewrite_the_section_from_docs_gpu_json_and_refuse_a_fixture(tmp_path: Path):
    repo = _doc_repo(tmp_path / "fixture", sample())
    with pytest.raises(BiomassError, match=r"gpu\.json: kind 'fixture', not 'measurement'"):
        docs.rewrite(repo)
    measured = {**sample(), "kind": "measurement"}
    repo = _doc_repo(tmp_path / "measured", measured)
    assert docs.rewrite(repo) == ["docs/GPU.md: gpu"]
    text = (repo / "docs" / "GPU.md").read_text()
    assert "Measured on **FIXTURE-GPU (not a measurement)**" in text and "FIXTURE, not a measurement" not in text
    assert docs.rewrite(repo, check=True) == []
    repo = _doc_repo(tmp_path / "none", None)
    docs.rewrite(repo)
    assert "No GPU has been measured yet" in (repo / "docs" / "GPU.md").read_text()


# ---- the script up to its first CUDA call ------------------------------------------------------------------------
def test_the_dry_run_plan_resolves_shapes_projections_wheels_and_commands(tmp_path: Path, capsys):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "albumentations-2.0.8-py3-none-any.whl").write_bytes(b"")
    (wheels / "pydantic-2.0.0-py3-none-any.whl").write_bytes(b"")  # another version than the pinned one: missing
    assert run_cli(gpu_check.main, ["--dry-run", "--wheels", str(wheels)]) == 0
    plan = json.loads(capsys.readouterr().out)
    shapes = {(s["recipe"], s["grid"]): s for s in plan["shapes"]}
    assert set(shapes) == {("gpu-smoke", "2x2"), ("seed", "2x2"), ("seed", "3x3"), ("top", "1x1"), ("top-h", "1x1")}
    seed = shapes[("seed", "2x2")]  # ViT-B/14 reg4 at 504: 36 x 36 patches + 5 prefix tokens; 8 images x 2 views x 4
    assert (seed["tile"], seed["tokens"], seed["sequences_per_step"]) == (504, 36 * 36 + 5, 64)
    top = shapes[("top", "1x1")]  # ViT-L/16 DINOv3 at 768, batch 4, EMA
    assert (top["tile"], top["tokens"], top["sequences_per_step"], top["ema"]) == (768, 48 * 48 + 5, 8, True)
    memory = plan["memory_model_gb"]["seed"]["2x2"]
    assert memory["with_ckpt_gb"] < memory["without_ckpt_gb"]  # checkpointing keeps only each block's input
    projected = {r["grid"]: r["memory_gb"] for r in gpu_check.recipes.project(REPO / "configs" / "seed.yaml")[0]}
    assert memory["without_ckpt_gb"] == projected["2x2"]  # seed.yaml itself has checkpointing off
    assert plan["wheels"]["found"] == {"albumentations": "albumentations-2.0.8-py3-none-any.whl"}
    assert "pydantic==2.14.4" in plan["wheels"]["missing"] and len(plan["wheels"]["missing"]) == 8
    assert plan["budgets_sum_s"] <= plan["total_budget_s"] < 360  # the whole check under 6 minutes
    assert "-m gpu tests/test_gpu.py" in plan["commands"]["tests"] and "--no-index" in plan["commands"]["setup"]
    assert "--python-version 3.12" in plan["fetch_wheels"] and "albucore==0.0.24" in plan["fetch_wheels"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where CUDA is absent")
def test_without_cuda_the_check_stops_with_one_line(capsys):
    assert run_cli(gpu_check.main, []) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA device visible") and "--dry-run" in err[0]
    assert run_cli(gpu_measure.main, ["memory", "--part", "x.json"]) == 1
    assert "the memory stage measures a GPU" in capsys.readouterr().err


def test_a_stage_is_killed_at_its_budget_and_a_failure_keeps_its_exit_code():
    slow = gpu_check.run_limited([sys.executable, "-c", "import time; print('begun', flush=True); time.sleep(60)"], 2)
    assert slow["status"] == "timeout" and slow["seconds"] < 10 and "begun" in slow["output"]
    bad = gpu_check.run_limited([sys.executable, "-c", "import sys; print('oops'); sys.exit(3)"], 30)
    assert (bad["status"], bad["returncode"]) == ("failed", 3) and "oops" in bad["output"]


def test_junit_outcomes_count_pass_fail_skip_and_expected_failures(tmp_path: Path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_ok" time="1.5"/>'
        '<testcase classname="tests.test_gpu" name="test_bad" time="2"><failure message="assert 1 == 2&#10;more">'
        "trace</failure></testcase>"
        '<testcase classname="tests.test_gpu" name="test_skip" time="0"><skipped type="pytest.skip" '
        'message="needs a CUDA device"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_xf" time="0.1"><skipped type="pytest.xfail" '
        'message="not merged yet"/></testcase>'
        "</testsuite></testsuites>"
    )
    out = gpu_check.junit_outcomes(xml)
    assert {k: out[k] for k in ("passed", "failed", "error", "skipped", "xfailed")} == {
        "passed": 1, "failed": 1, "error": 0, "skipped": 1, "xfailed": 1,
    }  # fmt: skip
    bad = next(c for c in out["cases"] if c["name"].endswith("test_bad"))
    assert bad == {"name": "tests.test_gpu::test_bad", "outcome": "failed", "seconds": 2.0, "message": "assert 1 == 2"}


def test_setup_installs_nothing_when_albumentations_imports_and_names_missing_wheels_otherwise(tmp_path, monkeypatch):
    done = gpu_check.setup_site(tmp_path / "whl", tmp_path / "site", 60)  # this machine has albumentations
    assert done["status"] == "ok" and "already importable; nothing installed" in done["note"]
    assert not (tmp_path / "site").exists()
    monkeypatch.setattr(gpu_check, "run_limited", lambda *a, **k: {"status": "failed", "output": "ModuleNotFound"})
    with pytest.raises(BiomassError, match=r"whl: no wheel for albumentations==2\.0\.8, .*make gpu-wheels"):
        gpu_check.setup_site(tmp_path / "whl", tmp_path / "site", 60)


def test_peak_table_matches_cards_by_name():
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12 and gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops("Tesla T4") == 65e12 and gpu_check.peak_flops("NVIDIA L40S") == 362e12
    assert gpu_check.peak_flops("Some Future GPU") is None


def test_make_targets_call_the_script():
    run = {"cwd": REPO, "capture_output": True, "text": True, "check": True}
    make = ["make", "--no-print-directory", "-n"]  # no "Entering directory" lines under a parent make (make test)
    dry = subprocess.run([*make, "gpu-check", "GPU_FLAGS=--dry-run"], **run).stdout
    assert "bench/gpu_check.py --dry-run" in dry
    bare = subprocess.run([*make, "gpu-check", "PY=/no/such/python"], **run).stdout  # a GPU box has no .venv
    assert bare.strip().startswith("python3 bench/gpu_check.py")
    assert "bench/gpu_check.py --fetch-wheels" in subprocess.run([*make, "gpu-wheels"], **run).stdout
