"""FactorizedAttention: a richer query/key interaction inside self-attention, as a registered
attention function (transformers' AttentionInterface), trained together with LoRA.

Per patched layer, on each query and key vector (per head, parameters shared across heads):
    x_n     = LayerNorm(x)
    inter   = GELU(w1(x_n) * w2(x_n))                 (w3, w4 for keys)
    x'      = x + sigmoid(alpha) * proj(inter)        (alpha_q, alpha_k)
and a learnable temperature per query head scales the attention logits (a per-head scale of q: the
logits are linear in q, and a scale commutes with the rotary rotation). The projection starts at
zero, so the patched model computes exactly the base function at initialisation. The softmax-V
product stays with the model's own kernel (SDPA or eager). The arithmetic and its hand-written,
recomputing backward are in factorized_transform.py.

Where the transform acts (`placement`):
  post_rope  inside the registered attention function, on the rotated q and on every key the
             kernel sees (the cache holds the base's rotated keys; the transform is applied to all
             of them at each step). One implementation for GPT-2 and the Llama family.
  pre_rope   on the per-head q and k the projections produce, before the rotary embedding, through
             forward hooks on q_proj / k_proj (Qwen3: on its per-head q_norm / k_norm, which run
             after the projections and before the rotation). The model then rotates the transformed
             vectors and caches the transformed-then-rotated keys: the function of the proposal's
             formula written before RoPE, exactly, with or without a cache. A forward pre-hook on the
             attention module moves the hooks when another plug-in (a LoRA attached afterwards)
             replaces a projection, so the transform always sees the projection's full output.
             GPT-2 has no rotary embedding: there pre_rope would be post_rope, and it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .attention import inner_attention, modules_to_patch, names, register, route, unroute
from .base import Plugin, PluginError
from .factorized_transform import RecomputedBranch, branch

NAME = "attnlab_factorized"
ATTR = "attnlab_factorized"
LABEL = "FactorizedAttention"


class FactorizedQK(nn.Module):
    """The parameters one attention module carries, and the transform of its q (..., H, d) and
    k (..., H_kv, d) head vectors."""

    def __init__(self, head_dim: int, n_heads: int, factor_dim: int, recompute: bool = True,
                 placement: str = "post_rope"):
        super().__init__()
        self.recompute, self.placement = recompute, placement
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
        self._hooks: list = []          # pre_rope: handles of the hooks on the attention module's projections
        self._targets: tuple = ()       # the (q, k) modules they are on

    def _branch(self, x, norm, wa, wb, proj, alpha, tau):
        if x.dtype != proj.weight.dtype:  # a bf16/fp16 base, fp32 weights: the transform in fp32, cast back
            with torch.autocast(x.device.type, enabled=False):
                return self._branch(x.float(), norm, wa, wb, proj, alpha, tau).to(x.dtype)
        # w1 and w2 (w3 and w4) as one (2f x d) matmul; the parameters keep their names and meaning
        args = (x, norm.weight, norm.bias, torch.cat([wa.weight, wb.weight]), torch.cat([wa.bias, wb.bias]),
                proj.weight, proj.bias, alpha, tau, norm.eps)
        if self.recompute and torch.is_grad_enabled() and (x.requires_grad or proj.weight.requires_grad):
            return RecomputedBranch.apply(*args)
        return branch(*args)

    def transform_q(self, q: torch.Tensor, head_axis: int) -> torch.Tensor:
        """q (..., d) with the heads on `head_axis`: the transformed queries, each head scaled by its
        temperature."""
        tau = self.log_temperature.exp().view(-1, *[1] * (q.dim() - 1 - head_axis % q.dim()))
        return self._branch(q, self.q_norm, self.q_w1, self.q_w2, self.q_proj, self.alpha_q, tau)

    def transform_k(self, k: torch.Tensor, head_axis: int | None = None) -> torch.Tensor:
        """k (..., d), any layout: the transformed keys."""
        return self._branch(k, self.k_norm, self.k_w3, self.k_w4, self.k_proj, self.alpha_k, None)

    def transform(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, T, d), k (B, H_kv, S, d), as the attention function receives them."""
        return _in_memory_order(self.transform_q, q), _in_memory_order(self.transform_k, k)

    # -- pre_rope: hooks on the attention module's projections ---------------------------------
    def hook(self, attn: nn.Module) -> None:
        self._hooks = [attn.register_forward_pre_hook(self._follow)]
        self._hook_targets(_rope_inputs(attn))

    def unhook(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._targets = [], ()

    def _hook_targets(self, targets: tuple) -> None:
        for h in self._hooks[1:]:
            h.remove()
        q_mod, k_mod = targets
        self._hooks[1:] = [q_mod.register_forward_hook(self._on_q), k_mod.register_forward_hook(self._on_k)]
        self._targets = targets

    def _follow(self, attn, args):
        targets = _rope_inputs(attn)  # a projection replaced since (a LoRA attached later): move the hooks
        if targets[0] is not self._targets[0] or targets[1] is not self._targets[1]:
            self._hook_targets(targets)

    def _on_q(self, module, args, out):
        return _per_head(self.transform_q, out, self.q_norm.normalized_shape[0])

    def _on_k(self, module, args, out):
        return _per_head(self.transform_k, out, self.k_norm.normalized_shape[0])


def _rope_inputs(attn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are the per-head q and k right before the rotary embedding."""
    if isinstance(getattr(attn, "q_norm", None), nn.Module):   # Qwen3: RMSNorm per head after the projection
        return attn.q_norm, attn.k_norm
    return attn.q_proj, attn.k_proj


def _per_head(fn, out: torch.Tensor, d: int) -> torch.Tensor:
    if out.dim() == 3:                          # a projection's (B, T, H * d)
        return fn(out.unflatten(-1, (-1, d)), 2).flatten(-2)
    return fn(out, 2)                           # already (B, T, H, d)


def _in_memory_order(fn, x: torch.Tensor) -> torch.Tensor:
    """fn on x (B, H, T, d) or on its (B, T, H, d) view, whichever is contiguous (the rotated q is
    laid out as the projection wrote it, (B, T, H, d); cached keys as (B, H, T, d)): no copy."""
    if x.is_contiguous() or not x.transpose(1, 2).is_contiguous():
        return fn(x, 1)
    return fn(x.transpose(1, 2), 2).transpose(1, 2)


def factorized_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: where the module is patched post_rope, transform q and k
    (pre_rope: the hooks already did), then run the implementation the model used before patching."""
    params = getattr(module, ATTR, None)
    if params is not None and params.placement == "post_rope":
        query, key = params.transform(query, key)
    return inner_attention(module)(module, query, key, value, attention_mask, **kwargs)


NAMES = names(NAME)
PLACEMENTS = ("post_rope", "pre_rope")


@dataclass
class FactorizedConfig:
    layers: list[int] | None = None      # None: every layer
    factor_dim: int = 128                # width of w1..w4 (2 x head_dim on GPT-2 small: 1.41M trainable with LoRA r=8)
    lora_r: int = 8                      # LoRA on the attention projections alongside (0: none)
    lora_alpha: float = 16.0
    lora_target_modules: list[str] | None = None
    recompute: bool = True               # keep only q/k for the backward and recompute the transform there:
                                         # 1.06x LoRA's peak memory instead of 1.7x, no slower (docs)
    placement: Literal["post_rope", "pre_rope"] = "post_rope"   # where the q/k transform acts (module docstring)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise PluginError(f"factorized placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")


class Factorized(Plugin):
    method = "factorized"
    Config = FactorizedConfig

    def _install(self, model):
        mods = modules_to_patch(model, self.config.layers, ATTR, NAMES, LABEL)
        if self.config.placement == "pre_rope" and model.config.model_type == "gpt2":
            raise PluginError("placement 'pre_rope' acts before the rotary embedding, and GPT-2 has none (there it "
                              "would equal post_rope): use placement: post_rope")
        register(NAMES, factorized_attention)
        if self.config.lora_r:  # a part: attached through LoRA's public verbs, detached with this plug-in
            from .lora import LoRA, LoRAConfig
            self._attach_part(LoRA(LoRAConfig(r=self.config.lora_r, alpha=self.config.lora_alpha,
                                              target_modules=self.config.lora_target_modules)), model)
        ref = next(model.parameters())
        self._mods = mods
        for m in mods:
            heads = getattr(m, "num_heads", None) or model.config.num_attention_heads
            m.add_module(ATTR, FactorizedQK(m.head_dim, heads, self.config.factor_dim, self.config.recompute,
                                            self.config.placement).to(ref.device, ref.dtype))
            if self.config.placement == "pre_rope":
                getattr(m, ATTR).hook(m)
        self._inner = route(model, NAMES)

    def _remove(self, model):  # its LoRA part is detached after this, by Plugin.detach
        for m in self._mods:
            getattr(m, ATTR).unhook()
            delattr(m, ATTR)
        unroute(model, self._inner)

    def _parameters(self):  # its LoRA part's are added by Plugin.trainable_parameters
        return {n: p for n, p in self.model.named_parameters() if f".{ATTR}." in n}

