"""The Kaggle path: build the three uploads, run the generated kernel offline in a mock /kaggle, push, download."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import REPO, run_script

from kernels import build as kbuild
from kernels import kernel_template, push
from kernels.rehearse import WRAPPER  # the one network-cut runner of the kernel tests and the rehearsal
from src import download
from src.config import InferConfig, load_yaml
from src.errors import run_cli

OWNER, SLUG = "tester", "i2b-test"
IDS = {"kernel": f"{OWNER}/{SLUG}", "weights": f"{OWNER}/{SLUG}-weights", "code": f"{OWNER}/{SLUG}-code"}


def _no_credentials(monkeypatch, home: Path) -> None:
    """A HOME without ~/.kaggle and no KAGGLE_* variables."""
    for key in [k for k in os.environ if k.startswith("KAGGLE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))


def _clean_env(home: Path, **extra: str) -> dict:
    """Subprocess environment: no credentials, no PYTHONPATH, no offline flags (the kernel sets its own)."""
    drop = ("PYTHONPATH", "HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_") and k not in drop}
    return {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), **extra}


@pytest.fixture(scope="module")
def kernel_build(trained_exp: Path, tmp_path_factory) -> Path:
    """`python kernels/build.py` on the session's tiny experiment, run as a user would."""
    out = tmp_path_factory.mktemp("build") / "kaggle"
    run_script(
        "kernels/build.py", "--checkpoints", str(trained_exp), "--owner", OWNER, "--slug", SLUG, "--out", str(out)
    )
    return out


@pytest.fixture
def build_copy(kernel_build: Path, tmp_path: Path) -> Path:
    """A private copy of the build that a test may break."""
    return Path(shutil.copytree(kernel_build, tmp_path / "kaggle"))


