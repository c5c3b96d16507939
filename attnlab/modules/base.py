"""What every attnlab method is: a config + a plug-in with the same verbs (PEFT-style).

    plugin = LoRA(LoRAConfig(r=8)).attach(model)   # installs itself into the frozen model, in place
    model(...)                                     # now computes the modified function
    plugin.save_pretrained("out/lora")             # safetensors + attnlab_plugin.json (base fingerprint) + README.md
    plugin.detach()                                # the model computes exactly the base function again
    plugin = load_plugin(model, "out/lora")        # refuses a base whose fingerprint differs

A plug-in's state is exactly its trainable parameters, so saving, loading, checkpointing and the
trainer's optimizer all work the same for every method.

Several plug-ins of different kinds compose on one base (LoRA + a head, sparse attention + a head,
FactorizedAttention + LoRA): each attach adds to the model's list (`attached(model)`), and each
detach removes exactly what that plug-in installed, in any order. What two plug-ins cannot share is
refused with one line: the attention implementation (only one attention method at a time), the
output head (one head), a trained parameter, or the same method twice (unless it is `stackable`,
like LoRA adapters with distinct names). What each one changed is read off the model around its
install, so a user's own method needs to declare nothing.

`plugin.disable()` (one plug-in) and `disabled(model)` (all of them) are context managers: inside,
the model computes the function without them (the base function when all are off); outside, they
are back with the same parameter objects, so an optimizer built on them stays valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import MANIFEST, read_manifest, remove_stale_temps, verify_dir, write_dir
from ..backbone import fingerprint
from ..errors import AttnlabError, DamagedFile, UnsafePath

WEIGHTS_NAME = "plugin.safetensors"
CONFIG_NAME = "attnlab_plugin.json"   # not config.json: the folder must not look like a Hugging Face model
LEGACY_CONFIG_NAME = "config.json"    # what plug-ins saved before; still read


class PluginError(AttnlabError, RuntimeError):
    """Misuse of a plug-in (attach twice, detach when detached, wrong base): the message says the fix."""


class Plugin:
    method: ClassVar[str] = ""
    Config: ClassVar[type] = None
    PRESETS: ClassVar[dict] = {}
    head_only: ClassVar[bool] = False   # True: changes only the output head (can train from cached features)
    stackable: ClassVar[bool] = False   # True: two of this method may be attached to one model at once

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        self.model: nn.Module | None = None
        self._kept_state: dict | None = None
        self.changes: frozenset[str] = frozenset()   # what attaching changed: "attention", "head"
        self._parts: list[Plugin] = []               # plug-ins this one is built from (factorized: its LoRA)
        self._owner: Plugin | None = None

    def __repr__(self) -> str:
        options = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{type(self).__name__}({options})"

    # -- the verbs ------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "Plugin":
        if self.model is not None:
            raise PluginError(f"{self.method} is already attached; call detach() first")
        for other in attached(model):
            if other.method == self.method and not self.stackable:
                raise PluginError(f"the model already carries a '{other.method}' plug-in{_part_of(other)}; detach "
                                  f"it first (two '{self.method}' plug-ins would change the same thing)")
        before = _touched(model)
        try:
            self._install(model)
        except BaseException:
            self._drop_parts()
            raise
        self.model = model
        for m in self.training_modules():  # new modules start in train mode: dropout acts in training steps only
            m.eval()
        _register(model, self)
        try:
            now = _touched(model)
            self.changes = frozenset(k for k in before if before[k] != now[k])
            self._check_conflicts(model)
            if self._kept_state is not None:  # re-attached after a detach: it keeps what it had learned
                self.load_state_dict(self._kept_state)
        except BaseException:
            self._undo(model)
            raise
        return self

    def detach(self) -> nn.Module:
        if self.model is None:
            raise PluginError(f"{self.method} is not attached to a model")
        if self._owner is not None:
            raise PluginError(f"this {self.method} is part of the '{self._owner.method}' plug-in; detach that one")
        model = self.model
        self._kept_state = self.state_dict()
        self._undo(model)
        return model

    @contextlib.contextmanager
    def disable(self):
        """with plugin.disable(): the model computes the function without this plug-in (the others
        stay); afterwards it is back, with the same parameter objects (an optimizer stays valid)."""
        if self.model is not None and self._owner is not None:
            raise PluginError(f"this {self.method} is part of the '{self._owner.method}' plug-in; disable that one")
        params = self.trainable_parameters()
        model = self.detach()
        try:
            yield model
        finally:
            self.attach(model)
            self._rebind(params)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """name -> parameter, for every parameter this plug-in trains (empty for the frozen base),
        its parts' included."""
        if self.model is None:
            raise PluginError(f"attach {self.method} to a model first")
        out = self._parameters()
        for part in self._parts:
            out.update(part.trainable_parameters())
        return out

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

    def save_pretrained(self, path: str | os.PathLike, base_name: str | None = None, card: dict | None = None) -> Path:
        """Write `path/plugin.safetensors`, `path/attnlab_plugin.json` (method, options, base
        fingerprint) and a model card `path/README.md`, atomically with a checksum manifest. `card`:
        what the run that produced it knows (data, metrics, training, command), for the card.

        `path` must be new, an empty folder, or a plug-in folder attnlab saved (every file in it
        listed in its manifest): anything else is refused, so nothing of the user's is replaced."""
        from ..card import write_card

        if self.model is None:
            raise PluginError(f"attach {self.method} to a model before saving it")
        path = Path(path)
        check_save_target(path)
        remove_stale_temps(path.parent, path.name)
        meta = {"method": self.method, "module": type(self).__module__, "config": dataclasses.asdict(self.config),
                "base": fingerprint(self.model, base_name or _model_name(self.model))}
        state = self.state_dict()
        check_finite(state, f"{self.method} plug-in")
        n_trainable = sum(v.numel() for v in state.values())

        def write(tmp):
            save_file(state, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
            self._export(tmp, meta)
            write_card(tmp, meta, n_trainable, card, exported=sorted(p.name for p in tmp.iterdir()))

        write_dir(path, write, replace=True)
        return path

    # -- training hooks: the trainer calls these once at a fresh start and around each step ------
    def on_train_start(self, hidden_fn) -> None:
        """Once, before the first step of a fresh (not resumed) training run: a data-dependent
        initialisation. `hidden_fn()` returns the base's final hidden states (N x E) at the target
        positions of the first training examples."""

    def on_step_start(self) -> None:
        """Before the micro-batches of an optimizer step (e.g. precompute what they all share)."""

    def on_step_end(self, reduce=None) -> None:
        """After their backward passes, before clipping and the optimizer update. `reduce` averages
        a tensor over processes when there are several (None: one process)."""

    def replay_state(self):
        """For activation checkpointing (attnlab/checkpointing.py): called at a block's forward, it
        returns a zero-argument context manager factory that puts back, around the block's
        recomputation in the backward, whatever settings of this plug-in its forward read then
        (e.g. sparse's collect_gate_loss, switched off again before the backward). Default: none."""
        return contextlib.nullcontext

    def training_modules(self) -> list[nn.Module]:
        """Modules of this plug-in (its parts' included) that act differently in training, such as
        dropout. The trainer switches them to train mode for its optimizer steps only (validation
        and everything after training run in eval mode); the frozen base always stays in eval mode."""
        out = list(self._training_modules())
        for part in self._parts:
            out += part.training_modules()
        return out

    def _training_modules(self) -> list[nn.Module]:
        return []

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

    def _export(self, folder: Path, meta: dict) -> None:
        """Extra files saved beside the plug-in's own (LoRA: the PEFT adapter format)."""

    # -- composition ----------------------------------------------------------------------------
    def _attach_part(self, part: "Plugin", model: nn.Module) -> "Plugin":
        """From `_install`: attach `part` (another method this one is built from) through its public
        verbs. Its parameters count as this plug-in's, and it is detached with it, never alone."""
        part.attach(model)
        part._owner = self
        self._parts.append(part)
        return part

    def _drop_parts(self) -> None:
        for part in reversed(self._parts):
            part._owner = None
            part.detach()
        self._parts = []

    def _undo(self, model: nn.Module) -> None:
        self._remove(model)
        self._drop_parts()
        _unregister(model, self)
        self.model = None

    def _check_conflicts(self, model: nn.Module) -> None:
        mine = {id(p): n for n, p in self.trainable_parameters().items()}
        family = {id(p) for p in self._parts} | {id(self._owner)}
        for other in attached(model):
            if other is self or id(other) in family:
                continue
            both = sorted(self.changes & other.changes)
            if both:
                what = " and ".join({"attention": "attention implementation", "head": "output head"}.get(b, b) for b in both)
                raise PluginError(f"'{self.method}' and the attached '{other.method}'{_part_of(other)} both replace the "
                                  f"model's {what}; detach '{(other._owner or other).method}' first")
            shared = [mine[id(p)] for p in other.trainable_parameters().values() if id(p) in mine]
            if shared:
                raise PluginError(f"'{self.method}' and the attached '{other.method}'{_part_of(other)} would both train "
                                  f"{shared[0]}; detach '{(other._owner or other).method}' first")

    def _rebind(self, old: dict[str, nn.Parameter]) -> None:
        """Put the parameter objects `old` back where the re-installed plug-in created new ones (same
        names, same values): whoever holds them (an optimizer) keeps training the live weights."""
        where: dict[int, list] = {}
        for module in self.model.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    where.setdefault(id(p), []).append((module, key))
        for name, p in self.trainable_parameters().items():
            if name in old and p is not old[name]:
                for module, key in where.get(id(p), []):
                    module._parameters[key] = old[name]


def attached(model: nn.Module) -> list[Plugin]:
    """The plug-ins on `model`, in the order they were attached (parts of a plug-in included)."""
    return list(getattr(model, "_attnlab_plugins", ()))


def _register(model: nn.Module, plugin: Plugin) -> None:
    model._attnlab_plugins = attached(model) + [plugin]
    _name_last(model)


def _unregister(model: nn.Module, plugin: Plugin) -> None:
    model._attnlab_plugins = [p for p in attached(model) if p is not plugin]
    _name_last(model)


def _name_last(model: nn.Module) -> None:
    # `model._attnlab_plugin`: the plug-in attached last (None when there is none), as before composition
    top = [p for p in attached(model) if p._owner is None]
    model._attnlab_plugin = top[-1] if top else None


def _part_of(plugin: Plugin) -> str:
    return f" (part of '{plugin._owner.method}')" if plugin._owner is not None else ""


def _touched(model: nn.Module) -> dict[str, object]:
    """What two plug-ins cannot both replace, as it is now: the attention implementation, the head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {"attention": getattr(getattr(model, "config", None), "_attn_implementation", None), "head": id(head)}


@contextlib.contextmanager
def disabled(model: nn.Module, *plugins: Plugin):
    """with disabled(model): the base function (every plug-in off); disabled(model, p): without p only.
    Afterwards they are back, attached in their order, with the same parameter objects."""
    chosen = list(plugins) or [p for p in attached(model) if p._owner is None]
    with contextlib.ExitStack() as stack:
        for p in reversed(chosen):
            stack.enter_context(p.disable())
        yield model


def _model_name(model: nn.Module) -> str:
    return getattr(model, "_attnlab_spec", None) or getattr(model.config, "name_or_path", "") or "unknown"


def check_save_target(path: Path) -> None:
    """Refuse to save over anything but nothing, an empty folder, or a plug-in attnlab saved."""
    fix = "save to a new or empty folder (or delete it yourself)"
    if path.is_symlink():
        raise UnsafePath(f"save_pretrained: {path} is a symlink; {fix}")
    if not path.exists():
        return
    if not path.is_dir():
        raise UnsafePath(f"save_pretrained: {path} is a file, not a folder; {fix}")
    if not any(path.iterdir()):
        return
    if not (path / CONFIG_NAME).is_file() and not (path / LEGACY_CONFIG_NAME).is_file():
        raise UnsafePath(f"save_pretrained: {path} exists and holds no attnlab plug-in (no {CONFIG_NAME}); {fix}")
    try:
        listed = set(read_manifest(path))
    except DamagedFile:
        raise UnsafePath(f"save_pretrained: {path} holds a plug-in without a valid {MANIFEST}, so attnlab cannot "
                         f"tell its files from yours; {fix}") from None
    theirs = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                    if (p.is_file() or p.is_symlink()) and p.name != MANIFEST and str(p.relative_to(path)) not in listed)
    if theirs:
        raise UnsafePath(f"save_pretrained: {path} holds files the plug-in did not write ({', '.join(theirs[:3])}); "
                         f"{fix}")


def read_plugin_config(path: str | os.PathLike) -> dict:
    """The plug-in's attnlab_plugin.json (or the config.json of older saves), after checking every
    file against the folder's manifest (required: a folder without one is refused)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        cfg_file = path / LEGACY_CONFIG_NAME
    if not path.is_dir() or not cfg_file.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise PluginError(f"{path} is not an attnlab plug-in (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    verify_dir(path, required=(cfg_file.name, WEIGHTS_NAME))  # DamagedFile names the file
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


def check_fingerprint(saved: dict, model: nn.Module, path, allow_missing_body_hash: bool = False) -> None:
    """Refuse a plug-in trained on another base: sizes, the embedding hash and the body hash must
    match. A plug-in without `body_sha256` (saved before bodies were fingerprinted, or edited) is
    refused unless `allow_missing_body_hash` (then sizes and embedding only)."""
    now = fingerprint(model, _model_name(model))
    for key in ("vocab_size", "hidden_size", "embedding_sha256", "body_sha256"):
        if key == "body_sha256" and key not in saved:
            if allow_missing_body_hash:
                continue
            raise PluginError(f"{path} does not record its base's body_sha256, so attnlab cannot check that this "
                              f"base is the one it was trained on; pass allow_missing_body_hash=True "
                              f"(CLI: --allow-missing-body-hash) if you know it is")
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
