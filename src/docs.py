"""Generated sections of README.md and docs/*.md: every figure there comes from a file a script wrote.

A section is `<!-- generated:NAME -->...<!-- /generated -->`; NAME's renderer below turns its sources (CSV/JSON
committed under docs/) into the text between the markers. The sources are written by the scripts that measure:
`bench/ablate.py` (docs/ablation.csv + .json), `bench/recipes.py` (docs/recipes*.csv), `bench/gpu_check.py`
(docs/gpu.json), `python -m src.docs demo checkpoints/demo --write` (docs/demo.csv + .json, from a `make demo`
run's files), `bench/*.py` (the dated sections they append to docs/BENCHMARKS.md, whose bar verdicts README.md
summarises).

    python -m src.docs                  # rewrite every generated section from its sources
    python -m src.docs --check          # exit 1 naming each section that differs (tests/test_docs.py)
    python -m src.docs demo checkpoints/demo [--baselines DIR] [--blend DIR] [--write]   # the demo's numbers
    python -m src.docs params           # count the model's parameters per config -> docs/param_counts.csv
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from src.bootstrap import paired_bootstrap
from src.checkpoint import git_description
from src.config import PRESETS, Config, apply_overrides
from src.errors import BiomassError, run_cli
from src.io_utils import write_csv_atomic, write_text_atomic
from src.model import build_model
from src.real_stats import stats_table
from src.report import (
    default_setting_row,
    ensemble_table,
    fixed_schedule,
    frame_terms,
    load_runs,
    oof_score,
    per_image_predictions,
    seeds_of,
    to_markdown,
)
from src.schema import SHORT_NAMES, TARGETS

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SECTION_RE = re.compile(r"<!-- generated:(?P<name>[\w-]+) -->(?P<body>.*?)<!-- /generated -->", re.S)


# ---- sections in a text ----------------------------------------------------------------------------------------
def begin(name: str) -> str:
    return f"<!-- generated:{name} -->"


END = "<!-- /generated -->"


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with section NAME's body replaced (appended at the end when the text has no such section)."""
    found = [m for m in SECTION_RE.finditer(text) if m.group("name") == name]
    if not found:
        return text.rstrip() + f"\n\n{begin(name)}\n{body.strip()}\n{END}\n"
    for m in reversed(found):
        inline = "\n" not in m.group("body")
        new = body.strip() if inline else f"\n{body.strip()}\n"
        text = text[: m.start("body")] + new + text[m.end("body") :]
    return text


def sections(text: str) -> list[tuple[str, str]]:
    """(name, body) of every generated section of a text."""
    return [(m.group("name"), m.group("body")) for m in SECTION_RE.finditer(text)]


def doc_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


# ---- sources -------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    if not path.is_file():
        raise BiomassError(f"{path}: source of a generated doc section not found; run the script that writes it")
    return json.loads(path.read_text())


def read_source_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise BiomassError(f"{path}: source of a generated doc section not found; run the script that writes it")
    return pd.read_csv(path, dtype={"fold": str})


def write_json_atomic(data: dict, path: Path) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- the ablation (bench/ablate.py) -----------------------------------------------------------------------------
def _mean_pm(value: float, std) -> str:
    return f"{value:.4f}" if std is None or not np.isfinite(std) else f"{value:.4f} ± {std:.4f}"


def ablation_table(table: pd.DataFrame) -> str:
    """The ablation rows: seed-mean OOF ± std, fixed-schedule OOF, delta to default with its paired bootstrap 95%
    interval and verdict (rows whose interval excludes 0 in bold), per-target R², seconds."""
    if "ci_low" not in table:  # a run from before seeds were an axis (one seed, no interval)
        return _ablation_table_one_seed(table)
    excludes = [v in ("better", "worse") for v in table["verdict"]]
    shown = pd.DataFrame(
        {
            "option": [
                (f"**{e}**" if x else e) + (" *" if b else "")
                for e, b, x in zip(table["experiment"], table["baseline"], excludes)
            ],
            "flags": [f"`{f}`" for f in table["flags"]],
            "seeds": table["seeds"],
            "OOF wR2 (mean ± std)": [_mean_pm(v, s) for v, s in zip(table["weighted_r2"], table["seed_std"])],
            "fixed-schedule wR2": table["fixed_r2"],
            "delta": [f"{v:+.4f}" for v in table["delta"]],
            "95% CI": [
                f"[{lo:+.4f}, {hi:+.4f}]" if np.isfinite(lo) and np.isfinite(hi) else ""
                for lo, hi in zip(table["ci_low"], table["ci_high"])
            ],
            "verdict": [f"**{v}**" if x else v for v, x in zip(table["verdict"], excludes)],
            **{f"R2 {s}": table[f"r2_{t}"] for t, s in zip(TARGETS, SHORT_NAMES)},
            "train s": table["train_s"],
            "wall s": table["wall_s"],
        }
    )
    return to_markdown(shown, {"train s": 0, "wall s": 0, "seeds": 0}, default_digits=4)


