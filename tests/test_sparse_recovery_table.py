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
META = {"model": "m", "length": 2048, "block_size": 32, "granularity": "row", "text": "valid.txt",
        "split": "validation", "gate": {"steps": 2000, "target": "mass"}, "train_sequences": [0, 1],
        "train_text": "/a/valid.txt", "recover": {"steps": 32, "lr": 0.001, "r": 8}}


def _dense():
    return {"selector": "dense", "budget": {}, "sequences": {
        s: {"tokens": TOKENS, "nll": (2 + 0.1 * int(s)) * TOKENS, "density": 1.0} for s in SEQS}}


def _point(sel: str, extra, density=lambda i: 0.275) -> dict:
    """NLL per token = dense + extra(i) on sequence i."""
    return {"selector": sel, "budget": {"top_k": 7}, "sequences": {
        s: {"tokens": TOKENS, "nll": (2 + 0.1 * int(s) + extra(int(s))) * TOKENS, "density": density(int(s))}
        for s in SEQS}}


def _write(root: Path, rel: str, data: dict) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _setup(root: Path, dense_shift: float = 0.0, before_meta=None, quest_before=lambda i: 0.09,
           quest_density=lambda i: 0.275):
    unrecovered = {k: v for k, v in META.items() if k != "recover"}
    before = {"meta": {**unrecovered, **(before_meta or {})},
              "points": {"dense": _dense(), "learned:top_k=7": _point("learned", lambda i: 0.08),
                         "quest:top_k=7": _point("quest", quest_before)}}
    _write(root, f"{RESULTS}/sparse_gate_ablation/ref.json", before)
    dense = _dense()
    dense["sequences"]["110"]["nll"] += dense_shift
    after = {"meta": META, "points": {"dense": dense,
                                      "learned:top_k=7": _point("learned", lambda i: 0.04 + 0.001 * (i % 2)),
                                      "quest:top_k=7": _point("quest", lambda i: 0.06, quest_density)},
             "recovery": {k: {"kl_first": 0.05, "kl_last": 0.03} for k in ("learned:top_k=7", "quest:top_k=7")}}
    _write(root, f"{DIR}/rec.json", after)


