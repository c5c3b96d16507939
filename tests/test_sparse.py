"""SparseAttention: every variant and kernel against its reference, on tiny GPT-2 and tiny Llama (GQA).

Small blocks (4) and windows (3) so that ~40 tokens span many blocks and the patterns really skip."""

import importlib.util
import shutil

import pytest
import torch

from attnlab import load_backbone
from attnlab.modules.base import PluginError, load_weights
from attnlab.modules.attention import attention_modules
from attnlab.modules.sparse import (ATTR, NAMES, SparseAttention, SparseConfig,
                                    capture_attention, dense_reference)

from .conftest import logits_of

SMALL = dict(block_size=4, window=3, top_k=2)
SPARSE = ("window", "learned", "quest", "performer")   # the variants with their own kernels
ALL = SPARSE + ("dense",)


def ids(n=37, batch=2, seed=0):
    return torch.randint(3, 250, (batch, n), generator=torch.Generator().manual_seed(seed))


def attach(model, **options) -> SparseAttention:
    return SparseAttention(SparseConfig(**{**SMALL, **options})).attach(model)


def logits_with(model, x, mask=None, **options):
    plugin = attach(model, **options)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask).logits
    plugin.detach()
    return out


def gap(a, b):
    return (a - b).abs().max().item()


# --- each kernel against its reference -----------------------------------------------------------

@pytest.mark.parametrize("variant", SPARSE)
def test_gather_kernel_equals_the_masked_reference(tiny, variant):
    x = ids()
    base = logits_of(tiny.model, x)
    for extra in ({}, {"sinks": 2}) if variant == "window" else ({},):
        gathered = logits_with(tiny.model, x, variant=variant, kernel="gather", **extra)
        masked = logits_with(tiny.model, x, variant=variant, kernel="masked", **extra)
        assert gap(gathered, masked) <= 1e-5
        assert gap(gathered, base) > 1e-3          # the pattern really changes the function


def test_dense_variant_and_dense_reference_compute_the_base(tiny):
    x = ids()
    base = logits_of(tiny.model, x)
    assert torch.equal(logits_with(tiny.model, x, variant="dense"), base)
    plugin = attach(tiny.model, variant="learned")
    with dense_reference(tiny.model):
        assert torch.equal(logits_of(tiny.model, x), base)
    assert gap(logits_of(tiny.model, x), base) > 1e-3   # sparse again outside
    plugin.detach()


@pytest.mark.parametrize("kernel", ["gather", "masked"])
def test_patterns_that_cover_everything_equal_dense(tiny, kernel):
    x = ids()
    base = logits_of(tiny.model, x)
    assert gap(logits_with(tiny.model, x, variant="learned", top_k=100, kernel=kernel), base) <= 1e-5
    assert gap(logits_with(tiny.model, x, variant="window", window=x.shape[1], kernel=kernel), base) <= 1e-5


@pytest.mark.parametrize("variant", ALL)
def test_detach_restores_the_base_exactly(tiny, variant):
    x = ids()
    base = logits_of(tiny.model, x)
    impl = tiny.model.config._attn_implementation
    plugin = attach(tiny.model, variant=variant)
    assert tiny.model.config._attn_implementation == NAMES[impl]
    logits_of(tiny.model, x)
    plugin.detach()
    assert torch.equal(logits_of(tiny.model, x), base)
    assert tiny.model.config._attn_implementation == impl
    assert not any(hasattr(m, ATTR) for m in attention_modules(tiny.model))
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_only_the_chosen_layers_change(tiny_llama):
    plugin = attach(tiny_llama.model, variant="learned", layers=[1])
    mods = attention_modules(tiny_llama.model)
    assert not hasattr(mods[0], ATTR) and hasattr(mods[1], ATTR)
    assert plugin.trainable_parameters() and all(f"layers.1.self_attn.{ATTR}." in n for n in plugin.trainable_parameters())
    logits_of(tiny_llama.model, ids())
    assert set(plugin.layer_sparsity()) == {1}
    plugin.detach()