@pytest.fixture(scope="module")
def mock_kaggle(kernel_build: Path, synthetic_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """/kaggle/input/{SLUG-weights, SLUG-code, csiro-biomass} and /kaggle/working as Kaggle mounts them."""
    root = tmp_path_factory.mktemp("kaggle")
    dirs = {
        "I2B_WEIGHTS_DIR": root / "input" / f"{SLUG}-weights",
        "I2B_CODE_DIR": root / "input" / f"{SLUG}-code",
        "I2B_DATA_DIR": root / "input" / "csiro-biomass",
        "I2B_OUT_DIR": root / "working",
    }
    shutil.copytree(kernel_build / "weights", dirs["I2B_WEIGHTS_DIR"])
    shutil.copytree(kernel_build / "code", dirs["I2B_CODE_DIR"])
    shutil.copytree(synthetic_dir, dirs["I2B_DATA_DIR"])
    dirs["I2B_OUT_DIR"].mkdir()
    return dirs


def _run_kernel(kernel_py: Path, dirs: dict[str, Path], tmp: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """kernel.py through the network-blocking wrapper, from an unrelated cwd, with only the mock mounts."""
    wrapper, report = tmp / "wrapper.py", tmp / "report.json"
    wrapper.write_text(WRAPPER)
    env = _clean_env(tmp / "home", **{k: str(v) for k, v in dirs.items()})
    proc = subprocess.run(
        [sys.executable, str(wrapper), str(kernel_py), str(report)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, json.loads(report.read_text()) if report.is_file() else {}


# ---- build ----------------------------------------------------------------------------------------------------------
def test_build_writes_three_uploads_with_consistent_metadata(kernel_build: Path, trained_exp: Path):
    weights, code, kernel = (kernel_build / name for name in ("weights", "code", "kernel"))
    expected = sorted(p.relative_to(trained_exp.parent).as_posix() for p in trained_exp.glob("grid*/fold*/best.pt"))
    assert len(expected) == 4
    assert (
        sorted(p.relative_to(weights).as_posix() for p in weights.rglob("*.pt")) == expected
    )  # best.pt only, no last.pt
    for rel in expected:
        assert (weights / rel).read_bytes() == (trained_exp.parent / rel).read_bytes()

    code_files = {p.relative_to(code).as_posix() for p in code.rglob("*") if p.is_file()}
    assert {"infer.py", "src/__init__.py", "src/inference.py", "MANIFEST.json", "dataset-metadata.json"} <= code_files
    assert not any("__pycache__" in f or f.endswith(".pyc") or f.startswith("tests") for f in code_files)
    assert (code / "infer.py").read_bytes() == (REPO / "infer.py").read_bytes()

    for folder, ref in ((weights, IDS["weights"]), (code, IDS["code"])):
        meta = json.loads((folder / "dataset-metadata.json").read_text())
        assert meta["id"] == ref and 6 <= len(meta["title"]) <= 50 and meta["licenses"] == [{"name": "CC0-1.0"}]

    meta = json.loads((kernel / "kernel-metadata.json").read_text())
    assert meta["id"] == IDS["kernel"] and meta["code_file"] == "kernel.py" and (kernel / "kernel.py").is_file()
    assert (meta["language"], meta["kernel_type"]) == ("python", "script")
    assert meta["is_private"] is True and meta["enable_gpu"] is True and meta["enable_internet"] is False
    assert meta["machine_shape"] == "NvidiaTeslaT4" and meta["enable_tpu"] is False  # GPU T4 x2, asked for
    assert meta["dataset_sources"] == [IDS["weights"], IDS["code"]] and meta["competition_sources"] == ["csiro-biomass"]
    assert meta["kernel_sources"] == [] and meta["model_sources"] == []
    assert push._slugify(meta["title"]) == SLUG

    # kernel.py is the template with the build filled in, pinned to the exact dataset contents
    text = (kernel / "kernel.py").read_text()
    assert text.startswith('"""CSIRO Image2Biomass submission kernel') and "BUILD: dict = {}" not in text
    for folder in (weights, code):
        assert json.loads((folder / "MANIFEST.json").read_text())["id"] in text
    assert [u.ref for u in push.validate_build(kernel_build)] == [IDS["weights"], IDS["code"], IDS["kernel"]]
    info = json.loads((kernel_build / "build.json").read_text())
    assert info["experiments"] == [trained_exp.name]
    infer = InferConfig.from_dict(info["infer"])  # the kernel's infer.py config: the `kaggle` preset
    assert (infer.tta, infer.physics, infer.on_bad_image, infer.device) == ("full", "project", "fallback", "auto")
    assert infer.amp is True  # fp16 autocast on a Kaggle T4 (bf16 on this CPU)
    assert not list(kernel_build.parent.glob(".kaggle.*")), "temp build folders left behind"


def test_build_errors_are_one_line(trained_exp: Path, tmp_path: Path, monkeypatch, capsys):
    empty = tmp_path / "empty_exp"
    empty.mkdir()
    out = tmp_path / "out" / "kaggle"
    assert run_cli(kbuild.main, ["--checkpoints", str(empty), "--owner", OWNER, "--out", str(out)]) == 1
    assert "no grid*/fold*/best.pt" in capsys.readouterr().err

    _no_credentials(monkeypatch, tmp_path / "home")
    assert run_cli(kbuild.main, ["--checkpoints", str(trained_exp), "--out", str(out)]) == 1
    assert "pass --owner" in capsys.readouterr().err
    monkeypatch.setenv("KAGGLE_USERNAME", OWNER)  # the owner can also come from the CLI's own settings
    assert kbuild.resolve_owner(None) == OWNER

    # a failing build leaves the previous one untouched and no temp folder behind
    assert run_cli(kbuild.main, ["--checkpoints", str(trained_exp), "--out", str(out), "--slug", SLUG]) == 0
    before = (out / "build.json").read_text()
    bad = [
        "--checkpoints",
        str(trained_exp),
        "--out",
        str(out),
        "--ship-backbone-weights",
        str(tmp_path / "missing.pth"),
    ]
    assert run_cli(kbuild.main, bad) == 1
    assert "missing.pth: file not found" in capsys.readouterr().err
    assert (out / "build.json").read_text() == before and sorted(p.name for p in out.parent.iterdir()) == ["kaggle"]

    # --out is replaced whole, so a folder that is not a build is refused
    precious = tmp_path / "precious"
    (precious / "keep.txt").parent.mkdir()
    (precious / "keep.txt").write_text("x")
    assert run_cli(kbuild.main, ["--checkpoints", str(trained_exp), "--out", str(precious)]) == 1
    assert "not a kernels/build.py output" in capsys.readouterr().err and (precious / "keep.txt").is_file()


# ---- the kernel, offline, in a mock /kaggle --------------------------------------------------------------------------
def test_kernel_offline_writes_the_same_submission_as_infer(
    kernel_build, mock_kaggle, synthetic_dir, trained_exp, tmp_path
):
    proc, report = _run_kernel(kernel_build / "kernel" / "kernel.py", mock_kaggle, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    submission = mock_kaggle["I2B_OUT_DIR"] / "submission.csv"
    config = json.loads(
        next(ln for ln in proc.stdout.splitlines() if ln.startswith("infer.py --config")).split(": ", 1)[1]
    )
    assert (config["tta"], config["physics"], config["on_bad_image"], config["device"], config["amp"]) == (
        "full",
        "project",
        "fallback",
        "auto",
        True,
    )
    assert InferConfig.from_dict(load_yaml(mock_kaggle["I2B_OUT_DIR"] / "submission.yaml")).amp is True

    # the code came from the code dataset copy, never from the repo; the kernel set the offline flags itself
    code = mock_kaggle["I2B_CODE_DIR"]
    assert {k: report["modules"][k] for k in ("infer", "src")} == {
        "infer": str(code / "infer.py"),
        "src": str(code / "src" / "__init__.py"),
    }
    assert (
        "timm 1." in proc.stdout and "needed); timm imported from" in proc.stdout
    )  # the image's own timm, no wheel built
    assert not [p for p in report["sys_path"] if p and Path(p).resolve() == REPO]
    assert report["env"] == {"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}

    local = tmp_path / "local.csv"
    run_script(
        "infer.py", "--data-dir", str(synthetic_dir), "--checkpoints", str(trained_exp), "--out", str(local), "--amp"
    )
    assert submission.read_bytes() == local.read_bytes()


def test_kernel_with_stamp_cleaning_pseudo_labels_and_a_bundled_timm(clean_exp, stamp_dir, tmp_path):
    """The issue's kernel run: checkpoints trained with --clean-stamps, a one-epoch pseudo-label fine-tune, and the
    bundled timm wheel installed offline (forced: this image's timm is new enough); same submission as infer.py."""
    exp, _ = clean_exp
    out = tmp_path / "build" / "kaggle"
    run_script(
        "kernels/build.py", "--checkpoints", str(exp), "--owner", OWNER, "--slug", SLUG, "--out", str(out),
        "--pseudo-label-epochs", "1", "--pseudo-label-blend", "0.5", "--pseudo-label-lr-scale", "0.2",
        "--time-budget", "30", "--bundle-timm",
    )  # fmt: skip
    wheels = sorted((out / "code" / "wheels").glob("timm-*-py3-none-any.whl"))
    assert (
        len(wheels) == 1
        and f"wheels/{wheels[0].name}" in json.loads((out / "code" / "MANIFEST.json").read_text())["files"]
    )
    info = json.loads((out / "build.json").read_text())
    assert info["infer"]["pseudo_label"] == {"epochs": 1, "weight": 1.0, "blend": 0.5, "fold": "best", "lr_scale": 0.2}
    assert info["infer"]["time_budget"] == 30.0
    timm_entry = {"min_version": "1.0.19", "trained_with": timm.__version__, "wheel": f"wheels/{wheels[0].name}"}
    assert info["timm"] == timm_entry and info["cleaning"] == ["stamps+crop0.05"]

    root = tmp_path / "kaggle"
    dirs = {"I2B_WEIGHTS_DIR": root / "input" / f"{SLUG}-weights", "I2B_CODE_DIR": root / "input" / f"{SLUG}-code",
            "I2B_DATA_DIR": root / "input" / "csiro-biomass", "I2B_OUT_DIR": root / "working"}  # fmt: skip
    for key, src in (("I2B_WEIGHTS_DIR", out / "weights"), ("I2B_CODE_DIR", out / "code"), ("I2B_DATA_DIR", stamp_dir)):
        shutil.copytree(src, dirs[key])
    dirs["I2B_OUT_DIR"].mkdir()
    proc, report = _run_kernel(out / "kernel" / "kernel.py", {**dirs, "I2B_FORCE_TIMM_WHEEL": "1"}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"timm from the bundled {wheels[0].name}" in proc.stdout
        and "image cleaning of the checkpoints: stamps+crop0.05" in proc.stdout
    )
    assert "/i2b-timm-" in report["modules"]["timm"] and str(REPO) not in report["modules"]["timm"]
    assert "pseudo-label adaptation: 1 model(s), 1 epoch(s), blend 0.5" in proc.stdout
    # the fine-tune read the run's drop-ids and folds files shipped beside its best.pt, not the training machine's
    weights = dirs["I2B_WEIGHTS_DIR"]
    shipped = [p.relative_to(weights).as_posix() for p in sorted(weights.rglob("*")) if p.suffix in (".txt", ".csv")]
    assert shipped == [
        f"{ckpt_dir}/{name}" for ckpt_dir in ("clean/grid2x2/fold0",) for name in ("drop_ids.txt", "folds.csv")
    ]
    assert (weights / shipped[0]).read_text() == (exp.parents[1] / "drop.txt").read_text()
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("fine-tune training set:"))
    assert line == (f"fine-tune training set: 27 of 30 train.csv images; the run's images from {weights / shipped[1]}; "
                    f"3 left out by {weights / shipped[0]}")  # fmt: skip
    assert (
        '"pseudo_label": {"blend": 0.5, "epochs": 1, "fold": "best", "lr_scale": 0.2, "weight": 1.0}' in proc.stdout
        and '"time_budget": 30.0' in proc.stdout
    )

    local = tmp_path / "local.csv"
    run_script(
        "infer.py", "--data-dir", str(stamp_dir), "--checkpoints", str(exp), "--out", str(local), "--amp",
        "--pseudo-label-epochs", "1", "--pseudo-label-blend", "0.5", "--pseudo-label-lr-scale", "0.2",
        "--time-budget", "30",
    )  # fmt: skip
    assert (dirs["I2B_OUT_DIR"] / "submission.csv").read_bytes() == local.read_bytes()


def test_kernel_without_a_new_enough_timm_names_the_fix(kernel_build, tmp_path, monkeypatch):
    """An image whose timm is too old and a build without the wheel: a clear error before any work."""
    build = json.loads((kernel_build / "build.json").read_text())
    assert build["timm"]["wheel"] is None
    monkeypatch.setattr(kernel_template, "BUILD", {**build, "timm": {"min_version": "99.0.0", "wheel": None}})
    with pytest.raises(
        kernel_template.KernelError, match=r"the backbones need >= 99.0.0; rebuild with kernels/build.py --bundle-timm"
    ):
        kernel_template.ensure_timm(tmp_path)
    assert kbuild.timm_min_version(["vit_small_patch16_dinov3.lvd1689m", "vit_base_patch14_reg4_dinov2"]) == "1.0.20"


def test_the_bundled_timm_replaces_one_older_than_the_backbones_or_the_training():
    """issue 25: the wheel goes in when Kaggle's timm is older than the family floor, or (bundled) than training's."""
    need = kbuild.timm_min_version(["vit_base_patch14_reg4_dinov2"])
    assert need == "1.0.19" and kbuild.timm_min_version(["vit_small_patch16_dinov3"]) == "1.0.20"
    assert kernel_template.wheel_needed("1.0.19", need, "1.0.31", bundled=True)  # trained under a newer timm
    assert not kernel_template.wheel_needed("1.0.19", need, "1.0.31", bundled=False)  # nothing to install: run
    assert not kernel_template.wheel_needed("1.0.31", need, "1.0.31", bundled=True)
    assert kernel_template.wheel_needed("1.0.31", need, "1.0.31", bundled=True, force=True)
    assert kernel_template.wheel_needed("1.0.15", need, None, bundled=False)
    assert kernel_template.wheel_needed(None, need, None, bundled=False)
    plan = kbuild.timm_plan([{"backbone": "vit_small_patch16_dinov3", "timm_version": "1.0.22"},
                             {"backbone": "vit_base_patch14_reg4_dinov2", "timm_version": "1.0.31"},
                             {"backbone": "vit_base_patch14_reg4_dinov2", "timm_version": None}], None)  # fmt: skip
    assert plan == {"min_version": "1.0.20", "trained_with": "1.0.31", "wheel": None}


def test_kernel_exits_nonzero_with_one_line(kernel_build, mock_kaggle, tmp_path):
    # a weights dataset of another build (e.g. its new version is still processing) stops the kernel before any work
    stale = Path(shutil.copytree(mock_kaggle["I2B_WEIGHTS_DIR"], tmp_path / "stale"))
    manifest = json.loads((stale / "MANIFEST.json").read_text())
    (stale / "MANIFEST.json").write_text(json.dumps({**manifest, "id": "0" * 64}))
    proc, _ = _run_kernel(kernel_build / "kernel" / "kernel.py", {**mock_kaggle, "I2B_WEIGHTS_DIR": stale}, tmp_path)
    assert proc.returncode == 1 and "is not the one this kernel was built with" in proc.stderr.strip().splitlines()[-1]

    # a BiomassError inside infer.py (here: no test.csv) ends the run with its message, not a constant submission
    empty = tmp_path / "no_data"
    empty.mkdir()
    out = tmp_path / "working"
    out.mkdir()
    proc, _ = _run_kernel(
        kernel_build / "kernel" / "kernel.py", {**mock_kaggle, "I2B_DATA_DIR": empty, "I2B_OUT_DIR": out}, tmp_path
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "test.csv" in last and not (out / "submission.csv").exists()


def test_kernel_finds_datasets_left_zipped_or_nested(kernel_build: Path, tmp_path: Path):
    weights_id = json.loads((kernel_build / "weights" / "MANIFEST.json").read_text())["id"]
    # Kaggle left `tiny.zip` (what `--dir-mode zip` uploads) packed, one level below the mount
    mount = tmp_path / "mount"
    inner = mount / "v1"
    inner.mkdir(parents=True)
    for entry in (kernel_build / "weights").iterdir():
        if entry.is_dir():
            shutil.make_archive(str(inner / entry.name), "zip", entry)
        else:
            shutil.copy(entry, inner / entry.name)
    root = kernel_template.locate_dataset(mount, "weights", weights_id)
    for rel in json.loads((inner / "MANIFEST.json").read_text())["files"]:
        assert (root / rel).is_file()
    with pytest.raises(kernel_template.KernelError, match="no MANIFEST.json of a code dataset"):
        kernel_template.locate_dataset(mount, "code", "x")
    (inner / "tiny.zip").unlink()
    with pytest.raises(kernel_template.KernelError, match="file\\(s\\) of the weights dataset missing"):
        kernel_template.locate_dataset(mount, "weights", weights_id)


# ---- push -----------------------------------------------------------------------------------------------------------
def test_push_dry_run_needs_no_credentials(kernel_build: Path, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "kernels" / "push.py"), str(kernel_build), "--dry-run"],
        cwd=tmp_path,
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("weights", "code"):
        assert f"kaggle datasets create -p {kernel_build / name} --dir-mode zip" in proc.stdout
        assert f"kaggle datasets version -p {kernel_build / name} -m" in proc.stdout
    assert f"kaggle kernels push -p {kernel_build / 'kernel'}" in proc.stdout


def test_push_without_credentials_stops_before_any_command(kernel_build: Path, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "kernels" / "push.py"), str(kernel_build)],
        cwd=tmp_path,
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {download.CREDENTIALS_HELP}"]
    assert "kaggle" not in proc.stdout


@pytest.mark.parametrize(
    ("rel", "edit", "expected"),
    [
        ("kernel/kernel-metadata.json", {"enable_internet": True}, "kernel-metadata.json: field 'enable_internet'"),
        ("kernel/kernel-metadata.json", {"id": "tester/Bad_Slug"}, "kernel-metadata.json: field 'id'"),
        ("kernel/kernel-metadata.json", {"title": "Something Else"}, "kernel-metadata.json: field 'title'"),
        (
            "kernel/kernel-metadata.json",
            {"dataset_sources": [IDS["weights"]]},
            "kernel-metadata.json: field 'dataset_sources'",
        ),
        ("kernel/kernel-metadata.json", {"code_file": "nope.py"}, "kernel-metadata.json: field 'code_file'"),
        ("weights/dataset-metadata.json", {"id": "no-owner-here"}, "dataset-metadata.json: field 'id'"),
        ("code/dataset-metadata.json", {"licenses": []}, "dataset-metadata.json: field 'licenses'"),
    ],
)
def test_push_dry_run_rejects_bad_metadata(build_copy: Path, rel: str, edit: dict, expected: str, capsys):
    path = build_copy / rel
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    assert run_cli(push.main, [str(build_copy), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path.parent}/") and expected in err and len(err.strip().splitlines()) == 1


class FakeKaggle:
    """Stands in for run_kaggle: answers `datasets status` from a table, records every command."""

    def __init__(self, versions: dict[str, int], push_output: str = "Kernel version 1 successfully pushed."):
        self.versions = dict(versions)  # ref -> current version (absent = the dataset does not exist)
        self.calls: list[list[str]] = []
        self.push_output = push_output

    def __call__(self, args: list[str], echo: bool = True) -> tuple[int, str]:
        self.calls.append(args)
        if args[:2] == ["datasets", "status"]:
            if args[2] not in self.versions:
                return 1, "404 Client Error: Not Found for url: https://www.kaggle.com/api/v1/datasets/status"
            return 0, json.dumps({"status": "ready", "current_version_number": self.versions[args[2]]})
        if args[:2] in (["datasets", "create"], ["datasets", "version"]):
            ref = json.loads((Path(args[3]) / "dataset-metadata.json").read_text())["id"]
            self.versions[ref] = self.versions.get(ref, 0) + 1
            return 0, "Your private Dataset is being created."
        return 0, self.push_output


def test_push_creates_then_versions_datasets_then_pushes_kernel(kernel_build: Path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "fake-token")
    monkeypatch.setattr(push, "POLL_SECONDS", 0)
    fake = FakeKaggle({IDS["code"]: 3})  # weights: first upload; code: exists at version 3
    monkeypatch.setattr(push, "run_kaggle", fake)
    assert push.main([str(kernel_build), "--message", "test"]) == 0
    uploads = [c for c in fake.calls if c[1] != "status"]
    assert uploads == [
        ["datasets", "create", "-p", str(kernel_build / "weights"), "--dir-mode", "zip"],
        ["datasets", "version", "-p", str(kernel_build / "code"), "-m", "test", "--dir-mode", "zip"],
        ["kernels", "push", "-p", str(kernel_build / "kernel")],
    ]
    assert fake.versions == {IDS["weights"]: 1, IDS["code"]: 4}

    # the CLI reports some failures with exit code 0: they must still fail the push
    monkeypatch.setattr(push, "run_kaggle", FakeKaggle(fake.versions, "Kernel push error: Notebook not found"))
    assert run_cli(push.main, [str(kernel_build)]) == 1
    assert "Kernel push error: Notebook not found" in capsys.readouterr().err


# ---- competition download -------------------------------------------------------------------------------------------
def test_download_needs_credentials_and_skips_existing_files(tmp_path: Path, monkeypatch, capsys):
    _no_credentials(monkeypatch, tmp_path / "home")
    out = tmp_path / "data"
    assert run_cli(download.main, ["--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {download.CREDENTIALS_HELP}"

    for name in ("train.csv", "test.csv", "train/a.jpg", "test/b.jpg"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    assert run_cli(download.main, ["--out", str(out)]) == 0  # already there: no credentials needed
    assert "nothing to do" in capsys.readouterr().out


def test_download_reports_cli_failure_and_unzips(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "fake-token")
    fake = tmp_path / "fake_kaggle.py"
    fake.write_text(
        "import sys, zipfile, pathlib\n"
        "if sys.argv[-1].endswith('fail'):\n"
        "    print('Downloading...', flush=True)\n"
        "    sys.exit(print('403 Client Error: Forbidden for url: https://www.kaggle.com/api/v1/x', "
        "file=sys.stderr) or 1)\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('-p') + 1])\n"
        "with zipfile.ZipFile(out / 'csiro-biomass.zip', 'w') as zf:\n"
        "    for name in ('train.csv', 'test.csv', 'sample_submission.csv', 'train/a.jpg', 'test/b.jpg'):\n"
        "        zf.writestr(name, 'x')\n"
    )
    monkeypatch.setattr(download, "kaggle_executable", lambda: [sys.executable, str(fake)])
    assert run_cli(download.main, ["--out", str(tmp_path / "fail")]) == 1
    err = capsys.readouterr().err
    assert "403 Client Error: Forbidden" in err and "accept the rules" in err

    out = tmp_path / "ok"
    assert run_cli(download.main, ["--out", str(out)]) == 0
    assert download.competition_files_present(out) and not (out / "csiro-biomass.zip").exists()


# ---- accelerator ----------------------------------------------------------------------------------------------------
def test_accelerator_names_are_the_kaggle_clis_own():
    """push.py's lists match the installed kaggle CLI 2.2.5 source (read as text: importing kaggle authenticates)."""
    root = Path(importlib.util.find_spec("kaggle").submodule_search_locations[0])
    api = (root / "api" / "kaggle_api_extended.py").read_text()
    table = ast.literal_eval(re.search(r"_RETIRED_ACCELERATORS = (\{.*?\})", api, re.S)[1])
    assert {k.lower() for k in push.RETIRED_ACCELERATORS} == set(table)
    for name, detail in push.RETIRED_ACCELERATORS.items():
        assert table[name.lower()].lower().startswith(detail.lower()), (name, table[name.lower()])
    help_text = (root / "cli.py").read_text()
    for name, what in push.ACCELERATORS.items():
        assert f"'{name}' for {what}" in help_text
    assert "'NvidiaTeslaP100' are accepted but warn" in help_text


def test_build_accelerator_flag(trained_exp: Path, tmp_path: Path, capsys):
    def meta(*flags: str) -> dict:
        out = tmp_path / "k"
        argv = ["--checkpoints", str(trained_exp), "--owner", OWNER, "--slug", SLUG, "--out", str(out), *flags]
        assert run_cli(kbuild.main, argv) == 0, capsys.readouterr().err
        return json.loads((out / "kernel" / "kernel-metadata.json").read_text())

    retired = meta("--accelerator", "nvidiateslap100")  # the CLI's case-insensitive match, written its way
    assert (retired["machine_shape"], retired["enable_gpu"]) == ("NvidiaTeslaP100", True)
    assert "accelerator NvidiaTeslaP100 is retired: sessions run on the default GPU" in capsys.readouterr().out
    cpu = meta("--accelerator", "none")
    assert "machine_shape" not in cpu and cpu["enable_gpu"] is False and cpu["enable_tpu"] is False
    tpu = meta("--accelerator", "TpuV5E8")
    assert (tpu["machine_shape"], tpu["enable_gpu"], tpu["enable_tpu"]) == ("TpuV5E8", False, True)
    assert "is a TPU: the kernel uses CUDA or the CPU" in capsys.readouterr().out
    argv = ["--checkpoints", str(trained_exp), "--owner", OWNER, "--out", str(tmp_path / "x"), "--accelerator", "H100"]
    assert run_cli(kbuild.main, argv) == 1
    assert "--accelerator 'H100' is not an accelerator the kaggle CLI knows: NvidiaTeslaT4, TpuV5E8" in (
        capsys.readouterr().err
    )


def test_push_checks_the_machine_shape(build_copy: Path, capsys):
    path = build_copy / "kernel" / "kernel-metadata.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "machine_shape": "NvidiaTeslaP100"}))
    assert run_cli(push.main, [str(build_copy), "--dry-run"]) == 0
    assert "warning: accelerator NvidiaTeslaP100 is retired" in capsys.readouterr().err
    path.write_text(json.dumps({**meta, "machine_shape": "NvidiaA100"}))
    assert run_cli(push.main, [str(build_copy), "--dry-run"]) == 1
    assert "field 'machine_shape' 'NvidiaA100' is not an accelerator the kaggle CLI knows" in capsys.readouterr().err


def test_a_fine_tune_build_needs_the_runs_drop_ids_file(trained_exp: Path, tmp_path: Path, capsys):
    exp = tmp_path / "exp"
    for src in trained_exp.glob("grid1x2/fold*/best.pt"):
        ckpt = torch.load(src, weights_only=True)
        ckpt["config"]["data"]["drop_ids"] = str(tmp_path / "gone.txt")
        (exp / src.relative_to(trained_exp)).parent.mkdir(parents=True)
        torch.save(ckpt, exp / src.relative_to(trained_exp))
    argv = ["--checkpoints", str(exp), "--owner", OWNER, "--slug", SLUG, "--out", str(tmp_path / "out")]
    assert run_cli(kbuild.main, [*argv, "--pseudo-label-epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert f"trained with --drop-ids {tmp_path / 'gone.txt'}, which is not here; the kernel's fine-tune needs it" in err
    assert run_cli(kbuild.main, argv) == 0  # without the fine-tune: a warning, the folds file still shipped
    assert "which is not here; not shipped" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "weights" / "exp" / "grid1x2" / "fold0").iterdir()) == [
        "best.pt",
        "folds.csv",
    ]


# ---- push --submit --------------------------------------------------------------------------------------------------
class FakeKaggleRun(FakeKaggle):
    """FakeKaggle that also answers `kernels status` (one state per poll), `kernels logs` and `competitions submit`."""

    HEALTHY = {"submission_written": True, "finite_models": 2, "models_total": 2, "used": ["a", "b"], "images": 3,
               "images_on_fallback": 0, "failed": {}, "errors": []}  # fmt: skip

    def __init__(
        self, versions: dict[str, int], states: list[str], failure: str = "", push_version: int = 7, report=HEALTHY
    ):
        super().__init__(versions, f"Kernel version {push_version} successfully pushed.  Please check progress at x")
        self.states, self.failure, self.report = list(states), failure, report

    def __call__(self, args: list[str], echo: bool = True) -> tuple[int, str]:
        if args[:2] == ["kernels", "status"]:
            self.calls.append(args)
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            text = f'{args[2]} has status "KernelWorkerStatus.{state}"\n'
            return 0, text + (f'Failure message: "{self.failure}"\n' if self.failure and state == "ERROR" else "")
        if args[:2] == ["kernels", "logs"]:
            self.calls.append(args)
            events = [{"stream_name": "stdout", "time": i, "data": f"line {i}\n"} for i in range(40)]
            return 0, json.dumps(events)
        if args[:2] == ["kernels", "output"]:  # writes the run's run_report.json into -p (None: the output lacks it)
            self.calls.append(args)
            if self.report is not None:
                (Path(args[args.index("-p") + 1]) / "run_report.json").write_text(json.dumps(self.report))
            return 0, "Output file downloaded"
        if args[:2] == ["competitions", "submit"]:
            self.calls.append(args)
            return 0, "Submission ref: 123\n5 submissions remaining today.\nSuccessfully submitted"
        return super().__call__(args, echo)


def test_push_submit_waits_for_the_run_then_submits_that_version(kernel_build: Path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "fake-token")
    monkeypatch.setattr(push, "POLL_SECONDS", 0)
    monkeypatch.setattr(push, "KERNEL_POLL_SECONDS", 0)
    fake = FakeKaggleRun({IDS["weights"]: 1, IDS["code"]: 1}, ["QUEUED", "RUNNING", "RUNNING", "COMPLETE"])
    monkeypatch.setattr(push, "run_kaggle", fake)
    assert push.main([str(kernel_build), "--skip-weights", "--submit", "--message", "v1 test"]) == 0
    after_push = fake.calls[[c[:2] for c in fake.calls].index(["kernels", "push"]) + 1 :]
    assert after_push == [
        ["kernels", "status", f"{IDS['kernel']}/7"],
        ["kernels", "status", f"{IDS['kernel']}/7"],
        ["kernels", "status", f"{IDS['kernel']}/7"],
        ["kernels", "status", f"{IDS['kernel']}/7"],
        ["kernels", "logs", f"{IDS['kernel']}/7"],
        ["kernels", "output", f"{IDS['kernel']}/7", "-p", after_push[5][4], "--file-pattern", r"run_report\.json"],
        ["competitions", "submit", "csiro-biomass", "-k", IDS["kernel"], "-v", "7", "-f", "submission.csv",
         "-m", "v1 test"],
    ]  # fmt: skip
    out = capsys.readouterr().out
    assert "kernel tester/i2b-test version 7: queued" in out and "version 7: complete" in out
    tail = out.split("---- last lines of the log")[1]
    assert "line 39" in tail and "line 10\n" in tail and "line 9\n" not in tail  # the last 30 lines
    assert f"submitted {IDS['kernel']} version 7 to csiro-biomass" in out


def test_push_submit_submits_nothing_after_a_failed_run(kernel_build: Path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", "fake-token")
    monkeypatch.setattr(push, "POLL_SECONDS", 0)
    monkeypatch.setattr(push, "KERNEL_POLL_SECONDS", 0)
    fake = FakeKaggleRun(
        {IDS["weights"]: 1, IDS["code"]: 1}, ["RUNNING", "ERROR"], failure="Your notebook hit an error"
    )
    monkeypatch.setattr(push, "run_kaggle", fake)
    assert run_cli(push.main, [str(kernel_build), "--skip-weights", "--submit"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: kernel {IDS['kernel']} version 7 ended with status error (Your notebook hit an error); nothing "
        f"submitted; see the log above and https://www.kaggle.com/code/{IDS['kernel']}"
    )
    assert ["kernels", "logs", f"{IDS['kernel']}/7"] in fake.calls
    assert not [c for c in fake.calls if c[0] == "competitions"]

    # a run that does not end in time: nothing submitted either, and the command to submit later
    fake = FakeKaggleRun({IDS["weights"]: 1, IDS["code"]: 1}, ["RUNNING"])
    monkeypatch.setattr(push, "run_kaggle", fake)
    assert run_cli(push.main, [str(kernel_build), "--skip-weights", "--submit", "--run-wait", "0"]) == 1
    err = capsys.readouterr().err
    assert "version 7: still running after 0s; nothing submitted; when it is complete: kaggle competitions" in err
    assert not [c for c in fake.calls if c[0] == "competitions"]


@pytest.mark.parametrize(
    "report, expected",
    [
        ({**FakeKaggleRun.HEALTHY, "finite_models": 0, "failed": {"w/e/best.pt": "could not load (OOM)"}},
         "no model produced a finite prediction: all 3 images got the training median; failed: w/e/best.pt: could not "
         "load (OOM)"),
        (None, "the run's output holds no run_report.json (built by an older kernels/build.py?)"),
        ({**FakeKaggleRun.HEALTHY, "submission_written": False}, "the run wrote no submission"),
    ],
)  # fmt: skip
def test_push_submit_refuses_a_run_where_no_model_was_finite(kernel_build: Path, monkeypatch, capsys, report, expected):
    """issue 25 item 2: a completed run (exit 0) whose run_report.json shows no finite model is not submitted."""
    monkeypatch.setenv("KAGGLE_API_TOKEN", "fake-token")
    monkeypatch.setattr(push, "POLL_SECONDS", 0)
    monkeypatch.setattr(push, "KERNEL_POLL_SECONDS", 0)
    fake = FakeKaggleRun({IDS["weights"]: 1, IDS["code"]: 1}, ["COMPLETE"], report=report)
    monkeypatch.setattr(push, "run_kaggle", fake)
    assert run_cli(push.main, [str(kernel_build), "--skip-weights", "--submit"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: kernel {IDS['kernel']} version 7 completed but is not worth submitting: {expected}; nothing submitted"
    ), err
    assert not [c for c in fake.calls if c[0] == "competitions"]


def test_push_submit_dry_run_prints_every_command(kernel_build: Path, capsys):
    assert push.main([str(kernel_build), "--dry-run", "--submit", "--message", "m"]) == 0
    out = capsys.readouterr().out
    for line in (
        f"kaggle kernels push -p {kernel_build / 'kernel'}",
        f"kaggle kernels status {IDS['kernel']}/N",
        f"kaggle kernels logs {IDS['kernel']}/N",
        f"kaggle competitions submit csiro-biomass -k {IDS['kernel']} -v N -f submission.csv -m m",
    ):
        assert line in out, out
