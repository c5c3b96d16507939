import itertools
import math

import pytest
import torch

from attnlab import PluginSet, attach, load_backbone
from attnlab.chunked_ce import ConcatTable, mixture_cross_entropy, mixture_log_probs
from attnlab.evaluate import generate, score
from attnlab.features import build_feature_cache
from attnlab.modules import PluginError
from attnlab.train import TrainConfig, train

from .conftest import logits_of, tiny_splits

OPTIONS = [dict(preset="paper"), dict(preset="residual", gate_init=0.7)] + [
    dict(weights=w, n_heads=nh, latent_dim=lat, projection=pr, residual=res, gate_init=0.5)
    for w, nh, lat, pr, res in itertools.product(["logits", "probs", "logprobs"], [1, 4], [None, 16],
                                                 ["linear", "mlp"], [False, True])]


def _perturb(plugin, scale=0.05):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in plugin.trainable_parameters().values():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fast_path_equals_the_literal_formula(opts):
    bb = load_backbone("tiny-llama")
    p = attach(bb.model, "backward_head", **opts)
    _perturb(p)
    head = bb.model.get_output_embeddings()
    h = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, ref = head(h), head.reference_log_probs(h)
    assert (fast - ref).abs().max() <= 1e-4
    tokens = torch.randint(0, head.vocab, (9,))
    loss = head.target_loss(h, tokens)
    assert math.isclose(loss.item(), -ref[torch.arange(9), tokens].sum().item(), rel_tol=1e-4)


def test_chunked_cross_entropy_value_and_gradients():
    torch.manual_seed(0)
    X = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 41, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 41, (6,))
    ref = -mixture_log_probs(X, W)[torch.arange(6), y]
    for chunk in (1, 7, 41, 1000):  # 41 rows: chunks that do and do not divide the vocabulary
        torch.testing.assert_close(mixture_cross_entropy(X, W, y, chunk), ref)
    assert torch.autograd.gradcheck(lambda a, b: mixture_cross_entropy(a, b, y, 8), (X, W))
    # frozen leading columns: same value, same gradient for X and the trainable columns
    Wf = W.detach()[..., :2]
    Wt = W.detach()[..., 2:].clone().requires_grad_(True)
    mixture_cross_entropy(X, torch.cat([Wf, Wt], -1), y, 8, w_grad_from=2).sum().backward()
    gX, gWt = X.grad.clone(), Wt.grad.clone()
    X.grad = None
    Wt.grad = None
    mixture_cross_entropy(X, torch.cat([Wf, Wt], -1), y, 8).sum().backward()
    torch.testing.assert_close(gX, X.grad)
    torch.testing.assert_close(gWt, Wt.grad)
    assert mixture_cross_entropy(X[:, :0], W, y[:0]).shape == (0,)
    with pytest.raises(ValueError, match="targets must have shape"):
        mixture_cross_entropy(X, W, y[:3])
    with pytest.raises(ValueError, match="expected X"):
        mixture_cross_entropy(X[0], W, y)


def test_a_table_of_column_blocks_scores_like_the_concatenated_table():
    torch.manual_seed(0)
    X = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    parts = [torch.randn(1, 41, 4, dtype=torch.float64), torch.randn(1, 41, 1, dtype=torch.float64),
             torch.randn(1, 41, 4, dtype=torch.float64)]
    y = torch.randint(0, 41, (6,))
    whole, blocks = torch.cat(parts, -1), ConcatTable(parts)
    torch.testing.assert_close(mixture_log_probs(X, blocks), mixture_log_probs(X, whole))
    for save_bytes in (0, 1 << 20):  # scores recomputed per chunk, and kept for the backward
        grads = []
        for W in (whole, blocks):
            loss = mixture_cross_entropy(X, W, y, 7, save_bytes=save_bytes)
            grads.append((loss.detach(), torch.autograd.grad(loss.sum(), X)[0]))
        torch.testing.assert_close(grads[1], grads[0])


def test_the_residual_head_keeps_no_copy_of_the_lm_head(tiny_llama):
    emb = tiny_llama.model.get_input_embeddings().weight
    p = attach(tiny_llama.model, "backward_head", preset="residual")
    head = tiny_llama.model.get_output_embeddings()
    V, E = emb.shape
    # R, C, c, and the zero bias column of a head without bias: no V x E block of the LM head
    assert head.constant_bytes() == (V * E + E * E + E + V) * emb.element_size()
    p.detach()


