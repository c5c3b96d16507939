"""The sparse verdict's cells are computed from the results they rest on, and a renderer's fields can
sit in a Markdown table cell."""

import json

from attnlab import docs
from attnlab.published import md_tables, render_one


def _write(root, name, rows):
    (root / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (root / "benchmarks" / "results" / name).write_text(json.dumps({"command": "x", "layers": 4, "rows": rows}))


def test_an_escaped_pipe_keeps_a_rendered_block_inside_one_table_cell(tmp_path):
    (tmp_path / "r.md").write_text("| method | PPL |\n|---|---:|\n| lora | 3.50 |\n")
    doc = "| goal | measured |\n|---|---|\n| PPL | <!-- render:cell:r.md\\|PPL\\|lora -->old<!-- /render --> |\n"
    out = docs.render_text(doc, tmp_path)
    assert "\\|lora -->3.50<!-- /render --> |" in out
    rows = md_tables(out.replace("\\|", "¦"))[0][1]                 # GFM splits cells on unescaped pipes only
    assert len(rows[0]) == 2


def test_the_memory_verdict_marks_each_variant_and_blames_the_floor_only_when_all_miss(tmp_path):
    def rows(window, quest, learned, floor):
        return [{"variant": v, "tokens": n, "peak_MiB": p * n} for n in (1024, 2048)
                for v, p in (("dense-sdpa", 100), ("window 256 + 4 sinks", window), ("quest top-4", quest),
                             ("learned top-4", learned), ("floor (attention keeps nothing)", floor))]

    _write(tmp_path, "sparse_memory.json", rows(101, 102, 101, 82))
    assert render_one("sparse_memory_goal:met", tmp_path) == ("✘ — unreachable by any attention kernel in this body "
                                                             "(floor 0.82×)")
    assert render_one("sparse_memory_goal:gap", tmp_path) == "missed at all 2 lengths, by 0.31–0.32 (1.01–1.02× measured)"
    assert render_one("sparse_memory_goal:measured", tmp_path).startswith("window 1.01 / 1.01×, quest top-4 1.02 / 1.02×")
    _write(tmp_path, "sparse_memory.json", rows(65, 102, 101, 50))
    assert render_one("sparse_memory_goal:met", tmp_path) == "✔ window; ✘ quest top-4, learned top-4"
    assert render_one("sparse_memory_goal:gap", tmp_path) == "met at 2 of 2 lengths (the leanest variant 0.65×)"


def test_the_time_verdict_is_the_median_over_layers_of_each_variants_ratio_to_sdpa(tmp_path):
    rows = []
    for layer, dense in ((2, 1.0), (15, 2.0), (28, 4.0)):
        for v, x in (("dense-sdpa", 1.0), ("window 256 + 4 sinks", 0.3), ("quest top-2", 1.2),
                     ("learned top-2 (distilled gate)", 0.35 if layer != 28 else 0.9)):
            rows.append({"variant": v, "mode": "inference", "layer": layer, "cpu_s": dense * x, "density": 0.14})
    _write(tmp_path, "sparse_kernel.json", rows)
    assert render_one("sparse_kernel_goal:met", tmp_path) == "✔ window, learned; ✘ quest"
    assert render_one("sparse_kernel_goal:summary", tmp_path) == ("met by the window (0.30×), missed by the per-row "
                                                                 "selectors (0.35–1.20×)")


def test_the_flex_table_divides_each_kernel_by_the_dense_row_of_its_own_run(tmp_path):
    _write(tmp_path, "flex.json", [
        {"part": "flex", "tokens": 4096, "variant": "dense-sdpa", "wall_s": 0.5, "cpu_s": 0.25},
        {"part": "flex", "tokens": 4096, "variant": "quest (flex)", "wall_s": 0.3, "cpu_s": 0.15, "first_call_s": 16.4},
        {"part": "flex", "tokens": 4096, "variant": "quest (gather)", "wall_s": 0.2, "cpu_s": 0.1}])
    out = render_one("sparse_flex:benchmarks/results/flex.json", tmp_path).splitlines()
    assert out[2:] == ["| 4096 | quest (flex) | 0.60 (0.60) | 16 |", "| 4096 | quest (gather) | 0.40 (0.40) | – |"]


def test_the_v3_rows_judge_the_ten_percent_goal_at_2048_tokens_only_and_beating_quest_at_every_length(tmp_path):
    from pathlib import Path

    from attnlab.published.sparse import v3_rows

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "sparse_quality.py").symlink_to(root / "benchmarks" / "sparse_quality.py")
    data = json.loads((root / "benchmarks/results/sparse_quality_2048_b32.json").read_text())
    for length in (2048, 4096):     # the same per-sequence records, labelled as read at each length
        data["meta"]["length"] = length
        (tmp_path / f"benchmarks/results/sparse_quality_{length}_b32.json").write_text(json.dumps(data))
    at2048, at4096 = v3_rows(tmp_path, "2048_b32"), v3_rows(tmp_path, "4096_b32")
    assert "≤ +10%" in at2048[0] and "≤ +10%" not in at4096[0] and "no goal at this length" in at4096[0]
    assert all("beats Quest outside noise" in rows[1] for rows in (at2048, at4096))


