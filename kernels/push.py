"""python kernels/push.py build/kaggle [--dry-run] [--message MSG]: upload a kernels/build.py output to Kaggle.

Validates every metadata file first (offline), then with the kaggle CLI: the weights and code datasets
(`datasets create` the first time, `datasets version` afterwards, both `--dir-mode zip` so folders go up),
waits until both are processed, and pushes the kernel, which then runs on Kaggle.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python kernels/push.py`: `src` lives in the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.download import COMPETITION, last_line, require_credentials, run_kaggle  # noqa: E402
from src.errors import BiomassError, run_cli  # noqa: E402

SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")  # the CLI's dataset/kernel slug rule
OWNER_RE = re.compile(r"^[a-z0-9]+(?:[_-][a-z0-9]+)*$")  # the CLI's owner slug rule
# The CLI reports these with exit code 0; they are failures all the same.
CLI_FAILURES = (
    "creation error",
    "push error",
    "not valid dataset sources",
    "not valid competition sources",
    "already in use",
)
POLL_SECONDS = 15


@dataclass
class Upload:
    """One thing to send: a dataset folder or the kernel folder, with its Kaggle id."""

    kind: str  # weights | code | kernel
    path: Path
    ref: str


# ---- offline validation -------------------------------------------------------------------------------------------
def _slugify(title: str) -> str:
    """Kaggle's title -> slug for plain ASCII titles (python-slugify, as the CLI uses)."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _load_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"{path}: missing; rebuild with kernels/build.py")
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        problems.append(f"{path}: not valid JSON ({err})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object")
        return None
    return data


def _check_ref(path: Path, field: str, ref, problems: list[str], min_len: int) -> None:
    """`owner/slug` with Kaggle's slug rules."""
    if not isinstance(ref, str) or ref.count("/") != 1:
        problems.append(f"{path}: field '{field}' is {ref!r}; expected 'user/slug'")
        return
    owner, slug = ref.split("/")
    if not OWNER_RE.match(owner):
        problems.append(
            f"{path}: field '{field}' owner {owner!r} is not a Kaggle user name (lowercase letters, digits, - or _)"
        )
    if not SLUG_RE.match(slug) or not min_len <= len(slug) <= 50:
        problems.append(
            f"{path}: field '{field}' slug {slug!r} must be {min_len}-50 lowercase letters, digits and single dashes"
        )


def _check_dataset(folder: Path, kind: str, problems: list[str]) -> str | None:
    """dataset-metadata.json (id, title, one license) and the MANIFEST.json files all present."""
    path = folder / "dataset-metadata.json"
    meta = _load_json(path, problems)
    if meta is None:
        return None
    _check_ref(path, "id", meta.get("id"), problems, min_len=6)
    title = meta.get("title")
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        problems.append(f"{path}: field 'title' is {title!r}; expected a string of 6-50 characters")
    licenses = meta.get("licenses")
    if not (
        isinstance(licenses, list)
        and len(licenses) == 1
        and isinstance(licenses[0], dict)
        and isinstance(licenses[0].get("name"), str)
    ):
        problems.append(
            f'{path}: field \'licenses\' is {licenses!r}; expected exactly one, e.g. [{{"name": "CC0-1.0"}}]'
        )
    manifest = _load_json(folder / "MANIFEST.json", problems)
    if manifest is not None:
        if manifest.get("kind") != kind:
            problems.append(f"{folder / 'MANIFEST.json'}: field 'kind' is {manifest.get('kind')!r}, expected {kind!r}")
        files = manifest.get("files")
        missing = [rel for rel in files or {} if not (folder / rel).is_file()]
        if not files or missing:
            problems.append(
                f"{folder / 'MANIFEST.json'}: field 'files' names "
                f"{'no file' if not files else missing[0] + ', which is missing'}; rebuild"
            )
    return meta.get("id") if isinstance(meta.get("id"), str) else None