def test_residual_starts_at_the_base_distribution(tiny):
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    base = logits_of(tiny.model, ids).log_softmax(-1)
    p = attach(tiny.model, "backward_head", preset="residual")
    torch.testing.assert_close(logits_of(tiny.model, ids), base, atol=1e-5, rtol=0)
    p.detach()


def test_mlp_tables_once_per_step_give_the_same_gradients():
    bb = load_backbone("tiny-gpt2")
    p = attach(bb.model, "backward_head", preset="paper", latent_dim=16, n_heads=2, projection="mlp")
    head = bb.model.get_output_embeddings()
    params = p.trainable_parameters()
    h = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, head.vocab, (2, 7))
    for mb in range(2):  # per call: tables recomputed in every micro-batch
        head.target_loss(h[mb], y[mb]).backward()
    per_call = {n: q.grad.clone() for n, q in params.items()}
    for q in params.values():
        q.grad = None
    p.on_step_start()
    for mb in range(2):
        head.target_loss(h[mb], y[mb]).backward()
    p.on_step_end()
    for n, q in params.items():
        torch.testing.assert_close(q.grad, per_call[n], atol=1e-6, rtol=1e-5)
    p.detach()


def test_training_lowers_the_loss_and_generation_runs(tiny_llama):
    s = tiny_splits(tiny_llama, n_train=8, n_eval=2)
    pad = tiny_llama.tokenizer.pad_token_id
    p = attach(tiny_llama.model, "backward_head", preset="paper")
    before = score(tiny_llama.model, s.eval, pad)["cross_entropy"]
    r = train(tiny_llama.model, p, s.train, TrainConfig(steps=15, batch_size=4, lr=1e-2, warmup_steps=0,
                                                        progress=False), pad_id=pad)
    assert r.history[-1]["loss"] < r.history[0]["loss"] - 0.5
    assert score(tiny_llama.model, s.eval, pad)["cross_entropy"] < before
    texts = generate(tiny_llama.model, tiny_llama.tokenizer, s.eval, max_new_tokens=5)
    texts_s = generate(tiny_llama.model, tiny_llama.tokenizer, s.eval, max_new_tokens=5, do_sample=True)
    assert len(texts) == len(texts_s) == 2
    p.detach()


def test_feature_cache_matches_live_training(tiny_llama, tmp_path):
    s = tiny_splits(tiny_llama, n_train=8)
    pad = tiny_llama.tokenizer.pad_token_id
    cache = build_feature_cache(tiny_llama.model, "tiny-llama", s.train, pad, root=tmp_path, log=lambda *_: None)
    assert len(cache) == 8 and cache.n_tokens == sum(e.n_target for e in s.train)
    again = build_feature_cache(tiny_llama.model, "tiny-llama", s.train, pad, root=tmp_path)
    assert again.path == cache.path
    other = build_feature_cache(tiny_llama.model, "tiny-llama", s.train[:4], pad, root=tmp_path)
    assert other.path != cache.path and len(other) == 4
    curves = []
    for feats in (None, cache):
        torch.manual_seed(0)
        p = attach(tiny_llama.model, "backward_head", preset="residual", gate_init=0.3)
        r = train(tiny_llama.model, p, s.train, TrainConfig(steps=6, batch_size=4, lr=1e-2, progress=False),
                  pad_id=pad, features=feats)
        curves.append([h["loss"] for h in r.history])
        p.detach()
    for live, cached in zip(*curves):
        assert abs(live - cached) < 2e-3 * max(1.0, abs(live))  # fp16 rounding of the cached states
    lora = attach(tiny_llama.model, "lora")
    with pytest.raises(ValueError, match="cannot train from cached features"):
        train(tiny_llama.model, lora, s.train, TrainConfig(steps=1, progress=False), features=cache)
    lora.detach()
    assert build_feature_cache(tiny_llama.model, "tiny-llama", s.train, pad, root=tmp_path, max_bytes=10,
                               log=lambda *_: None) is None


