"""A benchmark's results file: its rows plus the command that made them and the conditions it ran in.

Every number the README or docs publish from a benchmark is rendered from such a file
(`python -m attnlab.docs render`), so the file must say how to make it again: `command` is the
exact command line (with OMP_NUM_THREADS when set), and `conditions` records what timings depend
on: the date, torch and its thread count, the CPU count and the machine's load average at the
start and at the end (other jobs sharing the cores show up there).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

_START = {"load": os.getloadavg() if hasattr(os, "getloadavg") else None, "t": time.time()}


def command() -> str:
    """The command line that ran this script, as a user would type it from the repository root."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "BENCH_THREADS") if k in os.environ)
    script = os.path.relpath(Path(sys.argv[0]).resolve(), Path(__file__).resolve().parent.parent)
    return " ".join(x for x in (env, "python", shlex.join([script, *sys.argv[1:]])) if x)


def conditions() -> dict:
    import torch

    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(_START["t"])),
            "seconds": round(time.time() - _START["t"], 1), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_avg_start": _START["load"], "load_avg_end": os.getloadavg() if hasattr(os, "getloadavg") else None}


def write_result(path: str | os.PathLike, payload: dict, note: str | None = None) -> Path:
    """Write {command, conditions, note, **payload} atomically to `path` and return it."""
    from attnlab.atomic import write_json_atomic

    rec = {"command": command(), "conditions": conditions(), **({"note": note} if note else {}), **payload}
    return write_json_atomic(path, rec)
