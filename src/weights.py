"""`python -m src.weights export --name MODEL --out DIR`: save a timm model's pretrained weights to a file.

Run it once on a machine with internet; upload the file as a Kaggle dataset and pass it to
`--backbone-weights` (training) or bundle it with `kernels/build.py` (inference), both offline.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import timm
from safetensors.torch import save_file

from src.errors import BiomassError, run_cli
from src.io_utils import atomic_path


def export_weights(name: str, out_dir: str | os.PathLike) -> Path:
    """Download `name`'s pretrained weights through timm and save them as `<out>/<name>.safetensors`."""
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # hub errors come in many types; all mean "no weights here"
        raise BiomassError(
            f"cannot download {name} ({type(err).__name__}); run this on a machine with internet"
        ) from err
    out = Path(out_dir) / f"{name}.safetensors"
    with atomic_path(out) as tmp:
        # the pretrained config rides along: training reads mean/std from it (src.backbone.file_norm_constants)
        data_cfg = timm.data.resolve_data_config(model=model)
        meta = {"pretrained_cfg": json.dumps({"architecture": name, "mean": data_cfg["mean"], "std": data_cfg["std"]})}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="save pretrained weights of a timm model to a file")
    exp.add_argument("--name", required=True, help="timm model name, e.g. vit_base_patch14_reg4_dinov2.lvd142m")
    exp.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    print(export_weights(args.name, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
