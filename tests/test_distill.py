import pytest
import torch

from attnlab.distill import attention_mse, base_function, distillation_loss, gradient_cosine, sparse_metrics
from attnlab.evaluate import base_reference, score
from attnlab.modules import attach
from attnlab.train import TrainConfig, train

from .conftest import logits_of


def _lm_splits(bb, n_train=8, n_eval=3, max_length=48):
    from attnlab.data import build_splits
    return build_splits({"dataset_name": "python_docs", "n_train": n_train, "n_eval": n_eval,
                         "max_length": max_length}, bb.tokenizer)


def test_dense_variant_metrics_are_exact(tiny):
    s = _lm_splits(tiny)
    p = attach(tiny.model, "sparse", variant="dense")
    m = sparse_metrics(tiny.model, p, s.eval, tiny.tokenizer.pad_token_id, batch_size=2, n_examples=2)
    assert m["sparsity"] == 0 and m["attention_mse"] == pytest.approx(0, abs=1e-12)
    assert m["grad_cosine"] == pytest.approx(1, abs=1e-5)
    assert all(not q.requires_grad for q in tiny.model.parameters()), "metrics must leave the base frozen"
    p.detach()


def test_window_metrics_see_the_difference(tiny):
    s = _lm_splits(tiny)
    pad = tiny.tokenizer.pad_token_id
    p = attach(tiny.model, "sparse", variant="window", window=3, block_size=4)
    assert attention_mse(tiny.model, s.eval[:2], pad) > 1e-4
    cos = gradient_cosine(tiny.model, p, s.eval[:2], pad)
    assert -1 <= cos < 0.999
    p.detach()


def test_teacher_is_the_base_even_with_trained_layers(tiny_llama):
    m = tiny_llama.model
    ids = torch.tensor([[5, 80, 77, 33, 101, 9, 64, 200, 17, 3] * 3])
    base = logits_of(m, ids)
    p = attach(m, "sparse", variant="window", window=3, block_size=4, train_modules=["model.layers.1.mlp"])
    with torch.no_grad():
        for q in p.trainable_parameters().values():
            q.add_(0.1)
    assert not torch.allclose(logits_of(m, ids), base)
    with base_function(m, p):
        assert torch.equal(logits_of(m, ids), base)
    assert not torch.allclose(logits_of(m, ids), base), "the trained values come back after the teacher"
    p.detach()


def test_distillation_trains_unfrozen_layers_towards_the_base(tiny_llama):
    bb = tiny_llama
    s = _lm_splits(bb, n_train=16)
    pad = bb.tokenizer.pad_token_id
    ref = base_reference(bb.model, s.eval, pad)
    p = attach(bb.model, "sparse", variant="window", window=2, block_size=4,
               train_modules=["model.layers.0.mlp", "model.layers.1.mlp"])
    before = score(bb.model, s.eval, pad, reference=ref)["kl_base_model"]
    res = train(bb.model, p, s.train, TrainConfig(steps=25, batch_size=4, lr=3e-3, warmup_steps=2, progress=False),
                pad_id=pad)
    after = score(bb.model, s.eval, pad, reference=ref)["kl_base_model"]
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert after < before, (before, after)
    p.detach()


def test_the_learned_gate_trains_from_its_block_maps(tiny_llama):
    bb = tiny_llama
    s = _lm_splits(bb, n_train=16, max_length=64)
    p = attach(bb.model, "sparse", variant="learned", block_size=4, top_k=1)
    gates = {n: q.detach().clone() for n, q in p.trainable_parameters().items()}
    res = train(bb.model, p, s.train, TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup_steps=2, progress=False),
                pad_id=bb.tokenizer.pad_token_id)
    assert any(not torch.equal(q, gates[n]) for n, q in p.trainable_parameters().items())
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last < first, (first, last)
    p.detach()


def test_nothing_to_train_is_a_clear_error(tiny_llama):
    from attnlab.data import collate
    s = _lm_splits(tiny_llama)
    p = attach(tiny_llama.model, "sparse", variant="learned", block_size=4, gate_weight=0.0)
    batch = collate(s.train[:2], tiny_llama.tokenizer.pad_token_id)
    with pytest.raises(RuntimeError, match="nothing that this loss can train"):
        distillation_loss(tiny_llama.model, p, batch, gate_weight=0.0)
    p.detach()


def test_gradient_cosine_leaves_trained_weights_as_they_were(tiny_llama):
    s = _lm_splits(tiny_llama)
    p = attach(tiny_llama.model, "sparse", variant="window", window=3, block_size=4,
               train_modules=["model.layers.1.self_attn"])
    gradient_cosine(tiny_llama.model, p, s.eval[:1], tiny_llama.tokenizer.pad_token_id)
    assert all(q.requires_grad and q.grad is None for q in p.trainable_parameters().values())
    assert not any(q.requires_grad for n, q in tiny_llama.model.named_parameters() if "layers.0." in n)
    p.detach()


def test_the_oracle_is_for_analysis_only(tiny_llama):
    s = _lm_splits(tiny_llama)
    p = attach(tiny_llama.model, "sparse", variant="learned", block_size=4, oracle=True)
    assert p.num_trainable() == 0
    from attnlab.data import collate
    with pytest.raises(Exception, match="analysis only"):
        p.objective(tiny_llama.model, collate(s.train[:1], tiny_llama.tokenizer.pad_token_id))
    p.detach()


def test_hidden_state_distillation_term_is_zero_for_the_exact_base(tiny_llama):
    from attnlab.data import collate
    s = _lm_splits(tiny_llama)
    p = attach(tiny_llama.model, "sparse", variant="dense", train_modules=["model.layers.1.mlp"])
    batch = collate(s.train[:2], tiny_llama.tokenizer.pad_token_id)
    loss = distillation_loss(tiny_llama.model, p, batch, gate_weight=0.0, hidden_weight=1.0)
    assert loss.requires_grad and loss.item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for q in p.trainable_parameters().values():
            q.add_(0.05)
    assert distillation_loss(tiny_llama.model, p, batch, gate_weight=0.0, hidden_weight=1.0).item() > 1e-4
    p.detach()
