"""Distillation from the frozen dense model into a sparse attention, and the proposal's metrics.

Teacher = the same frozen weights with dense attention (`dense_reference`), student = the patched
model. The loss per token is KL(P_base || P_student) at the target positions, plus optionally
  - gate_weight  x the gate's block-distribution KL against the dense attention's block-pooled
                 maps (the signal that trains a learned gate: its top-k choice is not differentiable),
  - hidden_weight x the mean squared difference of every layer's hidden states (intermediate-layer
                 distillation, for unfrozen layers).
Metrics against dense: attention-matrix MSE, cosine between the gradients that reach the attention
layers' weights under dense and under sparse attention, and achieved sparsity; KL, perplexity and
top-1 agreement come from `evaluate.score` with the base reference.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .data import collate
from .evaluate import target_logits, target_positions
from .modules.base import PluginError, attached


def _forward(model: nn.Module, batch: dict, hidden_states: bool):
    if not hidden_states:  # the trainer's own path: the head at target positions only
        logits, tokens = target_logits(model, batch)
        return logits.float(), tokens, None
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                output_hidden_states=True)
    keep, tokens = target_positions(batch["labels"])
    return out.logits[:, :-1][keep].float(), tokens, out.hidden_states


@contextlib.contextmanager
def base_function(model: nn.Module, plugin):
    """Inside: the model computes the frozen base exactly (the plug-in's public `base_function()`:
    dense attention, and the original values of any base weights it trains in place)."""
    with plugin.base_function():
        yield model


def distillation_loss(model: nn.Module, plugin, batch: dict, gate_weight: float = 1.0,
                      hidden_weight: float = 0.0) -> torch.Tensor:
    """Summed over the batch's target tokens (the trainer divides by the step's token count)."""
    with torch.no_grad(), base_function(model, plugin):
        t_logits, _, t_hidden = _forward(model, batch, hidden_weight > 0)
    plugin.collect_gate_loss = gate_weight > 0
    try:
        s_logits, tokens, s_hidden = _forward(model, batch, hidden_weight > 0)
        gate = plugin.gate_loss() if gate_weight > 0 else None
    finally:
        plugin.collect_gate_loss = False
    n = tokens.numel()
    loss = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="sum")
    if gate is not None:
        loss = loss + gate_weight * n * gate
    if hidden_weight > 0:
        mask = batch["attention_mask"].bool()
        mse = sum(F.mse_loss(s[mask].float(), t[mask].float()) for s, t in zip(s_hidden[1:], t_hidden[1:]))
        loss = loss + hidden_weight * n * mse / (len(s_hidden) - 1)
    if not loss.requires_grad:
        raise RuntimeError(f"the '{plugin.config.variant}' attention has nothing that this loss can train: give "
                           f"the learned gate gate_weight > 0, or unfreeze layers with train_modules")
    return loss


def _batches(examples, pad_id, batch_size, dev):
    for i in range(0, len(examples), batch_size):
        yield {k: v.to(dev) for k, v in collate(examples[i: i + batch_size], pad_id).items()}


@torch.no_grad()
def attention_mse(model: nn.Module, examples: list, pad_id: int, batch_size: int = 4) -> float:
    """Mean squared difference between the sparse and the dense attention probability matrices over
    the causal entries only (real query row, real key at or before it), every patched layer and head.
    Each layer's maps are reduced as they are computed (one layer's Tq x Tk maps at a time)."""
    plugin = _attention_plugin(model)
    dev = next(model.parameters()).device
    total = _CausalSquares()
    for batch in _batches(examples, pad_id, batch_size, dev):
        total.rows = batch["attention_mask"].bool()
        with plugin.capture_attention(into=total):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return total.sum / max(total.count, 1)


class _CausalSquares:
    """Receives (sparse, dense) (B, H, Tq, Tk) per layer; sums squared differences over causal entries."""

    def __init__(self):
        self.sum, self.count, self.rows = 0.0, 0, None

    def __setitem__(self, layer_idx, maps):
        sparse, dense = maps
        tq, tk = sparse.shape[-2:]
        rows = self.rows[:, -tq:]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=sparse.device).tril(tk - tq)
        entries = causal & rows[:, None, :, None] & self.rows[:, None, None, :tk]   # (B, 1, Tq, Tk)
        self.sum += ((sparse.float() - dense.float()).pow(2) * entries).sum().item()
        self.count += int(entries.sum().item()) * sparse.shape[1]


def _attention_plugin(model: nn.Module):
    """The attached plug-in that can capture its attention maps (the sparse attention)."""
    found = [p for p in attached(model) if hasattr(p, "capture_attention")]
    if not found:
        raise PluginError("this model carries no attention plug-in that captures its maps; attach sparse first")
    return found[-1]


def gradient_cosine(model: nn.Module, plugin, examples: list, pad_id: int, batch_size: int = 4) -> float:
    """Cosine similarity between the cross-entropy gradients that reach the (frozen) weights of the
    patched attention layers with dense attention and with the sparse one: does training through the
    sparse attention move those layers the way dense attention would?"""
    dense = attention_gradients(model, plugin, examples, pad_id, batch_size, dense=True)
    sparse = attention_gradients(model, plugin, examples, pad_id, batch_size, dense=False)
    return F.cosine_similarity(dense, sparse, dim=0).item()


def attention_gradients(model: nn.Module, plugin, examples: list, pad_id: int, batch_size: int = 4,
                        dense: bool = False) -> torch.Tensor:
    """The summed cross-entropy gradient of the patched attention layers' own weights, flattened,
    through the sparse attention (or the dense one): what gradient_cosine compares."""
    weights = plugin.patched_weights()
    dev = next(model.parameters()).device
    was = [w.requires_grad for w in weights]
    total = [torch.zeros_like(w) for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in _batches(examples, pad_id, batch_size, dev):
            labels = batch["labels"]
            with plugin.dense_reference() if dense else contextlib.nullcontext():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")
            # autograd.grad: no .grad left on any parameter, trained ones included
            for t, g in zip(total, torch.autograd.grad(loss, weights)):
                t += g
    finally:
        for w, r in zip(weights, was):
            w.requires_grad_(r)
    return torch.cat([t.flatten() for t in total])


@torch.no_grad()
def mean_sparsity(model: nn.Module, plugin, examples: list, pad_id: int, batch_size: int = 4) -> float:
    dev = next(model.parameters()).device
    vals = []
    for batch in _batches(examples, pad_id, batch_size, dev):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        vals.append(plugin.sparsity())
    return sum(vals) / len(vals)


def sparse_metrics(model: nn.Module, plugin, examples: list, pad_id: int, batch_size: int = 4,
                   n_examples: int = 8) -> dict:
    """Achieved sparsity over all eval examples; attention MSE and gradient cosine against dense on
    the first `n_examples` (0: skip those two)."""
    out = {"sparsity": mean_sparsity(model, plugin, examples, pad_id, batch_size)}
    if n_examples > 0:  # both materialise T x T maps: 0 skips them for long sequences
        ex = examples[:n_examples]
        out["attention_mse"] = attention_mse(model, ex, pad_id, batch_size)
        out["grad_cosine"] = gradient_cosine(model, plugin, ex, pad_id, batch_size)
    return out