def test_eager_inner_kernel_gives_the_same_outputs():
    outs = {}
    for impl in ("sdpa", "eager"):
        bb = load_backbone("tiny-llama")
        bb.model.config._attn_implementation = impl
        x, mask = ids(), torch.ones(2, 37, dtype=torch.long)
        mask[1, 30:] = 0                           # a padded row: the eager mask is additive float
        outs[impl] = {v: logits_with(bb.model, x, mask, variant=v) for v in ALL}
    for v in ALL:
        assert gap(outs["sdpa"][v][0], outs["eager"][v][0]) <= 1e-5
        assert gap(outs["sdpa"][v][1, :30], outs["eager"][v][1, :30]) <= 1e-5


# --- edge cases ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ALL)
def test_all_padding_batch_is_finite_like_the_base(tiny, variant):
    # SDPA gives a query with no visible key a zero output; so do the sparse kernels. The logits are
    # then finite and equal to the base's (the eager base would average all values there instead).
    x, mask = ids(12), torch.zeros(2, 12, dtype=torch.long)
    with torch.no_grad():
        base = tiny.model(input_ids=x, attention_mask=mask).logits
    out = logits_with(tiny.model, x, mask, variant=variant)
    assert torch.isfinite(out).all()
    assert gap(out, base) <= 1e-5


@pytest.mark.parametrize("variant", SPARSE)
def test_repeated_tokens_and_short_sequences(tiny, variant):
    for x, extra in ((torch.full((1, 40), 40), {}),          # identical tokens: ties everywhere
                     (ids(5), {"window": 8}),                 # shorter than the window, not whole blocks
                     (ids(1), {}), (ids(6), {})):
        gathered = logits_with(tiny.model, x, variant=variant, kernel="gather", **extra)
        masked = logits_with(tiny.model, x, variant=variant, kernel="masked", **extra)
        assert torch.isfinite(gathered).all()
        assert gap(gathered, masked) <= 1e-5
    short = ids(5)
    assert gap(logits_with(tiny.model, short, variant="window", window=8), logits_of(tiny.model, short)) <= 1e-5


@pytest.mark.parametrize("variant", ALL)
def test_right_padded_batch_matches_each_sequence_alone(tiny, variant):
    lengths, pad = [37, 22, 9], tiny.tokenizer.pad_token_id
    seqs = [ids(n, batch=1, seed=n)[0] for n in lengths]
    x = torch.full((3, 37), pad)
    mask = torch.zeros(3, 37, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)], mask[i, :len(s)] = s, 1
    plugin = attach(tiny.model, variant=variant, top_k=1)
    with torch.no_grad():
        batched = tiny.model(input_ids=x, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            alone = tiny.model(input_ids=s[None]).logits[0]
            assert gap(batched[i, :len(s)], alone) <= 1e-5
    assert torch.isfinite(batched).all()
    plugin.detach()


@pytest.mark.parametrize("variant", ALL)
def test_kv_cache_generation_matches_no_cache(tiny, variant):
    # A 26-token prompt is 7 blocks of 4: the learned gate picks 1 of up to 4 candidate blocks. A decoding
    # step is one row, so the equality holds for row-wise selection (block-shared: see selection.py).
    plugin = attach(tiny.model, variant=variant, top_k=1, granularity="row")
    prompt = ids(26, batch=1, seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        cached = tiny.model.generate(prompt, **kw)
        uncached = tiny.model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    if variant in ("window", "learned"):
        assert plugin.sparsity() > 0.2
    plugin.detach()


# --- the learned gate, its training signal, statistics -------------------------------------------

def test_gate_loss_trains_the_gates_only(tiny):
    plugin = attach(tiny.model, variant="learned", top_k=1)
    gates = plugin.trainable_parameters()
    assert gates and all(ATTR in n for n in gates)
    x = ids(40)
    tiny.model(input_ids=x)
    assert all(getattr(m, ATTR).last_gate_loss is None for m in attention_modules(tiny.model))  # no teacher
    with pytest.raises(PluginError, match="collect_gate_loss = True"):
        plugin.gate_loss()

    plugin.collect_gate_loss = True
    opt = torch.optim.Adam(gates.values(), lr=0.05)
    losses = []
    for _ in range(15):
        tiny.model(input_ids=x)
        loss = plugin.gate_loss()
        assert loss.requires_grad and torch.isfinite(loss) and loss > 0
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in gates.values())
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0]                  # the KL to the dense teacher goes down
    assert all(p.grad is None for n, p in tiny.model.named_parameters() if n not in gates)
    with pytest.raises(PluginError, match="no gate loss yet"):
        plugin.gate_loss()                         # it was cleared
    plugin.detach()


