"""The sparse quality benchmark's summary: sequences, intervals and comparisons at equal density."""

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "sparse_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_quality.py")
sq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sq)

TOKENS = 100


def _row(nll_per_token: float, density: float) -> dict:
    return {"tokens": TOKENS, "nll": nll_per_token * TOKENS, "correct": 50, "kl": 1.0, "agree": 90,
            "density": density}


def _data(offsets: dict, sequences=("3", "4", "5", "6")) -> dict:
    """Dense at NLL 2.0 + 0.1·i per token on sequence i; each selector's NLL falls linearly with
    density from dense + 1 (density 0) to dense (density 1), plus its offset."""
    points = {"dense": {"selector": "dense", "budget": {}, "sequences": {}}}
    for i in sequences:
        points["dense"]["sequences"][i] = _row(2.0 + 0.1 * int(i), 1.0)
    for sel, off in offsets.items():
        for k, d in enumerate((0.1, 0.2, 0.4)):
            p = points.setdefault(f"{sel}:{k}", {"selector": sel, "budget": {"k": k}, "sequences": {}})
            for i in sequences:
                p["sequences"][i] = _row(2.0 + 0.1 * int(i) + (1 - d) + off(int(i)), d)
    return {"meta": {"length": 2048}, "points": points}


def test_a_selector_uniformly_better_at_every_density_wins_every_comparison_outside_noise(monkeypatch):
    data = _data({"learned": lambda i: -0.01 * (1 + i % 2), "quest": lambda i: 0.0})
    monkeypatch.setattr(sq, "COMPARE", [("learned", "quest")])
    monkeypatch.setattr(sq, "DENSITIES", (0.05, 0.15, 0.3, 0.5))
    sq.summarise(data)
    rows = data["comparisons"]
    assert [r["density"] for r in rows] == [0.15, 0.3]        # 0.05 and 0.5 are outside the budgets: no extrapolation
    for r in rows:
        assert r["change"] == pytest.approx(math.exp(-0.015) - 1)   # exp(mean difference) − 1
        assert r["lo"] < r["change"] < r["hi"] < 0 and r["a_better_on"] == 4 and r["sequences"] == 4


def test_equal_selectors_are_within_noise_and_their_change_against_dense_has_an_interval(monkeypatch):
    data = _data({"learned": lambda i: 0.02 * (-1) ** i, "quest": lambda i: 0.0})
    monkeypatch.setattr(sq, "COMPARE", [("learned", "quest")])
    monkeypatch.setattr(sq, "DENSITIES", (0.2,))
    sq.summarise(data)
    (r,) = data["comparisons"]
    assert r["lo"] < 0 < r["hi"] and r["a_better_on"] == 2
    s = data["points"]["quest:1"]["summary"]                  # density 0.2: NLL dense + 0.8 on every sequence
    assert s["ppl_change"] == pytest.approx(math.exp(0.8) - 1) and s["ppl_change_lo"] == pytest.approx(s["ppl_change"])
    assert "within noise" in sq.report(data)


def test_a_sequence_some_budget_has_not_read_yet_is_left_out_of_every_summary(monkeypatch):
    data = _data({"quest": lambda i: 0.0})
    del data["points"]["quest:2"]["sequences"]["6"]           # a run stopped mid-sequence
    assert sq.complete(data) == ["3", "4", "5"]
    monkeypatch.setattr(sq, "COMPARE", [])
    monkeypatch.setattr(sq, "DENSITIES", ())
    sq.summarise(data)
    assert {p["summary"]["sequences"] for p in data["points"].values()} == {3}


def test_a_selector_s_value_between_budgets_is_the_straight_line_between_them_not_the_nearest_budget():
    data = _data({"quest": lambda i: 0.0})
    for k, bump in ((0, 0.0), (1, 0.3), (2, 0.0)):            # a curve that is not a line: 0.2 sits 0.3 above it
        for r in data["points"][f"quest:{k}"]["sequences"].values():
            r["nll"] += bump * TOKENS
    got = sq.at_density(data, "quest", 0.3, ["3"])           # halfway between 0.2 and 0.4
    line = 0.5 * ((2.3 + 0.8 + 0.3) + (2.3 + 0.6))            # sequence 3: dense 2.3; (1 - d) + bump
    assert got.tolist() == pytest.approx([line])
    assert sq.at_density(data, "quest", 0.45, ["3"]) is None


def test_one_read_sequence_gives_no_interval_no_comparison_and_says_so(monkeypatch):
    data = _data({"learned": lambda i: -0.01, "quest": lambda i: 0.0}, sequences=("3",))
    monkeypatch.setattr(sq, "COMPARE", [("learned", "quest")])
    monkeypatch.setattr(sq, "DENSITIES", (0.2,))
    sq.summarise(data)
    assert data["comparisons"] == [] and data["points"]["quest:1"]["summary"]["ppl_change_lo"] is None
    assert "none: fewer than 2 sequences" in sq.report(data)


def test_a_stale_summary_is_dropped_when_no_sequence_is_complete_any_more():
    data = _data({"quest": lambda i: 0.0}, sequences=("3",))
    sq.summarise(data)
    del data["points"]["quest:0"]["sequences"]["3"]
    sq.summarise(data)
    assert not any("summary" in p for p in data["points"].values())
    assert "nothing to report" in sq.report(data)


def test_the_metrics_table_averages_only_the_sequences_every_selector_has_read():
    data = _data({"quest": lambda i: 0.0})
    sq.summarise(data)
    data["metrics"] = {"quest:top_k=2": {"3": {"attention_mse": 1e-5, "grad_cosine": 0.9},
                                         "4": {"attention_mse": 1e-5, "grad_cosine": 0.5}},
                       "oracle:top_k=2": {"3": {"attention_mse": 1e-6, "grad_cosine": 0.99}}}
    text = sq.report(data)
    assert "sequences 3:" in text and "| quest | top_k=2 | 1 | 1e-05 | 0.9000 | 0.9000 | 0/1 |" in text


def test_report_draws_the_curves_next_to_its_out_and_only_publish_touches_docs(tmp_path, monkeypatch):
    import json

    data = _data({"quest": lambda i: 0.0})
    data["meta"].update(text="/elsewhere/other.txt")
    out = tmp_path / "other_text.json"
    out.write_text(json.dumps(data))
    docs = tmp_path / "repo"
    monkeypatch.setattr(sq, "ROOT", docs)            # the repository whose docs/img must stay untouched
    sq.main(["--length", "2048", "--report", "--out", str(out)])
    assert (tmp_path / "other_text.png").is_file() and not (docs / "docs").exists()
    sq.main(["--length", "2048", "--report", "--out", str(out), "--publish"])
    assert (docs / "docs" / "img" / "sparse_quality_2048.png").is_file()
