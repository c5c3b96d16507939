"""Plug-ins: the registry of methods and the two entry points, `attach` and `load_plugin`."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..config import check_fields
from ..errors import ConfigError
from .backward_head import BackwardAttentionHead, BackwardHead, BackwardHeadConfig
from .base import Plugin, PluginError, check_fingerprint, load_weights, read_plugin_config
from .factorized import Factorized, FactorizedConfig
from .frozen import Frozen, FrozenConfig
from .head_ft import HeadFineTune, HeadFTConfig
from .lora import LoRA, LoRAConfig
from .sparse import SparseAttention, SparseConfig
from .switch import PluginSet

METHODS: dict[str, type[Plugin]] = {cls.method: cls for cls in (Frozen, LoRA, HeadFineTune, BackwardHead, Factorized,
                                                              SparseAttention)}


def make_config(method: str, where: str | None = None, **options):
    """The method's config dataclass from keyword options; unknown options are a clear error."""
    if method not in METHODS:
        raise PluginError(f"unknown method '{method}'; available: {', '.join(METHODS)}")
    presets = METHODS[method].PRESETS
    if options.get("preset") is not None:
        if options["preset"] not in presets:
            raise PluginError(f"method '{method}' has no preset '{options['preset']}'; "
                              f"presets: {', '.join(presets) or 'none'}")
        options = {**presets[options["preset"]], **options}  # explicit options win over the preset
    cls = METHODS[method].Config
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise PluginError(f"method '{method}' has no option(s) {sorted(unknown)}; "
                          f"its options are: {sorted(known) or 'none'}")
    try:
        config = cls(**options)
        check_fields(config, where or method)
        return config
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise PluginError(f"method '{method}': {e}") from e


def attach(model: nn.Module, method: str, **options) -> Plugin:
    """Attach a new plug-in of `method` to `model` (in place) and return it."""
    config = make_config(method, **options)
    return METHODS[method](config).attach(model)


ATTENTION_METHODS = ("factorized", "sparse")


def patch(model: nn.Module, method: str = "factorized", **options) -> Plugin:
    """patch(model, "factorized", layers=[...], ...): replace the attention of those layers with an
    attnlab attention (in place) and return its plug-in; `unpatch(model)` undoes it exactly."""
    if method not in ATTENTION_METHODS:
        raise PluginError(f"'{method}' is not an attention method; attention methods: {', '.join(ATTENTION_METHODS)}"
                          f" (use attach() for the others)")
    return attach(model, method, **options)


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the attention patch `patch` installed; the model computes the base function again."""
    plugin = getattr(model, "_attnlab_plugin", None)
    if plugin is None or plugin.method not in ATTENTION_METHODS:
        raise PluginError("this model is not patched with an attnlab attention (nothing to unpatch)")
    return plugin.detach()


def load_plugin(model: nn.Module, path) -> Plugin:
    """Load a saved plug-in onto `model`, refusing a base whose fingerprint differs."""
    meta = read_plugin_config(path)
    if meta["method"] not in METHODS:
        raise PluginError(f"{path} was saved by method '{meta['method']}', which is not registered here; "
                          f"available: {', '.join(METHODS)}")
    check_fingerprint(meta["base"], model, path)
    plugin = METHODS[meta["method"]](make_config(meta["method"], **meta["config"])).attach(model)
    try:
        plugin.load_state_dict(load_weights(path))
    except Exception:
        plugin.detach()
        raise
    return plugin


__all__ = ["Plugin", "PluginError", "METHODS", "attach", "load_plugin", "make_config",
           "BackwardHead", "BackwardHeadConfig", "BackwardAttentionHead", "PluginSet",
           "Factorized", "FactorizedConfig", "patch", "unpatch", "SparseAttention", "SparseConfig",
           "Frozen", "FrozenConfig", "LoRA", "LoRAConfig", "HeadFineTune", "HeadFTConfig"]