def test_gate_threshold_mode_and_train_modules(tiny_llama):
    m, x = tiny_llama.model, ids()
    base = logits_of(m, x)
    plugin = attach(m, variant="learned", threshold=1.0, train_modules=["model.layers.1.mlp"])
    out = logits_of(m, x)                          # threshold 1: (almost) only the always-kept blocks
    assert plugin.sparsity() > 0.3 and gap(out, base) > 1e-3
    names = plugin.trainable_parameters()
    assert any(n.startswith("model.layers.1.mlp.") for n in names) and any(ATTR in n for n in names)
    up = m.model.layers[1].mlp.up_proj.weight
    assert up.requires_grad
    with torch.no_grad():
        up.add_(0.1)                               # "training" a base module
    trained = logits_of(m, x)
    plugin.detach()                                # restores the base weights exactly ...
    assert not any(p.requires_grad for p in m.parameters())
    assert torch.equal(logits_of(m, x), base)
    plugin.attach(m)                               # ... and a re-attach brings the trained ones back
    assert torch.equal(logits_of(m, x), trained)
    plugin.detach()
    low = attach(m, variant="learned", threshold=1e-9, kernel="gather")   # every candidate passes
    assert gap(logits_of(m, x), base) <= 1e-5
    low.detach()


def test_sparsity_is_the_fraction_of_causal_pairs_skipped(tiny):
    x = ids(37)
    expected = {"dense": 0.0, "performer": 0.0,
                # window 3, sinks 1: min(p+1, 3) + [p >= 3] keys of p+1
                "window": 1 - (1 + 2 + 3 * 35 + 34) / (37 * 38 / 2)}
    for variant in ALL:
        plugin = attach(tiny.model, variant=variant, sinks=1)
        with pytest.raises(PluginError, match="run one first"):
            plugin.sparsity()
        logits_of(tiny.model, x)
        s = plugin.sparsity()
        if variant in expected:
            assert s == pytest.approx(expected[variant], abs=1e-6)
        else:
            assert 0.1 < s < 0.9
        plugin.detach()


@pytest.mark.parametrize("variant", ALL)
def test_capture_attention_gives_probability_matrices(tiny, variant):
    x, mask = ids(21), torch.ones(2, 21, dtype=torch.long)
    mask[1, 15:] = 0
    plugin = attach(tiny.model, variant=variant, sinks=1)
    with capture_attention(tiny.model) as probs, torch.no_grad():
        tiny.model(input_ids=x, attention_mask=mask)
    assert sorted(probs) == [0, 1]
    heads = tiny.model.config.num_attention_heads
    real = mask.bool()[:, None, :, None].expand(2, heads, 21, 1)[..., 0]   # rows of real queries
    for sparse, dense in probs.values():
        assert sparse.shape == dense.shape == (2, heads, 21, 21)
        for p in (sparse, dense):
            assert torch.allclose(p.sum(-1)[real], torch.ones(()), atol=1e-5)
            assert (p.triu(1) == 0).all()          # causal
        if variant == "window":                    # nothing beyond the window except the sink
            far = torch.ones(21, 21, dtype=torch.bool).tril(-3)
            far[:, 0] = False
            assert (sparse[..., far] == 0).all() and (dense[..., far] > 0).any()
        if variant == "dense":
            assert torch.equal(sparse, dense)
    logits_of(tiny.model, x)
    assert sorted(probs) == [0, 1]                 # nothing captured after the block
    plugin.detach()


