"""real.py (`make real`): the whole chain on synthetic data with the tiny override and a fake kaggle CLI on PATH."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
import yaml

from src.config import load_yaml, overlay
from src.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "overrides" / "tiny.yaml"

# stands in for the kaggle CLI: records its args, answers like kaggle 2.2.5 (datasets ready, the run complete)
FAKE_KAGGLE = """#!{python}
import json, sys
from pathlib import Path
here = Path(__file__).parent
args = sys.argv[1:]
with open(here / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\\n")
state_file = here / "versions.json"
versions = json.loads(state_file.read_text()) if state_file.is_file() else {{}}
if args[:2] == ["datasets", "status"]:
    if args[2] not in versions:
        print("404 Client Error: Not Found"); sys.exit(1)
    print(json.dumps({{"status": "ready", "current_version_number": versions[args[2]]}}))
elif args[:2] in (["datasets", "create"], ["datasets", "version"]):
    ref = json.loads((Path(args[3]) / "dataset-metadata.json").read_text())["id"]
    versions[ref] = versions.get(ref, 0) + 1
    state_file.write_text(json.dumps(versions))
    print("Your private Dataset is being created.")
elif args[:2] == ["kernels", "push"]:
    print("Kernel version 3 successfully pushed.  Please check progress at https://www.kaggle.com/code/x")
elif args[:2] == ["kernels", "status"]:
    print(args[2] + ' has status "KernelWorkerStatus.COMPLETE"')
elif args[:2] == ["kernels", "logs"]:
    print("[]")
elif args[:2] == ["kernels", "output"]:  # the run's run_report.json: one finite model, so push.py may submit
    report = {{"submission_written": True, "finite_models": 1, "models_total": 1, "used": ["a"], "images": 3,
              "images_on_fallback": 0, "failed": {{}}, "errors": []}}
    (Path(args[args.index("-p") + 1]) / "run_report.json").write_text(json.dumps(report))
    print("Output file downloaded")
elif args[:2] == ["competitions", "submit"]:
    print("Successfully submitted")
else:
    print("unexpected command"); sys.exit(2)
"""


def _fake_kaggle(bin_dir: Path) -> Path:
    bin_dir.mkdir()
    path = bin_dir / "kaggle"
    path.write_text(FAKE_KAGGLE.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _real_module():
    spec = importlib.util.spec_from_file_location("real_script", REPO / "real.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _dry_run(argv: list[str], capfd) -> str:
    """real.py --dry-run in this process (it starts nothing, so no subprocess is needed)."""
    capfd.readouterr()
    assert _real_module().main([*argv, "--dry-run"]) == 0
    return capfd.readouterr().out


def test_make_real_chain_on_synthetic_data(synthetic_dir, folds_csv, tmp_path, capfd, monkeypatch):
    """real.py's main in this process; every step it runs is a real subprocess (train.py ... kernels/push.py)."""
    fake = _fake_kaggle(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KAGGLE_CLI", "kaggle")  # the one on PATH, not the venv's
    monkeypatch.setenv("KAGGLE_API_TOKEN", "fake-token")
    ckpt, build = tmp_path / "ckpt", tmp_path / "build"
    flags = ["--recipe", "gpu-smoke", "--override", str(TINY), "--data-dir", str(synthetic_dir)]
    flags += ["--folds", str(folds_csv), "--out-dir", str(ckpt), "--build", str(build), "--owner", "tester"]

    # a dry run prints every command and runs none
    dry = _dry_run(flags, capfd)
    steps = [ln for ln in dry.splitlines() if ln.startswith("$ ")]
    assert [s.split()[2] for s in steps] == ["train.py", "infer.py", "report.py", "kernels/build.py", "kernels/push.py"]
    assert "--grid 2 2 --fold 0" in steps[0] and steps[-1].endswith("--submit")
    assert "--fit-memory auto" in steps[0]  # each train.py fits its own GPU; no GPU here: a T4's fit is printed
    assert "# grid 2x2 on a 16 GB T4 (no GPU here" in dry and "fit-memory: the recipe fits" in dry
    assert not ckpt.exists() and not build.exists() and not (fake.parent / "calls.jsonl").exists()

    capfd.readouterr()
    assert _real_module().main(flags) == 0
    out = capfd.readouterr().out
    exp = ckpt / "gpu-smoke"
    assert (exp / "grid2x2" / "fold0" / "best.pt").is_file() and not (exp / "grid2x2" / "fold1").exists()  # 1 fold
    assert yaml.safe_load((exp / "recipe.yaml").read_text())["model"]["backbone_weights"] == "none"
    assert (exp / "oof_report.csv").is_file() and (exp / "oof_ensemble.csv").is_file()  # infer.py --oof
    assert (exp / "report").is_dir() and any((exp / "report").iterdir())  # report.py
    assert json.loads((build / "build.json").read_text())["experiments"] == ["gpu-smoke"]
    calls = [json.loads(ln) for ln in (fake.parent / "calls.jsonl").read_text().splitlines()]
    verbs = [c[:2] for c in calls if c[1] != "status"]
    assert verbs == [["datasets", "create"], ["datasets", "create"], ["kernels", "push"], ["kernels", "logs"],
                     ["kernels", "output"], ["competitions", "submit"]]  # fmt: skip
    submit = next(c for c in calls if c[0] == "competitions")
    assert submit[:4] == ["competitions", "submit", "csiro-biomass", "-k"] and submit[4].startswith("tester/")
    assert submit[5:7] == ["-v", "3"] and "submitted" in out  # the version kernels push reported

    # the finished fold's last.pt lost its optimizer state (--keep-last slim); last.json says it finished
    fold0 = exp / "grid2x2" / "fold0"
    assert json.loads((fold0 / "last.json").read_text()) | {"best_metric": 0} == {
        "epoch": 0, "best_metric": 0, "best_epoch": 0, "bad_epochs": 0, "finished": True, "last": "slim"
    }  # fmt: skip
    assert "optimizer" not in torch.load(fold0 / "last.pt", weights_only=True)
    # again: the finished fold is skipped, read from last.json alone (a broken last.pt is never opened)
    (fold0 / "last.pt").write_bytes(b"not a checkpoint")
    again = _dry_run(flags, capfd)
    assert "grid2x2 fold0: finished" in again and "train.py" not in again
    # with more epochs: no optimizer state is left to resume, so the fold is trained again (--overwrite)
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump(overlay(load_yaml(TINY), {"train": {"epochs": 2}})))
    redo = _dry_run([*flags[:2], "--override", str(longer), *flags[4:]], capfd)
    assert [ln for ln in redo.splitlines() if "train.py" in ln][0].endswith("--overwrite")
    # a killed run (its last.json not finished) is resumed
    (fold0 / "last.json").write_text(json.dumps({"epoch": 0, "bad_epochs": 0, "finished": False, "last": "full"}))
    resumed = _dry_run([*flags[:2], "--override", str(longer), *flags[4:]], capfd)
    assert [ln for ln in resumed.splitlines() if "train.py" in ln][0].endswith("--resume")


def test_gpus_run_folds_side_by_side_one_device_each(tmp_path):
    real = _real_module()
    jobs = []
    for fold in range(4):
        out = tmp_path / f"fold{fold}.txt"
        code = f"import os, pathlib; pathlib.Path({str(out)!r}).write_text(os.environ['CUDA_VISIBLE_DEVICES'])"
        jobs.append((real.Job((2, 2), fold, None, tmp_path, "new"), [sys.executable, "-c", code]))
    jobs.append((real.Job((2, 2), 9, None, tmp_path, "new"), [sys.executable, "-c", "raise SystemExit(3)"]))
    failed = real.run_jobs(jobs, ["0", "1"], tmp_path)
    assert failed == ["grid2x2 fold9"]
    devices = [(tmp_path / f"fold{k}.txt").read_text() for k in range(4)]
    assert sorted(set(devices)) == ["0", "1"]  # every fold on one of the two devices, both used
    assert (tmp_path / "grid2x2-fold9.out").is_file()


def test_missing_weights_file_is_one_line_with_the_export_command(tmp_path, capsys):
    real = _real_module()
    recipe = tmp_path / "r.yaml"
    data = {"recipe": {"grids": [[2, 2]], "folds": [0]}, "exp": "r", "model": {"backbone_weights": "weights/x.pth"}}
    recipe.write_text(yaml.safe_dump(data))
    argv = ["--recipe", str(recipe), "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "c")]
    (tmp_path / "data" / "train").mkdir(parents=True)  # competition files "present": no download step
    (tmp_path / "data" / "test").mkdir()
    for name in ("train", "test"):
        (tmp_path / "data" / name / "a.jpg").write_bytes(b"x")
        pd.DataFrame({"a": [1]}).to_csv(tmp_path / "data" / f"{name}.csv", index=False)
    assert run_cli(real.main, argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "weights/x.pth: backbone weights file not found" in err[0]
    assert "python -m src.weights export --name vit_base_patch14_reg4_dinov2.lvd142m --out weights" in err[0]


def test_make_real_target_is_a_thin_call_of_real_py():
    """`make real` passes RECIPE, OWNER, GPUS, OVERRIDE and DRY_RUN straight to real.py (make -n: nothing runs)."""
    argv = ["make", "-n", "-C", str(REPO), "real", "RECIPE=top", "OWNER=me", "GPUS=0,1", "DRY_RUN=1"]
    text = subprocess.run([*argv, "OVERRIDE=o.yaml"], capture_output=True, text=True, check=True).stdout
    line = " ".join(text.replace("\\\n", " ").split())
    assert "/bin/python real.py --recipe top --owner me --gpus 0,1 --override o.yaml --dry-run" in line
    plain = subprocess.run([*argv[:4], "real", "DRY_RUN=0"], capture_output=True, text=True, check=True).stdout
    plain = " ".join(plain.replace("\\\n", " ").split())
    assert "real.py --recipe seed" in plain and "--dry-run" not in plain and "--owner" not in plain
    fitted = subprocess.run([*argv, "FIT_MEMORY=16", "KEEP_LAST=none"], capture_output=True, text=True, check=True)
    assert "--fit-memory 16 --keep-last none" in " ".join(fitted.stdout.replace("\\\n", " ").split())
    assert "--fit-memory" not in plain and "--keep-last" not in plain  # real.py's defaults: auto, slim


def test_finish_last_slims_or_removes_last_pt_and_a_slim_one_is_not_resumed(tmp_path):
    from src.checkpoint import check_resume, finish_last, read_last_sidecar, save_resume_state
    from src.config import Config
    from src.errors import BiomassError

    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()  # AdamW moments: twice the weights
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = {"epoch": 3, "best_metric": 0.5, "best_epoch": 2, "bad_epochs": 1, "history": []}
    sizes = {}
    for keep in ("full", "slim", "none"):
        last = tmp_path / keep / "last.pt"
        last.parent.mkdir()
        save_resume_state(last, model, Config(), "finetune", optimizer, scheduler, state)
        assert read_last_sidecar(last) == {
            "epoch": 3, "best_metric": 0.5, "best_epoch": 2, "bad_epochs": 1, "finished": False, "last": "full"
        }  # fmt: skip
        before = last.stat().st_size
        freed = finish_last(last, keep)
        sizes[keep] = last.stat().st_size if last.is_file() else 0
        assert freed == before - sizes[keep]
        assert read_last_sidecar(last)["finished"] is True and read_last_sidecar(last)["last"] == keep
    weights = 64 * 64 * 4
    assert sizes["full"] > 3 * weights and weights < sizes["slim"] < 1.5 * weights and sizes["none"] == 0
    assert check_resume(tmp_path / "full" / "last.pt", Config()) is not None
    try:
        check_resume(tmp_path / "slim" / "last.pt", Config())
        raise AssertionError("a slim last.pt must not be resumed")
    except BiomassError as err:
        assert "--overwrite" in str(err) and "slim" in str(err)
