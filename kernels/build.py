"""python kernels/build.py --checkpoints checkpoints/<exp> [...] [--owner USER] [--slug NAME] --out build/kaggle

Writes the three Kaggle uploads of a submission (kernels/push.py sends them):
  weights/  every best.pt of the ensemble as <exp>/grid*/fold*/best.pt, beside it the run's --drop-ids file
            (drop_ids.txt) and folds file (folds.csv) for the pseudo-label fine-tune, + MANIFEST.json
                                                                                       -> dataset USER/SLUG-weights
  code/     the src/ package and infer.py (+ wheels/timm-*.whl with --bundle-timm)    -> dataset USER/SLUG-code
  kernel/   kernel.py (from kernels/kernel_template.py) + kernel-metadata.json         -> kernel USER/SLUG
The build happens in a temp folder beside --out and replaces --out only when complete.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import hashlib
import json
import os
import pprint
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python kernels/build.py`: `src` and `kernels` live in the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.plan import DEFAULT_DEADLINE_MIN, DEFAULT_IMAGES, describe  # noqa: E402
from kernels.push import (  # noqa: E402
    DEFAULT_ACCELERATOR,
    NO_ACCELERATOR,
    OWNER_RE,
    SLUG_RE,
    accelerator_problem,
    accelerator_warnings,
    canonical_accelerator,
    validate_build,
)
from kernels.wheel import pack_installed, version_tuple  # noqa: E402
from src.adapt import RUN_FILES  # noqa: E402
from src.artifacts import Cleaning  # noqa: E402
from src.checkpoint import find_checkpoints, git_description, load_checkpoint  # noqa: E402
from src.config import INFER_PRESETS, Config, InferConfig, add_infer_flags, resolve_infer_config  # noqa: E402
from src.download import COMPETITION, kaggle_username  # noqa: E402
from src.errors import BiomassError, run_cli  # noqa: E402
from src.logs import add_quiet_flag, get_logger  # noqa: E402

log = get_logger("kernels.build")

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).with_name("kernel_template.py")
TEMPLATE_MARKER = "BUILD: dict = {}"
DEFAULT_SLUG = "image2biomass"
CODE_FILES = ("infer.py", "src")
SKIP_NAMES = ("__pycache__", ".pytest_cache", ".ruff_cache")
# The oldest timm each backbone family is known to run under here: DINOv3 arrived in timm 1.0.20; DINOv2 (reg4) runs
# under Kaggle's 1.0.19 (`make kaggle-sim` rehearses a ViT-B/14 seed-recipe checkpoint under it); nothing older
# was tried, so nothing older is claimed. The kernel checks Kaggle's timm against it.
TIMM_MIN = {"dinov3": "1.0.20", "dinov2": "1.0.19"}
DEFAULT_TIMM_MIN = "1.0.19"


# The share of infer.py's flags (InferConfig fields) that the kernel build sets; the kernel fills in the paths.
KERNEL_FIELDS = {
    "checkpoints", "tta", "physics", "structural_zeros", "grid_weights", "batch_size", "amp", "num_workers",
    "on_bad_image", "time_budget",
    "pseudo_label.epochs", "pseudo_label.weight", "pseudo_label.blend", "pseudo_label.fold", "pseudo_label.lr_scale",
}  # fmt: skip


def kernel_infer_config(**overrides) -> InferConfig:
    """The kernel's InferConfig: the `kaggle` preset (fp16 on a T4, counted fallback for bad images) + overrides."""
    return InferConfig.from_dict({**copy.deepcopy(INFER_PRESETS["kaggle"]), **overrides}, "kernel options")


@dataclasses.dataclass
class KernelOptions:
    """What the kernel runs (infer.py's resolved config, paths filled in on Kaggle) and whether timm travels along."""

    infer: InferConfig = dataclasses.field(default_factory=kernel_infer_config)
    bundle_timm: bool = False
    accelerator: str = DEFAULT_ACCELERATOR  # kernel-metadata.json machine_shape; "none" = CPU