def test_save_and_load_round_trip(tiny_llama, tmp_path):
    m, x = tiny_llama.model, ids()
    plugin = attach(m, variant="learned", top_k=1)
    with torch.no_grad():
        for p in plugin.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    before = logits_of(m, x)
    plugin.save_pretrained(tmp_path / "sparse")
    plugin.detach()
    again = attach(m, variant="learned", top_k=1)
    again.load_state_dict(load_weights(tmp_path / "sparse"))
    assert torch.equal(logits_of(m, x), before)
    again.detach()


# --- misuse --------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error(tiny_llama):
    m = tiny_llama.model
    with pytest.raises(PluginError, match="unknown sparse variant 'sliding'; use one of: window, learned"):
        SparseConfig(variant="sliding")
    with pytest.raises(PluginError, match="unknown sparse kernel 'triton'; use one of: auto, flex"):
        SparseConfig(kernel="triton")
    with pytest.raises(PluginError, match="block_size must be an integer >= 1"):
        SparseConfig(block_size=0)
    with pytest.raises(PluginError, match="out of range for a model with 2 layers"):
        attach(m, layers=[0, 5])
    with pytest.raises(PluginError, match="no submodule 'model.layers.9.mlp'"):
        attach(m, train_modules=["model.layers.9.mlp"])
    assert m.config._attn_implementation == "sdpa"     # failed attaches leave the model untouched
    plugin = attach(m)
    with pytest.raises(PluginError, match="already carries"):
        attach(m)
    with pytest.raises(PluginError, match="already attached"):
        plugin.attach(m)
    plugin.detach()
    with pytest.raises(PluginError, match="not attached"):
        plugin.detach()
    with pytest.raises(PluginError, match="attach SparseAttention first"):
        with dense_reference(m):
            pass
    from transformers import OPTConfig, OPTForCausalLM
    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(PluginError, match="supported: gpt2, llama, mistral, qwen2, qwen3"):
        attach(opt)


# --- FlexAttention (compiles with Inductor: ~20-30 s the first time on 2 CPU cores) --------------

def _flex_unavailable() -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "this torch has no FlexAttention"
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler: torch.compile cannot build FlexAttention for the CPU"
    return None


@pytest.mark.skipif(_flex_unavailable() is not None, reason=str(_flex_unavailable()))
def test_flex_kernel_equals_the_masked_reference(tiny_llama):
    m = tiny_llama.model
    x, mask = ids(30), torch.ones(2, 30, dtype=torch.long)
    mask[1, 26:] = 0
    for variant in ("learned", "window"):
        flex = logits_with(m, x, mask, variant=variant, kernel="flex", sinks=1)
        masked = logits_with(m, x, mask, variant=variant, kernel="masked", sinks=1)
        assert gap(flex[0], masked[0]) <= 1e-5 and gap(flex[1, :26], masked[1, :26]) <= 1e-5
    # decoding steps (queries after the cached keys) build the BlockMask from the rule instead
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=tiny_llama.tokenizer.pad_token_id)
    outs = []
    for kernel in ("flex", "masked"):
        plugin = attach(m, variant="learned", top_k=1, kernel=kernel)
        with torch.no_grad():
            outs.append(m.generate(x[:1], **kw))
        plugin.detach()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(_flex_unavailable() is not None, reason=str(_flex_unavailable()))
@pytest.mark.parametrize("tiles", [1, 2])
def test_flex_without_padding_skips_mask_mod_on_full_tiles_and_equals_the_reference(tiny_llama, monkeypatch, tiles):
    # no padding: tiles below the diagonal whose blocks are all kept are "full" (no mask_mod); tiles=2
    # is what CUDA training uses (BlockMask tiles of 128 over 64-token blocks), forced here on the CPU
    from attnlab.modules.sparse import kernels
    monkeypatch.setattr(kernels, "tile_factor", lambda *a: tiles)
    m = tiny_llama.model
    x, mask = ids(64), torch.ones(2, 64, dtype=torch.long)
    for variant, opts in (("quest", dict(top_k=2)), ("learned", dict(top_k=2)), ("window", {})):
        flex = logits_with(m, x, mask, variant=variant, kernel="flex", block_size=8, **opts)
        masked = logits_with(m, x, mask, variant=variant, kernel="masked", block_size=8, **opts)
        assert gap(flex, masked) <= 1e-5, variant


