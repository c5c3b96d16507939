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

from .base import Plugin, PluginError

NAME = "attnlab_factorized"
SUPPORTED = {"gpt2": "GPT2Attention", "llama": "LlamaAttention", "mistral": "MistralAttention",
             "qwen2": "Qwen2Attention", "qwen3": "Qwen3Attention"}
ATTR = "attnlab_factorized"


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
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    params = getattr(module, ATTR, None)
    if params is not None:
        if params.recompute and torch.is_grad_enabled() and (query.requires_grad or params.q_proj.weight.requires_grad):
            # keep only q and k for the backward and recompute the transform there: the factor-width
            # intermediates (2 x head_dim wide, several per vector) would dominate the added memory
            from torch.utils.checkpoint import checkpoint
            query, key = checkpoint(params.transform, query, key, use_reentrant=False)
        else:
            query, key = params.transform(query, key)
    inner = getattr(module.config, "_attnlab_inner_attn", "sdpa")
    if inner == "eager":
        import importlib
        fn = importlib.import_module(type(module).__module__).eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)


# One registered name per inner kernel, so that transformers builds the mask that kernel expects.
NAMES = {"sdpa": NAME, "eager": NAME + "_eager"}


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for inner, name in NAMES.items():
        AttentionInterface.register(name, factorized_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a supported model, in layer order; a clear error otherwise."""
    mtype = model.config.model_type
    if mtype not in SUPPORTED:
        raise PluginError(f"FactorizedAttention does not support model type '{mtype}'; supported: "
                          f"{', '.join(SUPPORTED)}")
    mods = [m for m in model.modules() if type(m).__name__ == SUPPORTED[mtype]]
    return sorted(mods, key=lambda m: m.layer_idx)


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
        mods = attention_modules(model)
        n = len(mods)
        layers = list(range(n)) if self.config.layers is None else list(self.config.layers)
        bad = [i for i in layers if not isinstance(i, int) or not -n <= i < n]
        if bad:
            raise PluginError(f"layer indices {bad} are out of range for a model with {n} layers")
        if any(hasattr(m, ATTR) for m in mods) or model.config._attn_implementation in NAMES.values():
            raise PluginError("this model is already patched with FactorizedAttention; unpatch it first")
        if model.config._attn_implementation not in NAMES:
            raise PluginError(f"FactorizedAttention runs on the 'sdpa' or 'eager' kernel; this model uses "
                              f"'{model.config._attn_implementation}' (load it with attn_implementation='sdpa')")
        _register()
        self._lora = None
        if self.config.lora_r:  # first: LoRA's install freezes every other parameter
            from .lora import LoRA, LoRAConfig
            self._lora = LoRA(LoRAConfig(r=self.config.lora_r, alpha=self.config.lora_alpha,
                                         target_modules=self.config.lora_target_modules))
            self._lora._install(model)
            self._lora.model = model
        cfg = model.config
        ref = next(model.parameters())
        self._mods = [mods[i] for i in sorted({i % n for i in layers})]
        for m in self._mods:
            heads = getattr(m, "num_heads", None) or cfg.num_attention_heads
            m.add_module(ATTR, FactorizedQK(m.head_dim, heads, self.config.factor_dim, self.config.recompute).to(ref.device, ref.dtype))
        self._inner = cfg._attn_implementation
        cfg._attnlab_inner_attn = self._inner
        cfg._attn_implementation = NAMES[self._inner]

    def _remove(self, model):
        if self._lora is not None:
            self._lora._remove(model)
            self._lora = None
        for m in self._mods:
            delattr(m, ATTR)
        model.config._attn_implementation = self._inner
        del model.config._attnlab_inner_attn

    def _parameters(self):
        out = {n: p for n, p in self.model.named_parameters() if f".{ATTR}." in n}
        if self._lora is not None:
            out.update(self._lora._parameters())
        return out

