"""`attnlab run` with a `distill:` block: the learned gate distilled from the cached teacher, saved,
reloaded, and the held-out density-vs-quality table with its equal-density comparisons in report.md."""

import json

import pytest
import torch

import attnlab
from attnlab.experiment import ConfigError, load_config, run_experiment
from attnlab.modules.sparse.quality import budgets

DISTILLED = {"name": "learned", "method": "sparse", "variant": "learned", "block_size": 8, "top_k": 1,
             "gate_dim": 8, "distill": {"sequences": 3, "rows": 16, "steps": 30, "lr": 1e-2, "heldout": 2}}
CFG = {"name": "distill", "model": "tiny-llama", "seeds": [0],
       "data": {"dataset_name": "python_docs", "n_train": 4, "n_eval": 2, "max_length": 64},
       "train": {"steps": 1, "batch_size": 2, "progress": False},
       "eval": {"batch_size": 2, "generate": False},
       "methods": [{"name": "frozen", "method": "frozen"}, DISTILLED]}


def test_the_distill_block_trains_saves_and_reports_the_gate_against_every_selector(tmp_path):
    logs = []
    res = run_experiment(CFG, out_root=tmp_path, log=logs.append)
    out = tmp_path / "distill"
    cell = next(c for c in res["cells"] if c["method"] == "learned")
    assert any("[distill] teacher pass over 3 training sequences" in line for line in logs)
    assert cell["train"]["steps"] == 30 and cell["train"]["tokens"] == 3 * 64
    gate = cell["sparse_quality"]["gate"]
    kl = [(r["before"]["train"], r["after"]["train"]) for r in gate["layers"].values()]
    assert sum(a for _, a in kl) < sum(b for b, _ in kl), "distillation should lower the gate's training KL"
    # every selector at every budget read on both held-out test blocks, beside dense
    points = cell["sparse_quality"]["points"]
    assert len(points) == 1 + sum(len(b) for s, b in budgets(8).items() if s not in ("oracle-qhead", "lowrank"))
    assert "oracle-qhead" not in {p["selector"] for p in points.values()}   # at granularity block it is the oracle
    assert all(set(p["sequences"]) == {"0", "1"} for p in points.values())
    # the saved plug-in is the distilled gate, and it reloads
    saved = out / "learned" / "seed0" / "plugin"
    assert '"distill": {' in (saved / "README.md").read_text()      # the card names the distillation
    bb = attnlab.load_backbone("tiny-llama")
    plugin = attnlab.load_plugin(bb.model, saved)
    try:
        fresh = attnlab.attach(attnlab.load_backbone("tiny-llama").model, "sparse", variant="learned",
                               block_size=8, top_k=1, gate_dim=8)
        untrained = fresh.state_dict()
        fresh.detach()
        state = plugin.state_dict()
        assert state.keys() == untrained.keys()
        assert any(not torch.equal(state[k], untrained[k]) for k in state)
    finally:
        plugin.detach()
    # report.md: the density table and the comparisons at equal density, with both intervals
    report = (out / "report.md").read_text()
    assert "## Distilled gate `learned` (seed 0): density vs quality on the held-out test split" in report
    assert "| selector | budget | density |" in report and "| oracle | top_k 1 |" in report
    assert "At equal density" in report and "| learned | quest |" in report and "t-interval 95%" in report
    assert json.loads((out / "results.json").read_text())["cells"][1]["sparse_quality"]["comparisons"]


def test_recovery_in_the_distill_block_gives_window_quest_and_learned_each_an_adapter_and_a_table(tmp_path):
    cfg = {**CFG, "methods": [{**DISTILLED, "distill": {**DISTILLED["distill"], "steps": 5, "heldout": 1,
                                                        "recover_steps": 2, "recover_r": 2}}]}
    res = run_experiment(cfg, out_root=tmp_path, log=lambda *a: None)
    rec = res["cells"][0]["sparse_quality"]["recovered"]
    b = budgets(8)
    assert sorted(rec["recovery"]) == sorted(f"{s}:" + ",".join(f"{k}={v}" for k, v in x.items())
                                             for s in ("window", "quest", "learned") for x in b[s])
    assert all(r["steps"] == 2 and r["r"] == 2 for r in rec["recovery"].values())
    assert "### With recovery training" in (tmp_path / "distill" / "report.md").read_text()


