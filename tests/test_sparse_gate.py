"""The learned gate of the sparse attention: what the cached teacher records, and that training from
it, layer by layer, brings the gate closer to the dense attention's block map."""

import pytest
import torch

import attnlab
from attnlab.modules.sparse.gate import rotary, unrope
from attnlab.modules.sparse.teacher import collect_teacher


def _peaky_llama():
    """tiny-llama with sharper attention (q and k scaled), so the block maps have a structure to learn."""
    bb = attnlab.load_backbone("tiny-llama")
    with torch.no_grad():
        for layer in bb.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return bb


def _sequences(bb, n, length=64):
    from attnlab.data import build_splits
    s = build_splits({"dataset_name": "python_docs", "n_train": n, "n_eval": 0, "max_length": length}, bb.tokenizer)
    return [torch.tensor(e.input_ids) for e in s.train]


def test_rotating_back_undoes_the_rotary_embedding():
    x = torch.randn(2, 3, 10, 8)
    pos = torch.arange(5, 15)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    assert torch.allclose(unrope(rotary(x, pos, inv_freq) * 1.5, pos, (inv_freq, 1.5)), x, atol=1e-5)
    assert unrope(x, pos, None) is x


def test_the_cached_teacher_records_queries_before_rope_and_normalised_targets():
    bb = _peaky_llama()
    seqs = _sequences(bb, 2)
    seen = {}
    hook = bb.model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", []).append(o))
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, granularity="row")
    try:
        caches, cost = collect_teacher(bb.model, plugin, seqs, rows=8)
    finally:
        hook.remove()
        plugin.detach()
    assert sorted(caches) == [0, 1] and cost["tokens"] == sum(len(s) for s in seqs)
    c = caches[1]
    assert c["q"].shape == (16, 4, 16) and c["stats"].shape == (2, 2, 16, 48)
    first = c["seq"] == 0
    projected = seen["q"][0][0].view(64, 4, 16)[c["pos"][first]]          # q_proj's output, before RoPE
    assert torch.allclose(c["q"][first], projected, atol=1e-4)
    assert ((c["pos"] // 4) >= 3).all()                                      # rows that have candidates
    assert torch.allclose(c["target"].sum(-1), torch.ones(16, 2), atol=1e-5)
    assert not (c["target"] * ~c["cand"][:, None]).any()                    # only on candidate blocks
    assert (c["mass"] <= 4 + 1e-5).all() and (c["mass"] > 0).any()          # summed over the G = 2 heads
    assert "quest" not in c                   # Quest's bound is recorded only for a gate that reads it


def test_gates_trained_layer_by_layer_from_the_cache_match_the_dense_block_map_better():
    bb = _peaky_llama()
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, top_k=2, granularity="row")
    before = {n: p.detach().clone() for n, p in plugin.trainable_parameters().items()}
    report = plugin.distil_gates(_sequences(bb, 12), rows=32, steps=150, lr=1e-2, batch=64)
    for idx, r in report["layers"].items():
        assert r["after"]["train"] < 0.5 * r["before"]["train"], (idx, r)
        assert r["after"]["heldout"] < 0.8 * r["before"]["heldout"], (idx, r)   # rows of sequences not trained on
    assert all(not torch.equal(p, before[n]) for n, p in plugin.trainable_parameters().items())
    assert report["teacher"]["tokens"] == 12 * 64 and report["training"]["seconds"] > 0
    assert not any(p.requires_grad for n, p in bb.model.named_parameters() if "attnlab_sparse" not in n)
    plugin.detach()


def test_distil_gates_refuses_what_has_no_gate(tiny_llama):
    plugin = attnlab.attach(tiny_llama.model, "sparse", variant="quest", block_size=4)
    with pytest.raises(attnlab.modules.PluginError, match="attach variant 'learned'"):
        plugin.distil_gates([torch.arange(40)])
    plugin.detach()


def test_the_gate_loss_is_taken_in_fp32_from_half_precision_scores():
    # the GPU check found -1e9 overflowing fp16 in the candidate mask (tests/test_cuda.py sparse-fp16)
    from attnlab.modules.sparse.gate import gate_kl
    scores = torch.randn(1, 2, 4, 4).half()
    target = torch.eye(4).expand(1, 2, 4, 4).half()
    cand = torch.ones(4, 4, dtype=torch.bool).tril()
    loss = gate_kl(scores, target, cand)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