def _ablation_table_one_seed(table: pd.DataFrame) -> str:
    """The table of a one-seed run (docs/ablation.csv before --seeds): OOF, delta, fold mean ± std, R², seconds."""
    shown = pd.DataFrame(
        {
            "option": [f"{e} *" if b else e for e, b in zip(table["experiment"], table["baseline"])],
            "flags": [f"`{f}`" for f in table["flags"]],
            "OOF wR2": table["weighted_r2"],
            "delta": [f"{v:+.4f}" for v in table["delta"]],
            "fold mean ± std": [f"{m:.3f} ± {s:.3f}" for m, s in zip(table["fold_mean"], table["fold_std"])],
            **{f"R2 {s}": table[f"r2_{t}"] for t, s in zip(TARGETS, SHORT_NAMES)},
            "train s": table["train_s"],
            "wall s": table["wall_s"],
        }
    )
    return to_markdown(shown, {"train s": 0, "wall s": 0}, default_digits=4)


ABLATION_NOTE = (
    "OOF wR2 = the competition metric on all folds' oof.csv rows pooled (best epoch per fold, no TTA, no physics "
    "post-processing), per seed, then mean ± std over the seeds; fixed-schedule wR2 = the same with each fold at the "
    "median best epoch of the other folds (selection-honest); delta = this row - default on the same images, with "
    "the paired bootstrap 95% interval (images and seeds resampled, the metric recomputed each draw; "
    "`src/bootstrap.py`); verdict better / worse (in bold) only when the interval excludes 0, else can't tell. "
    "train s = sum of the per-epoch seconds of metrics.csv (feature-cache builds excluded); wall s = the whole "
    "train_fold calls."
)
ABLATION_NOTE_ONE_SEED = (
    "OOF wR2 = the competition metric on all folds' oof.csv rows pooled (best epoch per fold, no TTA, no physics "
    "post-processing); delta = OOF wR2 - default's; fold mean ± std = each fold's own weighted R2; train s = sum of "
    "the per-epoch seconds of metrics.csv (feature-cache builds excluded); wall s = the whole train_fold calls. "
    "One seed per row and no interval: this run predates `--seeds`, so no row is marked as telling."
)


def render_ablation(table: pd.DataFrame, meta: dict) -> str:
    """The results block of docs/ABLATION.md from the run's table (docs/ablation.csv) and meta (.json)."""
    seeds = f" x {meta['seeds']} seeds" if meta.get("seeds") else ""
    quick = " (quick smoke settings, not a result)" if meta.get("quick") else ""
    lines = [
        f"## Results{quick} — {meta['date']}",
        "",
        f"- command: `{meta['command']}` ({meta['minutes']:.1f} min for {meta['options']} options x "
        f"{meta['folds']} folds{seeds})",
        f"- data: `{meta['data_dir']}` ({meta['images']} train images), folds `{meta['folds_csv']}` (run: "
        f"{meta['folds_run']})",
        f"- base flags of every run: `{meta['base_flags']}`; each row adds its flags",
        f"- machine: {meta['cpu']}; {meta['cores']}; load average at start {meta['load_start']}, at end "
        f"{meta['load_end']}",
        f"- CSV: `{meta['csv']}`; experiment directories: `{meta['out_dir']}/<option>` (`python report.py "
        "--compare ...` reads them)",
        "",
        ablation_table(table),
        "",
        ABLATION_NOTE if "ci_low" in table else ABLATION_NOTE_ONE_SEED,
    ]
    return "\n".join(lines)


def _ablation(repo: Path) -> str:
    return render_ablation(read_source_csv(repo / "docs" / "ablation.csv"), read_json(repo / "docs" / "ablation.json"))


# ---- the demo (make demo) ------------------------------------------------------------------------------------------
DEMO_COLUMNS = ("model_best", "model_fixed", "colour_ridge", "train_mean")


def _seed_mean_scores(frames_by_seed: list[list[pd.DataFrame]]) -> float:
    """Mean over seeds of the metric of each seed's frames pooled (NaN when a seed lacks a frame)."""
    values = []
    for frames in frames_by_seed:
        if not frames or any(f is None for f in frames):
            return float("nan")
        values.append(oof_score(pd.concat(frames, ignore_index=True))["weighted_r2"])
    return float(np.mean(values)) if values else float("nan")


def _last_epoch(run) -> pd.DataFrame | None:
    """A fold's held-out predictions at its last validated epoch (oof_epochs.csv), or None without that file."""
    if run.epochs is None or not len(run.epochs):
        return None
    last = run.epochs[run.epochs["epoch"] == run.epochs["epoch"].max()]
    return last.drop(columns=["epoch"]).reset_index(drop=True)