def test_tiles_pool_blocks_with_any_or_all_and_count_edge_blocks_as_not_kept():
    from attnlab.modules.sparse.kernels import tile_blocks
    kept = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    assert tile_blocks(kept, 2, any).tolist() == [[True, True], [True, True]]
    assert tile_blocks(kept, 2, all).tolist() == [[True, False], [False, False]]
    assert torch.equal(tile_blocks(kept, 1, all), kept)


def test_oracle_selection_beats_or_ties_the_untrained_gate_on_block_mass():
    # The oracle keeps, per query block, the candidate blocks with the most dense attention mass,
    # so it drops the least mass; on this input its attention-matrix error is no worse than the gate's.
    from attnlab import load_backbone
    from attnlab.distill import attention_mse
    from attnlab.modules import attach
    from attnlab.data import build_splits
    bb = load_backbone("tiny-llama")
    s = build_splits({"dataset_name": "python_docs", "n_train": 0, "n_eval": 2, "max_length": 64}, bb.tokenizer)
    errs = {}
    for oracle in (False, True):
        p = attach(bb.model, "sparse", variant="learned", block_size=4, top_k=1, oracle=oracle)
        errs[oracle] = attention_mse(bb.model, s.eval, bb.tokenizer.pad_token_id)
        p.detach()
    assert errs[True] <= errs[False] + 1e-9, errs


# --- Quest, the memory-lean kernel, and the work it does -----------------------------------------

def test_quest_bound_is_above_every_logit_of_its_block():
    from attnlab.modules.sparse.patterns import Pattern
    from attnlab.modules.sparse.quest import quest_scores
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    p = Pattern(40, 40, 4, "cpu")
    bound = quest_scores(q, k, p)                                   # (B, Hkv, G, Tq, nfull)
    logits = q.view(2, 2, 2, 40, 8) @ k[:, :, None].transpose(-1, -2)   # every q.k
    best = logits.view(2, 2, 2, 40, 10, 4).amax(-1)                 # the largest logit in each block
    assert (bound >= best - 1e-5).all()
    assert (bound - best).abs().min() < 1e-5                        # and it can be tight
    single = Pattern(40, 40, 1, "cpu")                              # one key per block: exact
    assert torch.allclose(quest_scores(q, k, single), logits, atol=1e-5)


def test_quest_finds_the_block_that_holds_the_matching_key(tiny_llama):
    from attnlab.modules.sparse.patterns import Pattern
    from attnlab.modules.sparse.quest import quest_scores
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 64, 16, generator=g) * 0.1, torch.randn(1, 2, 64, 16, generator=g) * 0.1
    k[0, :, 21] = q[0, :, 60] * 50                                  # one key in block 5 matches query 60
    p = Pattern(64, 64, 4, "cpu")
    sel = p.row_selection(quest_scores(q, k, p), top_k=1)
    assert (sel.idx[0, :, :, 60, 3] == 5).all()                     # the one chosen candidate