def test_bad_input_is_a_clear_error(tiny_llama):
    p = attach(tiny_llama.model, "backward_head")
    head = tiny_llama.model.get_output_embeddings()
    with pytest.raises(PluginError, match=r"expected final hidden states"):
        head(torch.randn(3, 65))
    with pytest.raises(PluginError, match=r"expected final hidden states"):
        head.target_loss(torch.randn(2, 3, 64), torch.zeros(2, dtype=torch.long))
    assert head(torch.randn(0, 64)).shape == (0, head.vocab)
    assert head.target_loss(torch.randn(0, 64), torch.zeros(0, dtype=torch.long)).item() == 0
    p.detach()
    with pytest.raises(PluginError, match="no preset 'best'"):
        attach(tiny_llama.model, "backward_head", preset="best")
    with pytest.raises(PluginError, match="not divisible by n_heads"):
        attach(tiny_llama.model, "backward_head", attn_dim=30, n_heads=4)
    with pytest.raises(PluginError, match="weights must be one of"):
        attach(tiny_llama.model, "backward_head", weights="raw")
    from attnlab.modules.backward_head import BackwardAttentionHead, BackwardHeadConfig
    with pytest.raises(PluginError, match="must both be vocab x hidden"):
        BackwardAttentionHead(BackwardHeadConfig(), torch.randn(10, 8), torch.nn.Linear(8, 11, bias=False))


def test_named_heads_switch_without_reloading(tiny_llama, tmp_path):
    m = tiny_llama.model
    ids = torch.tensor([[5, 6, 7, 8]])
    base = logits_of(m, ids)
    a = attach(m, "backward_head", preset="paper")
    _perturb(a)
    out_a = logits_of(m, ids)
    a.save_pretrained(tmp_path / "a")
    a.detach()
    heads = PluginSet(m)
    heads.add("a", tmp_path / "a")
    b = attach(m, "backward_head", preset="residual", gate_init=1.0)
    _perturb(b, 0.2)
    out_b = logits_of(m, ids)
    heads.add("b", b)
    heads.use_head("a")
    assert torch.equal(logits_of(m, ids), out_a)
    heads.use_head("b")
    assert torch.equal(logits_of(m, ids), out_b)
    heads.use_head(None)
    assert torch.equal(logits_of(m, ids), base)
    with pytest.raises(PluginError, match="no plug-in named 'c'"):
        heads.use_head("c")


@pytest.mark.parametrize("latent_dim", [None, 8])
def test_the_paper_head_is_a_bilinear_lm_head(tiny, latent_dim):
    """With raw-logit weights the head's scores are h · A + a, one E x V matrix A =
    W_outᵀ · Vv · W_Qᵀ · Kᵀ / (V √d) and a row a from the LM-head bias: a reparametrised bilinear LM
    head. Written out here from the head's weights and compared with its log-probabilities."""
    import math

    torch.manual_seed(5)
    p = attach(tiny.model, "backward_head", preset="paper", latent_dim=latent_dim,
               attn_dim=16 if latent_dim else None)
    head = tiny.model.get_output_embeddings()
    with torch.no_grad():
        for v in p.trainable_parameters().values():
            v.mul_(0).add_(torch.randn_like(v))  # far from the near-uniform start
        emb, w_out, b_out = head._base["emb"], head._base["out_w"], head._base["out_b"]
        V, E = emb.shape
        ie = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + 1e-6) * head.norm_weight
        lat = ie @ head.W_L.weight.T if latent_dim else ie
        K, Vv = lat @ head.W_K.weight.T, lat @ head.W_V.weight.T
        A = w_out.T @ Vv @ head.W_Q.weight.T @ K.T / (V * math.sqrt(head.dim))           # E x V
        a = (b_out @ Vv @ head.W_Q.weight.T @ K.T / (V * math.sqrt(head.dim))) if b_out is not None else 0.0
        h = torch.randn(7, E)
        want = torch.log_softmax(h @ A + a, -1)
        got = head(h)
    p.detach()
    assert (got.max(-1).values - got.min(-1).values).min() > 1.0, "a distribution far from uniform"
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def _head(V=300, E=24, d=None, latent=None, bias=True, tied=False, dtype=torch.float32, **opts):
    """A head on a made-up base: untied (or tied) embeddings, an optional LM-head bias, any V."""
    from torch import nn

    from attnlab.modules.backward_head import BackwardAttentionHead, BackwardHeadConfig

    g = torch.Generator().manual_seed(11)
    emb = torch.randn(V, E, generator=g, dtype=dtype) * 0.7 + 0.1
    out = nn.Linear(E, V, bias=bias).to(dtype)
    with torch.no_grad():
        out.weight.copy_(emb if tied else torch.randn(V, E, generator=g, dtype=dtype))
        if bias:
            out.bias.copy_(torch.randn(V, generator=g, dtype=dtype))
    out.requires_grad_(False)
    head = BackwardAttentionHead(BackwardHeadConfig(attn_dim=d, latent_dim=latent, **opts), emb, out)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
    return head