def _plain_loop_frames(baselines_dir: Path) -> list[pd.DataFrame]:
    """The plain loop's OOF, one frame per seed (`python -m src.baseline --plain --seeds ... --out DIR`); may be []."""
    paths = sorted(baselines_dir.glob("oof_plain_loop*.csv"))
    return [pd.read_csv(p, dtype={"image_id": str}) for p in paths]


def _blend_frames(blend_dir: Path) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict]:
    """The blend's nested OOF (oof_blend.csv), each member's one prediction per image (as src.blend read it), and
    blend.yaml."""
    record = yaml.safe_load((blend_dir / "blend.yaml").read_text())
    members = {}
    for path in record["experiments"]:
        frame, _ = per_image_predictions(Path(path), load_runs(path))
        members[Path(path).name] = frame
    return pd.read_csv(blend_dir / "oof_blend.csv", dtype={"image_id": str}), members, record


def blend_verdicts(blend: pd.DataFrame, others: dict[str, list[pd.DataFrame]], images: pd.Index) -> list[dict]:
    """The submitted blend against each other system on the same images: blend - other, paired bootstrap 95%
    interval (images resampled together, the other's seeds resampled too), verdict: better = the blend is better."""
    mine = frame_terms([blend], images)
    rows = []
    for name, frames in others.items():
        interval = paired_bootstrap(mine, frame_terms(frames, images))
        rows.append(
            {
                "system": name,
                "weighted_r2": _seed_mean_scores([[f[f["image_id"].isin(images)]] for f in frames]),
                "seeds": len(frames),
                "delta": interval.delta,
                "low": interval.low,
                "high": interval.high,
                "verdict": interval.verdict,
            }
        )
    return rows


