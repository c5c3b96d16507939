"""The run folder of `attnlab run`: created, marked, locked, and cleaned by `--fresh`, so that a run
never touches anything of the user's.

    out/.attnlab-run    the marker: JSON naming the config whose run this folder is
    out/.attnlab-lock   an advisory fcntl lock held for the whole run, holding the holder's pid

Guarantees:
  - attnlab writes only into a new, empty, or marked folder, and only into the folder of the config
    its marker names (another config's folder is refused, naming both);
  - `--fresh` never follows a symlink (the run folder itself being one is refused), and deletes only
    what attnlab wrote: files named in `WRITTEN` (and the temps an interrupted atomic write left of
    them), folders with a valid checksum manifest (the files it lists), and temp folders carrying
    attnlab's temp mark. Anything else stays, and is reported;
  - one run per folder: a second run is refused naming the first one's pid; the kernel drops the
    lock of a process that died, so a stale lock file (dead pid) is simply taken over.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .atomic import MANIFEST, TEMP_MARK, TEXT_TEMP, read_manifest, sweep_temps, write_text_atomic
from .errors import AttnlabError, DamagedFile, UnsafePath

MARKER = ".attnlab-run"    # a run folder attnlab created (only those are written into or cleaned)
LOCK = ".attnlab-lock"     # held while a run uses the folder
# files `attnlab run` writes (in the run folder, a dataset's folder, or a cell/sweep point's folder)
WRITTEN = {"results.json", "report.md", "loss_curves.png", "metrics.png", "result.json", "metrics.jsonl",
           "diverged.json", ".results.json.tmp", ".report.md.tmp", ".result.json.tmp", ".metrics.jsonl.tmp",
           ".diverged.json.tmp", "report.json", ".report.json.tmp"}
WRITTEN_PREFIXES = ("events.out.tfevents.",)   # tensorboard's (train.log_with), under <cell>/tensorboard


class RunLocked(AttnlabError, RuntimeError):
    """Another attnlab run holds the run folder's lock."""


def lexical(path) -> Path:
    """An absolute path with '..' and '~' resolved by text, symlinks left as they are."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def marker_name(out: Path) -> str | None:
    """The config name the folder's marker names (a marker of an older attnlab, plain text: the
    folder's own name, which was the config's); None without a marker."""
    m = out / MARKER
    if not m.is_file() or m.is_symlink():
        return None
    try:
        data = json.loads(m.read_text())
        if isinstance(data, dict) and isinstance(data.get("config"), str):
            return data["config"]
    except (ValueError, UnicodeDecodeError, OSError):
        pass
    return out.name


def prepare_run_folder(out: Path, fresh: bool, name: str | None = None, link: Path | None = None, log=print):
    """Create (or, with `fresh`, clean) the run folder `out` (resolved) of config `name`, and lock
    it; returns the lock (release it with `unlock`). `link`: the path as given, before symlinks
    were followed. Refuses to write into a folder attnlab did not create or one of another config,
    and to clean the current folder, one of its parents, home or root."""
    link = link or out
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if out == out.parent or out == home or (fresh and (out == cwd or out in cwd.parents)):
        raise UnsafePath(f"the run folder {out} is {'root' if out == out.parent else 'your home' if out == home else 'the current folder or one of its parents'}; "
                         f"choose a new folder with out_dir or --out")
    fix = "choose another out_dir (or --out), or delete it yourself"
    if out.exists():
        if not out.is_dir():
            raise UnsafePath(f"the run folder {out} is a file; choose a new folder with out_dir or --out")
        owner = marker_name(out)
        if owner is None and any(p.name != LOCK for p in out.iterdir()):  # a lock alone: a run that just began
            raise UnsafePath(f"{out} exists and was not created by attnlab run (no {MARKER} file); choose a new or "
                             f"empty folder (out_dir / --out), or delete it yourself")
        if owner is not None and name is not None and owner != name:
            raise UnsafePath(f"{out} is the run folder of config '{owner}', not of '{name}'; {fix}")
        if fresh and owner is not None and link.is_symlink():
            raise UnsafePath(f"--fresh: the run folder {link} is a symlink (to {out}); --fresh does not follow "
                             f"links, so {fix}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnsafePath(f"cannot create the run folder {out} ({os.strerror(e.errno) if e.errno else e}); "
                         f"choose another out_dir or --out") from None
    lock = lock_folder(out, log)
    try:
        if fresh and marker_name(out) is not None:
            kept = clean(out)
            if kept:
                log(f"[attnlab] --fresh: kept {len(kept)} file(s) attnlab did not write: "
                    f"{', '.join(str(p.relative_to(out)) for p in kept[:5])}{' ...' if len(kept) > 5 else ''}")
        else:
            stale = sweep_temps(out)
            if stale:
                log(f"[attnlab] removed {stale} half-written temp folder(s) in {out}")
        if marker_name(out) is None:
            write_text_atomic(out / MARKER, json.dumps({"config": name, "written_by": "attnlab run",
                                                        "note": "attnlab run --fresh may clean this folder"}) + "\n")
    except BaseException:
        unlock(lock)
        raise
    return lock


def lock_folder(out: Path, log=print) -> int:
    """Take the folder's advisory lock (non-blocking); RunLocked names the holder's pid."""
    import fcntl

    path = out / LOCK
    if path.is_symlink():
        raise UnsafePath(f"{path} is a symlink; remove it (attnlab writes its lock there)")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLocked(f"{out} is in use by another attnlab run (pid {holder}); wait for it to finish, or give "
                        f"this run another out_dir / --out") from None
    before = os.pread(fd, 32, 0).decode(errors="replace").strip()
    if before.isdigit() and int(before) != os.getpid():
        log(f"[attnlab] took over the lock of pid {before} (no longer running) on {out}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock(lock: int | None) -> None:
    if lock is not None:
        os.close(lock)  # closing the descriptor releases the flock


def clean(out: Path) -> list[Path]:
    """Delete what attnlab wrote under `out` (never following symlinks, never the marker or lock);
    returns the files left because attnlab did not write them."""
    kept: list[Path] = []
    _clean(out, out, kept, None)
    return kept


def _clean(folder: Path, root: Path, kept: list[Path], manifest) -> bool:
    """Clean `folder`; `manifest`: (folder of the nearest manifest above, the files it lists).
    True when the folder ended up empty."""
    if (folder / TEMP_MARK).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        return True
    if folder != root and (folder / MANIFEST).is_file():
        try:
            manifest = (folder, set(read_manifest(folder)) | {MANIFEST})
        except DamagedFile:
            pass
    for p in sorted(folder.iterdir()):
        ours = manifest is not None and str(p.relative_to(manifest[0])) in manifest[1]
        if p.is_symlink():
            kept.append(p)
        elif p.is_dir():
            if _clean(p, root, kept, manifest):
                p.rmdir()
        elif folder == root and p.name in (MARKER, LOCK):
            continue
        elif ours or p.name in WRITTEN or p.name.startswith(WRITTEN_PREFIXES) or _temp_of_written(p.name):
            p.unlink()
        else:
            kept.append(p)
    return folder != root and not any(folder.iterdir())


def _temp_of_written(name: str) -> bool:
    """Whether `name` is the temp an interrupted write_text_atomic left of a file in WRITTEN."""
    m = TEXT_TEMP.match(name)
    return m is not None and m.group("name") in WRITTEN


def inside(root: Path, *parts: str) -> Path:
    """root/parts..., refused if it would leave root."""
    p = root.joinpath(*parts).resolve()
    if p != root and root not in p.parents:
        raise UnsafePath(f"{'/'.join(parts)} would be written outside the run folder {root}")
    return p
