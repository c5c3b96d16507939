"""Finished work kept outside the run folder, so a run can span fresh checkouts (`keep:` / `--keep DIR`).

A run folder (runs/<name>/) holds weights, optimizer checkpoints and the feature cache: megabytes
to gigabytes, never committed, and gone when a session starts from a fresh checkout. A run that
takes longer than one session would then start over each time. `keep: DIR` in the config (or
`attnlab run --keep DIR`) names a second folder, meant to be committed, into which the run mirrors
the small JSON that its numbers come from, each file written atomically the moment it is final:

    DIR/<arm>/seed<k>/result.json           a finished cell: the run folder's result.json, byte for byte
    DIR/<arm>/seed<k>/sweep/<point>.json    a finished point of a sweep: its validation loss, steps,
                                            best step, whether it stopped early, its curves (no weights)

A rerun reads them back before computing anything. A cell's result.json is used only if its
`spec` (everything its numbers depend on, built by attnlab/experiment.py) equals the config's;
a point's summary only if its `mark` (base, data and plug-in fingerprints, and the point's own
training settings) equals the point's. Anything else is refused with one line naming what
differs: an edited arm must become a new arm (or the kept folder be removed by hand), never
silently mixed with numbers from other settings.

Validation chooses among the points as before (the kept validation losses are the ones the choice
was always made on). The chosen point's weights are needed for the test evaluation but are not
kept; when they are not in memory (the point was trained in an earlier session), only that point
is trained again. Training is deterministic given (seed, step): the data order is a seeded
permutation per epoch, the plug-in is initialised after `seed_everything(seed)`, and the learning
rate at step s depends on s and the configured total only. So the retrained weights at the kept
best step are the chosen ones, and the retraining stops there (`stop_at`) rather than running on
for the `patience` validations that early stopping needed to see the curve flatten. Its
validation loss is stored beside the kept one, so a difference (e.g. another thread count's
summation order) is visible in the result, not assumed away.

A run so loses at most the training in progress when its session ends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import write_json_atomic, write_text_atomic
from .errors import ConfigError

POINT_TRAIN = ("steps", "tokens", "seconds", "resumed_from", "best_step", "stopped_early", "val_history")


def differences(kept: dict | None, want: dict, nested: bool = False) -> list[str]:
    """The keys on which two specs differ (`nested`: one level down in mappings, 'point.lr')."""
    kept = kept or {}
    out = []
    for k in sorted(set(kept) | set(want)):
        a, b = kept.get(k), want.get(k)
        if a == b:
            continue
        if nested and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        else:
            out.append(k)
    return out


def read_result(path: Path, spec: dict, fix: str, log=print) -> dict | None:
    """A finished cell's result.json if it was computed with `spec`; None if absent or damaged
    (recomputed); ConfigError, naming what differs and `fix`, if it belongs to other settings."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log(f"[attnlab] {path} is damaged (not JSON); recomputing this cell")
        return None
    if not isinstance(cell, dict) or not isinstance(cell.get("spec"), dict):
        raise ConfigError(f"{path} is not a result attnlab wrote (no spec); move it out of the way, or name another "
                          f"folder")
    if cell["spec"] != spec:
        diff = differences(cell["spec"], spec)
        raise ConfigError(f"{path} was computed with other settings ({', '.join(diff)} differ); {fix}")
    return cell