def collect_demo(exp_dir: Path, baselines_dir: Path, blend_dir: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Per fold and pooled: the model's best-epoch and fixed-schedule OOF (mean over seeds), the peers' OOF on the
    same folds (and the plain loop's, seed mean, when `--plain` wrote it), the submitted blend's nested OOF; meta =
    the ensemble's infer.py default row, the paired bootstrap of model - peer and of the blend - every system."""
    runs = [r for r in load_runs(exp_dir) if r.oof is not None]
    schedule = fixed_schedule(runs)
    seeds = seeds_of(runs)
    peers = {}
    for name in ("colour_ridge", "train_mean"):
        path = baselines_dir / f"oof_{name}.csv"
        if not path.is_file():
            raise BiomassError(f"{path}: not found; run `python -m src.baseline --colour --out {baselines_dir}` first")
        peers[name] = pd.read_csv(path, dtype={"image_id": str})
    plain = _plain_loop_frames(baselines_dir)
    blend, members, record = _blend_frames(blend_dir) if blend_dir is not None else (None, {}, {})
    folds = sorted({r.fold for r in runs})
    rows = []
    for fold in [*folds, None]:
        mine = [r for r in runs if fold is None or r.fold == fold]
        best = [[r.oof for r in mine if r.seed == s] for s in seeds]
        fixed = [[schedule[r.path][1] for r in mine if r.seed == s] for s in seeds]
        images = set(pd.concat([r.oof for r in mine])["image_id"])
        row = {"fold": "pooled" if fold is None else str(fold), "images": len(images)}
        row["model_best"] = _seed_mean_scores(best)
        row["model_fixed"] = _seed_mean_scores(fixed)
        row["model_last"] = _seed_mean_scores([[_last_epoch(r) for r in mine if r.seed == s] for s in seeds])
        for name, frame in peers.items():
            row[name] = oof_score(frame[frame["image_id"].isin(images)])["weighted_r2"]
        if plain:
            row["plain_loop"] = _seed_mean_scores([[f[f["image_id"].isin(images)]] for f in plain])
        if blend is not None:
            row["blend"] = oof_score(blend[blend["image_id"].isin(images)])["weighted_r2"]
        rows.append(row)
    table = pd.DataFrame(rows)
    images = pd.Index(sorted(set(pd.concat([r.oof for r in runs])["image_id"])))
    meta: dict = {"seeds": len(seeds), "grids": sorted({r.grid for r in runs}), "exp": exp_dir.name}
    fixed_frames = [[schedule[r.path][1] for r in runs if r.seed == s] for s in seeds]
    for label, frames_by_seed in (
        ("best", [[r.oof for r in runs if r.seed == s] for s in seeds]),
        ("fixed", fixed_frames),
    ):
        if any(f is None for frames in frames_by_seed for f in frames):
            continue
        model = frame_terms([pd.concat(f, ignore_index=True) for f in frames_by_seed], images)
        interval = paired_bootstrap(model, frame_terms([peers["colour_ridge"]], images))
        meta[f"vs_peer_{label}"] = {
            "delta": interval.delta, "low": interval.low, "high": interval.high, "verdict": interval.verdict
        }  # fmt: skip
    ens = ensemble_table(exp_dir)
    if ens is not None:
        row = default_setting_row(ens)
        meta["ensemble"] = {"tta": row["tta"], "physics": row["physics"], "weighted_r2": float(row["weighted_r2"])}
    if blend is not None:
        others = {
            "network, fixed schedule": None if any(f is None for fs in fixed_frames for f in fs) else fixed_frames,
            "network, best epoch": [[r.oof for r in runs if r.seed == s] for s in seeds],
        }
        others = {k: [pd.concat(f, ignore_index=True) for f in v] for k, v in others.items() if v is not None}
        others |= {f"member: {name}": [frame] for name, frame in members.items()}
        if plain:
            others["plain loop (last epoch)"] = plain
        others |= {"colour ridge (peer)": [peers["colour_ridge"]], "train mean": [peers["train_mean"]]}
        meta["blend"] = {
            "dir": blend_dir.name,
            "weighted_r2": oof_score(blend)["weighted_r2"],
            "in_sample_weighted_r2": record["oof"]["in_sample_weighted_r2"],
            "members": [Path(p).name for p in record["experiments"]],
            "vs": blend_verdicts(blend, others, images),
        }
    if plain:
        meta["plain_loop_seeds"] = len(plain)
    meta["commands"] = list(dict.fromkeys(r.command for r in runs if r.command))
    # the commit the folds were trained at (git.txt of each run), not the one collecting them
    trained_at = {(r.path / "git.txt").read_text().strip() for r in runs if (r.path / "git.txt").is_file()}
    meta["git"] = " / ".join(sorted(trained_at)) or git_description().strip()
    meta["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    return table, meta


def render_demo_table(table: pd.DataFrame, meta: dict) -> str:
    """README's demo table: model vs peer per fold, the ensemble, and whether the model beats the peer."""
    columns = {"fold": table["fold"], "images": table["images"]}
    if "blend" in table:
        columns["blend (submitted, nested)"] = table["blend"]
    columns["model, fixed schedule"] = table["model_fixed"]
    if "model_last" in table:
        columns["model, last epoch"] = table["model_last"]
    columns["model, best epoch"] = table["model_best"]
    if "plain_loop" in table:
        columns["plain loop"] = table["plain_loop"]
    columns |= {"colour ridge (peer)": table["colour_ridge"], "train mean": table["train_mean"]}
    shown = pd.DataFrame(columns)
    seeds = f"mean over {meta['seeds']} seeds, " if meta.get("seeds", 1) > 1 else ""
    lines = [
        to_markdown(shown, {"images": 0}),
        "",
        f"Weighted R² out of fold ({seeds}`{meta['exp']}`, {meta['date']}, `{meta['git']}`). Model columns: each "
        "fold's held-out predictions from training (no TTA, no physics); fixed schedule = each fold at the median "
        "of the other folds' best epochs (halves round up), chosen without its labels (a fold whose early stopping "
        "fired keeps its best.pt but trains on to the last epoch, so that epoch is always one it ran); last epoch = "
        "the end of the schedule, no choice at all (as the plain loop is scored); best epoch is selected on the "
        "fold's own labels and so optimistic.",
    ]
    if "ensemble" in meta:
        e = meta["ensemble"]
        lines[-1] += (
            f" `infer.py --oof` ensemble of the best.pt checkpoints (tta={e['tta']}, physics={e['physics']}): "
            f"{e['weighted_r2']:.4f}."
        )
    for label, name in (("fixed", "fixed schedule"), ("best", "best epoch")):
        v = meta.get(f"vs_peer_{label}")
        if v:
            lines[-1] += (
                f" Model ({name}) - peer, pooled: {v['delta']:+.4f}, paired bootstrap 95% interval "
                f"[{v['low']:+.4f}, {v['high']:+.4f}]: {v['verdict']}."
            )
    if meta.get("plain_loop_seeds"):
        lines[-1] += (
            f" Plain loop: `python -m src.baseline --plain` (its own loop, scored at its last epoch), mean over "
            f"{meta['plain_loop_seeds']} seed(s)."
        )
    if "blend" in meta:
        b = meta["blend"]
        members = ", ".join(f"`{m}`" for m in b["members"])
        vs = pd.DataFrame(b["vs"])
        vs = pd.DataFrame(
            {
                "system": vs["system"],
                "seeds": vs["seeds"],
                "pooled wR2": vs["weighted_r2"],
                "blend - system": vs["delta"].map(lambda v: f"{v:+.4f}"),
                "95% interval": [f"[{lo:+.4f}, {hi:+.4f}]" for lo, hi in zip(vs["low"], vs["high"])],
                "verdict (blend is ...)": vs["verdict"],
            }
        )
        lines += [
            "",
            f"The submitted system is `{b['dir']}`: `python -m src.blend` of {members} (non-negative per-target "
            f"weights); its estimate {b['weighted_r2']:.4f} is nested (each fold's rows blended with weights fitted on "
            f"the other folds; in-sample {b['in_sample_weighted_r2']:.4f}), and `make demo`'s submission.csv comes "
            "from it. Against every other system on the same images (paired bootstrap, 2000 draws; `verdict` reads "
            "better when the interval of blend - system is above 0):",
            "",
            to_markdown(vs, {"seeds": 0}),
        ]
    return "\n".join(lines)


def _demo_table(repo: Path) -> str:
    return render_demo_table(read_source_csv(repo / "docs" / "demo.csv"), read_json(repo / "docs" / "demo.json"))


def _demo_peer(repo: Path) -> str:
    """One sentence for docs/SYNTHETIC.md: what the colour peer and the train mean score on the demo folds."""
    table = read_source_csv(repo / "docs" / "demo.csv").set_index("fold")
    pooled = table.loc["pooled"]
    per_fold = " / ".join(f"{v:.2f}" for k, v in table["colour_ridge"].items() if k != "pooled")
    return (
        f"ridge on the colour features of `src/colour.py` reaches weighted R² {pooled['colour_ridge']:.3f} out of fold "
        f"on the demo's month-grouped 5 folds (per fold {per_fold}; per-target train means score "
        f"{pooled['train_mean']:.3f})"
    )


# ---- figures of the real label file (python -m src.real_stats -> docs/real_labels.json) ---------------------------
def _synthetic_stats(repo: Path) -> str:
    """docs/SYNTHETIC.md's table: synthetic labels of seed 0 beside the real ones, as `src.real_stats` counted them."""
    return stats_table(read_json(repo / "docs" / "real_labels.json"))


def _physics_labels(repo: Path) -> str:
    """One sentence for README's physics bullet: how far the real labels lie from the projection's set."""
    p = read_json(repo / "docs" / "real_labels.json")["physics"]
    return (
        f"{p['on_set']} of the {p['images']} real labels lie on the set (to 1e-9 g); the others break an identity by "
        f"rounding, at most 0.01 g, except {p['gap_over_0.01_g']} image(s) (the farthest: {p['worst_image']}) "
        f"breaking one by up to {p['max_identity_gap_g']:.2f} g; the projection moves a real label by at most "
        f"{p['max_move_g']:.2f} g on one target, and the largest weighted distance from the set, "
        f"{p['max_weighted_distance_g']:.3f} g, bounds what it can add to any real image's weighted error norm"
    )


# ---- the benchmarks (bench/*.py -> docs/BENCHMARKS.md) -----------------------------------------------------------
# every verdict bench.common.bar_line writes; the leading '- ' is optional (some older records lack it)
BAR_RE = re.compile(r"^(?:- )?\*\*Bar (met|NOT met|not measured|invalid)\*\*: (.*)$")


def latest_benchmarks(text: str) -> dict[str, tuple[str, list[str]]]:
    """title -> (date, bar verdict lines) of the newest section of each benchmark in docs/BENCHMARKS.md."""
    out: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        title, _, date = head.partition(" — ")
        bars = [f"{m.group(1)}: {m.group(2).strip()}" for m in map(BAR_RE.match, body.splitlines()) if m]
        out.pop(title.strip(), None)  # newest last: re-insert so the order is that of the newest runs
        out[title.strip()] = (date.strip(), bars)
    return out


def _benchmarks(repo: Path) -> str:
    """README's benchmark table: each benchmark's newest run and its bar verdicts, verbatim."""
    path = repo / "docs" / "BENCHMARKS.md"
    if not path.is_file():
        raise BiomassError(f"{path}: not found; the bench/*.py scripts append their sections to it")
    rows = [
        {"benchmark (newest run)": f"{title} ({date})", "bars": "<br>".join(bars) or "no bar: see the section"}
        for title, (date, bars) in latest_benchmarks(path.read_text()).items()
    ]
    return to_markdown(pd.DataFrame(rows))


# ---- parameter counts (docs/ARCHITECTURE.md) ---------------------------------------------------------------------
# (label, preset, model overrides): the default config (grid 2x2, cls_mean, fusion_dim 256, aux heads) unless noted
PARAM_MODELS = (
    ("tiny preset (ViT embed 64, depth 2, patch 14; fusion 64)", "tiny", {"tile_size": 56}),
    ("ViT-S/14 reg4 DINOv2 (`vit_small_patch14_reg4_dinov2.lvd142m`)", None,
     {"backbone": "vit_small_patch14_reg4_dinov2.lvd142m"}),
    ("ViT-B/14 reg4 DINOv2 (default `vit_base_patch14_reg4_dinov2.lvd142m`)", None, {}),
    ("ViT-B/14 reg4, grid 3x3", None, {"grid": [3, 3]}),
    ("ViT-S/16 DINOv3 (`vit_small_patch16_dinov3.lvd1689m`)", None, {"backbone": "vit_small_patch16_dinov3.lvd1689m"}),
    ("ViT-B/16 DINOv3 (`vit_base_patch16_dinov3.lvd1689m`)", None, {"backbone": "vit_base_patch16_dinov3.lvd1689m"}),
)  # fmt: skip


def count_parameters() -> pd.DataFrame:
    """Parameters of each PARAM_MODELS model, built by `build_model` on the meta device (no memory, no weights)."""
    rows = []
    for label, preset, overrides in PARAM_MODELS:
        cfg = Config()
        if preset:
            apply_overrides(cfg, PRESETS[preset], f"preset {preset}")
        apply_overrides(cfg, {"model": overrides}, label)
        with torch.device("meta"):
            model = build_model(cfg.model, load_backbone_weights=False)
        parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
        pos = getattr(model.backbone, "pos_embed", None)
        total = sum(p.numel() for p in model.parameters())
        aux = sum(v for k, v in parts.items() if k.startswith("aux"))
        rows.append(
            {"model": label, "tile": model.tile_size, "backbone": parts["backbone"],
             "pos_embed": 0 if pos is None else pos.numel(), "heads": parts["heads"], "aux": aux,
             "fusion": total - parts["backbone"] - parts["heads"] - aux, "total": total}
        )  # fmt: skip
    return pd.DataFrame(rows)


def _param_counts(repo: Path) -> str:
    table = read_source_csv(repo / "docs" / "param_counts.csv")
    shown = pd.DataFrame(
        {
            "model": table["model"],
            "tile": table["tile"],
            "backbone": [
                f"{b:,}" + (f" (pos_embed {p:,})" if p else "") for b, p in zip(table["backbone"], table["pos_embed"])
            ],
            "fusion (proj, pos/view emb, 2 FiLM, pool, norm)": [f"{v:,}" for v in table["fusion"]],
            "5 heads": [f"{v:,}" for v in table["heads"]],
            "aux": [f"{v:,}" for v in table["aux"]],
            "total": [f"**{v:,}**" for v in table["total"]],
            "frozen stage trains": [f"{f + h + a:,}" for f, h, a in zip(table["fusion"], table["heads"], table["aux"])],
        }
    )
    return to_markdown(shown)


# ---- the recipes' projections (bench/recipes.py) ---------------------------------------------------------------
def _recipe_tables(repo: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return read_source_csv(repo / "docs" / "recipes.csv"), read_source_csv(repo / "docs" / "recipes_kernel.csv")


def _recipes(repo: Path) -> str:
    """docs/RECIPES.md: per recipe x grid x device the projected memory and time per fold, the arithmetic shown."""
    table, kernel = _recipe_tables(repo)
    lines = [
        "| recipe | grid, tile | device | GB as written (fits?) | GB grad ckpt | --fit-memory auto | min / fold | runs "
        "| h, all runs | disk GB slim / none / full | arithmetic |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in table.itertuples():
        fits = "yes" if str(r.fits) == "True" else f"**no** (> {r.device_gb})"
        minutes = f"{r.minutes_per_fold}" if r.device != "T4" else f"{r.minutes_per_fold_fast}-{r.minutes_per_fold}"
        lines.append(
            f"| {r.recipe} | {r.grid}, {r.tile} | {r.device} | {r.memory_gb} ({fits}) | "
            f"{r.memory_gb_grad_checkpointing} | {r.fit_memory_choice} | {minutes} | {r.runs} | {r.hours_all_runs} | "
            f"{r.disk_gb_slim} / {r.disk_gb_none} / {r.disk_gb_full} | {r.arithmetic} |"
        )
    lines += ["", "Kernel ensembles (Kaggle T4, fp16 autocast, one GPU, 9 h limit):", ""]
    lines += [
        "| recipe | ensemble | models | min | share of 9 h | fits | arithmetic |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in kernel.itertuples():
        fits = "yes" if str(r.fits_9h) == "True" else "**no**"
        lines.append(
            f"| {r.recipe} | {r.ensemble} | {r.models} | {r.minutes_t4} | {float(r.share_of_9h):.1%} | {fits} | "
            f"{r.arithmetic} |"
        )
    return "\n".join(lines)


def _recipes_readme(repo: Path) -> str:
    """README.md: one row per recipe, minutes per fold on T4 / A100 / H100 and the largest ensemble that fits 9 h."""
    table, kernel = _recipe_tables(repo)
    lines = [
        "| recipe | backbone | grids | min / fold T4 | A100 | H100 | GB (T4 fits?) | largest kernel ensemble in 9 h |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name, rows in table.groupby("recipe", sort=False):
        minutes = {
            d: " + ".join(str(v) for v in rows[rows.device == d].minutes_per_fold) for d in ("T4", "A100", "H100")
        }
        t4 = rows[rows.device == "T4"]
        fits = "yes" if (t4.fits.astype(str) == "True").all() else "fitted: --fit-memory"
        ens = kernel[(kernel.recipe == name) & (kernel.fits_9h.astype(str) == "True")]
        best = f"{ens.iloc[-1].ensemble} ({ens.iloc[-1].minutes_t4} min)" if len(ens) else "none"
        lines.append(
            f"| `{name}` | `{rows.iloc[0].backbone}` | {', '.join(dict.fromkeys(rows.grid))} | {minutes['T4']} | "
            f"{minutes['A100']} | {minutes['H100']} | {t4.memory_gb.max()} ({fits}) | {best} |"
        )
    return "\n".join(lines)


# ---- the GPU check (bench/gpu_check.py -> docs/gpu.json) ------------------------------------------------------------
GPU_RESULTS = "gpu.json"
NOT_MEASURED = (
    "**No GPU has been measured yet.** `make gpu-check` has not run on a CUDA machine for this repo (there is no "
    "docs/gpu.json), so none of the CUDA paths above has run on a GPU and every GPU figure elsewhere is *assumed*: "
    "docs/RECIPES.md's memory and minutes per fold, docs/KAGGLE.md's kernel plan (`kernels/plan.py`) and the T4 / "
    "P100 rows of docs/BENCHMARKS.md are FLOP and byte arithmetic at assumed rates (a T4 at 30% of its 65 TFLOP/s "
    "fp16 peak, A100 / H100 at 40%) and an assumed activation model (34 bytes per token x width per block, 1 GB "
    "overhead), not measurements."
)


def _fmt(value, spec: str = "", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def render_gpu(results: dict | None) -> str:
    """docs/GPU.md's generated section: the machine, the stages, pytest -m gpu, memory, TFLOP/s and infer.py rows."""
    if results is None:
        return NOT_MEASURED
    m = results["machine"]
    lines = []
    if results.get("kind") != "measurement":
        lines += [f"**FIXTURE, not a measurement** ({results.get('note', 'a test file')}).", ""]
    lines += [
        f"Measured on **{m['card']}** ({m['capability']}, {m['memory_gib']} GiB, {m['gpus']} GPU), driver "
        f"{m['driver']}, torch {m['torch']} (CUDA {m['cuda']}), timm {m['timm']}, Python {m['python']}, {m['date']}, "
        f"commit {str(m['git'])[:12]}; `make gpu-check` took {results['total_seconds']:.0f} s (budget "
        f"{results['total_budget_s']} s). Card peak used for shares: {_fmt(m.get('peak_tflops'), '.0f')} TFLOP/s "
        "(datasheet, dense fp16/bf16).",
        "",
        "| stage | status | seconds | budget s |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {s['status']} | {s.get('seconds', 0)} | {s.get('budget_s', '-')} |"
        for name, s in results["stages"].items()
    ]
    tests = results.get("tests")
    if tests:
        lines += [
            "",
            f"`pytest -m gpu`: {tests['passed']} passed, {tests['failed']} failed, {tests.get('error', 0)} errors, "
            f"{tests['skipped']} skipped, {tests.get('xfailed', 0)} expected failures.",
        ]
        odd = [c for c in tests["cases"] if c["outcome"] != "passed"]
        if odd:
            lines += ["", "| test | outcome | message |", "|---|---|---|"]
            lines += [f"| `{c['name']}` | {c['outcome']} | {c['message'].replace('|', '/')} |" for c in odd]
    if results.get("memory"):
        lines += [
            "",
            "Peak CUDA memory of two finetune-stage training steps (`torch.cuda.max_memory_allocated`: tensors only, "
            "no CUDA context) at each recipe's real shapes with random weights, against bench/recipes.py's memory "
            "model (which adds 1 GB for context and slack):",
            "",
            "| recipe | backbone | grid | batch | grad ckpt | measured GB | model GB | measured / model | status |",
            "|---|---|---|---:|---|---:|---:|---:|---|",
        ]
        for r in results["memory"]:
            status = r.get("status", "") + (f" (= {r['same_as']})" if r.get("same_as") else "")
            lines.append(
                f"| {r['recipe']} | `{r['backbone']}` | {r['grid']} | {r['batch_size']} | "
                f"{'on' if r['grad_checkpointing'] else 'off'} | {_fmt(r.get('peak_gb'), '.2f')} | "
                f"{r['model_gb']:.1f} | {_fmt(r.get('ratio_to_model'), '.2f')} | {status} |"
            )
    if results.get("flops"):
        t4 = results.get("t4_peak_tflops")
        lines += [
            "",
            "Sustained throughput of each recipe backbone at one training step's sequences (bench/recipes.py's FLOP "
            f"count; fwd+bwd = 3 x forward). T4 column: the measured share x the T4's {_fmt(t4, '.0f')} TFLOP/s fp16 "
            "peak, an upper bound (sm_75 has no FlashAttention-2 and no bf16; its 70 W clocks drop under load):",
            "",
            "| backbone | tile | sequences | dtype | mode | TFLOP/s | share of peak | T4 projection TFLOP/s |",
            "|---|---:|---:|---|---|---:|---:|---:|",
        ]
        for r in results["flops"]:
            share = r.get("share_of_peak")
            t4_rate = share * t4 if share is not None and t4 else None
            lines.append(
                f"| `{r['backbone']}` | {r['tile']} | {r['sequences_per_step']} | {r['dtype']} | {r['mode']} | "
                f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(share, '.1%')} | {_fmt(t4_rate, '.1f')} |"
            )
    infer = results.get("infer")
    if infer and infer.get("status") == "ok":
        lines += [
            "",
            f"`infer.py` end to end on the GPU: {infer['models']} random ViT-B/14 checkpoints "
            f"({infer['checkpoint_mb']} MB each), {infer['images']} full-size images, tta full, bf16 "
            f"(`{infer['command']}`): wall {infer['wall_s']:.1f} s, of which predicting {infer['predict_s']:.1f} s "
            f"(fixed {infer['fixed_s']:.1f} s); "
            f"{infer['e2e_tflops']:.1f} TFLOP/s = **{infer['share_of_encoder']:.0%} of the encoder alone** "
            f"({infer['encoder_tflops']:.1f} TFLOP/s, same precision and tiles per call), "
            f"{_fmt(infer.get('share_of_peak'), '.1%')} of the card's peak.",
        ]
    elif infer:
        lines += ["", f"`infer.py` end to end: {infer.get('status')}."]
    return "\n".join(lines)


def _gpu(repo: Path) -> str:
    """docs/GPU.md: the results of the last `make gpu-check` (docs/gpu.json), or that no GPU has been measured."""
    path = repo / "docs" / GPU_RESULTS
    if not path.is_file():
        return render_gpu(None)
    results = read_json(path)
    if results.get("kind") != "measurement":
        raise BiomassError(
            f"{path}: kind {results.get('kind')!r}, not 'measurement'; docs/gpu.json is written only by "
            "bench/gpu_check.py on a GPU (a fixture belongs under tests/)"
        )
    return render_gpu(results)


# ---- all sections ----------------------------------------------------------------------------------------------------
RENDERERS: dict[str, Callable[[Path], str]] = {
    "ablation": _ablation,
    "demo-table": _demo_table,
    "demo-peer": _demo_peer,
    "synthetic-stats": _synthetic_stats,
    "physics-labels": _physics_labels,
    "benchmarks": _benchmarks,
    "param-counts": _param_counts,
    "recipes": _recipes,
    "recipes-readme": _recipes_readme,
    "gpu": _gpu,
}


def rewrite(repo: Path = REPO, check: bool = False) -> list[str]:
    """Render every generated section of README.md and docs/*.md; returns `file: NAME` of each that differed
    (with check=True nothing is written)."""
    stale = []
    for path in doc_files(repo):
        text = path.read_text()
        new = text
        for name, body in sections(text):
            if name not in RENDERERS:
                raise BiomassError(f"{path}: unknown generated section {name!r}; known: {', '.join(RENDERERS)}")
            rendered = RENDERERS[name](repo)
            if body.strip() != rendered.strip():
                stale.append(f"{path.relative_to(repo)}: {name}")
                new = replace_section(new, name, rendered)
        if new != text and not check:
            write_text_atomic(path, new)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report sections that differ from their sources")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="collect a demo run's per-fold numbers (model vs peers)")
    demo.add_argument("exp", help="experiment directory, e.g. checkpoints/demo")
    demo.add_argument("--baselines", default=None, help="python -m src.baseline --out DIR (default <exp>/baselines)")
    demo.add_argument("--blend", default=None, help="the submitted blend directory (python -m src.blend --out DIR)")
    demo.add_argument("--write", action="store_true", help="write docs/demo.csv + .json and rewrite the docs")
    sub.add_parser("params", help="count the parameters of each model config -> docs/param_counts.csv")
    args = parser.parse_args(argv)
    if args.command == "params":
        write_csv_atomic(count_parameters(), DOCS / "param_counts.csv")
        print(f"wrote {DOCS / 'param_counts.csv'}")
    if args.command == "demo":
        exp = Path(args.exp)
        blend = Path(args.blend) if args.blend else None
        table, meta = collect_demo(exp, Path(args.baselines) if args.baselines else exp / "baselines", blend)
        print(render_demo_table(table, meta))
        out = DOCS if args.write else exp
        write_csv_atomic(table, out / "demo.csv")
        write_json_atomic(meta, out / "demo.json")
        print(f"wrote {out / 'demo.csv'} and {out / 'demo.json'}")
        if not args.write:
            return 0
    stale = rewrite(check=args.check)
    if args.check and stale:
        raise BiomassError(f"generated sections differ from their sources: {', '.join(stale)}; run python -m src.docs")
    print("\n".join(f"{'stale' if args.check else 'rewrote'} {s}" for s in stale) or "generated sections up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