REASSOCIATED = [
    dict(),                                        # d = E, untied, with an LM-head bias
    dict(d=16),                                    # attn_dim != E
    dict(d=12, latent=8, n_heads=3),               # latent projection, several heads
    dict(bias=False, tied=True, weights="logprobs"),
    dict(d=8, weights="probs", n_heads=2),
    dict(d=16, residual=True, gate_init=0.8),
    dict(d=16, latent=8, residual=True, gate_init=0.8, weights="logprobs", n_heads=2),
]


@pytest.mark.parametrize("opts", REASSOCIATED, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper")
@pytest.mark.parametrize("save_bytes", [0, 1 << 30], ids=["recompute", "saved"])
def test_the_reassociated_loss_and_gradients_equal_autograd_through_the_literal_formula(opts, save_bytes, monkeypatch):
    """Value and every parameter's gradient of the fast loss (never building K or Vv, vocabulary
    larger than one chunk, scores saved or recomputed) against autograd through the reference."""
    import attnlab.chunked_ce as ce

    monkeypatch.setattr(ce, "SAVE_BYTES", save_bytes)
    monkeypatch.setattr(ce.mixture_cross_entropy, "__defaults__", (8192, 0, save_bytes))
    head = _head(chunk_size=64, **opts)
    monkeypatch.setattr(head, "compute_tables", lambda: pytest.fail("the linear head built a V x d table"))
    h = torch.randn(10, 24, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(3))
    params = dict(head.named_parameters())
    ref = -head.reference_log_probs(h)[torch.arange(10), y].sum()
    want = torch.autograd.grad(ref, list(params.values()))
    fast = head.target_loss(h, y)
    got = torch.autograd.grad(fast, list(params.values()))
    assert abs(fast.item() - ref.item()) <= 1e-4 * abs(ref.item())
    for n, a, b in zip(params, got, want):
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max()), n
    with torch.no_grad():
        assert (head(h) - head.reference_log_probs(h)).abs().max() <= 1e-4


def test_dropout_on_the_query_is_the_same_mask_in_both_paths():
    head = _head(d=16, dropout=0.3).train()
    h = torch.randn(10, 24, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 300, (10,))
    torch.manual_seed(7)
    ref = -head.reference_log_probs(h)[torch.arange(10), y].sum()
    torch.manual_seed(7)
    fast = head.target_loss(h, y)
    torch.manual_seed(8)
    other = head.target_loss(h, y)
    assert abs(fast.item() - ref.item()) <= 1e-4 * abs(ref.item())
    assert abs(other.item() - ref.item()) > 1e-3, "dropout was not applied"


def test_the_linear_head_has_no_per_step_tables():
    head = _head(d=16)
    params = list(head.parameters())
    head.on_step_start()
    assert head._step is None, "the linear head needs no tables per optimizer step"
    head.target_loss(torch.randn(4, 24), torch.randint(0, 300, (4,))).backward()
    head.on_step_end()
    assert all(p.grad is not None for p in params)


def test_lora_on_the_lm_head_is_the_equal_parameter_baseline_and_trains_from_the_cache(tiny_llama, tmp_path):
    """LoRA through PEFT on `lm_head` alone: head-only (trains from cached features, same curve as
    live), and on a tied base it changes the output head only, never the input embedding."""
    m, pad = tiny_llama.model, tiny_llama.tokenizer.pad_token_id
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight, "tiny-llama ties its head"
    s = tiny_splits(tiny_llama, n_train=8)
    cache = build_feature_cache(m, "tiny-llama", s.train, pad, root=tmp_path, log=lambda *_: None)
    emb_before = m.get_input_embeddings().weight.clone()
    curves = []
    for feats in (None, cache):
        torch.manual_seed(0)
        p = attach(m, "lora", r=2, target_modules=["lm_head"])
        assert p.head_only and p.num_trainable() == 2 * (m.config.hidden_size + m.config.vocab_size)
        r = train(m, p, s.train, TrainConfig(steps=4, batch_size=4, lr=1e-2, progress=False), pad_id=pad,
                  features=feats)
        curves.append([h["loss"] for h in r.history])
        p.detach()
    for live, cached in zip(*curves):
        assert abs(live - cached) < 2e-3 * max(1.0, abs(live))
    assert curves[0][-1] < curves[0][0]
    assert torch.equal(m.get_input_embeddings().weight, emb_before)
