"""What every attnlab attention method shares: a function registered with transformers'
AttentionInterface (one name per inner kernel, so transformers builds the mask that kernel expects),
the model families it supports, and the checks before patching. The method's own parameters live on
each patched attention module under one attribute; the registered function finds them there.
"""

from __future__ import annotations

import importlib

from torch import nn

from .base import PluginError

SUPPORTED = {"gpt2": "GPT2Attention", "llama": "LlamaAttention", "mistral": "MistralAttention",
             "qwen2": "Qwen2Attention", "qwen3": "Qwen3Attention"}
INNER = ("sdpa", "eager")   # the kernels a patched model can run underneath


def names(prefix: str) -> dict[str, str]:
    """inner kernel -> registered name, e.g. {"sdpa": "attnlab_sparse", "eager": "attnlab_sparse_eager"}."""
    return {"sdpa": prefix, "eager": prefix + "_eager"}


def register(registered: dict[str, str], fn) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for inner, name in registered.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])


def attention_function(impl: str, module: nn.Module):
    """The function transformers runs for `impl`; 'eager' is the modeling file's own of `module`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        return importlib.import_module(type(module).__module__).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def inner_attention(module: nn.Module):
    """The attention implementation the model used before it was patched."""
    return attention_function(getattr(module.config, "_attnlab_inner_attn", "sdpa"), module)


def attention_modules(model: nn.Module, label: str = "this attention") -> list[nn.Module]:
    """The causal self-attention modules of a supported model, in layer order; a clear error otherwise."""
    mtype = model.config.model_type
    if mtype not in SUPPORTED:
        raise PluginError(f"{label} does not support model type '{mtype}'; supported: {', '.join(SUPPORTED)}")
    mods = [m for m in model.modules() if type(m).__name__ == SUPPORTED[mtype] and getattr(m, "is_causal", True)]
    return sorted(mods, key=lambda m: m.layer_idx)


def modules_to_patch(model: nn.Module, layers, attr: str, registered: dict[str, str], label: str) -> list[nn.Module]:
    """The attention modules of `layers` (None: all), after checking that the model can be patched:
    indices in range, not patched already, running an inner kernel the method can call."""
    mods = attention_modules(model, label)
    n = len(mods)
    layers = list(range(n)) if layers is None else list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not -n <= i < n]
    if bad:
        raise PluginError(f"layer indices {bad} are out of range for a model with {n} layers")
    impl = model.config._attn_implementation
    if any(hasattr(m, attr) for m in mods) or impl in registered.values():
        raise PluginError(f"this model is already patched with {label}; unpatch it first")
    if impl not in INNER and impl.startswith("attnlab_"):
        raise PluginError(f"{label} and another attnlab attention ('{impl}') would both replace this model's "
                          f"attention implementation; detach (unpatch) that one first")
    if impl not in INNER:
        raise PluginError(f"{label} runs on the 'sdpa' or 'eager' kernel; this model uses '{impl}' "
                          f"(load it with attn_implementation='sdpa')")
    return [mods[i] for i in sorted({i % n for i in layers})]


def route(model: nn.Module, registered: dict[str, str]) -> str:
    """Send the model's attention through the registered function; returns the inner kernel."""
    inner = model.config._attn_implementation
    model.config._attnlab_inner_attn = inner
    model.config._attn_implementation = registered[inner]
    return inner


def unroute(model: nn.Module, inner: str) -> None:
    model.config._attn_implementation = inner
    del model.config._attnlab_inner_attn