def test_gather_kernel_gradients_equal_the_masked_reference():
    # The custom backward (fused CPU kernel, and the plain-torch path used off the CPU) against
    # autograd through dense SDPA with the pattern as a mask: per-row (quest) and per-block (window)
    # selections, grouped heads, a padded sequence, a chunk of queries after cached keys.
    from attnlab.modules.sparse import blocksparse
    from attnlab.modules.sparse.kernels import masked_attention
    from attnlab.modules.sparse.patterns import Pattern
    from attnlab.modules.sparse.quest import quest_scores
    gen = torch.Generator().manual_seed(0)
    for fused, row_tile in ((True, 16), (False, 16), (True, 2)):    # 2: tiles of 2 query positions
        for window, tq, tk, shared in ((None, 37, 37, False), (None, 37, 37, True), (6, 37, 37, False),
                                       (None, 5, 37, False), (None, 1, 37, False)):
            q = torch.randn(2, 4, tq, 8, generator=gen, requires_grad=True)
            k, v = (torch.randn(2, 2, tk, 8, generator=gen, requires_grad=True) for _ in range(2))
            p = Pattern(tq, tk, 4, "cpu", window, 1 if window else 0)
            if window:
                sel = p.window_selection()
            else:
                scores = quest_scores(q.detach(), k.detach(), p)
                sel = p.row_selection(scores.sum(2, keepdim=True) if shared else scores, top_k=2)
            base = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq).repeat(2, 1, 1, 1)
            base[1, :, :, tk - 6:] = False                          # the second sequence is shorter
            try:
                blocksparse.USE_FUSED, blocksparse.ROW_TILE = fused, row_tile
                out, _ = blocksparse.block_sparse_attention(q, k, v, p, sel, base, 0.3)
            finally:
                blocksparse.USE_FUSED, blocksparse.ROW_TILE = True, 16
            ref = masked_attention(q, k, v, p.full_mask(sel, base, 2), 0.3)
            grad = torch.randn(out.shape, generator=gen)
            assert gap(out, ref) <= 1e-5
            for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
                assert gap(a, b) <= 1e-5


def test_the_backward_keeps_indices_and_the_log_sum_exp_not_a_mask():
    # What the autograd graph keeps for the sparse attention: q, k, v, the output and the lse (B, Hq,
    # Tq); the block indices ride along. No Tq x Tk mask, no gathered keys, no rows x keys mask.
    from attnlab.modules.sparse.blocksparse import block_sparse_attention
    from attnlab.modules.sparse.patterns import Pattern
    from attnlab.modules.sparse.quest import quest_scores
    t = 256
    q = torch.randn(1, 4, t, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, t, 16, requires_grad=True) for _ in range(2))
    p = Pattern(t, t, 16, "cpu")
    sel = p.row_selection(quest_scores(q.detach(), k.detach(), p), top_k=2)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: kept.append(x) or x, lambda x: x):
        out, _ = block_sparse_attention(q, k, v, p, sel, None, 0.25)
    assert sorted(x.numel() for x in kept) == sorted([q.numel(), k.numel(), v.numel(), out.numel(), 4 * t])
    out.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_work_done_falls_with_sparsity(tiny_llama):
    # Pairs the kernel scores (whole tiles, masked pairs included) against the sparsity it reports.
    x = ids(96, batch=1)
    runs = {}
    for name, options in (("window 48", dict(variant="window", window=48)),
                          ("window 12", dict(variant="window", window=12)),
                          ("quest top 6", dict(variant="quest", top_k=6)),
                          ("quest top 1", dict(variant="quest", top_k=1))):
        plugin = attach(tiny_llama.model, kernel="gather", **options)
        logits_of(tiny_llama.model, x)
        runs[name] = (plugin.pairs_scored(), plugin.sparsity())
        plugin.detach()
    dense = 2 * 4 * 96 * 96                                         # layers x heads x Tq x Tk
    assert runs["window 12"][0] < runs["window 48"][0] < dense
    assert runs["quest top 1"][0] < runs["quest top 6"][0] < dense
    assert runs["window 12"][1] > runs["window 48"][1] and runs["quest top 1"][1] > runs["quest top 6"][1]


def test_mass_selection_adapts_density_per_row():
    import math
    from attnlab.modules.sparse.patterns import Pattern
    p = Pattern(64, 64, 4, "cpu")
    scores = torch.zeros(1, 1, 1, 64, 16)
    scores[..., 40:, 5] = 10.0                                      # rows 40+: block 5 holds the mass
    fixed, cand = p.fixed()[1].sum(-1), p.candidates().sum(-1)
    chosen = {m: p.row_selection(scores, mass=m).valid.sum(-1)[0, 0, 0] - fixed for m in (0.5, 0.9, 1.0)}
    assert torch.equal(chosen[1.0], cand)                           # all the mass: every candidate
    assert (chosen[0.5][40:] == 1).all() and (chosen[0.9][40:] == 1).all()
    flat = [r for r in range(40) if cand[r] > 0]                    # equal scores: a share of them
    assert flat and all(chosen[0.9][r] == math.ceil(0.9 * cand[r] - 1e-6) for r in flat)


