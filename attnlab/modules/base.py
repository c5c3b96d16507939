"""What every attnlab method is: a config + a plug-in with the same verbs (PEFT-style).

    plugin = LoRA(LoRAConfig(r=8)).attach(model)   # installs itself into the frozen model, in place
    model(...)                                     # now computes the modified function
    plugin.save_pretrained("out/lora")             # safetensors + config.json with the base fingerprint
    plugin.detach()                                # the model computes exactly the base function again
    plugin = load_plugin(model, "out/lora")        # refuses a base whose fingerprint differs

A plug-in's state is exactly its trainable parameters, so saving, loading, checkpointing and the
trainer's optimizer all work the same for every method.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import verify_dir, write_dir
from ..backbone import fingerprint
from ..errors import AttnlabError, DamagedFile

WEIGHTS_NAME = "plugin.safetensors"
CONFIG_NAME = "config.json"


class PluginError(AttnlabError, RuntimeError):
    """Misuse of a plug-in (attach twice, detach when detached, wrong base): the message says the fix."""


class Plugin:
    method: ClassVar[str] = ""
    Config: ClassVar[type] = None
    PRESETS: ClassVar[dict] = {}
    head_only: ClassVar[bool] = False   # True: changes only the output head (can train from cached features)

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        self.model: nn.Module | None = None
        self._kept_state: dict | None = None

    # -- the verbs ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "Plugin":
        if self.model is not None:
            raise PluginError(f"{self.method} is already attached; call detach() first")
        installed = getattr(model, "_attnlab_plugin", None)
        if installed is not None:
            raise PluginError(f"the model already carries a '{installed.method}' plug-in; detach it first")
        self._install(model)
        self.model = model
        model._attnlab_plugin = self
        if self._kept_state is not None:  # re-attached after a detach: it keeps what it had learned
            self.load_state_dict(self._kept_state)
        return self

    def detach(self) -> nn.Module:
        if self.model is None:
            raise PluginError(f"{self.method} is not attached to a model")
        model = self.model
        self._kept_state = self.state_dict()
        self._remove(model)
        model._attnlab_plugin = None
        self.model = None
        return model

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """name -> parameter, for every parameter this plug-in trains (empty for the frozen base)."""
        if self.model is None:
            raise PluginError(f"attach {self.method} to a model first")
        return self._parameters()

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.trainable_parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters()
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise PluginError(f"{self.method} weights do not match: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]} (saved with another config?)")
        with torch.no_grad():
            for k, p in params.items():
                if p.shape != state[k].shape:
                    raise PluginError(f"{k}: saved shape {tuple(state[k].shape)} != {tuple(p.shape)}")
                p.copy_(state[k].to(p.dtype))

    def save_pretrained(self, path: str | os.PathLike, base_name: str | None = None) -> Path:
        """Write `path/plugin.safetensors` and `path/config.json` atomically."""
        if self.model is None:
            raise PluginError(f"attach {self.method} to a model before saving it")
        path = Path(path)
        meta = {"method": self.method, "config": dataclasses.asdict(self.config),
                "base": fingerprint(self.model, base_name or _model_name(self.model))}
        state = self.state_dict()
        check_finite(state, f"{self.method} plug-in")

        def write(tmp):
            save_file(state, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

        write_dir(path, write, replace=True)
        return path

    # -- training hooks: the trainer calls these around each optimizer step ----------------------
    def on_step_start(self) -> None:
        """Before the micro-batches of an optimizer step (e.g. precompute what they all share)."""

    def on_step_end(self, reduce=None) -> None:
        """After their backward passes, before clipping and the optimizer update. `reduce` averages
        a tensor over processes when there are several (None: one process)."""

    # -- optional: a method's own objective and metrics ------------------------------------------
    def objective(self, model: nn.Module, batch: dict) -> torch.Tensor | None:
        """The training loss of a batch, summed over its target tokens (the trainer divides by the
        step's target-token count). None: cross-entropy on the target tokens."""
        return None

    def extra_metrics(self, model: nn.Module, examples: list, pad_id: int, batch_size: int) -> dict:
        """Method-specific evaluation numbers, added to the standard ones in a run's results."""
        return {}

    # -- what each method defines ---------------------------------------------------------------
    def _install(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _remove(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _parameters(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError


def _model_name(model: nn.Module) -> str:
    return getattr(model, "_attnlab_spec", None) or getattr(model.config, "name_or_path", "") or "unknown"


def read_plugin_config(path: str | os.PathLike) -> dict:
    """The plug-in's config.json, after checking every file against the folder's manifest."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir() or not cfg_file.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise PluginError(f"{path} is not an attnlab plug-in (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    verify_dir(path)  # DamagedFile names the file
    try:
        meta = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError):
        raise DamagedFile(f"{cfg_file} is damaged (not JSON)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("base"), dict) or not isinstance(meta.get("config"), dict) \
            or not isinstance(meta.get("method"), str):
        missing = [k for k in ("method", "config", "base") if not isinstance(meta, dict) or k not in meta]
        raise PluginError(f"{cfg_file} is not a complete plug-in config (missing or wrong: "
                          f"{', '.join(missing) or 'method/config/base'}); save it again with save_pretrained")
    return meta


def check_fingerprint(saved: dict, model: nn.Module, path) -> None:
    """Refuse a plug-in trained on another base: sizes and the embedding hash must match."""
    now = fingerprint(model, _model_name(model))
    for key in ("vocab_size", "hidden_size", "embedding_sha256", "body_sha256"):
        if key == "body_sha256" and key not in saved:
            continue  # saved before the body was fingerprinted: sizes and embedding only
        if saved.get(key) != now[key]:
            raise PluginError(
                f"{path} was trained on base '{saved.get('model')}' ({key}={saved.get(key)}), but this base "
                f"'{now['model']}' has {key}={now[key]}. Load it onto the base it was trained on.")


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The plug-in's tensors; a file safetensors cannot read, or a NaN/inf weight, is refused."""
    f = Path(path) / WEIGHTS_NAME
    try:
        state = load_file(str(f))
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise DamagedFile(f"{f} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    check_finite(state, f)
    return state


def check_finite(state: dict[str, torch.Tensor], where) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise PluginError(f"{where}: weights {bad[:3]} hold NaN or inf values; this plug-in cannot be used "
                          f"(retrain it with a lower learning rate)")
