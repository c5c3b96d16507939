"""The recovery table: each recovered point against the same point unrecovered, read from another
results file on the same sequences, and the recovered selectors against each other at equal density."""

import json
import math
from pathlib import Path

import pytest

from attnlab.errors import DataError
from attnlab.published.sparse_recovery import DIR, RESULTS, sparse_recovery

TOKENS = 100
SEQS = ("109", "110", "111", "112")
META = {"model": "m", "length": 2048, "block_size": 32, "text": "valid.txt", "split": "validation",
        "recover": {"steps": 32, "lr": 0.001, "r": 8}}


def _dense():
    return {"selector": "dense", "budget": {}, "sequences": {
        s: {"tokens": TOKENS, "nll": (2 + 0.1 * int(s)) * TOKENS, "density": 1.0} for s in SEQS}}


def _point(sel: str, extra, density: float = 0.275) -> dict:
    """NLL per token = dense + extra(i) on sequence i."""
    return {"selector": sel, "budget": {"top_k": 7}, "sequences": {
        s: {"tokens": TOKENS, "nll": (2 + 0.1 * int(s) + extra(int(s))) * TOKENS, "density": density} for s in SEQS}}


def _write(root: Path, rel: str, data: dict) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _setup(root: Path, dense_shift: float = 0.0):
    before = {"meta": META, "points": {"dense": _dense(), "learned:top_k=7": _point("learned", lambda i: 0.08),
                                       "quest:top_k=7": _point("quest", lambda i: 0.09)}}
    _write(root, f"{RESULTS}/sparse_gate_ablation/ref.json", before)
    dense = _dense()
    dense["sequences"]["110"]["nll"] += dense_shift
    after = {"meta": META, "points": {"dense": dense,
                                      "learned:top_k=7": _point("learned", lambda i: 0.04 + 0.001 * (i % 2)),
                                      "quest:top_k=7": _point("quest", lambda i: 0.06)},
             "recovery": {k: {"kl_first": 0.05, "kl_last": 0.03} for k in ("learned:top_k=7", "quest:top_k=7")}}
    _write(root, f"{DIR}/rec.json", after)


def _row(table: str, first: str) -> list[str]:
    return next([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                if line.startswith(f"| {first} |"))


def test_recovery_is_rendered_against_the_same_point_unrecovered_with_the_share_of_the_gap_it_closes(tmp_path):
    _setup(tmp_path)
    table = sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref")
    row = _row(table, "quest")
    assert row[3].startswith(f"{100 * (math.exp(0.09) - 1):+.1f}%")          # before, vs dense
    assert row[4].startswith(f"{100 * (math.exp(0.06) - 1):+.1f}%")          # after, vs dense
    assert row[5].startswith(f"{100 * (math.exp(-0.03) - 1):+.1f}%")         # after vs before
    assert row[6] == f"{100 * (1 - (math.exp(0.06) - 1) / (math.exp(0.09) - 1)):.0f}%"
    # the two top-7 selectors keep the same pairs: compared directly, the gate better on every sequence
    line = next(x for x in table.splitlines() if x.startswith("- learned against quest"))
    assert "better on 4/4" in line and "within noise" not in line


def test_a_recovery_run_read_on_other_tokens_than_its_reference_is_refused(tmp_path):
    _setup(tmp_path, dense_shift=5.0)
    with pytest.raises(DataError, match="dense NLL of sequence 110"):
        sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref")


def test_a_recovered_point_without_an_unrecovered_reference_is_named(tmp_path):
    _setup(tmp_path)
    ref = json.loads((tmp_path / RESULTS / "sparse_gate_ablation/ref.json").read_text())
    del ref["points"]["quest:top_k=7"]
    _write(tmp_path, f"{RESULTS}/sparse_gate_ablation/ref.json", ref)
    with pytest.raises(DataError, match="unrecovered point quest:top_k=7"):
        sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref")
