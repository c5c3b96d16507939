"""A gate that reads Quest's bound (gate_quest): it starts as Quest, it is scored the same way in
training (from the cached teacher) and in the model, and decoding with it equals recomputing."""

import pytest
import torch

import attnlab
from attnlab.modules.sparse import SparseConfig
from attnlab.modules.sparse.patterns import Pattern
from attnlab.modules.sparse.selection import select
from attnlab.modules.sparse.teacher import cached_scores, collect_teacher, stack_gates

from .test_sparse_gate import _peaky_llama, _sequences


def _row_teacher(n: int):
    """A Quest-reading row gate on the peaky tiny Llama and its cached teacher over n sequences."""
    bb = _peaky_llama()
    seqs = _sequences(bb, n)
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, granularity="row", gate_quest=True)
    try:
        return bb, seqs, plugin, collect_teacher(bb.model, plugin, seqs, rows=8)
    except Exception:
        plugin.detach()
        raise


def _zero_learned_part(gate):
    with torch.no_grad():
        gate.wq.zero_()


def test_with_its_learned_part_at_zero_the_block_gate_selects_what_quest_selects():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 64, 16, generator=g) * 2, torch.randn(1, 2, 64, 16, generator=g) * 2
    p = Pattern(64, 64, 4, "cpu")
    learned = SparseConfig(variant="learned", gate_quest=True, top_k=3, block_size=4, gate_dim=8)
    from attnlab.modules.sparse.gate import BlockGate
    gate = BlockGate(16, 2, 2, 8, 4, seed=0, quest=True)
    _zero_learned_part(gate)
    with torch.no_grad():
        gate.quest_scale.mul_(3.0)                 # any positive scale ranks as Quest does
    a = select(learned, q, k, p, None, 0.25, gate=gate)
    b = select(SparseConfig(variant="quest", top_k=3, block_size=4), q, k, p, None, 0.25)
    assert torch.equal(a.idx, b.idx) and torch.equal(a.valid, b.valid)
    plain = BlockGate(16, 2, 2, 8, 4, seed=0)
    c = select(SparseConfig(variant="learned", top_k=3, block_size=4, gate_dim=8), q, k, p, None, 0.25, gate=plain)
    assert not torch.equal(c.idx, b.idx)           # the test can tell the two apart


@pytest.mark.parametrize("unit", ["row", "block"])
def test_a_quest_reading_gate_trains_from_the_teacher_and_keeps_its_quest_scale(unit):
    bb = _peaky_llama()
    seqs = _sequences(bb, 12)
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, top_k=2, granularity=unit,
                            gate_quest=True)
    try:
        report = plugin.distil_gates(seqs, rows=32, steps=100, lr=1e-2, batch=64)
        scales = [layer.gate.quest_scale.detach().clone() for layer in plugin.layers()]
        state = plugin.state_dict()
    finally:
        plugin.detach()
    assert any("quest_scale" in n for n in state)
    assert any(not torch.equal(s, torch.ones_like(s)) for s in scales)
    for r in report["layers"].values():
        assert r["after"]["train"] < r["before"]["train"], r
    plain = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, top_k=2, granularity=unit)
    try:
        with pytest.raises(attnlab.modules.PluginError, match="saved with gate_quest"):
            plain.load_state_dict(state)           # a Quest-reading gate's weights need a Quest-reading gate
    finally:
        plain.detach()


def test_training_scores_a_cached_row_as_the_model_scores_it_with_quest():
    bb, seqs, plugin, (caches, _) = _row_teacher(1)
    try:
        layer = plugin.layers()[0]          # the first layer: its inputs are the dense model's in both passes
        seen = {}
        real = layer.gate_scores

        def spy(q, k, p, scale):
            seen["scores"] = real(q, k, p, scale)
            return seen["scores"]

        layer.gate_scores = spy
        layer.collect_gate_loss = True
        with torch.no_grad():
            bb.model(input_ids=seqs[0][None])
        layer.collect_gate_loss = False
        c = caches[0]
        stack = stack_gates([layer.gate])
        cache = {"q": c["q"][None], "stats": c["stats"][None], "quest": c["quest"][None],
                 "pos": c["pos"], "seq": c["seq"], "cand": c["cand"]}
        cached = cached_scores(stack, cache, 0, torch.arange(len(c["pos"])))[0]     # (rows, Hkv, nfull)
        full = seen["scores"][0][:, c["pos"]].transpose(0, 1)                        # (rows, Hkv, nfull)
        cand = c["cand"][:, None].expand_as(cached)
        assert torch.allclose(cached[cand], full[cand], atol=1e-4)
    finally:
        plugin.detach()


