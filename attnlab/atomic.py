"""Atomic writes: a folder is written beside its target and renamed into place, so a crash never
leaves a half-written cache, checkpoint or artifact."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_dir(target: str | os.PathLike, write, replace: bool = False) -> Path:
    """Call write(tmp_dir), then move tmp_dir to `target`. If `target` exists: replace it when
    `replace`, else keep it (another process finished first; its copy is as good as ours)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        elif not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
