"""Every published number is rendered from a committed results file that says how it was made."""

import json

import pytest

from attnlab import docs
from attnlab.errors import DataError
from attnlab.published import md_tables, render_one, table_cell


def test_every_rendered_block_matches_its_results_file_and_every_results_file_has_its_command():
    problems = docs.stale()
    assert not problems, "\n".join(problems)


def test_the_check_fails_on_a_hand_edited_number_and_on_a_results_file_without_a_command(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "r.md").write_text("# r\n\n| method | PPL |\n|---|---:|\n| lora | 3.50 |\n")
    (tmp_path / "README.md").write_text(
        "LoRA reads <!-- render:cell:docs/results/r.md|PPL|lora -->3.40<!-- /render --> here.\n")
    problems = docs.stale(tmp_path)
    assert any("README.md" in p and "cell:docs/results/r.md|PPL|lora" in p for p in problems)
    assert any("docs/results/r.md: records no command" in p for p in problems)
    assert docs.render(tmp_path) == [tmp_path / "README.md"]
    assert "<!-- render:cell:docs/results/r.md|PPL|lora -->3.50<!-- /render -->" in (tmp_path / "README.md").read_text()
    (tmp_path / "docs" / "results" / "r.md").write_text("# r\n\nCommand: `attnlab run r.yaml`\n\n| method | PPL |\n"
                                                        "|---|---:|\n| lora | 3.50 |\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "b.json").write_text(json.dumps({"rows": []}))
    assert [p.split(":")[0] for p in docs.stale(tmp_path)] == ["benchmarks/results/b.json"]


def test_an_included_file_is_the_file_and_a_multi_line_block_sits_on_its_own_lines(tmp_path):
    (tmp_path / "c.yaml").write_text("a: 1\nb: [2, 3]\n")
    text = docs.render_text("x\n<!-- render:include:c.yaml -->old<!-- /render -->\n", tmp_path)
    assert text == "x\n<!-- render:include:c.yaml -->\n```yaml\na: 1\nb: [2, 3]\n```\n<!-- /render -->\n"


def test_cells_are_found_by_column_name_occurrence_and_row_keys():
    text = ("| method | decoding | acc | Δ | acc |\n|---|---|---:|---:|---:|\n"
            "| **m** | greedy | 0.1 | +1 | 0.3 |\n| `m` | T=1 | 0.2 | +2 | 0.4 |\n")
    assert md_tables(text)[0][0] == ["method", "decoding", "acc", "Δ", "acc"]
    assert table_cell(text, "acc", "m") == "0.1"
    assert table_cell(text, "acc#2", "m>T=1") == "0.4"
    with pytest.raises(DataError, match="no table"):
        table_cell(text, "acc", "other")


def test_an_unknown_renderer_or_a_missing_results_file_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="unknown renderer 'nope'"):
        render_one("nope:x", tmp_path)
    with pytest.raises(DataError, match="missing.md: no such results file"):
        render_one("cell:missing.md|PPL|lora", tmp_path)
    (tmp_path / "README.md").write_text("<!-- render:cell:missing.md|PPL|lora -->1<!-- /render -->\n")
    assert docs.stale(tmp_path) == ["README.md: cannot render: missing.md: no such results file (a rendered block "
                                    "names it)"]


def test_a_table_of_chosen_rows_keeps_each_cell_as_the_report_prints_it(tmp_path):
    (tmp_path / "r.md").write_text("| method | decoding | acc | Δ |\n|---|---|---:|---:|\n| m | greedy | 1/4 | – |\n"
                                   "| m | T=1, top-k=off | 2/4 | +25 pp |\n")
    out = render_one("table:r.md|acc;Δ|m>T=1, top-k=off=>m, sampled;m>greedy", tmp_path)
    assert out.splitlines() == ["| arm | acc | Δ |", "|---|---:|---:|", "| m, sampled | 2/4 | +25 pp |",
                                "| m, greedy | 1/4 | – |"]