def _check_kernel(folder: Path, dataset_ids: list[str | None], problems: list[str]) -> str | None:
    """kernel-metadata.json: types, slug rules, title -> slug, offline, sources consistent with the built datasets."""
    path = folder / "kernel-metadata.json"
    meta = _load_json(path, problems)
    if meta is None:
        return None
    ref = meta.get("id")
    _check_ref(path, "id", ref, problems, min_len=6)
    title = meta.get("title")
    if not isinstance(title, str) or len(title) < 5:
        problems.append(f"{path}: field 'title' is {title!r}; expected a string of at least 5 characters")
    elif isinstance(ref, str) and "/" in ref and _slugify(title) != ref.split("/")[1]:
        problems.append(
            f"{path}: field 'title' {title!r} resolves to slug {_slugify(title)!r}, not the id's {ref.split('/')[1]!r}"
        )
    code_file = meta.get("code_file")
    if not isinstance(code_file, str) or not (folder / code_file).is_file():
        problems.append(f"{path}: field 'code_file' is {code_file!r}; it must name a file in {folder}")
    if meta.get("language") != "python":
        problems.append(f"{path}: field 'language' is {meta.get('language')!r}; expected 'python'")
    if meta.get("kernel_type") != "script":
        problems.append(f"{path}: field 'kernel_type' is {meta.get('kernel_type')!r}; expected 'script' (kernel.py)")
    for field in ("is_private", "enable_gpu"):
        if field in meta and not isinstance(meta[field], bool):
            problems.append(f"{path}: field '{field}' is {meta[field]!r}; expected true or false")
    if meta.get("enable_internet") is not False:
        problems.append(
            f"{path}: field 'enable_internet' is {meta.get('enable_internet', 'missing (Kaggle defaults to true)')!r}; "
            "a code-competition kernel must run offline: set it to false"
        )
    for field in ("dataset_sources", "competition_sources", "kernel_sources", "model_sources"):
        value = meta.get(field, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{path}: field '{field}' is {value!r}; expected a list of strings")
    if COMPETITION not in (meta.get("competition_sources") or []):
        problems.append(f"{path}: field 'competition_sources' must contain {COMPETITION!r}")
    built = sorted(d for d in dataset_ids if d)
    if isinstance(meta.get("dataset_sources"), list) and sorted(meta["dataset_sources"]) != built:
        problems.append(
            f"{path}: field 'dataset_sources' is {meta['dataset_sources']}; expected the built datasets {built}"
        )
    if isinstance(code_file, str) and (folder / code_file).is_file():
        text = (folder / code_file).read_text()
        stale = [d for d in built if repr(d) not in text]
        if stale:
            problems.append(f"{folder / code_file}: does not use dataset {stale[0]}; rebuild with kernels/build.py")
    return ref if isinstance(ref, str) else None


def validate_build(build_dir: str | Path) -> list[Upload]:
    """Check a kernels/build.py output offline; the uploads in push order, or one BiomassError listing the problems."""
    root = Path(build_dir)
    if not all((root / name).is_dir() for name in ("weights", "code", "kernel")):
        raise BiomassError(
            f"{root}: not a kernels/build.py output (needs weights/, code/, kernel/); run python kernels/build.py first"
        )
    problems: list[str] = []
    weights = _check_dataset(root / "weights", "weights", problems)
    code = _check_dataset(root / "code", "code", problems)
    for rel in ("infer.py", "src/__init__.py"):
        if not (root / "code" / rel).is_file():
            problems.append(f"{root / 'code'}: {rel} missing; rebuild with kernels/build.py")
    kernel = _check_kernel(root / "kernel", [weights, code], problems)
    if problems:
        more = f" (+{len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise BiomassError(problems[0] + more)
    return [
        Upload("weights", root / "weights", weights),
        Upload("code", root / "code", code),
        Upload("kernel", root / "kernel", kernel),
    ]


# ---- the kaggle CLI ------------------------------------------------------------------------------------------------
def dataset_commands(upload: Upload, message: str) -> tuple[list[str], list[str]]:
    """(create, version) command lines of a dataset folder."""
    create = ["datasets", "create", "-p", str(upload.path), "--dir-mode", "zip"]
    version = ["datasets", "version", "-p", str(upload.path), "-m", message, "--dir-mode", "zip"]
    return create, version


def kernel_command(upload: Upload) -> list[str]:
    return ["kernels", "push", "-p", str(upload.path)]


def _show(args: list[str]) -> str:
    return shlex.join(["kaggle", *args])


def _check_output(args: list[str], code: int, text: str) -> None:
    failure = next((ln.strip() for ln in text.splitlines() if any(f in ln for f in CLI_FAILURES)), None)
    if code != 0 or failure:
        raise BiomassError(f"{_show(args[:2])} failed (exit {code}): {failure or last_line(text)}")


def dataset_status(ref: str) -> dict | None:
    """{'status', 'current_version_number'} of a dataset, None if it does not exist yet (HTTP 404)."""
    args = ["datasets", "status", ref, "--format", "json"]
    code, text = run_kaggle(args, echo=False)
    if code != 0:
        if "404" in text or "Not Found" in text:
            return None
        raise BiomassError(f"{_show(args)} failed (exit {code}): {last_line(text)}")
    try:
        return json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError) as err:
        raise BiomassError(f"{_show(args)}: unexpected output {last_line(text)!r}") from err


