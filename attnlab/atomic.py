"""Atomic, verifiable writes: the one home for writing checkpoints, caches, artifacts and JSON.

A folder is written beside its target, gets a `manifest.json` (sha256 and size of every file in
it), and is renamed into place, so a crash never leaves a half-written folder under the target's
name, and damage that happens later (a truncated or edited file) is caught by `verify_dir` before
the folder is used. Folders written before manifests existed carry none and are accepted as they
are (legacy: sizes and checksums unknown).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DamagedFile

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"sha256": _sha256(p), "size": p.stat().st_size} for p in files}
    (Path(folder) / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def verify_dir(folder: str | os.PathLike) -> bool:
    """Check every file against the folder's manifest; raise DamagedFile naming the first file that
    is missing, has another size, or another checksum. Returns False for a legacy folder (no
    manifest, nothing to check), True when verified."""
    folder = Path(folder)
    m = folder / MANIFEST
    if not m.is_file():
        return False
    try:
        entries = json.loads(m.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DamagedFile(f"{m} is damaged (not a manifest); the folder cannot be verified") from None
    for rel, want in entries.items():
        p = folder / rel
        if not p.is_file():
            raise DamagedFile(f"{p} is missing (listed in {m.name})")
        if p.stat().st_size != want["size"]:
            raise DamagedFile(f"{p} is damaged: {p.stat().st_size} bytes, {want['size']} were written")
        if _sha256(p) != want["sha256"]:
            raise DamagedFile(f"{p} is damaged: its checksum differs from the one written")
    return True


def write_dir(target: str | os.PathLike, write, replace: bool = False, keep_previous: str | None = None) -> Path:
    """Call write(tmp_dir), add the manifest, then move tmp_dir to `target`. If `target` exists:
    replace it when `replace` (keeping the old one as `keep_previous`, a sibling name, if given),
    else keep it (another process finished first; its copy is as good as ours)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        write_manifest(tmp)
        if replace and target.exists():
            old = target.with_name(keep_previous or f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            if not keep_previous:
                shutil.rmtree(old, ignore_errors=True)
        elif not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_stale_temps(parent: str | os.PathLike, name: str) -> int:
    """Remove half-written temp folders `.{name}.*` that a crash left beside `name`; returns how many."""
    n = 0
    for p in Path(parent).glob(f".{name}.*"):
        if p.is_dir() and p.name != f".{name}.old":
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write JSON to a temp file beside `path` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
