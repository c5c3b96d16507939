"""The sparse_granularity renderer: the block-shared run against the row-wise run at equal density,
on the sequences both read, refused when the two runs did not read the same text."""

import json

import pytest

from attnlab.errors import DataError
from attnlab.published import render_one

META = {"model": "m", "length": 8, "block_size": 4, "text_tokens": 100, "sequences": 12}


def run(tmp_path, name, text, points):
    folder = tmp_path / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"meta": {**META, "text": text, "command": "x"}, "points": points}))


def point(selector, per_seq):
    return {"selector": selector, "budget": {}, "sequences": {
        s: {"tokens": 10, "nll": nll, "density": dens, "correct": 5, "kl": 0.0, "agree": 5} for s, (dens, nll) in per_seq.items()}}


def points(quest_nll, dense_nll=20.0, seqs=("10", "11", "12")):
    return {"dense": point("dense", {s: (1.0, dense_nll) for s in seqs}),
            "quest:top_k=1": point("quest", {s: (0.2, quest_nll + i) for i, s in enumerate(seqs)}),
            "quest:top_k=2": point("quest", {s: (0.5, quest_nll - 2 + i) for i, s in enumerate(seqs)})}


def test_the_block_run_is_compared_with_the_row_run_on_the_sequences_both_read(tmp_path):
    run(tmp_path, "sparse_quality_8.json", "/a/valid.txt", points(30.0, seqs=("10", "11", "12", "13")))
    run(tmp_path, "sparse_quality_8_block.json", "/b/valid.txt", points(31.0))     # same text, another folder
    out = render_one("sparse_granularity:8", tmp_path)
    assert "3 held-out sequences" in out and "sequences 10–12" in out
    row = next(line for line in out.splitlines() if line.startswith("| quest·block | quest |"))
    assert row.split("|")[3].strip().startswith("+10.5%")        # exp(0.1 nats per token) - 1, every sequence


def test_runs_on_different_text_are_refused(tmp_path):
    run(tmp_path, "sparse_quality_8.json", "/a/valid.txt", points(30.0))
    run(tmp_path, "sparse_quality_8_block.json", "/a/valid.txt", points(31.0, dense_nll=25.0))
    with pytest.raises(DataError, match="dense NLL differs"):
        render_one("sparse_granularity:8", tmp_path)
    run(tmp_path, "sparse_quality_8_block.json", "/a/other.txt", points(31.0))
    with pytest.raises(DataError, match="in text"):
        render_one("sparse_granularity:8", tmp_path)


def test_a_block_gate_is_read_against_its_row_self_and_against_quest_and_the_oracle_per_block(tmp_path):
    def with_gate(quest_nll, gate_nll):
        p = points(quest_nll)
        for k in ("1", "2"):
            p[f"learned:top_k={k}"] = {**p[f"quest:top_k={k}"], "selector": "learned"}
            p[f"learned:top_k={k}"]["sequences"] = {s: {**r, "nll": r["nll"] + gate_nll - quest_nll}
                                                    for s, r in p[f"quest:top_k={k}"]["sequences"].items()}
        return p

    run(tmp_path, "sparse_quality_8.json", "/a/valid.txt", with_gate(30.0, 29.0))
    run(tmp_path, "sparse_quality_8_block.json", "/a/valid.txt", with_gate(31.0, 30.0))
    lines = render_one("sparse_granularity:8|0.25", tmp_path).splitlines()
    assert lines[2] == "| A | B | density 0.25 |"
    cell = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[3].strip() for line in lines[4:]}
    assert cell[("learned·block", "learned")].startswith("+10.5%")      # +0.1 nats per token on every sequence
    assert cell[("learned·block", "quest·block")].startswith("-9.5%")   # exp(-0.1) - 1
    assert ("learned·block", "oracle·block") not in cell and ("quest·block", "window") not in cell  # neither run has them


def test_a_row_run_gate_that_the_block_run_lacks_does_not_narrow_the_sequences_compared(tmp_path):
    row = points(30.0, seqs=("10", "11", "12"))
    row["learned:top_k=1"] = point("learned", {"10": (0.2, 29.0)})      # the row run's gate read one sequence only
    run(tmp_path, "sparse_quality_8.json", "/a/valid.txt", row)
    run(tmp_path, "sparse_quality_8_block.json", "/a/valid.txt", points(31.0))
    assert "3 held-out sequences" in render_one("sparse_granularity:8", tmp_path)
