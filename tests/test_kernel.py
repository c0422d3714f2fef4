"""The Kaggle path: build the three uploads, run the generated kernel offline in a mock /kaggle, push, download."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_script

from kernels import build as kbuild
from kernels import kernel_template, push
from src import download
from src.config import InferConfig, load_yaml
from src.errors import run_cli

OWNER, SLUG = "tester", "i2b-test"
IDS = {"kernel": f"{OWNER}/{SLUG}", "weights": f"{OWNER}/{SLUG}-weights", "code": f"{OWNER}/{SLUG}-code"}

# Runs a script with the network cut: every connect raises. Afterwards it reports where `infer`/`src` came from.
WRAPPER = """
import json, os, runpy, socket, sys

def blocked(*args, **kwargs):
    raise OSError("network blocked in test")

socket.socket.connect = blocked
socket.create_connection = blocked
try:
    runpy.run_path(sys.argv[1], run_name="__main__")
finally:
    mods = {name: getattr(sys.modules.get(name), "__file__", None) for name in ("infer", "src", "timm")}
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "NO_ALBUMENTATIONS_UPDATE")}
    with open(sys.argv[2], "w") as f:
        json.dump({"modules": mods, "sys_path": sys.path, "env": env}, f)
"""


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
        "--pseudo-label-epochs", "1", "--pseudo-label-blend", "0.5", "--time-budget", "30", "--bundle-timm",
    )  # fmt: skip
    wheels = sorted((out / "code" / "wheels").glob("timm-*-py3-none-any.whl"))
    assert (
        len(wheels) == 1
        and f"wheels/{wheels[0].name}" in json.loads((out / "code" / "MANIFEST.json").read_text())["files"]
    )
    info = json.loads((out / "build.json").read_text())
    assert info["infer"]["pseudo_label"] == {"epochs": 1, "weight": 1.0, "blend": 0.5, "fold": "best"}
    assert info["infer"]["time_budget"] == 30.0
    assert info["timm"] == {"min_version": "0.9.0", "wheel": f"wheels/{wheels[0].name}"} and info["cleaning"] == [
        "stamps+crop0.05"
    ]

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
    assert (
        '"pseudo_label": {"blend": 0.5, "epochs": 1, "fold": "best", "weight": 1.0}' in proc.stdout
        and '"time_budget": 30.0' in proc.stdout
    )

    local = tmp_path / "local.csv"
    run_script(
        "infer.py", "--data-dir", str(stamp_dir), "--checkpoints", str(exp), "--out", str(local), "--amp",
        "--pseudo-label-epochs", "1", "--pseudo-label-blend", "0.5", "--time-budget", "30",
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