# ---- names -------------------------------------------------------------------------------------------------------
def resolve_owner(owner: str | None) -> str:
    """--owner, else the Kaggle user name found in KAGGLE_USERNAME / kaggle.json; a valid owner slug."""
    owner = owner or kaggle_username()
    if not owner:
        raise BiomassError("no Kaggle user name: pass --owner USER (an API token alone does not name its user offline)")
    if not OWNER_RE.match(owner):
        raise BiomassError(f"--owner {owner!r}: a Kaggle user name is lowercase letters, digits, '-' or '_'")
    return owner


def check_slug(slug: str) -> str:
    """Kernel slug; the datasets append -weights/-code, so it stays within Kaggle's 50 characters with them."""
    if not SLUG_RE.match(slug) or not 6 <= len(slug) <= 42:
        raise BiomassError(
            f"--slug {slug!r}: use 6-42 lowercase letters, digits and single dashes, e.g. {DEFAULT_SLUG}"
        )
    return slug


def check_accelerator(value: str) -> str:
    """--accelerator: a machine_shape the kaggle CLI knows (its spelling), or `none`; retired ones warn."""
    name = canonical_accelerator(value)
    if name == NO_ACCELERATOR:
        return name
    problem = accelerator_problem(value)
    if problem:
        raise BiomassError(f"--accelerator {problem}, or {NO_ACCELERATOR} for a CPU kernel")
    for line in accelerator_warnings(name):
        log.warning(line)
    return name


def title_of(slug: str) -> str:
    """A title that Kaggle turns back into `slug` (image2biomass -> Image2Biomass)."""
    return slug.replace("-", " ").title()


# ---- contents ------------------------------------------------------------------------------------------------------
def place_file(src: Path, dst: Path) -> None:
    """Hard-link when possible (multi-GB ensembles; checkpoints are replaced atomically, never edited), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: Path, kind: str) -> str:
    """MANIFEST.json: every file of the dataset with its size, and a content id the kernel checks."""
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.name not in ("MANIFEST.json", "dataset-metadata.json")
    )
    rels = [p.relative_to(root).as_posix() for p in files]
    content_id = hashlib.sha256("".join(f"{rel}\0{_sha256(p)}\n" for rel, p in zip(rels, files)).encode()).hexdigest()
    manifest = {"kind": kind, "id": content_id, "files": {rel: p.stat().st_size for rel, p in zip(rels, files)}}
    (root / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return content_id


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def collect_checkpoints(dirs: list[str]) -> dict[str, tuple[Path, list[tuple[Path, str]]]]:
    """{exp name: (exp dir, [(best.pt, its path in the weights dataset)])}, experiments in the given order."""
    experiments: dict[str, tuple[Path, list[tuple[Path, str]]]] = {}
    for raw in dirs:
        exp_dir = Path(raw)
        if exp_dir.is_file():
            raise BiomassError(
                f"--checkpoints {exp_dir}: pass the experiment directory (checkpoints/<exp>), not a file"
            )
        name = exp_dir.resolve().name
        if name in experiments:
            raise BiomassError(
                f"--checkpoints: two experiment directories are named {name!r}; rename one (the kernel finds "
                "them by name)"
            )
        experiments[name] = (
            exp_dir,
            [(p, f"{name}/{p.relative_to(exp_dir).as_posix()}") for p in find_checkpoints([exp_dir])],
        )
    return experiments


def describe_checkpoint(path: Path) -> dict:
    """Grid, fold, validation score, backbone and cleaning of a best.pt (loading it also proves it is one of ours)."""
    ckpt = load_checkpoint(path)
    grid = ckpt.get("grid") or ckpt["config"]["model"]["grid"]
    data = ckpt["config"].get("data", {})
    return {
        "grid": f"{grid[0]}x{grid[1]}", "fold": ckpt.get("fold"), "val_metric": ckpt.get("val_metric"),
        "backbone": ckpt["config"]["model"]["backbone"],
        "clean_stamps": bool(data.get("clean_stamps", False)), "crop_bottom": float(data.get("crop_bottom", 0.0)),
        "drop_ids": data.get("drop_ids"), "folds": data.get("folds"),
        "timm_version": ckpt.get("timm_version"),  # the timm it was trained with (None: saved before issue 25)
    }  # fmt: skip


def find_run_file(configured: str | None) -> Path | None:
    """A path of a checkpoint's config as training saw it: absolute, from the current directory or the repo."""
    if not configured:
        return None
    path = Path(configured)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO / path]
    return next((p for p in candidates if p.is_file()), None)


