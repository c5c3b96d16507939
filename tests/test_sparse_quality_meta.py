"""The sparse quality benchmark's settings: a rerun with the JSON's own settings goes on, a rerun
with a gate other than the one its learned points read is refused, and so is a selector that
duplicates another at the granularity asked for."""

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sparse_quality", ROOT / "benchmarks" / "sparse_quality.py")
sq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sq)

BLOCK_JSON = ROOT / "benchmarks" / "results" / "sparse_quality_2048_block.json"


def _args(**kw) -> argparse.Namespace:
    """The gate options at their defaults (benchmarks/sparse_quality.py), with `kw` changed."""
    base = dict(gate_rows=512, gate_steps=2000, gate_lr=3e-3, gate_dim=64, gate_target="peak", gate_unit=None,
                gate_quest=False, granularity="row")
    return argparse.Namespace(**{**base, **kw})


def _rerun(data: dict, args) -> dict:
    """The meta a rerun of the JSON's last command builds (its settings, the gate's from `args`)."""
    meta = {k: v for k, v in copy.deepcopy(data["meta"]).items() if k != "commands"}
    meta.update(command=data["meta"]["commands"][-1], gate=sq.gate_settings(args))
    return meta


def test_the_committed_block_json_without_a_gate_can_be_rerun_with_its_own_command():
    data = json.loads(BLOCK_JSON.read_text())
    assert data["meta"]["granularity"] == "block" and "gate" not in data
    assert not any(p["selector"].startswith("learned") for p in data["points"].values())
    meta = _rerun(data, _args(granularity="block"))
    assert meta["gate"]["unit"] == "block"                       # what a rerun records now
    out = sq.merge_meta(data, meta, BLOCK_JSON)
    assert out["gate"] == meta["gate"]                           # no gate was read: the new settings stand


def test_a_json_whose_learned_points_read_a_row_distilled_gate_refuses_a_block_distilled_one():
    data = json.loads(BLOCK_JSON.read_text())
    data["points"]["learned:top_k=1"] = {"selector": "learned", "budget": {"top_k": 1}, "sequences": {}}
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(gate\)"):
        sq.merge_meta(data, _rerun(data, _args(granularity="block")), BLOCK_JSON)
    data = json.loads(BLOCK_JSON.read_text())
    data["gate"] = {"teacher_seconds": 1.0}                      # distilled, before any learned point was read
    with pytest.raises(SystemExit, match=r"other settings \(gate\)"):
        sq.merge_meta(data, _rerun(data, _args(granularity="block")), BLOCK_JSON)
    data = json.loads(BLOCK_JSON.read_text())
    data["gate"] = {"teacher_seconds": 1.0}
    sq.merge_meta(data, _rerun(data, _args(granularity="block", gate_unit="row")), BLOCK_JSON)   # the same gate


def test_the_query_head_oracle_is_refused_by_name_at_block_granularity_and_read_only_when_named(tmp_path):
    with pytest.raises(SystemExit, match="oracle-qhead at --granularity block is the oracle itself"):
        sq.main(["--granularity", "block", "--selectors", "oracle", "oracle-qhead", "--out", str(tmp_path / "q.json")])
    assert "oracle-qhead" not in sq.DEFAULT_SELECTORS and "oracle" in sq.DEFAULT_SELECTORS
    # the committed runs' commands (no --selectors) reproduce as they were, at either granularity


def test_a_validation_run_without_heldout_is_refused_before_it_reads_a_held_out_sequence(tmp_path):
    # --split validation reads the sequences just before the last --heldout: with the default 4 at 2048
    # tokens that would be 121-128, inside the 16 held-out sequences (117-132) the docs report
    with pytest.raises(SystemExit, match="name --heldout"):
        sq.main(["--length", "2048", "--split", "validation", "--validation", "8", "--out", str(tmp_path / "v.json")])
    assert not (tmp_path / "v.json").exists()


def test_a_window_of_no_tokens_is_refused_naming_the_flag():
    args = _args(block_size=32, window=[320, 0], selectors=["window"], train=0, length=2048)
    with pytest.raises(SystemExit, match="--window 0"):
        sq.check_flags(args)
    sq.check_flags(_args(block_size=32, window=[320], selectors=["window"], train=0, length=2048))   # accepted
