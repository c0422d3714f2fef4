"""python kernels/push.py build/kaggle [--dry-run] [--message MSG] [--submit]: upload a kernels/build.py output.

Validates every metadata file first (offline), then with the kaggle CLI: the weights and code datasets
(`datasets create` the first time, `datasets version` afterwards, both `--dir-mode zip` so folders go up),
waits until both are processed, and pushes the kernel, which then runs on Kaggle.

With --submit it then waits for that kernel version's run to end (`kaggle kernels status OWNER/SLUG/N`),
prints the tail of its log (`kaggle kernels logs OWNER/SLUG/N`) and, only if the run completed, submits
it: `kaggle competitions submit csiro-biomass -k OWNER/SLUG -v N -f submission.csv -m MSG`. A failed run
is an error and nothing is submitted. So is a completed run whose run_report.json (fetched with
`kaggle kernels output OWNER/SLUG/N --file-pattern run_report.json`) says no model produced a finite prediction:
the kernel exits 0 with the training median everywhere then, and that is not worth a submission.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python kernels/push.py`: `src` lives in the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.download import COMPETITION, last_line, require_credentials, run_kaggle  # noqa: E402
from src.errors import BiomassError, run_cli  # noqa: E402
from src.run_report import REPORT_NAME, read_report, refusal  # noqa: E402

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
KERNEL_POLL_SECONDS = 60  # a kernel runs for minutes to hours
# `machine_shape` values of the kaggle CLI 2.2.5 (kaggle/cli.py, help of `kernels push --accelerator`) and the
# ones it calls retired (kaggle/api/kaggle_api_extended.py, _RETIRED_ACCELERATORS: accepted, with a warning,
# and the session runs on the replacement named here). tests/test_kernel.py reads both back from the CLI source.
ACCELERATORS = {"NvidiaTeslaT4": "GPU T4 x2", "TpuV5E8": "TPU v5e-8"}
RETIRED_ACCELERATORS = {
    "NvidiaTeslaP100": "sessions run on the default GPU (NvidiaTeslaT4) instead",
    "TpuV38": "sessions run on the default TPU (TpuV5E8) instead",
    "Tpu1VmV38": "sessions run on the default TPU (TpuV5E8) instead",
    "TpuV232": "sessions run on CPU instead, with no accelerator at all",
    "TpuV2256": "sessions run on CPU instead, with no accelerator at all",
}
DEFAULT_ACCELERATOR = "NvidiaTeslaT4"
NO_ACCELERATOR = "none"
SUBMISSION_FILE = "submission.csv"
# `kaggle kernels push` prints "Kernel version N successfully pushed.  Please check progress at URL";
# `kaggle kernels status` prints 'OWNER/SLUG has status "KernelWorkerStatus.COMPLETE"' (+ 'Failure message: "..."')
PUSHED_VERSION_RE = re.compile(r"Kernel version (\d+) successfully pushed")
STATUS_RE = re.compile(r'has status "(?:KernelWorkerStatus\.)?(\w+)"')
FAILURE_RE = re.compile(r'Failure message: "(.*)"')
RUN_DONE = "complete"
RUN_FAILED = ("error", "cancel_requested", "cancel_acknowledged")
LOG_TAIL_LINES = 30


@dataclass
class Upload:
    """One thing to send: a dataset folder or the kernel folder, with its Kaggle id."""

    kind: str  # weights | code | kernel
    path: Path
    ref: str


# ---- offline validation -------------------------------------------------------------------------------------------
def canonical_accelerator(value: str) -> str | None:
    """The CLI's spelling of an accelerator name (matched case-insensitively, as the CLI does), None if unknown."""
    known = [*ACCELERATORS, *RETIRED_ACCELERATORS, NO_ACCELERATOR]
    return next((name for name in known if name.lower() == str(value).strip().lower()), None)


def accelerator_problem(value) -> str | None:
    """Why `value` cannot be a machine_shape (None when the CLI knows it)."""
    if isinstance(value, str) and canonical_accelerator(value) not in (None, NO_ACCELERATOR):
        return None
    retired = ", ".join(RETIRED_ACCELERATORS)
    return f"{value!r} is not an accelerator the kaggle CLI knows: {', '.join(ACCELERATORS)} (retired: {retired})"