def ship_run_files(described: dict, dst_dir: Path, fine_tune: bool) -> dict[str, str | None]:
    """Copy the run's --drop-ids and folds files beside its best.pt in the weights dataset (src/adapt.RUN_FILES).

    The pseudo-label fine-tune on Kaggle reads them there: the paths in the config are the training machine's.
    A configured drop-ids file that is gone is an error when the kernel fine-tunes (it would train on images
    the run left out), a warning otherwise; a missing folds file is a warning (the fine-tune then takes every
    train.csv image).
    """
    shipped: dict[str, str | None] = {}
    for kind, name in RUN_FILES.items():
        configured = described.get(kind)
        found = find_run_file(configured)
        if configured and found is None:
            what = f"{described['path']}: trained with --{kind.replace('_', '-')} {configured}, which is not here"
            if kind == "drop_ids" and fine_tune:
                raise BiomassError(f"{what}; the kernel's fine-tune needs it: restore it or build without it")
            log.warning(f"{what}; not shipped")
        if found is not None:
            place_file(found, dst_dir / name)
        shipped[kind] = f"{Path(described['path']).parent.as_posix()}/{name}" if found is not None else None
    return shipped


def timm_min_version(backbones: list[str]) -> str:
    """The oldest timm that builds every backbone of the ensemble."""
    needs = [v for b in backbones for family, v in TIMM_MIN.items() if family in b] or [DEFAULT_TIMM_MIN]
    return max(needs, key=version_tuple)


def timm_plan(described: list[dict], wheel: str | None) -> dict:
    """build.json's timm entry: the oldest timm every backbone runs under, the newest any checkpoint was trained with,
    the bundled wheel. The kernel installs the wheel when Kaggle's timm is older than either (the second only when
    a wheel was bundled: the weights were made under it)."""
    trained = [d["timm_version"] for d in described if d.get("timm_version")]
    return {
        "min_version": timm_min_version([d["backbone"] for d in described]),
        "trained_with": max(trained, key=version_tuple) if trained else None,
        "wheel": wheel,
    }


def oof_summary(exp_dir: Path, tta: str, physics: str) -> str | None:
    """One line from <exp>/oof_report.csv (python infer.py --oof): the chosen setting and the best one."""
    path = exp_dir / "oof_report.csv"
    if not path.is_file():
        return None
    with path.open() as f:
        rows = list(csv.DictReader(f))
    plain = [r for r in rows if r.get("structural_zeros", "False") != "True"]  # the kernel's default: zeros off
    chosen = next((r for r in plain if r.get("tta") == tta and r.get("physics") == physics), None)
    best = max(rows, key=lambda r: float(r.get("weighted_r2") or "nan"), default=None)
    if chosen is None or best is None:
        return None
    line = f"OOF weighted R2 {float(chosen['weighted_r2']):.4f} with --tta {tta} --physics {physics}"
    if best is not chosen:
        setting = f"--tta {best['tta']} --physics {best['physics']}"
        line += f" (best in the report: {float(best['weighted_r2']):.4f} with {setting})"
    return line


def code_sources() -> list[Path]:
    """The files the kernel imports: infer.py and the src package (no caches, no tests)."""
    files = [REPO / "infer.py"]
    files += sorted(
        p
        for p in (REPO / "src").rglob("*")
        if p.is_file() and not set(p.parts) & set(SKIP_NAMES) and p.suffix != ".pyc"
    )
    return files


def render_kernel(build: dict) -> str:
    """kernel_template.py with its empty BUILD dict replaced by this build's."""
    text = TEMPLATE.read_text()
    if text.count(TEMPLATE_MARKER) != 1:
        raise BiomassError(f"{TEMPLATE}: expected exactly one line `{TEMPLATE_MARKER}` for kernels/build.py to fill in")
    return text.replace(TEMPLATE_MARKER, "BUILD: dict = " + pprint.pformat(build, sort_dicts=False, width=110))


