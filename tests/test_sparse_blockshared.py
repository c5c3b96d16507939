"""Block-shared selection (granularity: block), its kernel, and decoding with cached page metadata.

Each piece against its reference: the kernel against dense SDPA with the same selection as a mask
(forward and backward), the selection's pooled scores against the rows they pool, the decode path
against a full recomputation with the same row-wise selection, and the work against the density."""

import pytest
import torch

from attnlab.modules.base import PluginError
from attnlab.modules.sparse import ATTR, SparseAttention, SparseConfig
from attnlab.modules.sparse import blocksparse, blockshared
from attnlab.modules.sparse.gate import BlockGate
from attnlab.modules.sparse.kernels import masked_attention
from attnlab.modules.sparse.pages import Pages
from attnlab.modules.sparse.patterns import Pattern, scatter_blocks
from attnlab.modules.sparse.pooling import minmax
from attnlab.modules.sparse.quest import quest_block_scores
from attnlab.modules.sparse.selection import gate_scores, select

from .conftest import logits_of

SMALL = dict(block_size=4, top_k=2)


def ids(n=37, batch=2, seed=0):
    return torch.randint(3, 250, (batch, n), generator=torch.Generator().manual_seed(seed))


def attach(model, **options) -> SparseAttention:
    return SparseAttention(SparseConfig(**{**SMALL, **options})).attach(model)


def gap(a, b):
    return (a - b).abs().max().item()


def qkv(tq, tk, seed=0, hq=4, hkv=2, d=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, tq, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, hkv, tk, d, generator=gen, requires_grad=True) for _ in range(2))
    return q, k, v


# --- the selection -------------------------------------------------------------------------------

def test_quest_block_bound_is_above_every_logit_between_the_two_blocks():
    q, k, _ = qkv(40, 40)
    q, k = q.detach(), k.detach()
    p = Pattern(40, 40, 4, "cpu")
    bound = quest_block_scores(q, *minmax(k, p.nfull, 4), p)[:, :, 0]          # (B, Hkv, nq, nfull)
    logits = q.view(2, 2, 2, 40, 8) @ k[:, :, None].transpose(-1, -2)          # (B, Hkv, G, Tq, Tk)
    best = logits.view(2, 2, 2, 10, 4, 10, 4).amax((2, 4, 6))                  # max over rows, heads, keys
    cand = p.candidates(per_block=True)                                        # computed for candidates only
    assert (bound >= best - 1e-5)[..., cand].all()
    one = Pattern(40, 40, 1, "cpu")                                            # one row and key per block
    single = quest_block_scores(q, *minmax(k, 40, 1), one)[:, :, 0]
    cand = one.candidates(per_block=True)                                      # exact: the largest head's logit
    assert torch.allclose(single[..., cand], logits.amax(2)[..., cand], atol=1e-5)


def test_the_gates_pooled_query_scores_the_mean_of_its_rows_scores():
    q, k, _ = qkv(22, 22)
    gate = BlockGate(8, 2, 2, gate_dim=8, block_size=4, seed=0)
    p = Pattern(22, 22, 4, "cpu")
    stats = Pages("learned").get(k.detach(), p)[0]
    rows = gate_scores(gate, q.detach(), p, stats, None, block=False)          # (B, Hkv, Tq, nfull)
    blocks = gate_scores(gate, q.detach(), p, stats, None, block=True)         # (B, Hkv, nq, nfull)
    pad = torch.nn.functional.pad(rows, (0, 0, 0, 2))                          # 22 rows: the last block has 2
    mean = pad.view(2, 2, 6, 4, -1).sum(3) / torch.tensor([4.0] * 5 + [2.0])[:, None]
    assert torch.allclose(blocks, mean, atol=1e-5)


def test_block_selection_is_one_choice_per_query_block_with_the_fixed_blocks():
    q, k, _ = qkv(37, 37)
    p = Pattern(37, 37, 4, "cpu")
    cfg = SparseConfig(variant="quest", **SMALL)
    sel = select(cfg, q.detach(), k.detach(), p, None, 0.3)
    assert sel.per_block and sel.idx.shape[:4] == (2, 2, 1, p.nq)
    keep = scatter_blocks(sel, p.nb)[:, :, 0]                                  # (B, Hkv, nq, nb)
    i = torch.arange(p.nq)
    assert keep[:, :, i, i].all() and keep[:, :, 1:, 0].all() and keep[:, :, i[2:], i[2:] - 1].all()
    assert (keep.sum(-1) == torch.clamp(i + 1, max=3 + 2)).all()               # top_k=2 of the candidates
    row = select(SparseConfig(variant="quest", granularity="row", **SMALL), q.detach(), k.detach(), p, None, 0.3)
    assert not row.per_block and row.idx.shape[:4] == (2, 2, 2, 37)


def test_granularity_is_validated():
    with pytest.raises(PluginError, match="granularity"):
        SparseConfig(granularity="tile")


# --- the kernel ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["quest", "learned"])
def test_block_shared_kernel_equals_the_masked_reference_forward_and_backward(variant):
    gate = BlockGate(8, 2, 2, gate_dim=8, block_size=4, seed=0)
    for fused in (True, False):
        for tq, tk in ((37, 37), (40, 40), (8, 40)):                            # partial block; chunk after a cache
            q, k, v = qkv(tq, tk, seed=tq + tk)
            p = Pattern(tq, tk, 4, "cpu")
            sel = select(SparseConfig(variant=variant, **SMALL), q.detach(), k.detach(), p, None, 0.3, gate=gate)
            assert blockshared.supported(p, sel, None)
            try:
                blocksparse.USE_FUSED = fused
                out, pairs = blockshared.block_shared_attention(q, k, v, p, sel, 0.3)
            finally:
                blocksparse.USE_FUSED = True
            ref = masked_attention(q, k, v, p.full_mask(sel, None, 2), 0.3)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            assert gap(out, ref) <= 1e-5
            for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
                assert gap(a, b) <= 1e-5