def wait_ready(ref: str, min_version: int, timeout: float) -> None:
    """Until Kaggle has processed version >= min_version: a kernel pushed earlier would mount the old one."""
    start = time.time()
    while True:
        status = dataset_status(ref)
        if status is not None:
            state, version = str(status.get("status")), int(status.get("current_version_number") or 0)
            if state in ("failed", "deleted"):
                raise BiomassError(f"dataset {ref}: processing {state}; see https://www.kaggle.com/datasets/{ref}")
            if state == "ready" and version >= min_version:
                print(f"dataset {ref}: version {version} ready", flush=True)
                return
        if time.time() - start > timeout:
            raise BiomassError(
                f"dataset {ref}: not ready after {timeout:.0f}s; push the kernel later with `kaggle kernels "
                "push -p ...`"
            )
        time.sleep(POLL_SECONDS)


def push_dataset(upload: Upload, message: str, wait: float) -> None:
    """`datasets create` if the dataset does not exist (status 404), else `datasets version`; then wait for it."""
    create, version = dataset_commands(upload, message)
    status = dataset_status(upload.ref)
    args = create if status is None else version
    print(f"$ {_show(args)}", flush=True)
    code, text = run_kaggle(args)
    _check_output(args, code, text)
    wait_ready(upload.ref, 1 if status is None else int(status.get("current_version_number") or 0) + 1, wait)


def default_message(build_dir: Path) -> str:
    """Version note from build.json: experiments, TTA/physics and the git commit of the build."""
    try:
        info = json.loads((build_dir / "build.json").read_text())
        return f"{'+'.join(info['experiments'])} tta={info['tta']} physics={info['physics']} git {info['git'][:12]}"
    except (OSError, ValueError, KeyError):
        return "kernels/push.py upload"


def push(
    build_dir: str | Path,
    dry_run: bool = False,
    message: str | None = None,
    skip_weights: bool = False,
    wait: float = 1800,
) -> int:
    """Validate, then upload weights, code and the kernel (or print the commands with dry_run)."""
    build_dir = Path(build_dir)
    weights, code, kernel = validate_build(build_dir)
    message = message or default_message(build_dir)
    datasets = [code] if skip_weights else [weights, code]
    if dry_run:
        print(
            f"{build_dir}: metadata valid. Would run (datasets: create if `kaggle datasets status` says 404, "
            "else version):"
        )
        for upload in datasets:
            create, version = dataset_commands(upload, message)
            print(f"  {_show(create)}\n    or {_show(version)}")
        print(f"  {_show(kernel_command(kernel))}")
        return 0
    print(f"Kaggle credentials: {require_credentials()}")
    for upload in datasets:
        push_dataset(upload, message, wait)
    args = kernel_command(kernel)
    print(f"$ {_show(args)}", flush=True)
    code_, text = run_kaggle(args)
    _check_output(args, code_, text)
    print(
        f"kernel {kernel.ref} pushed; follow it with `kaggle kernels status {kernel.ref}`, then submit its "
        "submission.csv on the competition page"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python kernels/push.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("build_dir", nargs="?", default="build/kaggle", help="the --out of kernels/build.py")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the commands; no network, no credentials"
    )
    parser.add_argument(
        "--message", default=None, help="dataset version note (default: experiments, tta, physics, git commit)"
    )
    parser.add_argument(
        "--skip-weights",
        action="store_true",
        help="upload code and kernel only (the kernel checks the weights still match)",
    )
    parser.add_argument("--wait", type=float, default=1800, help="seconds to wait for each dataset to be processed")
    args = parser.parse_args(argv)
    return push(args.build_dir, args.dry_run, args.message, args.skip_weights, args.wait)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
