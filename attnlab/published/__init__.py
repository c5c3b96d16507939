r"""The renderers behind `python -m attnlab.docs`: each turns committed results files into the
Markdown a document publishes (a table, a row's cell, an included file).

A block `<!-- render:NAME:ARG -->` calls RENDERERS[NAME](root, ARG). Fields inside ARG are separated
by `|`; inside a Markdown table cell write them `\|` (GFM's escaped pipe, so the cell stays one
cell), which `render_one` reads as `|`. Every renderer reads only files committed in the repository,
so rendering is deterministic: the same files give the same text, and `python -m attnlab.docs check`
compares it with what is committed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .bench import (benchmark_table, factorized_goal, factorized_recompute, factorized_table, feature_cache_table,
                    sparse_kernel_table, sparse_memory_table)
from .gpu import gpu_checks, gpu_sparse_table, gpu_train_table
from .kept import kept_run, kept_sweep
from .sparse_ablation import gate_ablation, gate_pair
from .sparse import (sparse_compare, sparse_gate_kl, sparse_goal, sparse_road,
                     sparse_granularity, sparse_point, sparse_speed, sparse_table, sparse_text)
from .sparse_goals import sparse_speed_goals
from .sparse_recovery import sparse_recovery
from .sparse_verdict import (sparse_compare_at, sparse_flex, sparse_kernel_goal, sparse_memory_goal, sparse_next_budget,
                             sparse_samples, sparse_targets)
from .tables import (bench_ratio, cell, column_range, gguf, include, json_table, json_value, lm_eval, md_tables, ratio,
                     run_change, run_tables, run_wall, table, table_cell)

RENDERERS = {"include": include, "cell": cell, "ratio": ratio, "range": column_range, "run_tables": run_tables,
             "run_change": run_change, "run_wall": run_wall, "gguf": gguf, "table": table, "bench_ratio": bench_ratio,
             "benchmarks": benchmark_table, "factorized_bench": factorized_table, "feature_cache": feature_cache_table, "sparse_goal": sparse_goal,
             "sparse_table": sparse_table, "sparse_compare": sparse_compare, "sparse_text": sparse_text, "sparse_road": sparse_road,
             "sparse_speed": sparse_speed, "gpu_train": gpu_train_table, "gpu_sparse": gpu_sparse_table, "gpu_checks": gpu_checks,
             "gate_ablation": gate_ablation, "sparse_speed_goals": sparse_speed_goals,
             "factorized_goal": factorized_goal, "factorized_recompute": factorized_recompute,
             "json_table": json_table, "sparse_memory_table": sparse_memory_table,
             "sparse_kernel_table": sparse_kernel_table, "kept_run": kept_run, "kept_sweep": kept_sweep,
             "sparse_memory_goal": sparse_memory_goal, "sparse_kernel_goal": sparse_kernel_goal,
             "sparse_next_budget": sparse_next_budget, "sparse_targets": sparse_targets, "sparse_flex": sparse_flex,
             "sparse_compare_at": sparse_compare_at, "lm_eval": lm_eval,
             "sparse_point": sparse_point, "json_value": json_value, "sparse_gate_kl": sparse_gate_kl,
             "sparse_granularity": sparse_granularity, "gate_pair": gate_pair,
             "sparse_samples": sparse_samples, "sparse_recovery": sparse_recovery}


def render_one(expr: str, root: Path) -> str:
    """Run the renderer an `NAME:ARG` (or `NAME`) expression names."""
    name, _, arg = expr.replace("\\|", "|").partition(":")
    if name not in RENDERERS:
        raise DataError(f"unknown renderer {name!r} in a rendered block (known: {', '.join(RENDERERS)})")
    fn = RENDERERS[name]
    try:
        return fn(root, arg)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, ZeroDivisionError) as e:
        if isinstance(e, DataError):
            raise
        usage = next((x.strip() for x in (fn.__doc__ or "").splitlines() if x.strip()), "see its docstring")
        raise DataError(f"render:{expr}: {type(e).__name__}: {' '.join(str(e).split())[:160]}; check the argument "
                        f"against {name}'s form ({usage[:160]}) and the file it reads") from None
