"""Several named plug-ins (e.g. output heads) on one loaded base, switched per call without reloading it."""

from __future__ import annotations

import os

from torch import nn

from .base import Plugin, PluginError


class PluginSet:
    """    heads = PluginSet(model); heads.add("math", "runs/x/backward_head/seed0/plugin")
           heads.use_head("math")   # model now decodes through the math head
           heads.use_head(None)     # the exact base again
    Each plug-in keeps its weights while detached, so switching costs an attach, not a load."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.plugins: dict[str, Plugin] = {}
        self.active: str | None = None

    def add(self, name: str, plugin: Plugin | str | os.PathLike) -> Plugin:
        from . import load_plugin

        if name in self.plugins:
            raise PluginError(f"a plug-in named '{name}' is already in the set")
        self.use(None)
        if not isinstance(plugin, Plugin):
            plugin = load_plugin(self.model, plugin)
        elif plugin.model is None:
            plugin.attach(self.model)
        elif plugin.model is not self.model:
            raise PluginError(f"'{name}' is attached to another model")
        plugin.detach()
        self.plugins[name] = plugin
        return plugin

    def use(self, name: str | None) -> nn.Module:
        if name is not None and name not in self.plugins:
            raise PluginError(f"no plug-in named '{name}'; the set has: {', '.join(self.plugins) or 'none'}")
        if self.active == name:
            return self.model
        if self.active is not None:
            self.plugins[self.active].detach()
            self.active = None
        if name is not None:
            self.plugins[name].attach(self.model)
            self.active = name
        return self.model

    use_head = use

    def __contains__(self, name):
        return name in self.plugins