def test_the_recovered_row_marks_the_five_percent_goal_from_the_gate_at_a_quarter_of_the_pairs(tmp_path):
    from pathlib import Path

    from attnlab.published.sparse import RECOVERED, _quality, recovered_row

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "benchmarks" / "results" / "sparse_recovery").mkdir(parents=True)
    (tmp_path / "benchmarks" / "sparse_quality.py").symlink_to(root / "benchmarks" / "sparse_quality.py")
    data = json.loads((root / f"benchmarks/results/{RECOVERED.format('2048_b32')}.json").read_text())
    out = tmp_path / f"benchmarks/results/{RECOVERED.format('2048_b32')}.json"
    out.write_text(json.dumps(data))
    row = recovered_row(tmp_path, "2048_b32")
    gate = float(row.split("| gate ")[1].split("%")[0])
    assert row.endswith(f"≤ +5% (point estimate) {'✔' if gate <= 5 else '✘'} |") and "Quest +" in row
    for p in data["points"].values():            # the gate made worse by 5% in nats on every sequence
        if p["selector"] == "learned":
            for s in p["sequences"].values():
                s["nll"] += 0.05 * s["tokens"]
    out.write_text(json.dumps(data))
    _quality.cache_clear()                          # the same root, its file rewritten
    assert recovered_row(tmp_path, "2048_b32").endswith("≤ +5% (point estimate) ✘ |")


def test_a_quality_run_is_read_and_summarised_once_per_render(tmp_path):
    from pathlib import Path

    from attnlab.published.sparse import _quality

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "sparse_quality.py").symlink_to(root / "benchmarks" / "sparse_quality.py")
    data = json.loads((root / "benchmarks/results/sparse_quality_2048_b32.json").read_text())
    (tmp_path / "benchmarks/results/sparse_quality_2048_b32.json").write_text(json.dumps(data))
    assert _quality(tmp_path, "2048_b32") is _quality(tmp_path, "2048_b32")   # the bootstrap runs once, not per cell


def test_the_road_is_the_gates_share_of_the_log_perplexity_gap_from_quest_to_the_oracle(tmp_path):
    from pathlib import Path

    import pytest

    from attnlab.errors import DataError
    from attnlab.published.sparse import _quality, sparse_road

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "sparse_quality.py").symlink_to(root / "benchmarks" / "sparse_quality.py")
    data = json.loads((root / "benchmarks/results/sparse_quality_2048_b32.json").read_text())
    out = tmp_path / "benchmarks/results/sparse_quality_9_b32.json"

    def shift(selector_nats):      # set every point's NLL per token to dense + the selector's nats
        dense = data["points"]["dense"]["sequences"]
        for p in data["points"].values():
            for si, r in p["sequences"].items():
                if p["selector"] in selector_nats:
                    r["nll"] = (dense[si]["nll"] / dense[si]["tokens"] + selector_nats[p["selector"]]) * r["tokens"]
        out.write_text(json.dumps(data))
        _quality.cache_clear()

    shift({"quest": 0.20, "oracle": 0.04, "learned": 0.12})
    assert sparse_road(tmp_path, "9_b32|0.25") == "50%"                        # halfway in nats
    shift({"quest": 0.20, "oracle": 0.04, "learned": 0.24})
    assert sparse_road(tmp_path, "9_b32|0.25") == f"{100 * -0.04 / 0.16:.0f}%"  # behind Quest: negative
    shift({"quest": 0.04, "oracle": 0.04, "learned": 0.04})
    with pytest.raises(DataError, match="no road"):
        sparse_road(tmp_path, "9_b32|0.25")