class Keep:
    """The kept folder of one dataset of a run (None: nothing is kept; every method is a no-op)."""

    FIX = ("restore the arm's settings, or add the change as a new arm (a config of its own: its own keep folder; "
           "or remove that kept file by hand to recompute it)")

    def __init__(self, root, main: bool = True):
        self.root = Path(os.path.expanduser(str(root))) if root else None   # '~' as the run folder reads it
        self.main = main   # only the main process writes

    def _cell(self, name: str, seed: int) -> Path:
        return self.root / name / f"seed{seed}"

    def result(self, name: str, seed: int, spec: dict, log=print) -> dict | None:
        if self.root is None:
            return None
        path = self._cell(name, seed) / "result.json"
        cell = read_result(path, spec, self.FIX, log)
        if cell is not None:
            log(f"[attnlab] {name} seed {seed}: done earlier, read from the kept {path}")
        return cell

    def save_result(self, name: str, seed: int, cell: dict) -> None:
        """Mirror a finished cell; a kept result of other settings that appeared meanwhile (another run
        sharing the folder) is refused, never overwritten, and one of the same settings is left as it is."""
        if self.root is not None and self.main:
            path = self._cell(name, seed) / "result.json"
            if read_result(path, cell["spec"], self.FIX, log=lambda *_: None) is None:
                write_json_atomic(path, cell)

    def point(self, name: str, seed: int, label: str, mark: dict) -> dict | None:
        """A finished sweep point's summary ({row, n_trainable, train}), or None if not kept."""
        if self.root is None:
            return None
        path = self._cell(name, seed) / "sweep" / f"{label}.json"
        if not path.is_file():
            return None
        try:
            kept = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None   # damaged: the point is trained again and the file rewritten
        if not isinstance(kept, dict) or not isinstance(kept.get("mark"), dict):
            raise ConfigError(f"{path} is not a sweep point attnlab kept (no mark); move it out of the way, or name "
                              f"another keep folder")
        if kept.get("mark") != mark:
            raise ConfigError(f"{path} was trained with other settings "
                              f"({', '.join(differences(kept.get('mark'), mark, nested=True))} differ); {self.FIX}")
        return kept

    def save_point(self, name: str, seed: int, label: str, mark: dict, row: dict, n_trainable: int | None = None,
                   tr=None) -> None:
        """Mirror one finished point: its sweep row, and how its training went (no weights)."""
        if self.root is None or not self.main or self.point(name, seed, label, mark) is not None:
            return   # (point() refuses a point of other settings that another run kept meanwhile)
        train = None
        if tr is not None:
            train = {k: getattr(tr, k) for k in POINT_TRAIN}
            train["history"] = [[h["step"], h["loss"]] for h in tr.history]   # the loss curve, as the cell keeps it
        write_text_atomic(self._cell(name, seed) / "sweep" / f"{label}.json",   # one line: a few kB, not tens
                          json.dumps({"mark": mark, "row": row, "n_trainable": n_trainable, "train": train}))


def train_result(kept: dict):
    """The TrainResult of a kept point (what the cell reports about its training)."""
    from .train import TrainResult

    t = kept["train"]
    history = [{"step": s, "loss": x} for s, x in t["history"]]
    return TrainResult(**{**t, "seconds": float(t["seconds"]), "history": history})


class Reached(Exception):
    """Raised out of train() by `stop_at` once the wanted step is validated; carries the weights."""

    def __init__(self, val: float, state: dict):
        super().__init__(f"reached the kept best step (validation loss {val:.4f})")
        self.val, self.state = val, state


def stop_at(val_fn, plugin, step: int, eval_every: int, steps: int):
    """Wrap a training's val_fn (which train() calls at eval_every, 2 eval_every, ... and at the
    last step, counting from step 0) so that the training stops at `step` with that step's weights
    and validation loss (raised as `Reached`)."""
    calls = [0]

    def wrapped():
        calls[0] += 1
        val = val_fn()
        if min(calls[0] * eval_every, steps) == step:
            raise Reached(val, {k: v.clone() for k, v in plugin.state_dict().items()})
        return val

    return wrapped


def check_folder(root, run_folder: Path | None = None) -> None:
    """Refuse, before any model is loaded, a keep folder that could not take the first finished
    cell: a file (or a link to one, or to nothing), below a file, or in a folder that is not writable;
    and one inside the run folder (git ignores it, and --fresh deletes it with the run folder)."""
    if not root:
        return
    p = Path(os.path.abspath(os.path.expanduser(str(root))))
    if run_folder is not None and (p.resolve() == Path(run_folder).resolve()
                                   or p.resolve().is_relative_to(Path(run_folder).resolve())):
        raise ConfigError(f"keep: {root} lies inside the run folder {run_folder}, which --fresh deletes and git "
                          f"ignores; name a folder outside it (e.g. docs/results/<name>/cells)")
    if p.is_symlink() and not p.exists():
        raise ConfigError(f"keep: {root} is a symlink to nothing; point it at a folder, or name another keep folder")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"keep: {root} is a file, not a folder; name a folder (it is created if missing)")
    up = p
    while not up.exists():
        up = up.parent
    if not up.is_dir():
        raise ConfigError(f"keep: {root} lies below {up}, which is a file; name a folder elsewhere")
    if not os.access(up, os.W_OK | os.X_OK):
        raise ConfigError(f"keep: {up} is not writable; make it writable, or name another keep folder")


def fresh_check(root) -> None:
    """`--fresh` deletes the run folder's results, never the kept ones (they are the user's files)."""
    if root and Path(root).is_dir() and any(Path(root).rglob("*.json")):
        raise ConfigError(f"--fresh: {root} (keep:) holds finished results of this run; remove it yourself "
                          f"(git rm -r {root}) to start over, or name another keep folder")
