"""The frozen base: nothing attached, nothing trained. The reference every method is measured against."""

from dataclasses import dataclass

from .base import Plugin


@dataclass
class FrozenConfig:
    pass


class Frozen(Plugin):
    method = "frozen"
    Config = FrozenConfig

    def _install(self, model):
        pass

    def _remove(self, model):
        pass

    def _parameters(self):
        return {}
