"""Output-head-only fine-tuning: an untied trainable copy of the LM head; everything else frozen.

Tied models (SmolLM2, GPT-2) share the head with the input embedding, so the copy is what keeps
the input side, and the base, unchanged.
"""

from dataclasses import dataclass

from torch import nn

from .base import Plugin


@dataclass
class HeadFTConfig:
    pass


class HeadFineTune(Plugin):
    method = "head_ft"
    Config = HeadFTConfig
    head_only = True

    def _install(self, model):
        old = model.get_output_embeddings()
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)
        new.weight = nn.Parameter(old.weight.detach().clone())
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone())
        self._original, self._head = old, new
        model.set_output_embeddings(new)

    def _remove(self, model):
        model.set_output_embeddings(self._original)

    def _parameters(self):
        return {f"lm_head.{k}": p for k, p in self._head.named_parameters()}