def build_into(
    root: Path,
    experiments: dict[str, tuple[Path, list[tuple[Path, str]]]],
    owner: str,
    slug: str,
    options: KernelOptions,
    backbone_weights: Path | None,
) -> dict:
    """Write weights/, code/, kernel/ and build.json under `root`; return build.json's content."""
    weights, code, kernel = root / "weights", root / "code", root / "kernel"
    title = title_of(slug)
    ids = {"kernel": f"{owner}/{slug}", "weights": f"{owner}/{slug}-weights", "code": f"{owner}/{slug}-code"}
    described = []
    for _, items in experiments.values():
        for src, rel in items:
            item = {"path": rel, **describe_checkpoint(src)}
            item["shipped"] = ship_run_files(item, (weights / rel).parent, options.infer.pseudo_label.enabled)
            described.append(item)
            place_file(src, weights / rel)
    if backbone_weights is not None:
        if not backbone_weights.is_file():
            raise BiomassError(f"--ship-backbone-weights {backbone_weights}: file not found")
        if backbone_weights.name in experiments:
            raise BiomassError(
                f"--ship-backbone-weights {backbone_weights}: its name clashes with an experiment directory; rename it"
            )
        place_file(backbone_weights, weights / backbone_weights.name)
    weights_id = write_manifest(weights, "weights")
    write_json(
        weights / "dataset-metadata.json",
        {"title": f"{title} weights", "id": ids["weights"], "licenses": [{"name": "CC0-1.0"}]},
    )

    for src in code_sources():
        dst = code / src.relative_to(REPO)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    timm_wheel = pack_installed("timm", code / "wheels").relative_to(code).as_posix() if options.bundle_timm else None
    code_id = write_manifest(code, "code")
    write_json(
        code / "dataset-metadata.json", {"title": f"{title} code", "id": ids["code"], "licenses": [{"name": "CC0-1.0"}]}
    )

    kernel_build = {
        "kernel": ids["kernel"],
        "competition": COMPETITION,
        "code_dataset": ids["code"],
        "code_id": code_id,
        "weights_dataset": ids["weights"],
        "weights_id": weights_id,
        "experiments": list(experiments),
        "infer": {**options.infer.to_dict(), "deadline": kernel_deadline(options.infer)},
        "timm": timm_plan(described, timm_wheel),
        "cleaning": sorted({Cleaning(d["clean_stamps"], d["crop_bottom"]).key or "none" for d in described}),
        "accelerator": options.accelerator,
    }
    kernel.mkdir(parents=True)
    (kernel / "kernel.py").write_text(render_kernel(kernel_build))
    write_json(
        kernel / "kernel-metadata.json",
        {
            "id": ids["kernel"],
            "title": title,
            "code_file": "kernel.py",
            "language": "python",
            "kernel_type": "script",
            "is_private": True,
            "enable_gpu": options.accelerator.startswith("Nvidia"),
            "enable_tpu": options.accelerator.lower().startswith("tpu"),
            "enable_internet": False,
            **({} if options.accelerator == NO_ACCELERATOR else {"machine_shape": options.accelerator}),
            "dataset_sources": [ids["weights"], ids["code"]],
            "competition_sources": [COMPETITION],
            "kernel_sources": [],
            "model_sources": [],
        },
    )
    info = {
        **kernel_build,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git": git_description().strip(),
        "checkpoints": described,
        "backbone_weights": backbone_weights.name if backbone_weights else None,
    }
    write_json(root / "build.json", info)
    return info


def kernel_deadline(infer: InferConfig) -> float:
    """--deadline of the kernel's infer.py: --time-budget, else 495 min of the 9 hours (the kernel subtracts
    the minutes it spent before infer.py starts)."""
    return float(infer.time_budget or DEFAULT_DEADLINE_MIN)