def test_the_sparse_goals_verdict_is_computed_from_the_rows_quest_and_learned_judged_window_shown(tmp_path):
    def row(part, mode, variant, tokens, cpu_s, **kw):
        return {"part": part, "mode": mode, "variant": variant, "tokens": tokens, "cpu_s": cpu_s, "wall_s": cpu_s, **kw}

    rows = [row("attention", "inference", "dense-sdpa", 4096, 1.0), row("attention", "inference", "quest", 4096, 0.40),
            row("attention", "inference", "learned", 4096, 0.50), row("attention", "inference", "window", 4096, 0.90),
            row("decode", "decode", "dense-sdpa", 1024, 0.05), row("decode", "decode", "dense-sdpa", 4096, 0.10),
            row("decode", "decode", "quest", 4096, 0.07), row("decode", "decode", "learned", 4096, 0.075)]
    (tmp_path / "s.json").write_text(json.dumps({"meta": {"command": "x"}, "rows": rows}))
    lines = render_one("sparse_speed_goals:s.json", tmp_path).splitlines()
    fwd = next(x for x in lines if "≤ 0.45×" in x)
    assert "quest 0.40×, learned 0.50×, window 0.90×" in fwd and fwd.endswith("| ✘ learned (0.50×, by 0.05); ✔ the rest |")
    dec = next(x for x in lines if "≥ 1.3×" in x)         # tokens/s ratio = dense's seconds / the variant's
    assert "quest 1.43×, learned 1.33×; ceiling if attention cost nothing ≈ 2.00×" in dec and dec.endswith("| ✔ |")
    assert next(x for x in lines if "≥ 1.8×" in x).endswith("| not in this run | – |")


def test_the_decode_goals_are_judged_on_equal_caches_and_the_cache_alone_is_not_credited_to_sparsity(tmp_path):
    def row(variant, cache, cpu_s, tokens=4096, **kw):
        return {"part": "decode", "mode": "decode", "variant": variant, "tokens": tokens, "cache": cache,
                "cpu_s": cpu_s, **kw}

    rows = [row("dense-sdpa", "dynamic", 0.13), row("dense-sdpa (growing cache)", "growing", 0.10),
            row("ideal (dense, 513 keys)", "growing", 0.05, keys=513), row("quest", "growing", 0.10),
            row("learned", "growing", 0.05), row("quest (dynamic cache)", "dynamic", 0.12),
            row("dense-sdpa", "dynamic", 0.06, 1024), row("dense-sdpa (growing cache)", "growing", 0.05, 1024),
            row("quest", "growing", 0.0625, 1024), row("learned", "growing", 0.05, 1024)]
    (tmp_path / "s.json").write_text(json.dumps({"meta": {"command": "x"}, "rows": []}))
    (tmp_path / "d.json").write_text(json.dumps({"meta": {"command": "y"}, "rows": rows}))
    lines = render_one("sparse_speed_goals:s.json|d.json", tmp_path).splitlines()
    dec = next(x for x in lines if "≥ 1.3×" in x)
    assert "same GrowingCache: quest 1.00×, learned 2.00× (ideal 2.00×) (513 of 4096 keys a step, density 0.13)" in dec
    assert "end to end vs dense on DynamicCache: quest 1.30×, learned 2.60× (of which the cache alone: dense 1.30×)" in dec
    assert dec.endswith("| ✘ quest (1.00×, by 0.30); ✔ the rest (equal caches) |")      # quest's 1.30× is the cache's
    short = next(x for x in lines if "at 1024 context (no goal)" in x)
    assert "same GrowingCache: quest 0.80×, learned 1.00×" in short and short.endswith("| – |")
    assert next(x for x in lines if "≥ 1.8×" in x).endswith("| not in this run | – |")


def test_no_document_has_a_table_row_of_typed_results_outside_a_rendered_block():
    typed = {}
    for doc in docs.documents():
        rows = docs.typed_rows(doc.read_text())
        if rows:
            typed[str(doc.relative_to(docs.ROOT))] = rows
    assert not typed, "\n".join(f"{name}: {len(rows)} typed result rows (render them from a results file with "
                                 f"<!-- render:... -->, or remove the numbers):\n  " + "\n  ".join(rows)
                                 for name, rows in typed.items())


def test_a_typed_result_row_is_found_and_thresholds_rendered_blocks_and_code_are_not():
    text = ("| goal | measured |\n|---|---|\n| time ≤ 0.45× SDPA, ≥ 75% sparse | <!-- render:x -->0.38×<!-- /render --> |\n"
            "| lora | 2.750 |\n| r = 8, lengths 256 / 512, version 0.4.13 | 921,600 |\n"
            "```\n| inside a fence | 1.5× |\n```\n| window | 0.42× (ideal 0.22×) |\n| quest | +17.7% |\n")
    assert docs.typed_rows(text) == ["| lora | 2.750 |", "| window | 0.42× (ideal 0.22×) |", "| quest | +17.7% |"]


