"""LoRA on the attention projections, through PEFT, injected in place (no wrapper model).

Default targets are PEFT's usual names per family: GPT-2 `c_attn`, `c_proj` (PEFT matches names by
suffix, so in GPT-2 `c_proj` also hits the MLP output projection; that is what the research
proposals' LoRA baselines did), Llama-family `q_proj`, `k_proj`, `v_proj`, `o_proj`.

Several LoRA plug-ins (distinct `adapter_name`s, e.g. one inside `factorized` and one on its own)
may share a layer: every attnlab adapter on a layer is active, in sorted name order (a fixed
summation order, so detaching and re-attaching one gives the same numbers), and detaching one
deletes only its own adapter. Saved LoRA plug-ins are also PEFT adapters (adapter_config.json +
adapter_model.safetensors): `peft.PeftModel.from_pretrained(base, folder)` computes the same function.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

from .base import Plugin, PluginError, attached

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
    stackable = True   # adapters with distinct names add up on a shared layer

    @property
    def head_only(self) -> bool:
        return getattr(self, "_head_only", False)

    def _peft_config(self, model, **extra):
        from peft import LoraConfig

        mtype = model.config.model_type
        targets = self.config.target_modules or DEFAULT_TARGETS.get(mtype)
        if not targets:
            raise PluginError(f"no default LoRA targets for model type '{mtype}'; set target_modules "
                              f"(known defaults: {', '.join(DEFAULT_TARGETS)})")
        return LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                          target_modules=targets, fan_in_fan_out=(mtype == "gpt2"), bias="none", **extra)

    def _install(self, model):
        from peft import inject_adapter_in_model

        name = self.config.adapter_name
        if self.config.r < 1:
            raise PluginError(f"LoRA rank r must be >= 1, got {self.config.r}")
        for other in attached(model):
            if isinstance(other, LoRA) and other.config.adapter_name == name:
                part = f" (part of '{other._owner.method}')" if other._owner is not None else ""
                raise PluginError(f"the model already carries a 'lora' plug-in{part} with adapter_name '{name}'; "
                                  f"detach it first or give this one another adapter_name")
        # never inside another plug-in's modules (factorized's own q_proj / k_proj would match by suffix)
        peft_cfg = self._peft_config(model, exclude_modules=r".*attnlab.*")
        head = model.get_output_embeddings()
        head_key = next((n for n, mod in model.named_modules() if mod is head), None)
        if head_key and _targets(peft_cfg.target_modules, head_key):
            for other in attached(model):
                if "head" in other.changes:
                    raise PluginError(f"'lora' on the output head and the attached '{other.method}' both replace the "
                                      f"model's output head; detach '{other.method}' first")
        # PEFT freezes every parameter but its adapters': keep the others (another plug-in's) as they are
        grads = {id(p): p.requires_grad for p in model.parameters()}
        try:
            with warnings.catch_warnings():  # "Already found a `peft_config`": another adapter, on purpose
                warnings.simplefilter("ignore", UserWarning)
                inject_adapter_in_model(peft_cfg, model, adapter_name=name)
        except ValueError as e:  # PEFT's NoMatchingPeftModuleError is a ValueError
            raise PluginError(f"LoRA target_modules {peft_cfg.target_modules} matched no module of this "
                              f"{model.config.model_type} model ({' '.join(str(e).split())[:300]})") from e
        own = re.compile(rf"\.lora_[AB]\.{re.escape(name)}\.")
        self._names = [n for n, p in model.named_parameters() if own.search(n)]
        for n, p in model.named_parameters():
            p.requires_grad_(n in self._names or grads.get(id(p), False))
        self._layers = [m for m in model.modules() if _is_lora_layer(m) and name in m.lora_A]
        _activate_all(self._layers)
        for m in self._layers:  # PEFT creates the adapter modules in train mode: dropout would act at eval
            m.lora_dropout[name].eval()
        if not self._names:
            self._remove(model)
            raise PluginError(f"LoRA target_modules {peft_cfg.target_modules} matched no module of this "
                              f"{model.config.model_type} model")
        # LoRA on the LM head alone (target_modules: [lm_head]) changes only the output head: it can
        # train from the feature cache like head_ft. On a tied base only the head gets the update.
        head = model.get_output_embeddings()
        self._head_only = bool(self._layers) and all(m is head for m in self._layers)

    def _remove(self, model):
        # Delete this adapter from every layer it is on; a layer left without adapters is swapped back
        # for the layer it wraps (the base weights were never merged or touched).
        name = self.config.adapter_name
        for mod_name, module in list(model.named_modules()):
            if not (_is_lora_layer(module) and name in module.lora_A):
                continue
            module.delete_adapter(name)
            if module.lora_A:
                _activate_all([module])
            else:
                parent_name, _, child = mod_name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.get_base_layer())
        configs = getattr(model, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(name, None)
            if not configs:
                del model.peft_config
        self._layers = []

    def _training_modules(self):
        # PEFT's dropout on each adapted layer's input (lora_dropout[adapter]); identity when dropout is 0
        return [m.lora_dropout[self.config.adapter_name] for m in self._layers]

    def _parameters(self):
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self._names}

    # -- the PEFT adapter format ------------------------------------------------------------------
    def _export(self, folder, meta):
        """adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained writes them:
        keys `base_model.model.<module>.lora_A.weight` (no adapter name), GPT-2's Conv1D marked
        fan_in_fan_out, task CAUSAL_LM, the base named by its attnlab spec."""
        from safetensors.torch import save_file

        cfg = self._peft_config(self.model, task_type="CAUSAL_LM", base_model_name_or_path=meta["base"]["model"],
                                 inference_mode=True)
        cfg.save_pretrained(str(folder))
        own = re.compile(rf"\.(lora_[AB])\.{re.escape(self.config.adapter_name)}\.")
        state = {"base_model.model." + own.sub(r".\1.", n): v for n, v in self.state_dict().items()}
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def _targets(targets, key: str) -> bool:
    """Whether PEFT's target_modules select the module named `key` (a regex, or names matched by suffix)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def _is_lora_layer(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _activate_all(layers) -> None:
    """PEFT activates only the adapter injected last on a layer: activate every one, sorted."""
    for m in layers:
        grads = {id(p): p.requires_grad for p in m.parameters()}
        m.set_adapter(sorted(m.lora_A.keys()))
        for p in m.parameters():  # set_adapter also sets requires_grad; the plug-ins decide that
            p.requires_grad_(grads[id(p)])