def accelerator_warnings(shape: str | None) -> list[str]:
    """What a push with this machine_shape should say first: retired shapes run elsewhere, TPUs give a CPU run."""
    name = canonical_accelerator(shape) if shape else None
    if name is None or name == NO_ACCELERATOR:
        return [] if shape else ["no machine_shape: Kaggle picks the machine; rebuild with --accelerator NvidiaTeslaT4"]
    out = []
    if name in RETIRED_ACCELERATORS:
        out.append(f"accelerator {name} is retired: {RETIRED_ACCELERATORS[name]}; rebuild with --accelerator "
                   f"{DEFAULT_ACCELERATOR}")  # fmt: skip
    if name.lower().startswith("tpu"):
        out.append(f"accelerator {name} is a TPU: the kernel uses CUDA or the CPU, so it runs on the CPU there")
    return out


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
    if "machine_shape" in meta:
        problem = accelerator_problem(meta["machine_shape"])
        if problem:
            problems.append(f"{path}: field 'machine_shape' {problem}")
    for field in ("is_private", "enable_gpu", "enable_tpu"):
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


def status_command(ref: str, version: int | str) -> list[str]:
    """`kaggle kernels status OWNER/SLUG/N`: that version's run (the latest may still be the previous one)."""
    return ["kernels", "status", f"{ref}/{version}"]


def logs_command(ref: str, version: int | str) -> list[str]:
    return ["kernels", "logs", f"{ref}/{version}"]


def submit_command(ref: str, version: int | str, message: str) -> list[str]:
    """A code submission: the CLI 2.2.5 also demands `-f`, the output file of the kernel that is scored."""
    return ["competitions", "submit", COMPETITION, "-k", ref, "-v", str(version), "-f", SUBMISSION_FILE, "-m", message]


def output_command(ref: str, version: int | str, folder: str | Path) -> list[str]:
    """The kernel version's run_report.json only (the CLI matches --file-pattern as a regex on the file names)."""
    return [
        "kernels",
        "output",
        f"{ref}/{version}",
        "-p",
        str(folder),
        "--file-pattern",
        REPORT_NAME.replace(".", r"\."),
    ]


def run_report_refusal(ref: str, version: int) -> str | None:
    """Why the completed run must not be submitted (its run_report.json), or None; no report is a refusal too."""
    with tempfile.TemporaryDirectory(prefix="i2b-output-") as tmp:
        args = output_command(ref, version, tmp)
        code, text = run_kaggle(args, echo=False)
        if code != 0:
            return f"{_show(args)} failed (exit {code}): {last_line(text)}; its run_report.json could not be checked"
        found = sorted(Path(tmp).rglob(REPORT_NAME))
        if not found:
            return f"the run's output holds no {REPORT_NAME} (built by an older kernels/build.py?)"
        try:
            report = read_report(found[0])
        except BiomassError as err:
            return str(err)
    why = refusal(report)
    if why is None:
        used, total = len(report.get("used") or []), report.get("models_total", "?")
        print(f"{REPORT_NAME}: {used} of {total} model(s) used, {report.get('images_on_fallback')} image(s) on the "
              f"fallback, {len(report.get('errors') or [])} error(s) survived")  # fmt: skip
    return why


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
        infer = info["infer"]
        return f"{'+'.join(info['experiments'])} tta={infer['tta']} physics={infer['physics']} git {info['git'][:12]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "kernels/push.py upload"


def pushed_version(text: str) -> int:
    """The version number `kaggle kernels push` reports."""
    match = PUSHED_VERSION_RE.search(text)
    if not match:
        raise BiomassError(
            f"kaggle kernels push: no version number in its output ({last_line(text)!r}); nothing submitted: find "
            f"the version on the kernel's page and run `{_show(submit_command('OWNER/SLUG', 'N', 'MSG'))}`"
        )
    return int(match[1])


def kernel_status(ref: str, version: int) -> tuple[str, str]:
    """(state in lower case, e.g. running/complete/error; the failure message or '') of one kernel version."""
    args = status_command(ref, version)
    code, text = run_kaggle(args, echo=False)
    if code != 0:
        raise BiomassError(f"{_show(args)} failed (exit {code}): {last_line(text)}; nothing submitted")
    match = STATUS_RE.search(text)
    if not match:
        raise BiomassError(f"{_show(args)}: unexpected output {last_line(text)!r}; nothing submitted")
    failure = FAILURE_RE.search(text)
    return match[1].lower(), failure[1] if failure else ""


