"""LoRA on the attention projections, through PEFT, injected in place (no wrapper model).

Default targets are PEFT's usual names per family: GPT-2 `c_attn`, `c_proj` (PEFT matches names by
suffix, so in GPT-2 `c_proj` also hits the MLP output projection; that is what the research
proposals' LoRA baselines did), Llama-family `q_proj`, `k_proj`, `v_proj`, `o_proj`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Plugin, PluginError

DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
}


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None   # None: the family default above
    adapter_name: str = field(default="attnlab", metadata={"doc": "PEFT adapter name"})


class LoRA(Plugin):
    method = "lora"
    Config = LoRAConfig

    @property
    def head_only(self) -> bool:
        return getattr(self, "_head_only", False)

    def _install(self, model):
        from peft import LoraConfig, inject_adapter_in_model

        mtype = model.config.model_type
        targets = self.config.target_modules or DEFAULT_TARGETS.get(mtype)
        if not targets:
            raise PluginError(f"no default LoRA targets for model type '{mtype}'; set target_modules "
                              f"(known defaults: {', '.join(DEFAULT_TARGETS)})")
        if self.config.r < 1:
            raise PluginError(f"LoRA rank r must be >= 1, got {self.config.r}")
        peft_cfg = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                              target_modules=targets, fan_in_fan_out=(mtype == "gpt2"), bias="none")
        try:
            inject_adapter_in_model(peft_cfg, model, adapter_name=self.config.adapter_name)
        except ValueError as e:  # PEFT's NoMatchingPeftModuleError is a ValueError
            raise PluginError(f"LoRA target_modules {targets} matched no module of this {mtype} model "
                              f"({e})") from e
        self._names = [n for n, p in model.named_parameters() if "lora_" in n]
        if not self._names:
            raise PluginError(f"LoRA target_modules {targets} matched no module of this {mtype} model")
        for n, p in model.named_parameters():
            p.requires_grad_(n in self._names)
        # LoRA on the LM head alone (target_modules: [lm_head]) changes only the output head: it can
        # train from the feature cache like head_ft. On a tied base only the head gets the update.
        head = model.get_output_embeddings()
        wrapped = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]
        self._head_only = bool(wrapped) and all(m is head for m in wrapped)

    def _remove(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer

        # Swap every LoRA wrapper for the layer it wraps: the base weights were never merged or touched.
        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config
        for p in model.parameters():
            p.requires_grad_(False)

    def _parameters(self):
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self._names}
