"""FactorizedAttention: a richer query/key interaction inside self-attention, as a registered
attention function (transformers' AttentionInterface), trained together with LoRA.

Per patched layer, on each query and key vector (per head, parameters shared across heads):
    x_n     = LayerNorm(x)
    inter   = GELU(w1(x_n) * w2(x_n))                 (w3, w4 for keys)
    x'      = x + sigmoid(alpha) * proj(inter)        (alpha_q, alpha_k)
and a learnable temperature per query head scales the attention logits. The projection starts at
zero, so the patched model computes exactly the base function at initialisation. The softmax-V
product stays with the model's own kernel (SDPA or eager): the function transforms q and k, then
calls it. It runs after rotary embeddings and the KV cache, so one implementation serves GPT-2 and
Llama-family models (grouped-query heads included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import inner_attention, modules_to_patch, names, register, route, unroute
from .base import Plugin

NAME = "attnlab_factorized"
ATTR = "attnlab_factorized"
LABEL = "FactorizedAttention"


class FactorizedQK(nn.Module):
    """The parameters one attention module carries."""

    def __init__(self, head_dim: int, n_heads: int, factor_dim: int, recompute: bool = False):
        super().__init__()
        self.recompute = recompute
        self.q_norm, self.k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
        self.q_w1, self.q_w2 = nn.Linear(head_dim, factor_dim), nn.Linear(head_dim, factor_dim)
        self.k_w3, self.k_w4 = nn.Linear(head_dim, factor_dim), nn.Linear(head_dim, factor_dim)
        self.q_proj, self.k_proj = nn.Linear(factor_dim, head_dim), nn.Linear(factor_dim, head_dim)
        for p in (self.q_proj, self.k_proj):  # zero: the base function at initialisation
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)
        self.alpha_q = nn.Parameter(torch.zeros(()))
        self.alpha_k = nn.Parameter(torch.zeros(()))
        self.log_temperature = nn.Parameter(torch.zeros(n_heads))  # temperature exp(0) = 1 per head

    def transform(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        act = nn.functional.gelu
        qn, kn = self.q_norm(q), self.k_norm(k)
        q2 = q + torch.sigmoid(self.alpha_q) * self.q_proj(act(self.q_w1(qn) * self.q_w2(qn)))
        k2 = k + torch.sigmoid(self.alpha_k) * self.k_proj(act(self.k_w3(kn) * self.k_w4(kn)))
        # logits are linear in q: a per-head temperature is a per-head scale of q
        q2 = q2 * self.log_temperature.exp().view(1, -1, 1, 1)
        return q2, k2


def factorized_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: transform q, k where the module is patched, then run the
    implementation the model used before patching."""
    params = getattr(module, ATTR, None)
    if params is not None:
        if params.recompute and torch.is_grad_enabled() and (query.requires_grad or params.q_proj.weight.requires_grad):
            # keep only q and k for the backward and recompute the transform there: the factor-width
            # intermediates (2 x head_dim wide, several per vector) would dominate the added memory
            from torch.utils.checkpoint import checkpoint
            query, key = checkpoint(params.transform, query, key, use_reentrant=False)
        else:
            query, key = params.transform(query, key)
    return inner_attention(module)(module, query, key, value, attention_mask, **kwargs)


NAMES = names(NAME)


@dataclass
class FactorizedConfig:
    layers: list[int] | None = None      # None: every layer
    factor_dim: int = 128                # width of w1..w4 (2 x head_dim on GPT-2 small: 1.41M trainable with LoRA r=8)
    lora_r: int = 8                      # LoRA on the attention projections alongside (0: none)
    lora_alpha: float = 16.0
    lora_target_modules: list[str] | None = None
    recompute: bool = False              # recompute the q/k transform in the backward (less memory, more time)


class Factorized(Plugin):
    method = "factorized"
    Config = FactorizedConfig

    def _install(self, model):
        mods = modules_to_patch(model, self.config.layers, ATTR, NAMES, LABEL)
        register(NAMES, factorized_attention)
        if self.config.lora_r:  # a part: attached through LoRA's public verbs, detached with this plug-in
            from .lora import LoRA, LoRAConfig
            self._attach_part(LoRA(LoRAConfig(r=self.config.lora_r, alpha=self.config.lora_alpha,
                                              target_modules=self.config.lora_target_modules)), model)
        ref = next(model.parameters())
        self._mods = mods
        for m in mods:
            heads = getattr(m, "num_heads", None) or model.config.num_attention_heads
            m.add_module(ATTR, FactorizedQK(m.head_dim, heads, self.config.factor_dim,
                                            self.config.recompute).to(ref.device, ref.dtype))
        self._inner = route(model, NAMES)

    def _remove(self, model):  # its LoRA part is detached after this, by Plugin.detach
        for m in self._mods:
            delattr(m, ATTR)
        unroute(model, self._inner)

    def _parameters(self):  # its LoRA part's are added by Plugin.trainable_parameters
        return {n: p for n, p in self.model.named_parameters() if f".{ATTR}." in n}

