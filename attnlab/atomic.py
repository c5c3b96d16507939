"""Atomic, verifiable writes: the one home for writing checkpoints, caches, artifacts and JSON.

A folder is written beside its target in a temp folder `.{name}.XXXX` that carries a `TEMP_MARK`
file (so a crash leaves a folder attnlab knows is its own, and `remove_stale_temps` deletes only
those), gets a `manifest.json` (sha256 and size of every file in it), and is renamed into place, so
a crash never leaves a half-written folder under the target's name, and damage that happens later
(a truncated or edited file) is caught by `verify_dir` before the folder is used.

`verify_dir` requires the manifest: a folder without one (deleted, or written before manifests
existed) is refused, since nothing in it can be checked. A manifest may name only plain files
inside its own folder (no absolute paths, no `..`, no symlinks), so it can never make attnlab
open, or vouch for, a file elsewhere.

A write that fails (disk full, no permission, a file size limit) raises `WriteFailed` naming the
file; the temp folder is removed and whatever was there before stays, so rerunning resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import AttnlabError, DamagedFile

MANIFEST = "manifest.json"
TEMP_MARK = ".attnlab-temp"   # inside a temp folder while it is being written; removed before the rename


class WriteFailed(AttnlabError, OSError):
    """A file could not be written (disk full, permissions, a size limit); names the file and the fix."""


def write_failed(path, e: BaseException) -> WriteFailed:
    """One line for a failed write: the file, the reason, and that rerunning resumes."""
    name = getattr(e, "filename", None) or path
    code = getattr(e, "errno", None)
    if code is None:  # writers that wrap the OSError (safetensors: "... (os error 28)")
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    reason = os.strerror(code) if code else " ".join(str(e).split())[:160]
    fix = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota)", errno.EACCES: "make it writable",
           errno.EPERM: "make it writable", errno.EROFS: "write to a writable disk",
           errno.EFBIG: "raise the file size limit (ulimit -f)"}.get(code, "fix the cause")
    return WriteFailed(f"could not write {name} ({reason or type(e).__name__}); {fix} and rerun the same command: "
                       f"finished work is kept and the run resumes from its last checkpoint")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, TEMP_MARK))
    entries = {str(p.relative_to(folder)): {"sha256": _sha256(p), "size": p.stat().st_size} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """The manifest's entries {relative path: {sha256, size}}, each checked to be a well-formed
    entry naming a file inside `folder`; DamagedFile otherwise, or when there is no manifest."""
    folder = Path(folder)
    m = folder / MANIFEST
    if m.is_symlink() or not m.is_file():
        raise DamagedFile(f"{folder} has no {MANIFEST} (the checksums of its files), so attnlab cannot tell whether "
                          f"it was changed and refuses it; write it again with attnlab (if you trust this copy: "
                          f"python -c \"from attnlab.atomic import write_manifest; write_manifest('{folder}')\")")
    try:
        entries = json.loads(m.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise DamagedFile(f"{m} is damaged (not a manifest); the folder cannot be verified") from None
    if not isinstance(entries, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and isinstance(v.get("size"), int) and not isinstance(v.get("size"), bool) for k, v in entries.items()):
        raise DamagedFile(f"{m} is damaged (expected {{\"files\": {{path: {{sha256, size}}}}}}); the folder cannot "
                          f"be verified")
    root = folder.resolve()
    for rel in entries:
        p = folder / rel
        if os.path.isabs(rel) or ".." in Path(rel).parts or root not in p.resolve().parents or _has_link(folder, rel):
            raise DamagedFile(f"{m} names {rel!r}, which is not a file inside {folder}; refused")
    return entries


def _has_link(folder: Path, rel: str) -> bool:
    p = folder
    for part in Path(rel).parts:
        p = p / part
        if p.is_symlink():
            return True
    return False


def verify_dir(folder: str | os.PathLike, required: tuple[str, ...] = ()) -> bool:
    """Check every file against the folder's manifest; raise DamagedFile naming the first file that
    is missing, has another size, or another checksum, when the manifest is missing or names a file
    outside the folder, or when a `required` file is not covered by it. Returns True."""
    folder = Path(folder)
    entries = read_manifest(folder)
    unlisted = [r for r in required if r not in entries]
    if unlisted:
        raise DamagedFile(f"{folder / MANIFEST} does not list {unlisted[0]}, so it cannot be verified; refused")
    for rel, want in entries.items():
        p = folder / rel
        if not p.is_file():
            raise DamagedFile(f"{p} is missing (listed in {MANIFEST})")
        if p.stat().st_size != want["size"]:
            raise DamagedFile(f"{p} is damaged: {p.stat().st_size} bytes, {want['size']} were written")
        if _sha256(p) != want["sha256"]:
            raise DamagedFile(f"{p} is damaged: its checksum differs from the one written")
    return True


def write_dir(target: str | os.PathLike, write, replace: bool = False, keep_previous: str | None = None) -> Path:
    """Call write(tmp_dir), add the manifest, then move tmp_dir to `target`. If `target` exists:
    replace it when `replace` (keeping the old one as `keep_previous`, a sibling name, if given),
    else keep it (another process finished first; its copy is as good as ours). A failed write
    raises WriteFailed and leaves `target` as it was."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise write_failed(target, e) from None
    try:
        (tmp / TEMP_MARK).write_text("a folder attnlab was writing; removed at the next start\n")
        write(tmp)
        write_manifest(tmp)
        (tmp / TEMP_MARK).unlink()
        if replace and target.exists():
            old = target.with_name(keep_previous or f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            if not keep_previous:
                shutil.rmtree(old, ignore_errors=True)
        elif not target.exists():
            os.replace(tmp, target)
    except AttnlabError:
        raise
    except Exception as e:  # OSError, and what writers make of it (safetensors raises its own error type)
        if isinstance(e, OSError) or "os error" in str(e):
            raise write_failed(target, e) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_stale_temps(parent: str | os.PathLike, name: str | None = None) -> int:
    """Remove half-written temp folders `.{name}.*` (any name when None) that a crash left in
    `parent`: only those carrying attnlab's TEMP_MARK (or, for a given name, empty ones); returns how many."""
    n = 0
    parent = Path(parent)
    if not parent.is_dir():
        return 0
    for p in parent.glob(f".{name}.*" if name else ".*.*"):
        if p.is_symlink() or not p.is_dir() or p.name.endswith((".old", ".prev")):
            continue
        if (p / TEMP_MARK).is_file():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        elif name and not any(p.iterdir()):
            p.rmdir()
            n += 1
    return n


def sweep_temps(root: str | os.PathLike) -> int:
    """remove_stale_temps in `root` and every folder below it (symlinks are not followed)."""
    n = 0
    for here, dirs, _ in os.walk(root):
        n += remove_stale_temps(here)
        dirs[:] = [d for d in dirs if (Path(here) / d).is_dir()]
    return n


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write JSON to a temp file beside `path` and rename it into place."""
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str))


_UMASK = os.umask(0)        # read once (setting it back at once): the mode a plain new file gets
os.umask(_UMASK)


TEXT_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")   # write_text_atomic's temp of <name> (mkstemp's 8)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temp file of its own beside `path` (a unique name: two processes writing the
    same file never share a temp) and rename it into place: readers see the old file or the new one.
    UTF-8 whatever the locale; whatever fails, the temp is removed and the old file stays."""
    path = Path(path)
    _check_text_target(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)                 # as an ordinary new file, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                Path(tmp).unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise write_failed(path, e) from None
        raise
    return path


def _check_text_target(path: Path) -> None:
    """WriteFailed naming what is in the way: `path` is a folder, or one of its parents is a file or
    a broken symlink (mkdir and rename would report only an errno, about a temp name)."""
    if path.is_dir():
        raise WriteFailed(f"could not write {path}: it is a folder, not a file; give a file's path")
    for parent in path.parents:
        if parent.is_dir():
            return
        if parent.exists() or parent.is_symlink():
            what = "a file" if parent.exists() else "a broken symlink"
            raise WriteFailed(f"could not write {path}: {parent} is {what}, not a folder; remove it or write elsewhere")