def test_the_block_shared_backward_keeps_what_sdpa_keeps():
    t = 256
    q, k, v = qkv(t, t, hq=4, hkv=2, d=16)
    p = Pattern(t, t, 16, "cpu")
    sel = select(SparseConfig(variant="quest", block_size=16, top_k=2), q.detach(), k.detach(), p, None, 0.25)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: kept.append(x) or x, lambda x: x):
        out, _ = blockshared.block_shared_attention(q, k, v, p, sel, 0.25)
    assert sorted(x.numel() for x in kept) == sorted([q.numel(), k.numel(), v.numel(), out.numel(), 2 * 4 * t])


def test_block_shared_work_is_the_density_and_falls_with_it():
    t, bs = 512, 16
    q, k, v = (x.detach() for x in qkv(t, t, hq=4, hkv=2, d=8))
    p = Pattern(t, t, bs, "cpu")
    causal = 2 * 4 * t * (t + 1) / 2
    work, density = {}, {}
    for top_k in (1, 4, 12):
        sel = select(SparseConfig(variant="quest", block_size=bs, top_k=top_k), q, k, p, None, 0.3)
        with torch.no_grad():
            _, pairs = blockshared.block_shared_attention(q, k, v, p, sel, 0.3)
        kept, total = p.pair_counts(sel)
        work[top_k], density[top_k] = pairs / causal, float(kept / total)
    assert work[1] < work[4] < work[12] < 1
    diagonal = 2 * 4 * t * (bs - 1) / 2 / causal        # the masked upper half of each diagonal tile
    for top_k in work:   # plus padding where a chunk's blocks chose different numbers (the first ones)
        assert density[top_k] <= work[top_k] - diagonal + 1e-6 <= blockshared.WASTE * density[top_k]


@pytest.mark.parametrize("variant", ["quest", "learned"])
def test_model_gradients_with_block_selection_equal_the_masked_reference(tiny, variant):
    x = ids(30, batch=1)
    grads = {}
    for kernel in ("gather", "masked"):
        plugin = attach(tiny.model, variant=variant, kernel=kernel)
        emb = tiny.model.get_input_embeddings()(x).detach().requires_grad_(True)
        tiny.model(inputs_embeds=emb).logits.pow(2).mean().backward()
        grads[kernel] = emb.grad
        if kernel == "gather":
            used = [getattr(m, ATTR).last_pairs_scored for m in tiny.model.modules() if hasattr(m, ATTR)]
            assert all(u < 4 * 30 * 30 for u in used if u is not None)          # the sparse kernel ran
        plugin.detach()
    assert gap(grads["gather"], grads["masked"]) <= 1e-5


# --- decoding with page metadata ---------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["dynamic", "growing"])
@pytest.mark.parametrize("variant", ["quest", "learned"])
def test_decode_steps_equal_a_full_recomputation_with_row_selection(tiny, variant, cache):
    # Prefill 26 tokens with the cache (transformers' DynamicCache, or kvcache.GrowingCache whose
    # keys are strided views of a buffer), then 9 one-token steps; each step's logits against a full
    # forward (no cache) of the same tokens with granularity row; page metadata computed once per block.
    from attnlab.kvcache import GrowingCache
    x = ids(35, batch=1, seed=5)
    plugin = attach(tiny.model, variant=variant, top_k=1, granularity="row")
    with torch.no_grad():
        full = tiny.model(input_ids=x).logits
        before = [layer.pages.computed for layer in plugin.layers()]
        out = tiny.model(input_ids=x[:, :26], use_cache=True,
                         past_key_values=GrowingCache() if cache == "growing" else None)
        cache, steps = out.past_key_values, []
        for t in range(26, 35):
            out = tiny.model(input_ids=x[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
            pairs = plugin.pairs_scored()
            assert pairs < 2 * tiny.model.config.num_attention_heads * (t + 1)   # fewer keys than the cache
    assert gap(torch.stack(steps, 1), full[:, 26:]) <= 1e-4
    for layer, was in zip(plugin.layers(), before):
        assert layer.pages.computed - was == 35 // 4                           # each complete block once
    plugin.detach()


def test_page_store_recomputes_for_a_different_sequence(tiny_llama):
    # A cached step whose keys are not the stored sequence's (a new prompt of the same length, a
    # batch whose rows were reordered) is caught by the blocks' last keys and recomputed.
    k1, k2 = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    pages = Pages("quest")
    first = pages.get(k1, Pattern(20, 20, 4, "cpu"))
    again = pages.get(torch.cat([k1, k1[:, :, :1]], 2), Pattern(1, 21, 4, "cpu"))
    assert pages.computed == 5 and all(torch.equal(a, b) for a, b in zip(first, again))
    other = pages.get(torch.cat([k2, k2[:, :, :1]], 2), Pattern(1, 21, 4, "cpu"))
    assert pages.computed == 10 and all(torch.equal(a, b) for a, b in zip(other, minmax(k2, 5, 4)))
    rows = torch.cat([k1, k2])                                                 # a batch of two, then its rows swapped
    pages.get(rows, Pattern(20, 20, 4, "cpu"))
    swapped = pages.get(torch.cat([rows.flip(0), rows.flip(0)[:, :, :1]], 2), Pattern(1, 21, 4, "cpu"))
    assert pages.computed == 20 and all(torch.equal(a, b) for a, b in zip(swapped, minmax(rows.flip(0), 5, 4)))