def test_the_sparse_package_loads_without_distillation_and_distillation_uses_the_public_base_function():
    # No import cycle: the package imports attnlab.distill only inside the methods that use it, and
    # distill.py reaches the frozen base through the plug-in's public base_function(), never its fields.
    import inspect
    import subprocess
    import sys

    import attnlab.distill
    code = "import sys, attnlab.modules.sparse; print('attnlab.distill' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    source = inspect.getsource(attnlab.distill)
    assert "plugin.base_function()" in source and "modules.sparse" not in source
    assert "plugin._" not in source


def test_a_query_head_oracle_keeps_at_least_the_kv_head_oracles_mass_for_every_query_head():
    # oracle-qhead ranks each query head's own dense mass; the kv-head oracle ranks the sum over the G
    # heads that share the kv head. At the same top_k each keeps as many blocks, and per query head the
    # per-head choice keeps the most of that head's mass: never less than the shared choice.
    from attnlab.modules.sparse import recipe
    from attnlab.modules.sparse.patterns import Pattern
    from attnlab.modules.sparse.selection import select
    from attnlab.modules.sparse.teacher import row_block_stats
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 48, 8, generator=g) * 2, torch.randn(1, 2, 48, 8, generator=g) * 2
    p = Pattern(48, 48, 4, "cpu")
    mass = row_block_stats(q, k, p, None, 8 ** -0.5)[0].view(1, 2, 2, 48, p.nb)   # (B, Hkv, G, Tq, nb)
    kept, counts = {}, {}
    for selector in ("oracle", "oracle-qhead"):
        opts = recipe.options(selector, {"top_k": 2}, {"block_size": 4, "granularity": "row"})
        assert opts["oracle"] and opts["variant"] == {"oracle": "learned", "oracle-qhead": "quest"}[selector]
        cfg = SparseConfig(**{k: v for k, v in opts.items() if k != "block_size"}, block_size=4)
        sel = select(cfg, q, k, p, None, 8 ** -0.5)
        idx = sel.idx.expand(1, 2, 2, *sel.idx.shape[-2:])                   # (B, Hkv, G, Tq, K): per row
        got = mass.gather(-1, idx) * sel.valid.expand_as(idx)
        kept[selector] = got.sum(-1)                                                     # per query head and row
        counts[selector] = sel.valid.expand_as(idx).sum(-1)
    assert torch.equal(counts["oracle"], counts["oracle-qhead"])                      # the same density
    assert (kept["oracle-qhead"] >= kept["oracle"] - 1e-6).all()
    assert (kept["oracle-qhead"] > kept["oracle"] + 1e-4).any()          # the heads disagree somewhere


def test_at_block_granularity_the_query_head_oracle_is_the_oracle_and_is_not_swept_twice():
    from attnlab.modules.sparse import quality, recipe
    from attnlab.modules.sparse.patterns import Pattern
    from attnlab.modules.sparse.selection import select
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 48, 8, generator=g) * 2, torch.randn(1, 2, 48, 8, generator=g) * 2
    p = Pattern(48, 48, 4, "cpu")
    sel = {}
    for selector in ("oracle", "oracle-qhead"):
        opts = recipe.options(selector, {"top_k": 2}, {"block_size": 4, "granularity": "block"})
        cfg = SparseConfig(**{k: v for k, v in opts.items() if k != "block_size"}, block_size=4)
        sel[selector] = select(cfg, q, k, p, None, 8 ** -0.5)
    assert torch.equal(sel["oracle"].idx, sel["oracle-qhead"].idx)
    assert "oracle-qhead" not in quality.DEFAULT_SELECTORS and "oracle" in quality.DEFAULT_SELECTORS   # read only when named
    assert set(quality.DEFAULT_SELECTORS) == set(quality.SELECTORS) - {"oracle-qhead", "lowrank"}