def plan_lines(checkpoints: list[str], infer: InferConfig, images: int = DEFAULT_IMAGES) -> list[str]:
    """The budget planner's projection of this ensemble on T4 x2 (kernels/plan.py), against the kernel deadline."""
    paths = [p for _, items in collect_checkpoints(checkpoints).values() for p, _ in items]
    cfgs = [Config.from_dict(load_checkpoint(p)["config"], source=str(p)).model for p in paths]
    head = f"plan: {len(paths)} checkpoint(s), TTA {infer.tta}, {images} hidden-test images"
    return [head, *describe(cfgs, infer.tta, images, kernel_deadline(infer))]


def build(
    checkpoints: list[str],
    out: str | os.PathLike,
    owner: str | None = None,
    slug: str = DEFAULT_SLUG,
    options: KernelOptions | None = None,
    backbone_weights: str | os.PathLike | None = None,
) -> dict:
    """Build the three uploads into `out` (replaced only when the new build is complete and valid)."""
    out = Path(out)
    options = options or KernelOptions()
    owner, slug = resolve_owner(owner), check_slug(slug)
    experiments = collect_checkpoints(checkpoints)
    if out.exists() and not (out / "build.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise BiomassError(
            f"--out {out}: exists and is not a kernels/build.py output; choose another folder (it is replaced whole)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        info = build_into(tmp, experiments, owner, slug, options, Path(backbone_weights) if backbone_weights else None)
        validate_build(tmp)  # the build and push agree on what a valid upload is
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for name, (exp_dir, items) in experiments.items():
        summary = oof_summary(exp_dir, options.infer.tta, options.infer.physics)
        log.info(f"{name}: {len(items)} checkpoint(s)" + (f"; {summary}" if summary else ""))
    log.info(
        f"wrote {out}/{{weights,code,kernel}}: kernel {info['kernel']}, datasets {info['weights_dataset']} and "
        f"{info['code_dataset']}"
    )
    for line in plan_lines(checkpoints, options.infer):
        (log.warning if line.startswith("warning:") else log.info)(line.removeprefix("warning: "))
    log.info(f"next: python kernels/push.py {out} --dry-run")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python kernels/build.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--owner", default=None, help="Kaggle user name (default: KAGGLE_USERNAME or ~/.kaggle/kaggle.json)"
    )
    parser.add_argument("--slug", default=DEFAULT_SLUG, help="kernel slug; datasets are SLUG-weights and SLUG-code")
    parser.add_argument(
        "--ship-backbone-weights",
        dest="backbone_weights",
        default=None,
        help="a pretrained backbone file to ship in the weights dataset too (inference does not need it)",
    )
    parser.add_argument("--out", default="build/kaggle", help="output folder (replaced whole)")
    parser.add_argument(
        "--accelerator",
        default=DEFAULT_ACCELERATOR,
        help="kernel-metadata.json machine_shape: NvidiaTeslaT4 (GPU T4 x2, default), TpuV5E8, or none (CPU); "
        "retired ones (NvidiaTeslaP100) warn",
    )
    parser.add_argument(
        "--bundle-timm",
        action="store_true",
        help="ship this machine's timm as a wheel; the kernel installs it offline if Kaggle's is older",
    )
    parser.add_argument(
        "--plan", action="store_true", help="print the projected kernel time on T4 x2 (kernels/plan.py) and stop"
    )
    parser.add_argument(
        "--plan-images", type=int, default=DEFAULT_IMAGES, help="hidden-test images the plan assumes (default 1000)"
    )
    # infer.py's own flags (InferConfig), the kernel's share of them; defaults from the `kaggle` preset
    add_infer_flags(parser, only=KERNEL_FIELDS)
    add_quiet_flag(parser)
    args = parser.parse_args(argv)
    infer = resolve_infer_config(args, preset="kaggle")  # its checkpoints: the experiments to ship
    if args.plan:
        for line in plan_lines(infer.checkpoints, infer, args.plan_images):
            print(line)
        return 0
    options = KernelOptions(infer, args.bundle_timm, check_accelerator(args.accelerator))
    build(infer.checkpoints, args.out, args.owner, args.slug, options, args.backbone_weights)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