def _row(table: str, first: str) -> list[str]:
    return next([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                if line.startswith(f"| {first} |"))


def test_recovery_is_rendered_against_the_same_point_unrecovered_with_the_share_of_the_gap_it_closes(tmp_path):
    _setup(tmp_path)
    table = sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref")
    assert table.startswith("4 validation sequences of 2048 tokens (sequences 109, 110, 111, 112)")
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


def test_the_gap_closed_is_left_blank_where_the_selector_had_no_gap_to_dense_outside_noise(tmp_path):
    _setup(tmp_path, quest_before=lambda i: 0.01 * (-1) ** i)     # before: +/- around dense, mean 0
    row = _row(sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref"), "quest")
    assert row[6].startswith("–") and "within noise" in row[3]


def test_selectors_are_compared_directly_only_when_every_sequence_keeps_the_same_density(tmp_path):
    # the same mean density as learned's 0.275, but not sequence by sequence: another selection
    _setup(tmp_path, quest_density=lambda i: 0.275 + 0.01 * (-1) ** i)
    ref = json.loads((tmp_path / RESULTS / "sparse_gate_ablation/ref.json").read_text())
    ref["points"]["quest:top_k=7"] = _point("quest", lambda i: 0.09, lambda i: 0.275 + 0.01 * (-1) ** i)
    _write(tmp_path, f"{RESULTS}/sparse_gate_ablation/ref.json", ref)
    table = sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref")
    assert _row(table, "quest") and "learned against quest" not in table


@pytest.mark.parametrize("meta, message", [({"block_size": 64}, "block_size 64"),
                                           ({"granularity": "block"}, "granularity block"),
                                           ({"gate": {"steps": 2000, "target": "peak"}}, "another recipe")])
def test_an_unrecovered_point_read_with_other_settings_is_refused(tmp_path, meta, message):
    _setup(tmp_path, before_meta=meta)
    with pytest.raises(DataError, match=message):
        sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref")


def test_an_unrecovered_point_of_another_density_is_refused(tmp_path):
    _setup(tmp_path)
    ref = json.loads((tmp_path / RESULTS / "sparse_gate_ablation/ref.json").read_text())
    ref["points"]["quest:top_k=7"] = _point("quest", lambda i: 0.09, lambda i: 0.3)
    _write(tmp_path, f"{RESULTS}/sparse_gate_ablation/ref.json", ref)
    with pytest.raises(DataError, match="another density"):
        sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref")


def test_a_recovery_run_on_the_held_out_split_is_labelled_held_out(tmp_path):
    _setup(tmp_path)
    rec = json.loads((tmp_path / DIR / "rec.json").read_text())
    rec["meta"] = {**rec["meta"], "split": "heldout"}
    _write(tmp_path, f"{DIR}/rec.json", rec)
    assert sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref").startswith("4 held-out sequences")


def test_a_recovered_selector_that_keeps_more_pairs_is_compared_only_as_such(tmp_path):
    _setup(tmp_path, quest_density=lambda i: 0.28)          # Quest keeps more pairs on every sequence
    ref = json.loads((tmp_path / RESULTS / "sparse_gate_ablation/ref.json").read_text())
    ref["points"]["quest:top_k=7"] = _point("quest", lambda i: 0.09, lambda i: 0.28)
    _write(tmp_path, f"{RESULTS}/sparse_gate_ablation/ref.json", ref)
    table = sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref")
    assert "same density on every sequence" not in table
    line = next(x for x in table.splitlines() if x.startswith("- learned (density 0.275) against quest (density 0.280)"))
    assert "better on 4/4" in line
    assert not any(x.startswith("- quest (density") for x in table.splitlines())


def test_with_a_density_the_recovered_selectors_are_read_at_it_between_their_budgets(tmp_path):
    _setup(tmp_path)
    run = json.loads((tmp_path / DIR / "rec.json").read_text())
    run["points"]["learned:top_k=5"] = {**_point("learned", lambda i: 0.10, lambda i: 0.225), "budget": {"top_k": 5}}
    run["recovery"]["learned:top_k=5"] = {"kl_first": 0.06, "kl_last": 0.05}
    _write(tmp_path, f"{DIR}/rec.json", run)
    ref = json.loads((tmp_path / RESULTS / "sparse_gate_ablation/ref.json").read_text())
    ref["points"]["learned:top_k=5"] = {**_point("learned", lambda i: 0.12, lambda i: 0.225), "budget": {"top_k": 5}}
    _write(tmp_path, f"{RESULTS}/sparse_gate_ablation/ref.json", ref)
    table = sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref|0.25")
    line = next(x for x in table.splitlines() if x.startswith("- learned against dense"))
    # halfway between 0.225 (+0.10) and 0.275 (+0.04 / +0.041): +0.0705 nats per token on average
    assert line.startswith(f"- learned against dense: {100 * (math.exp(0.0705) - 1):+.1f}%")
    # one selector at two budgets is never compared with itself, and the equal-density reading replaces the
    # comparisons against a selector that keeps more pairs
    assert "learned (density" not in table and "keeps more pairs" not in table
    with pytest.raises(DataError, match="both sides of density 0.1"):
        sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref|0.1")


def test_without_a_density_one_selector_at_two_budgets_is_not_compared_with_itself(tmp_path):
    _setup(tmp_path)
    for rel, extra in ((f"{DIR}/rec.json", 0.10), (f"{RESULTS}/sparse_gate_ablation/ref.json", 0.12)):
        data = json.loads((tmp_path / rel).read_text())
        data["points"]["learned:top_k=5"] = {**_point("learned", lambda i: extra, lambda i: 0.225), "budget": {"top_k": 5}}
        if "recovery" in data:                                  # the recovery run's training record
            data["recovery"]["learned:top_k=5"] = {"kl_first": 0.06, "kl_last": 0.05}
        _write(tmp_path, rel, data)
    lines = sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref").splitlines()
    assert any(x.startswith("- learned (density 0.225) against quest (density 0.275)") for x in lines)
    assert not any(x.startswith("- learned (density 0.225) against learned") for x in lines)


@pytest.mark.parametrize("arg, message", [
    ("rec", r"expected FILE\|BEFORE,BEFORE"), ("rec|sparse_gate_ablation/ref|0.25|x", r"expected FILE\|BEFORE,BEFORE"),
    ("rec|sparse_gate_ablation/ref|more", "a density in"),
    ("rec|sparse_recovery/rec", "is a recovery run .meta.recover.: its points are recovered"),
    ("../sparse_gate_ablation/ref|sparse_gate_ablation/ref", "is not a recovery run")])
def test_a_recovery_block_with_a_wrong_argument_is_one_line_naming_the_fix(tmp_path, arg, message):
    # the recovery run named as its own 'before' rendered every gap as closed by 0%, before == after
    _setup(tmp_path)
    with pytest.raises(DataError, match=message):
        sparse_recovery(tmp_path, arg)


def test_unrecovered_runs_at_another_block_size_are_named_as_such(tmp_path):
    _setup(tmp_path, before_meta={"block_size": 64})
    data = json.loads((tmp_path / RESULTS / "sparse_gate_ablation" / "ref.json").read_text())
    data["points"] = {"dense": data["points"]["dense"]}       # a block-64 run has no top_k 7
    _write(tmp_path, f"{RESULTS}/sparse_gate_ablation/ref.json", data)
    with pytest.raises(DataError, match="sparse_gate_ablation/ref at block_size 64, the recovery run at 32"):
        sparse_recovery(tmp_path, "rec|sparse_gate_ablation/ref")
