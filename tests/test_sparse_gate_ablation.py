"""The gate ablation table: each distilled gate merged with the reference selectors on the validation
sequences and compared at equal density against dense, Quest and the baseline gate."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from attnlab.errors import DataError
from attnlab.modules.sparse import quality
from attnlab.published.sparse_ablation import DIR, gate_ablation, merged

_spec = importlib.util.spec_from_file_location(
    "sparse_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_quality.py")
sq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sq)

TOKENS = 100
SEQS = ("109", "110", "111", "112")
META = {"model": "m", "length": 2048, "block_size": 64, "text": "valid.txt", "split": "validation",
        "train_sequences": list(range(12)), "gate": {"rows": 512, "steps": 2000, "lr": 0.003, "dim": 64}}


def _run(selectors: dict, train: int = 12) -> dict:
    """Dense at NLL 2 + 0.1·i per token on sequence i; each selector's NLL falls linearly with density
    from dense + 1 (density 0) to dense (density 1), plus its offset (a function of i)."""
    points = {"dense": {"selector": "dense", "budget": {}, "sequences": {
        i: {"tokens": TOKENS, "nll": (2 + 0.1 * int(i)) * TOKENS, "density": 1.0} for i in SEQS}}}
    for sel, off in selectors.items():
        for k, d in ((1, 0.2), (2, 0.26), (4, 0.37)):
            points[f"{sel}:top_k={k}"] = {"selector": sel, "budget": {"top_k": k}, "sequences": {
                i: {"tokens": TOKENS, "nll": (2 + 0.1 * int(i) + (1 - d) + off(int(i))) * TOKENS, "density": d}
                for i in SEQS}}
    return {"meta": {**META, "train_sequences": list(range(train))}, "points": points}


def _write(root: Path, name: str, data: dict) -> None:
    (root / DIR).mkdir(parents=True, exist_ok=True)
    (root / DIR / f"{name}.json").write_text(json.dumps(data))


def _row(table: str, first: str) -> list[str]:
    return next([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                if line.startswith(f"| {first} |"))


def test_a_gate_better_than_quest_by_a_known_margin_is_rendered_with_that_margin_outside_noise(tmp_path):
    _write(tmp_path, "reference", _run({"quest": lambda i: 0.0, "oracle": lambda i: -0.1}))
    _write(tmp_path, "n12", _run({"learned": lambda i: 0.0}))
    _write(tmp_path, "n96", _run({"learned": lambda i: -0.02 - 0.01 * (i % 2)}, train=96))
    table = gate_ablation(tmp_path, "0.25|n12")
    row = _row(table, "n96")
    assert row[1].startswith("96 seq, 512 rows, 2000 steps")
    assert row[3].startswith(f"{100 * (math.exp(-0.025) - 1):+.1f}%") and "within noise" not in row[3]
    assert row[4].startswith(f"{100 * (math.exp(-0.025) - 1):+.1f}%")       # n12 equals quest here
    assert _row(table, "n12")[3].startswith("+0.0%") and "within noise" in _row(table, "n12")[3]
    # against dense at density 0.25: the line between budgets 0.2 and 0.26, i.e. NLL dense + 0.75 - 0.1
    assert _row(table, "oracle")[2].startswith(f"{100 * (math.exp(0.65) - 1):+.1f}%")


def test_another_reference_such_as_the_oracle_at_block_32_is_a_row_of_its_own(tmp_path):
    _write(tmp_path, "reference", _run({"quest": lambda i: 0.0, "oracle": lambda i: -0.1}))
    _write(tmp_path, "n12", _run({"learned": lambda i: 0.0}))
    b32 = _run({"oracle": lambda i: -0.2}, train=0)
    b32["meta"]["block_size"] = 32
    _write(tmp_path, "reference_b32", b32)
    g32 = _run({"learned": lambda i: -0.05})
    g32["meta"]["block_size"] = 32
    _write(tmp_path, "n12_b32", g32)
    table = gate_ablation(tmp_path, "0.25|n12")
    row = _row(table, "oracle·b32")
    assert row[1] == "no training, block 32"
    assert row[3].startswith(f"{100 * (math.exp(-0.2) - 1):+.1f}%")        # against quest (block 64)
    row = _row(table, "n12_b32")                                            # a gate at block 32, at equal density
    assert row[1].endswith("row, block 32") and row[3].startswith(f"{100 * (math.exp(-0.05) - 1):+.1f}%")


def test_the_same_text_read_from_another_worktree_path_is_the_same_text():
    ref, other = _run({"quest": lambda i: 0.0}), _run({"learned": lambda i: 0.0})
    ref["meta"]["text"], other["meta"]["text"] = "/work/shared/data/wikitext-2/valid.txt", "/w/x/shared/data/wikitext-2/valid.txt"
    assert any(k.startswith("learned:") for k in merged(ref, other, "learned")["points"])
    other["meta"]["text"] = "/work/shared/data/other/valid.txt"
    with pytest.raises(DataError, match="text"):
        merged(ref, other, "learned")


def test_a_gate_read_on_other_sequences_or_text_than_the_reference_is_refused(tmp_path):
    ref = _run({"quest": lambda i: 0.0})
    other = _run({"learned": lambda i: 0.0})
    other["meta"]["split"] = "heldout"
    with pytest.raises(DataError, match="split"):
        merged(ref, other, "n12")
    other = _run({"learned": lambda i: 0.0})
    other["points"]["dense"]["sequences"]["110"]["nll"] += 5
    with pytest.raises(DataError, match="dense NLL of sequence 110"):
        merged(ref, other, "n12")


def test_a_comparison_against_dense_uses_the_dense_nll_of_each_sequence():
    data = _run({"quest": lambda i: 0.01 * i})
    (c,) = quality.compare(data, list(SEQS), [("quest", "dense")], [0.26])
    assert c["change"] == pytest.approx(math.exp(0.74 + 0.01 * 110.5) - 1)
    assert c["a_better_on"] == 0 and c["sequences"] == 4


def test_top_k_sets_the_top_k_budgets_and_leaves_every_window_and_mass_budget():
    args = lambda top_k, bs=64: type("A", (), {"top_k": top_k, "block_size": bs})  # noqa: E731
    assert sq.selector_budgets("quest", args([1, 2])) == [{"top_k": 1}, {"top_k": 2}]
    assert sq.selector_budgets("oracle", args([5, 7, 11], 32)) == [{"top_k": 5}, {"top_k": 7}, {"top_k": 11}]
    assert sq.selector_budgets("window", args([1], 32))[0] == {"window": 32, "sinks": 4}
    assert len(sq.selector_budgets("learned-mass", args([1]))) == 4
    assert sq.selector_budgets("learned", args(None)) == [{"top_k": k} for k in (1, 2, 4, 8)]


def test_headline_top_k_sets_the_metrics_budget_of_the_top_k_selectors_only():
    args = type("A", (), {"headline_top_k": 7})
    assert sq.headline("learned", args) == {"top_k": 7} and sq.headline("oracle", args) == {"top_k": 7}
    assert sq.headline("window", args) == sq.HEADLINE["window"]
    assert sq.headline("quest", type("A", (), {"headline_top_k": None})) == sq.HEADLINE["quest"]
    # top-k 0 (only the three fixed blocks) is a budget like any other: read as 0, not as "unset"
    assert sq.headline("learned", type("A", (), {"headline_top_k": 0})) == {"top_k": 0}


def test_window_sets_the_window_budgets_in_tokens_and_leaves_the_top_k_ones():
    args = type("A", (), {"top_k": None, "block_size": 32, "window": [320]})
    assert sq.selector_budgets("window", args) == [{"window": 320, "sinks": 4}]
    assert sq.selector_budgets("quest", args) == [{"top_k": k} for k in (1, 2, 4, 8)]


def test_a_gsm8k_style_jsonl_distillation_text_is_each_problem_then_its_solution(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"question": "Q1?", "answer": "A1"}\n\n{"question": "Q2?", "answer": "A2"}\n')
    assert sq.read_text(str(f)) == "Q1?\nA1\n\nQ2?\nA2"
    assert "Python" in sq.read_text("python_docs")


def test_a_pair_of_rows_is_one_line_at_equal_density_and_an_unknown_row_names_the_table(tmp_path):
    from attnlab.published.sparse_ablation import gate_pair

    _write(tmp_path, "reference", _run({"quest": lambda i: 0.0, "oracle": lambda i: -0.1}))
    b32 = _run({"oracle": lambda i: -0.2}, train=0)
    b32["meta"]["block_size"] = 32
    _write(tmp_path, "reference_b32", b32)
    _write(tmp_path, "n12", _run({"learned": lambda i: 0.0}))
    assert gate_pair(tmp_path, "0.25|oracle·b32|oracle").startswith(f"{100 * (math.exp(-0.1) - 1):+.1f}%")
    assert "\n" not in gate_pair(tmp_path, "0.25|n12|quest")
    with pytest.raises(DataError, match="no row named n99"):
        gate_pair(tmp_path, "0.25|n99|quest")