@pytest.mark.parametrize("distill, message", [
    ({"stpes": 3}, "unknown key"), ({"steps": 0}, "positive int"), ({"lr": "fast"}, "positive float"),
    ({"recover_steps": -1}, "non-negative int"), ({"target": "max"}, "one of peak, mass"),
    ({"unit": "token"}, "one of row, block")])
def test_a_bad_distill_block_is_one_line_naming_the_fix(distill, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**CFG, "methods": [{**DISTILLED, "distill": distill}]})


def test_the_distill_block_passes_its_target_and_unit_to_the_recipe(monkeypatch):
    from types import SimpleNamespace
    from attnlab import sparse_distill
    seen = {}
    monkeypatch.setattr(sparse_distill.recipe, "distil", lambda plugin, seqs, **kw: seen.update(kw) or {"tokens": 64})
    plugin = SimpleNamespace(config=SimpleNamespace(granularity="block", block_size=8))
    one = [SimpleNamespace(input_ids=list(range(64)))]
    splits = SimpleNamespace(train=one, eval=one)
    opts = sparse_distill.distill_options({**DISTILLED, "distill": {"target": "mass", "unit": "row", "sequences": 1,
                                                                    "heldout": 1}}, "m")
    sparse_distill.distil(plugin, splits, opts, log=lambda *a: None)
    assert (seen["target"], seen["unit"]) == ("mass", "row")
    defaults = sparse_distill.distill_options({**DISTILLED, "distill": {}}, "m")
    assert (defaults["target"], defaults["unit"]) == ("peak", None)


def test_distill_is_refused_on_a_selector_without_a_gate():
    with pytest.raises(ConfigError, match="variant: learned"):
        load_config({**CFG, "methods": [{"name": "q", "method": "sparse", "variant": "quest", "distill": {}}]})


def test_the_recipe_reads_row_and_block_granularity_with_the_same_distilled_gate(tiny_llama):
    from attnlab.modules.sparse import quality, recipe

    model = tiny_llama.model
    seqs = [torch.randint(3, 200, (64,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plugin = attnlab.attach(model, "sparse", variant="learned", block_size=8, gate_dim=8)
    try:
        record = recipe.distil(plugin, seqs[:2], rows=16, steps=5, lr=1e-2)
        state = plugin.state_dict()
    finally:
        plugin.detach()
    assert record["tokens"] == 128 and len(record["layers"]) == len(model.model.layers)
    points = [("learned", {"top_k": 1}), ("quest", {"top_k": 1}), ("window", {"window": 8, "sinks": 4})]
    read = {}
    for granularity in ("row", "block"):
        common = {"block_size": 8, "kernel": "masked", "granularity": granularity, "gate_dim": 8}
        assert recipe.options("oracle", {"top_k": 1}, common) == {
            "variant": "learned", "block_size": 8, "kernel": "masked", "top_k": 1, "granularity": granularity,
            "oracle": True}
        data = recipe.sweep(model, {7: seqs[2]}, points, common, state, {})
        assert set(data["points"]) == {"dense"} | {quality.key(s, b) for s, b in points}
        read[granularity] = {k: p["sequences"]["7"]["density"] for k, p in data["points"].items()}
    assert read["row"]["window:window=8,sinks=4"] == read["block"]["window:window=8,sinks=4"]
    assert all(0 < d <= 1 for r in read.values() for d in r.values())


def test_a_distilled_gate_that_reads_quest_is_read_by_the_held_out_sweep_as_one(tmp_path):
    learned = {**DISTILLED, "gate_quest": True, "distill": {**DISTILLED["distill"], "steps": 5, "heldout": 1}}
    res = run_experiment({**CFG, "methods": [learned]}, out_root=tmp_path, log=lambda *_: None)
    cell = res["cells"][0]
    assert cell["sparse_quality"]["meta"]["common"]["gate_quest"] is True
    assert all(set(p["sequences"]) == {"0"} for p in cell["sparse_quality"]["points"].values())
