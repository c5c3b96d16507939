"""Plug-ins: the registry of methods and the two entry points, `attach` and `load_plugin`.

`register_method(cls)` adds a user's own method (a Plugin subclass with `method` and `Config`) to
the registry, so that attach, the trainer, `attnlab run` and save/load work with it unchanged
(docs/adding_a_method.md)."""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from ..config import check_fields
from ..errors import ConfigError
from .backward_head import BackwardAttentionHead, BackwardHead, BackwardHeadConfig
from .base import Plugin, PluginError, attached, check_fingerprint, disabled, load_weights, read_plugin_config
from .factorized import Factorized, FactorizedConfig
from .frozen import Frozen, FrozenConfig
from .head_ft import HeadFineTune, HeadFTConfig
from .lora import LoRA, LoRAConfig
from .mos_head import MoSConfig, MoSHead, MoSHeadPlugin
from .sparse import SparseAttention, SparseConfig
from .switch import PluginSet

METHODS: dict[str, type[Plugin]] = {cls.method: cls for cls in (Frozen, LoRA, HeadFineTune, BackwardHead, Factorized,
                                                              SparseAttention, MoSHeadPlugin)}


def register_method(cls: type[Plugin], replace: bool = False) -> type[Plugin]:
    """Register a user's method under `cls.method` (usable as a class decorator). The class must be
    a Plugin subclass with a `method` name, a dataclass `Config` whose options all have defaults, and
    `_install`, `_remove`, `_parameters`; an existing name is refused unless `replace=True` (a class
    of the same module and name, e.g. its module reloaded, replaces its earlier self)."""
    if not (isinstance(cls, type) and issubclass(cls, Plugin)) or cls is Plugin:
        raise PluginError(f"register_method takes a subclass of attnlab.modules.Plugin, got {cls!r}")
    name = cls.__dict__.get("method")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise PluginError(f"{cls.__name__}.method must name the method (letters, digits, _), e.g. "
                          f"method = \"my_method\"; got {name!r}")
    if not (isinstance(cls.Config, type) and dataclasses.is_dataclass(cls.Config)):
        raise PluginError(f"{cls.__name__}.Config must be a dataclass of the method's options "
                          f"(@dataclass class MyConfig: ...), got {cls.Config!r}")
    try:
        cls.Config()
    except TypeError as e:
        raise PluginError(f"{cls.__name__}.Config: every option needs a default ({e})") from None
    missing = [h for h in ("_install", "_remove", "_parameters") if getattr(cls, h) is getattr(Plugin, h)]
    if missing:
        raise PluginError(f"{cls.__name__} does not define {', '.join(missing)} (see docs/adding_a_method.md)")
    old = METHODS.get(name)
    same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
    if old is not None and old is not cls and not same and not replace:
        raise PluginError(f"method '{name}' is already registered by {old.__module__}.{old.__qualname__}; "
                          f"give {cls.__name__}.method another name, or pass replace=True")
    METHODS[name] = cls
    return cls


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
    """Remove the attention patch `patch` installed (other plug-ins stay); without other plug-ins
    the model computes the base function again."""
    patched = [p for p in attached(model) if p._owner is None and "attention" in p.changes]
    if not patched:
        raise PluginError("this model is not patched with an attnlab attention (nothing to unpatch)")
    return patched[-1].detach()


def load_plugin(model: nn.Module, path, allow_missing_body_hash: bool = False) -> Plugin:
    """Load a saved plug-in onto `model`, refusing a base whose fingerprint differs (and, unless
    `allow_missing_body_hash`, a plug-in that does not record its base's body hash)."""
    meta = read_plugin_config(path)
    if meta["method"] not in METHODS:
        module = meta.get("module")
        where = (f"; it is defined in module '{module}': `import {module}` (which calls "
                 f"attnlab.register_method) before loading" if module and module != "__main__" else
                 "; register its class with attnlab.register_method before loading")
        raise PluginError(f"{path} was saved by method '{meta['method']}', which is not registered here; "
                          f"available: {', '.join(METHODS)}{where}")
    check_fingerprint(meta["base"], model, path, allow_missing_body_hash)
    plugin = METHODS[meta["method"]](make_config(meta["method"], **meta["config"])).attach(model)
    try:
        plugin.load_state_dict(load_weights(path))
    except Exception:
        plugin.detach()
        raise
    return plugin


__all__ = ["Plugin", "PluginError", "METHODS", "attach", "load_plugin", "make_config", "register_method",
           "attached", "disabled",
           "BackwardHead", "BackwardHeadConfig", "BackwardAttentionHead", "PluginSet",
           "Factorized", "FactorizedConfig", "patch", "unpatch", "SparseAttention", "SparseConfig",
           "Frozen", "FrozenConfig", "LoRA", "LoRAConfig", "HeadFineTune", "HeadFTConfig",
           "MoSHeadPlugin", "MoSConfig", "MoSHead"]