def test_decoding_with_a_quest_reading_gate_equals_recomputing(tiny_llama):
    plugin = attnlab.attach(tiny_llama.model, "sparse", variant="learned", block_size=4, top_k=1,
                            granularity="row", gate_quest=True)
    prompt = torch.randint(5, 200, (1, 26), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tiny_llama.tokenizer.pad_token_id)
    try:
        with torch.no_grad():
            cached = tiny_llama.model.generate(prompt, **kw)
            uncached = tiny_llama.model.generate(prompt, use_cache=False, **kw)
    finally:
        plugin.detach()
    assert torch.equal(cached, uncached)


def test_a_teacher_without_quest_bounds_is_refused_for_a_quest_reading_gate_and_still_trains_a_plain_one():
    bb, seqs, plugin, (caches, record) = _row_teacher(2)
    try:
        for c in caches.values():
            del c["quest"]                    # as a teacher file saved before gate_quest existed
        with pytest.raises(ValueError, match="no Quest bounds"):
            plugin.distil_gates(seqs, rows=8, steps=1, teacher=(caches, record))
    finally:
        plugin.detach()
    plain = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, granularity="row")
    try:
        assert plain.distil_gates(seqs, rows=8, steps=1, teacher=(caches, record))["layers"][0]["steps"] == 1
    finally:
        plain.detach()
    with pytest.raises(attnlab.modules.PluginError, match="gate_quest must be true or false"):
        SparseConfig(gate_quest="yes")


@pytest.mark.parametrize("variant", ["quest", "window", "performer", "dense"])
def test_gate_quest_without_a_learned_gate_is_one_line_naming_the_variant(variant):
    with pytest.raises(attnlab.modules.PluginError, match=r"gate_quest is an option of variant learned.*drop gate_quest"):
        SparseConfig(variant=variant, gate_quest=True)
    assert not SparseConfig(variant=variant).gate_quest
    assert SparseConfig(variant="learned", oracle=True, gate_quest=True).gate_quest


def test_weights_of_a_quest_reading_gate_and_of_a_plain_one_are_refused_by_the_other_naming_gate_quest(tiny_llama):
    def state(**kw):
        plugin = attnlab.attach(tiny_llama.model, "sparse", variant="learned", block_size=4, **kw)
        try:
            return plugin.state_dict()
        finally:
            plugin.detach()

    quest, plain = state(gate_quest=True), state()
    for saved, attached in ((quest, {}), (plain, {"gate_quest": True})):
        plugin = attnlab.attach(tiny_llama.model, "sparse", variant="learned", block_size=4, **attached)
        try:
            want = "True" if saved is quest else "False"
            with pytest.raises(attnlab.modules.PluginError, match=f"attach sparse with gate_quest={want}"):
                plugin.load_state_dict(saved)
        finally:
            plugin.detach()


def test_each_decoding_step_scores_as_the_full_forward_scores_its_last_row_for_a_batch(tiny_llama, monkeypatch):
    from attnlab.modules.sparse import selection
    plugin = attnlab.attach(tiny_llama.model, "sparse", variant="learned", block_size=4, top_k=1,
                            granularity="row", gate_quest=True, kernel="gather")
    gates = {id(layer.gate): i for i, layer in enumerate(plugin.layers())}
    with torch.no_grad():
        for layer in plugin.layers():
            layer.gate.quest_scale.copy_(torch.tensor([0.5, 2.0]))   # the bound's weight matters
    seen = {}
    real = selection.gate_scores

    def spy(gate, *a, **kw):
        seen[gates[id(gate)]] = out = real(gate, *a, **kw)
        return out

    monkeypatch.setattr(selection, "gate_scores", spy)
    ids = torch.randint(5, 200, (2, 32), generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            cache = tiny_llama.model(input_ids=ids[:, :26], use_cache=True).past_key_values
            for t in range(26, 32):
                seen.clear()
                cache = tiny_llama.model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).past_key_values
                step = dict(seen)
                seen.clear()
                tiny_llama.model(input_ids=ids[:, :t + 1], use_cache=False)
                assert step.keys() == seen.keys() and len(step) == len(gates)
                for i, s in step.items():
                    assert torch.allclose(s[:, :, 0], seen[i][:, :, -1], atol=1e-5), (t, i)
    finally:
        plugin.detach()
