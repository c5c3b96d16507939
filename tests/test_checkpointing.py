"""Activation checkpointing of the frozen body gives the same gradients as without it, for every
method whose backward goes through the body, although no input of a block requires grad."""

import pytest
import torch

from attnlab import attach
from attnlab.backbone import layers
from attnlab.checkpointing import checkpointed
from attnlab.data import collate
from attnlab.train import TargetLoss, TrainConfig, train

from .conftest import tiny_splits

CASES = [("lora", {"r": 4, "dropout": 0.1}), ("factorized", {"lora_r": 2, "factor_dim": 8}),
         ("sparse", {}), ("sparse", {"variant": "window", "train_modules": ["@1.mlp"]})]


def _options(bb, opts):
    body = "transformer.h" if bb.model.config.model_type == "gpt2" else "model.layers"
    return {k: [m.replace("@", body + ".") for m in v] if k == "train_modules" else v for k, v in opts.items()}


def _grads(bb, p, batch, on):
    calls = []  # each block's first norm: how many times the blocks ran (forward, teacher, recomputation)
    hooks = [(b.ln_1 if hasattr(b, "ln_1") else b.input_layernorm).register_forward_pre_hook(
        lambda *a: calls.append(1)) for b in layers(bb.model)]
    try:
        torch.manual_seed(1)  # LoRA dropout: the same masks in both runs (and in the recomputation)
        with checkpointed(bb.model, on):
            loss = TargetLoss(bb.model, p.objective)(**batch)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: t.grad.clone() for n, t in p.trainable_parameters().items() if t.grad is not None}
    for t in p.trainable_parameters().values():
        t.grad = None
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("method,opts", CASES, ids=[f"{m}{o}" for m, o in CASES])
def test_checkpointed_blocks_give_the_same_gradients_as_stored_ones(tiny, method, opts):
    s = tiny_splits(tiny, n_train=4)
    batch = collate(s.train[:3], tiny.tokenizer.pad_token_id)
    torch.manual_seed(0)
    p = attach(tiny.model, method, **_options(tiny, opts))
    for m in p.training_modules():
        m.train(True)
    with torch.no_grad():  # zero-initialised parts (LoRA B, factorized proj) would hide a missing gradient
        for t in p.trainable_parameters().values():
            t.add_(0.01 * torch.randn_like(t))
    loss0, plain, calls0 = _grads(tiny, p, batch, on=False)
    loss1, ckpt, calls1 = _grads(tiny, p, batch, on=True)
    names = set(p.trainable_parameters())
    p.detach()
    assert calls1 > calls0, "checkpointing should recompute blocks in the backward"
    assert torch.equal(loss0, loss1)
    assert plain.keys() == ckpt.keys() == names, "every plug-in parameter gets a gradient"
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=0, msg=n)
    assert any(g.abs().sum() > 0 for g in ckpt.values())


def test_the_trainer_with_gradient_checkpointing_trains_the_same_weights(tiny_llama, tmp_path):
    s = tiny_splits(tiny_llama, n_train=8)
    out = {}
    for on in (False, True):
        torch.manual_seed(0)
        p = attach(tiny_llama.model, "lora", r=4, dropout=0.1)
        train(tiny_llama.model, p, s.train, TrainConfig(steps=3, batch_size=4, gradient_checkpointing=on,
                                                        progress=False))
        out[on] = p.state_dict()
        p.detach()
    assert all(torch.equal(out[False][k], out[True][k]) for k in out[False])
    assert "forward" not in vars(layers(tiny_llama.model)[0]), "the blocks are unwrapped after training"