def test_a_table_column_can_be_relabelled_and_a_json_table_formats_each_field(tmp_path):
    (tmp_path / "r.md").write_text("| method | PPL |\n|---|---:|\n| m | 2.75 |\n\n| method | PPL |\n|---|---:|\n| m | 2.18 |\n")
    assert render_one("table:r.md|PPL=>test PPL;PPL@2=>transfer PPL|m", tmp_path).splitlines()[::2] == [
        "| arm | test PPL | transfer PPL |", "| m | 2.75 | 2.18 |"]
    (tmp_path / "b.json").write_text(json.dumps({"command": "x", "rows": [{"p": "a", "gib": 1.014, "x": 1.032}]}))
    assert render_one("json_table:b.json|p=>preset;gib:.2f GiB;x:.1f", tmp_path).splitlines() == [
        "| preset | gib | x |", "|---|---:|---:|", "| a | 1.01 GiB | 1.0 |"]


def test_a_json_table_column_can_be_a_template_over_the_row_and_a_missing_field_is_one_clear_error(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"command": "x", "rows": [{"k": 5, "n": 32, "lo": 0.0691, "hi": 0.3178}]}))
    assert render_one("json_table:b.json|{k}/{n}=>right;[{lo:.3f}, {hi:.3f}]=>95% interval", tmp_path).splitlines() == [
        "| right | 95% interval |", "|---|---|", "| 5/32 | [0.069, 0.318] |"]
    with pytest.raises(DataError, match="b.json: a row has no field 'm'"):
        render_one("json_table:b.json|{k}/{m}=>right", tmp_path)


def test_an_lm_eval_results_file_renders_its_metrics_without_stderrs_and_names_a_missing_task(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"command": "attnlab lm-eval", "n-samples": {"t": {"original": 60, "effective": 4}},
                                                 "results": {"t": {"alias": "t", "word_perplexity,none": 27.9885,
                                                                   "word_perplexity_stderr,none": "N/A",
                                                                   "exact_match,strict-match": 0.0}}}))
    assert render_one("lm_eval:r.json|t", tmp_path) == "word perplexity 27.99, exact match (strict-match) 0 (4 of 60 examples)"
    with pytest.raises(DataError, match="no results for task 'u' \\(it has t\\)"):
        render_one("lm_eval:r.json|u", tmp_path)


# Numbers in prose that are not results: the proposal's own claims, goals, and arithmetic on a
# rendered table. Everything else that looks like a result must be rendered (or be words + a link).
PROSE_ALLOWED = {
    "docs/factorized_attention.md": {"5.806", "5.608", "4.324", "4.188", "5.395", "5.292",  # the proposal's claims
                                     "1.15×"},                                                # the step-time goal
    "docs/sparse_attention.md": {"0.7×", "1.3×", "1.8×", "0.001",    # goals: memory, decode speed-ups, KL per token
                                 "1.25×"},                           # GrowingCache's growth factor (a design constant)
}


def test_no_document_types_a_result_number_in_prose_outside_a_rendered_block():
    typed = {}
    for doc in docs.documents():
        name = str(doc.relative_to(docs.ROOT))
        left = [n for n in docs.typed_prose(doc.read_text()) if n not in PROSE_ALLOWED.get(name, ())]
        if left:
            typed[name] = left
    assert not typed, "\n".join(f"{name}: typed result numbers in prose (render them inline with <!-- render:... -->, "
                                 f"or say it in words with a link to the rendered row): {', '.join(nums)}"
                                 for name, nums in typed.items())


def test_a_typed_number_in_prose_is_found_across_a_line_break_and_goals_code_links_and_blocks_are_not():
    text = ("Quest is +1.18%\n[+0.47, +1.89] worse, 1.34× SDPA, test PPL 4.140 (the base).\n\n"
            "Goal ≤ 0.45× SDPA, `lr: 0.003`, [paper](https://arxiv.org/abs/2505.12345), version 0.4.13,\n"
            "learned <!-- render:x -->+0.7% [-0.3, +1.6]<!-- /render --> at 0.25, 2.5% sparse.\n\n"
            "| table | 1.50× |\n\n```\nfenced 3.141\n```\n")
    assert docs.typed_prose(text) == ["+1.18% [+0.47, +1.89]", "1.34×", "4.140"]


def test_the_sparse_comparison_parts_are_pieces_of_the_full_comparison_and_an_unknown_part_is_one_clear_error():
    root, arg = docs.ROOT, "4096|learned|quest|0.2"
    full = render_one(f"sparse_compare:{arg}", root)
    assert full.startswith(render_one(f"sparse_compare:{arg}|brief", root) + " (t-interval "
                           + render_one(f"sparse_compare:{arg}|t", root))
    assert f"better on {render_one(f'sparse_compare:{arg}|better', root).replace(' of ', '/')}" in full
    with pytest.raises(DataError, match="unknown part 'nope'"):
        render_one(f"sparse_compare:{arg}|nope", root)
    with pytest.raises(DataError, match="compares no 'nobody' against 'quest'"):
        render_one("sparse_compare:4096|nobody|quest|0.2", root)


