"""Pack an installed pure-Python distribution (timm) back into a wheel, offline, for the kernel to install.

Kaggle's image may ship a timm older than the backbone needs (DINOv3 came with timm 1.0.20). The build then
puts the timm this machine runs into the code dataset, and the kernel installs it with
`pip install --no-index --no-deps --target DIR` when its own is too old: no download at build or run time.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import re
import zipfile
from pathlib import Path

from src.errors import BiomassError

# installation records that describe this machine's install, not the package
SKIP_DIST_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


def version_tuple(version: str) -> tuple[int, ...]:
    """'1.0.20' -> (1, 0, 20); suffixes such as '.dev0' or '+cpu' are dropped."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def pack_installed(name: str, out_dir: str | Path) -> Path:
    """Write `<name>-<version>-py3-none-any.whl` from the installed files of distribution `name`; return its path.

    Only pure-Python distributions qualify (an extension module would not run on another platform).
    """
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as err:
        raise BiomassError(
            f"--bundle-timm: {name} is not installed here; pip install -r requirements.txt first"
        ) from err
    files = [f for f in dist.files or [] if "__pycache__" not in f.parts and f.suffix != ".pyc"]
    if any(f.suffix in (".so", ".pyd", ".dylib") for f in files):
        raise BiomassError(f"--bundle-timm: {name} has compiled extensions; only pure-Python packages can be bundled")
    dist_info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if dist_info is None:
        raise BiomassError(f"--bundle-timm: {name}'s installed files have no .dist-info folder; reinstall it with pip")
    version = dist.version
    out = Path(out_dir) / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(files, key=str):
            if f.parts[0] == dist_info and f.name in SKIP_DIST_INFO:
                continue
            path = Path(dist.locate_file(f))
            if not path.is_file() or ".." in f.parts:  # console scripts live outside site-packages
                continue
            data = path.read_bytes()
            zf.writestr(f.as_posix(), data)
            record.append(f"{f.as_posix()},{_record_hash(data)},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return out