def wait_for_run(ref: str, version: int, timeout: float) -> tuple[str, str]:
    """Poll the version's status until it is complete or failed; (state, failure message)."""
    start, last = time.time(), None
    while True:
        state, failure = kernel_status(ref, version)
        if state != last:
            print(f"kernel {ref} version {version}: {state}", flush=True)
            last = state
        if state == RUN_DONE or state in RUN_FAILED:
            return state, failure
        if time.time() - start > timeout:
            raise BiomassError(
                f"kernel {ref} version {version}: still {state} after {timeout:.0f}s; nothing submitted; when it "
                f"is complete: {_show(submit_command(ref, version, 'MSG'))}"
            )
        time.sleep(KERNEL_POLL_SECONDS)


def log_tail(ref: str, version: int, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the version's log (the CLI returns Kaggle's JSON event list or plain text)."""
    args = logs_command(ref, version)
    code, text = run_kaggle(args, echo=False)
    if code != 0:
        return f"(no log: {_show(args)} exited {code}: {last_line(text)})"
    try:
        events = json.loads(text)
        text = "".join(str(e.get("data", "")) for e in events if isinstance(e, dict))
    except (ValueError, TypeError, AttributeError):
        pass  # plain text
    return "\n".join(text.rstrip().splitlines()[-lines:])


def submit_version(ref: str, version: int, message: str, timeout: float) -> None:
    """Wait for the run, print its log tail, submit it if it completed; a failed run submits nothing."""
    state, failure = wait_for_run(ref, version, timeout)
    print(f"---- last lines of the log of {ref} version {version} ----\n{log_tail(ref, version)}\n----", flush=True)
    if state != RUN_DONE:
        raise BiomassError(
            f"kernel {ref} version {version} ended with status {state}"
            + (f" ({failure})" if failure else "")
            + f"; nothing submitted; see the log above and https://www.kaggle.com/code/{ref}"
        )
    why = run_report_refusal(ref, version)
    if why is not None:
        raise BiomassError(
            f"kernel {ref} version {version} completed but is not worth submitting: {why}; nothing submitted; "
            f"see the log above; to submit anyway: {_show(submit_command(ref, version, 'MSG'))}"
        )
    args = submit_command(ref, version, message)
    print(f"$ {_show(args)}", flush=True)
    code, text = run_kaggle(args)
    _check_output(args, code, text)
    print(f"submitted {ref} version {version} to {COMPETITION}; scores appear on the competition's Submissions page")


def push(
    build_dir: str | Path,
    dry_run: bool = False,
    message: str | None = None,
    skip_weights: bool = False,
    wait: float = 1800,
    submit: bool = False,
    run_wait: float = 12 * 3600,
) -> int:
    """Validate, then upload weights, code and the kernel (or print the commands with dry_run); --submit after."""
    build_dir = Path(build_dir)
    weights, code, kernel = validate_build(build_dir)
    for line in accelerator_warnings(
        json.loads((kernel.path / "kernel-metadata.json").read_text()).get("machine_shape")
    ):
        print(f"warning: {line}", file=sys.stderr)
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
        if submit:
            n = "N"
            print(
                f"then, N being the version that `kernels push` prints:\n  {_show(status_command(kernel.ref, n))}"
                f"    (every {KERNEL_POLL_SECONDS}s until complete or error)\n  {_show(logs_command(kernel.ref, n))}\n"
                f"  {_show(output_command(kernel.ref, n, 'TMP'))}    (its {REPORT_NAME}: some model finite?)\n"
                f"  {_show(submit_command(kernel.ref, n, message))}    (only if the run completed and was not refused)"
            )
        return 0
    print(f"Kaggle credentials: {require_credentials()}")
    for upload in datasets:
        push_dataset(upload, message, wait)
    args = kernel_command(kernel)
    print(f"$ {_show(args)}", flush=True)
    code_, text = run_kaggle(args)
    _check_output(args, code_, text)
    if not submit:
        by_hand = _show(submit_command(kernel.ref, "N", "MSG"))
        print(
            f"kernel {kernel.ref} pushed; follow it with `kaggle kernels status {kernel.ref}`; once complete, submit "
            f"version N with `{by_hand}` (or push with --submit, which waits and submits)"
        )
        return 0
    submit_version(kernel.ref, pushed_version(text), message, run_wait)
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
    parser.add_argument(
        "--submit",
        action="store_true",
        help="after the push, wait for the kernel run and submit that version to the competition if it completed",
    )
    parser.add_argument(
        "--run-wait", type=float, default=12 * 3600, help="with --submit: seconds to wait for the kernel run"
    )
    args = parser.parse_args(argv)
    return push(args.build_dir, args.dry_run, args.message, args.skip_weights, args.wait, args.submit, args.run_wait)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