def test_a_sparse_point_renders_its_change_density_and_kl_and_the_gate_kl_is_the_mean_over_layers():
    root = docs.ROOT
    data = json.loads((root / "benchmarks/results/sparse_quality_4096.json").read_text())
    layers = data["gate"]["layers"].values()
    before, after = (sum(r[w]["heldout"] for r in layers) / len(layers) for w in ("before", "after"))
    assert render_one("sparse_gate_kl:4096|heldout", root) == f"{before:.1f} to {after:.2f}"
    assert render_one("sparse_gate_kl:4096|heldout|after", root) == f"{after:.2f}"
    change = render_one("sparse_point:4096|oracle:top_k=8", root)
    assert change.startswith(render_one("sparse_point:4096|oracle:top_k=8|point", root) + " [")
    assert render_one("sparse_point:4096|oracle:top_k=8|density", root) == \
        f"{data['points']['oracle:top_k=8']['summary']['density']:.2f}"
    with pytest.raises(DataError, match="no summarised point 'oracle:top_k=99'"):
        render_one("sparse_point:4096|oracle:top_k=99", root)


def test_a_sparse_points_seconds_are_its_summed_forward_times_over_the_dense_ones_on_the_sequences_both_read():
    root = docs.ROOT
    data = json.loads((root / "benchmarks/results/sparse_gate_ablation/lowrank16_b32.json").read_text())
    mine, dense = (data["points"][k]["sequences"] for k in ("lowrank:top_k=5", "dense"))
    want = sum(r["seconds"] for r in mine.values()) / sum(dense[i]["seconds"] for i in mine)
    got = render_one("sparse_point:sparse_gate_ablation/lowrank16_b32|lowrank:top_k=5|seconds", root)
    assert got == f"{want:.1f}×"


def test_a_json_value_is_read_along_its_dotted_path_and_a_missing_field_names_where_it_stops(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"command": "x", "hidden": {"rms_mean": 1.954, "abs_max": 53.96}}))
    assert render_one("json_value:s.json|hidden.rms_mean|.1f", tmp_path) == "2.0"
    assert render_one("json_value:s.json|hidden.abs_max|.0f", tmp_path) == "54"
    with pytest.raises(DataError, match="s.json: no field 'hidden.rms' \\(stops at 'rms'\\)"):
        render_one("json_value:s.json|hidden.rms|.1f", tmp_path)


def test_the_memory_per_token_clause_divides_the_peaks_by_layers_and_tokens_in_fp32_numbers(tmp_path):
    from attnlab.published.sparse_verdict import FLOOR, MEMORY_VARIANTS

    peaks = {"dense-sdpa": 64.0, FLOOR: 48.0, **{v: 64.0 for v in MEMORY_VARIANTS}}   # MiB at 1024 tokens, 2 layers
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "sparse_memory.json").write_text(json.dumps(
        {"command": "x", "layers": 2, "rows": [{"variant": v, "tokens": 1024, "peak_MiB": m} for v, m in peaks.items()]}))
    assert render_one("sparse_memory_goal:per_token", tmp_path) == (   # 64 MiB / 2048 = 32,768 bytes = 8,192 numbers
        "64 MiB / (2 layers × 1024 tokens) ≈ 32.8 KB ≈ 8,192 fp32 numbers, the floor at ≈ 6,144; the ≈ 2,048 numbers")


@pytest.mark.parametrize("expr", ["table:r.md", "cell:r.md|PPL", "json_value:r.json", "run_tables:r.json",
                                  "json_table:r.json"])
def test_a_malformed_block_argument_is_one_line_naming_the_block_not_a_traceback(tmp_path, expr):
    (tmp_path / "r.md").write_text("Command: `x`\n\n| method | PPL |\n|---|---:|\n| lora | 3.50 |\n")
    (tmp_path / "r.json").write_text(json.dumps({"command": "x", "rows": [1]}))
    (tmp_path / "README.md").write_text(f"<!-- render:{expr} -->1<!-- /render -->\n")
    [problem] = docs.stale(tmp_path)
    assert problem.startswith(f"README.md: cannot render: render:{expr}: ") and "\n" not in problem, problem


def test_a_block_reading_a_file_outside_the_results_folders_still_needs_its_command(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r.json").write_text(json.dumps({"meta": ["not a mapping"], "ppl": 3.5}))
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "bad.json").write_text("not json")
    (tmp_path / "README.md").write_text("<!-- render:json_value:runs/r.json|ppl|.1f -->3.5<!-- /render -->\n")
    assert sorted(p.split(":")[0] for p in docs.stale(tmp_path)) == ["docs/results/bad.json", "runs/r.json"]


