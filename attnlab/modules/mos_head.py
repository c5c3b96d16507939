"""Mixture of Softmaxes output head (Yang et al., 2018, "Breaking the Softmax Bottleneck"), on a frozen decoder.

One softmax over h W_outᵀ + b gives log-probabilities of rank <= E + 1 across contexts (the softmax
bottleneck); a mixture of K softmaxes does not have that limit. For a final hidden state h (E):

    π      = softmax(W_π h)                               K          (prior over components)
    c_k    = h + tanh(A_k B_k h)                          E          (component contexts)
    p(y|h) = Σ_k π_k softmax(c_k W_outᵀ + b)[y]                      (W_out, b: the frozen tied decoder)
    log p  = logsumexp_k( log π_k + log_softmax(c_k W_outᵀ + b) )    (the mixture in fp32)

Differences from the published form, and why. Yang et al. train the decoder with the model and
use c_k = tanh(W_k h): a context bounded in [-1, 1]^E. Here the decoder is the frozen base's and
h is its final hidden state, whose coordinates are not bounded that way, so a saturating tanh(W_k h)
cannot reproduce the base's logits h W_outᵀ + b in general: the published form could only start away
from the base. The skip `h +` makes the contexts h plus a bounded tanh correction, and
W_k = A_k B_k (rank r) with A_k = 0 at the start (LoRA's trick) makes every c_k = h exactly, so
every component is the base's softmax and the mixture *is* the base distribution for any prior
(tested to 1e-5). B_k start random, so the components get different gradients for A_k from the
first step (no symmetry to break); W_π starts at 0 (a uniform prior). The rank is what sets the
parameter count: K (2 E r + E), so r = 288 at K = 3 (997,056) matches the literal Backward head
with d = E (995,904) and r = 432 / 216 do the same at K = 2 / 4.

Cost: one frozen LM-head product per component, forward and backward (K times an LM-head LoRA
step). The training loss takes each component's per-token log-probability of the target with
F.linear_cross_entropy in 256-row chunks (the same fused loss as head_ft: no N x V tensor kept
for the backward), then mixes the K of them in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Plugin, PluginError
from .head_ft import FUSED_ROWS


@dataclass
class MoSConfig:
    n_components: int = 3            # K
    rank: int = 288                  # r of each W_k = A_k B_k (E x E at r = E)

    def __post_init__(self):
        if self.n_components < 1 or self.rank < 1:
            raise ValueError(f"n_components and rank must be >= 1, got {self.n_components}, {self.rank}")


class MoSHead(nn.Module):
    """forward(h) gives next-token log-probabilities (..., V) of the mixture; target_loss for training."""

    def __init__(self, cfg: MoSConfig, out_head: nn.Linear):
        super().__init__()
        V, E = out_head.weight.shape
        if cfg.rank > E:
            raise PluginError(f"mos_head rank {cfg.rank} exceeds the hidden size {E}; use rank <= {E}")
        K, r = cfg.n_components, cfg.rank
        self.cfg, self.vocab, self.hidden = cfg, V, E
        self._base = {"w": out_head.weight, "b": out_head.bias}    # frozen, not registered (never saved)
        dev, dt = out_head.weight.device, out_head.weight.dtype
        self.prior = nn.Parameter(torch.zeros(K, E, device=dev, dtype=dt))                 # W_π: uniform prior
        self.down = nn.Parameter(torch.empty(K, r, E, device=dev, dtype=dt))               # B_k
        self.up = nn.Parameter(torch.zeros(K, E, r, device=dev, dtype=dt))                 # A_k = 0: c_k = h
        nn.init.normal_(self.down, std=1.0 / math.sqrt(E))

    def _mix(self, h: torch.Tensor):
        """log π (N x K, fp32) and the contexts (K x N x E)."""
        log_prior = torch.log_softmax((h @ self.prior.t()).float(), -1)                   # N x K
        c = h + torch.tanh(torch.bmm(torch.bmm(h.expand(self.cfg.n_components, -1, -1),
                                               self.down.transpose(1, 2)), self.up.transpose(1, 2)))  # K x N x E
        return log_prior, c

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.hidden:
            raise PluginError(f"expected final hidden states (..., {self.hidden}), got {tuple(h.shape)}")
        lead = h.shape[:-1]
        log_prior, c = self._mix(h.reshape(-1, self.hidden))
        out = None
        for k in range(self.cfg.n_components):  # one N x V table at a time
            lp = torch.log_softmax(F.linear(c[k], self._base["w"], self._base["b"]).float(), -1) + log_prior[:, k:k + 1]
            out = lp if out is None else torch.logaddexp(out, lp)
        return out.view(*lead, self.vocab)

    def target_loss(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of `tokens` (N,) under the mixture, from final hidden states h (N x E)."""
        log_prior, c = self._mix(h)
        opts = nn.LinearCrossEntropyOptions(batch_chunk_size=FUSED_ROWS)
        nll = torch.stack([F.linear_cross_entropy(c[k], self._base["w"], tokens, linear_bias=self._base["b"],
                                                  reduction="none", options=opts).float()
                           for k in range(self.cfg.n_components)], -1)                    # N x K
        return -torch.logsumexp(log_prior - nll, -1).sum()


class MoSHeadPlugin(Plugin):
    method = "mos_head"
    Config = MoSConfig
    head_only = True

    def _install(self, model):
        self._original = model.get_output_embeddings()
        if not isinstance(self._original, nn.Linear):
            raise PluginError(f"mos_head mixes softmaxes of a linear LM head; this model's is "
                              f"{type(self._original).__name__}")
        from ..evaluate import _has_plain_head

        if not _has_plain_head(model):
            raise PluginError("mos_head needs logits = h W^T + b (this model scales or caps its logits after the "
                              "head); use lora on lm_head instead")
        self._head = MoSHead(self.config, self._original)
        model.set_output_embeddings(self._head)

    def _remove(self, model):
        model.set_output_embeddings(self._original)

    def _parameters(self):
        return {f"head.{k}": p for k, p in self._head.named_parameters()}
