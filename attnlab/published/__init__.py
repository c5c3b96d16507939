"""The renderers behind `python -m attnlab.docs`: each turns committed results files into the
Markdown a document publishes (a table, a row's cell, an included file).

A block `<!-- render:NAME:ARG -->` calls RENDERERS[NAME](root, ARG). Fields inside ARG are separated
by `|`. Every renderer reads only files committed in the repository, so rendering is deterministic:
the same files give the same text, and `python -m attnlab.docs check` compares it with what is
committed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .bench import benchmark_table, factorized_table, feature_cache_table
from .gpu import gpu_checks, gpu_sparse_table, gpu_train_table
from .sparse_ablation import gate_ablation, gate_pair
from .sparse import sparse_compare, sparse_goal, sparse_speed, sparse_table, sparse_text
from .tables import (bench_ratio, cell, column_range, gguf, include, md_tables, ratio, run_change, run_tables,
                     run_wall, table, table_cell)

RENDERERS = {"include": include, "cell": cell, "ratio": ratio, "range": column_range, "run_tables": run_tables,
             "run_change": run_change, "run_wall": run_wall, "gguf": gguf, "table": table, "bench_ratio": bench_ratio,
             "benchmarks": benchmark_table, "factorized_bench": factorized_table, "feature_cache": feature_cache_table, "sparse_goal": sparse_goal,
             "sparse_table": sparse_table, "sparse_compare": sparse_compare, "sparse_text": sparse_text,
             "sparse_speed": sparse_speed, "gpu_train": gpu_train_table, "gpu_sparse": gpu_sparse_table, "gpu_checks": gpu_checks,
             "gate_ablation": gate_ablation, "gate_pair": gate_pair}


def render_one(expr: str, root: Path) -> str:
    """Run the renderer an `NAME:ARG` (or `NAME`) expression names."""
    name, _, arg = expr.partition(":")
    if name not in RENDERERS:
        raise DataError(f"unknown renderer {name!r} in a rendered block (known: {', '.join(RENDERERS)})")
    return RENDERERS[name](root, arg)