def test_a_block_without_its_closing_marker_is_refused_and_the_text_after_it_is_never_rendered_away(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "r.md").write_text("Command: `x`\n\n| method | PPL |\n|---|---:|\n| lora | 3.50 |\n")
    text = ("A <!-- render:cell:docs/results/r.md|PPL|lora -->3.40<!-- /render--> the user's sentence.\n\n"
            "B <!-- render:cell:docs/results/r.md|PPL|lora -->3.50<!-- /render -->\n")
    (tmp_path / "README.md").write_text(text)
    assert docs.stale(tmp_path) == ["README.md: cannot render: line 1: a rendered block opened here has no "
                                    "`<!-- /render -->` before the next block (or the end); close it, so that "
                                    "rendering replaces only its body"]
    with pytest.raises(DataError, match="README.md: line 1: a rendered block"):
        docs.render(tmp_path)
    assert (tmp_path / "README.md").read_text() == text


@pytest.mark.parametrize("rel", ["/etc/hostname", "../outside.md", "link/outside.md"])
def test_a_block_naming_a_file_outside_the_repository_is_refused(tmp_path, rel):
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "outside.md").write_text("Command: `x`\n")
    (repo / "link").symlink_to(tmp_path)
    with pytest.raises(DataError, match="lies outside the repository"):
        render_one(f"include:{rel}", repo)


def test_a_kept_run_whose_keep_folder_lies_outside_the_repository_is_refused(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "c.yaml").write_text("model: tiny-gpt2\nkeep: ../kept\nmethods: [{method: frozen}]\n")
    with pytest.raises(DataError, match="keep folder a rendered block names lies outside"):
        render_one("kept_run:c.yaml", repo)


def test_a_results_report_that_is_not_utf8_is_one_line_naming_it_not_a_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "r.md").write_bytes("# r\n\nCommand: `x`\n\nPPL 3.5 \xb1 0.1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"r\.md is not UTF-8 text \(byte \d+\): save it as UTF-8"):
        docs.stale(tmp_path)
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs.stale, "__defaults__", (tmp_path,))
    assert docs.main(["check"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_results_json_that_is_not_utf8_is_named_as_such_not_as_missing_its_command(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "b.json").write_bytes('{"command": "run \xb1"}'.encode("latin-1"))
    problems = docs.stale(tmp_path)
    assert any("b.json is not UTF-8 text" in p for p in problems), problems
    assert not any("records no command" in p for p in problems), problems


def test_a_comparison_against_dense_at_a_density_is_computed_when_the_report_does_not_list_it():
    from pathlib import Path

    from attnlab.modules.sparse import quality
    from attnlab.published.sparse import _quality
    root = Path(__file__).resolve().parents[1]
    data = _quality(root, "2048")
    want = quality.compare(data, quality.complete(data), [("quest", "dense")], [0.25])[0]
    got = render_one("sparse_compare:2048|quest|dense|0.25|brief", root)
    assert got == f"{100 * want['change']:+.1f}% [{100 * want['lo']:+.1f}, {100 * want['hi']:+.1f}]"
    assert want["change"] > 0                                 # sparser than dense costs perplexity
    with pytest.raises(DataError, match="compares no 'nobody'"):
        render_one("sparse_compare:2048|nobody|dense|0.25", root)


def test_generation_samples_render_one_row_per_selector_with_pipes_and_line_breaks_kept_in_their_cell(tmp_path):
    sample = {"sequence": 117, "prompt_tail": "the song | was\nreleased",
              "dense": {"text": "a | b\nc", "tokens": [1, 2, 3]},
              "quest": {"text": "a | x", "tokens": [1, 9, 3], "same_prefix": 1, "same_as_dense": 2},
              "learned": {"text": "a | b\nc", "tokens": [1, 2, 3], "same_prefix": 3, "same_as_dense": 3}}
    (tmp_path / "s.json").write_text(json.dumps({"command": "benchmarks/sparse_samples.py --gate g", "new": 3,
                                                 "prompt": 2000, "samples": [sample],
                                                 "selection": {"block_size": 32, "top_k": 7, "granularity": "row"}}))
    text = render_one("sparse_samples:s.json", tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| selector")]
    assert rows == ["| dense | a \\| b ⏎ c | – |", "| quest | a \\| x | 1 / 2 of 3 |", "| learned | a \\| b ⏎ c | 3 / 3 of 3 |"]
    assert "“…the song \\| was ⏎ released”" in text
