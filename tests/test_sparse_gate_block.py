"""The gate of a block-shared selection (granularity block) distilled per query block: SeerAttention's
2-D max-pooled target, and training that scores a block exactly as the selection does."""

import pytest
import torch

import attnlab
from attnlab.modules.sparse.patterns import Pattern
from attnlab.modules.sparse.pooling import minmax
from attnlab.modules.sparse.quest import quest_bound
from attnlab.modules.sparse.selection import gate_scores
from attnlab.modules.sparse.teacher import cached_scores, collect_teacher, dense_probs, stack_gates

from .test_sparse_gate import _peaky_llama, _sequences


def _block_teacher(bb, seqs, rows=8, **kw):
    seen = {}
    attn = bb.model.model.layers[1].self_attn
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", []).append(o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: seen.setdefault("k", []).append(o))]
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, granularity="block", **kw)
    try:
        caches, _ = collect_teacher(bb.model, plugin, seqs, rows=rows, unit="block")
    finally:
        for h in hooks:
            h.remove()
    return plugin, caches[1], seen


def test_the_block_teacher_max_pools_the_attention_over_the_blocks_rows_heads_and_keys():
    bb = _peaky_llama()
    seqs = _sequences(bb, 2)
    plugin, c, seen = _block_teacher(bb, seqs)
    plugin.detach()
    assert c["q"].shape == (16, 4, 16) and c["seq"].tolist() == [0, 0, 1, 1] and len(c["block"]) == 4
    assert c["target"].shape == (4, 2, 16) and c["cand"].shape == (4, 16)
    blocks = c["pos"].view(4, 4)
    assert (blocks == blocks[:, :1] + torch.arange(4)).all() and (blocks[:, 0] % 4 == 0).all()   # whole blocks
    assert ((blocks[:, 0] // 4) >= 3).all()                                 # the first query blocks: no candidates
    # the target of the first sequence's first recorded block, from the layer's own q and k
    attn = bb.model.model.layers[1].self_attn
    q = seen["q"][0].view(1, 64, 4, 16).transpose(1, 2)
    k = seen["k"][0].view(1, 64, 2, 16).transpose(1, 2)
    cos, sin = bb.model.model.rotary_emb(q, torch.arange(64)[None])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    p = Pattern(64, 64, 4, "cpu")
    probs = dense_probs(q, k, p.full_mask(None, None, 2), attn.scaling)      # (1, 4, 64, 64)
    i = int(blocks[0, 0]) // 4
    pooled = probs[0, :, 4 * i:4 * i + 4].view(2, 2, 4, 16, 4).amax(dim=(1, 2, 4))   # kv head x key block
    want = pooled * c["cand"][0]
    want = want / want.sum(-1, keepdim=True)
    assert torch.allclose(c["target"][0], want, atol=1e-5)
    assert c["cand"][0].tolist() == [1 <= j <= i - 2 for j in range(16)]
    mass = probs[0, :, 4 * i:4 * i + 4].view(2, 2, 4, 16, 4).sum(dim=(1, 2, 4))
    assert torch.allclose(c["mass"][0], mass, atol=1e-4)


@pytest.mark.parametrize("quest", [False, True])
def test_training_scores_a_cached_block_exactly_as_the_block_selection_does(quest):
    bb = _peaky_llama()
    seqs = _sequences(bb, 1)
    plugin, c, seen = _block_teacher(bb, seqs, rows=12, gate_quest=quest)
    gate = plugin.layers()[1].gate
    plugin.detach()
    if quest:
        with torch.no_grad():
            gate.quest_scale.copy_(torch.tensor([0.5, 2.0]))      # a multiple of its own per kv head
    stack = {k: v[None] for k, v in c.items() if k in ("q", "stats", "quest")}   # a leading layer axis of 1
    stack.update({k: c[k] for k in ("pos", "seq", "cand", "block")})
    cached = cached_scores(stack_gates([gate]), stack, 0, torch.arange(3))[0]     # (3 blocks, Hkv, nfull)
    # the selection's scores from the full sequence's queries (after RoPE), pooled per query block
    q = seen["q"][0].view(1, 64, 4, 16).transpose(1, 2)
    k = seen["k"][0].view(1, 64, 2, 16).transpose(1, 2)
    cos, sin = bb.model.model.rotary_emb(q, torch.arange(64)[None])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    p = Pattern(64, 64, 4, "cpu")
    rope = (bb.model.model.rotary_emb.inv_freq, bb.model.model.rotary_emb.attention_scaling)
    scale = bb.model.model.layers[1].self_attn.scaling
    bound = quest_bound(q, *minmax(k, 16, 4), p, True, None, scale) if quest else None
    full = gate_scores(gate, q, p, c["stats"][0][None], rope, block=True, bound=bound)[0]    # (Hkv, nq, nfull)
    qb = c["pos"].view(3, 4)[:, 0] // 4
    cand = c["cand"][:3, None].expand_as(cached)
    assert torch.allclose(cached[cand], full[:, qb].transpose(0, 1)[cand], atol=1e-4)


def test_block_gates_distilled_per_block_match_the_block_map_better():
    bb = _peaky_llama()
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, top_k=2, granularity="block")
    try:
        report = plugin.distil_gates(_sequences(bb, 24), rows=64, steps=150, lr=1e-2, batch=64)
    finally:
        plugin.detach()
    for idx, r in report["layers"].items():
        assert r["blocks"] == 24 * 13 and r["rows"] == 24 * 13 * 4           # every block with candidates
        assert r["after"]["train"] < 0.5 * r["before"]["train"], (idx, r)
        assert r["after"]["heldout"] < 0.8 * r["before"]["heldout"], (idx, r)


def test_a_row_teacher_is_refused_for_a_block_gate_and_the_unit_follows_the_granularity():
    bb = _peaky_llama()
    seqs = _sequences(bb, 2)
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, granularity="block")
    try:
        rows = collect_teacher(bb.model, plugin, seqs, rows=8, unit="row")
        with pytest.raises(attnlab.modules.PluginError, match="recorded per row, not per block"):
            plugin.distil_gates(seqs, rows=8, steps=1, teacher=rows)
        assert plugin.distil_gates(seqs, rows=8, steps=1)["layers"][0]["blocks"] == 4   # 2 blocks x 2 sequences
        assert "blocks" not in plugin.distil_gates(seqs, rows=8, steps=1, unit="row")["layers"][0]
        with pytest.raises(attnlab.modules.PluginError, match="unknown gate unit .column.; use one of: row, block"):
            collect_teacher(bb.model, plugin, seqs, unit="column")
    finally:
        plugin.detach()


def test_an_unknown_unit_is_refused_even_with_a_teacher_given():
    bb = _peaky_llama()
    seqs = _sequences(bb, 2)
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, granularity="row")
    try:
        rows = collect_teacher(bb.model, plugin, seqs, rows=8)
        with pytest.raises(attnlab.modules.PluginError, match="unknown gate unit 'rows'; use one of: row, block"):
            plugin.distil_gates(seqs, rows=8, steps=1, teacher=rows, unit="rows")
    finally:
        plugin.detach()
