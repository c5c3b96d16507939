"""The SparseAttention plug-in: patches the chosen layers, the dense reference, captured maps."""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ..attention import modules_to_patch, names, register, route, unroute
from ..base import Plugin, PluginError
from .config import SparseConfig
from .layer import ATTR, SparseLayer, sparse_attention

NAME = "attnlab_sparse"
NAMES = names(NAME)        # one per inner kernel: each gets its mask format
LABEL = "SparseAttention"


def _rotary(model: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(inv_freq, attention_scaling) of the model's rotary embedding, or None when it has none."""
    from ...backbone import decoder

    rot = getattr(decoder(model), "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return None
    return rot.inv_freq, float(getattr(rot, "attention_scaling", 1.0))


def _sparse_layers(model: nn.Module) -> list[SparseLayer]:
    layers = [getattr(m, ATTR) for m in model.modules() if isinstance(getattr(m, ATTR, None), SparseLayer)]
    if not layers:
        raise PluginError("this model carries no SparseAttention layers; attach SparseAttention first")
    return layers


# --- reference and metric hooks ------------------------------------------------------------------

@contextlib.contextmanager
def dense_reference(model: nn.Module):
    """Inside: every patched layer computes the unmodified base attention (the teacher)."""
    layers = _sparse_layers(model)
    before = [layer.force_dense for layer in layers]
    for layer in layers:
        layer.force_dense = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.force_dense = was


@contextlib.contextmanager
def capture_attention(model: nn.Module, into=None):
    """Yields a dict; after a forward inside, dict[layer_idx] = (sparse_probs, dense_probs), both
    (B, Hq, Tq, Tk) float: the variant's effective attention probabilities (zeros where skipped;
    performer: its normalised causal linear-attention weights) and the dense softmax. Patched layers
    only. It materialises Tq x Tk per head: for analysis and metrics, not for speed. `into`: any
    object with __setitem__ that receives each layer's pair as it is computed instead (to reduce
    them on the fly and keep one layer's maps at a time)."""
    layers = _sparse_layers(model)
    captured = {} if into is None else into
    for layer in layers:
        layer.capture = captured
    try:
        yield captured
    finally:
        for layer in layers:
            layer.capture = None


# --- the plug-in ---------------------------------------------------------------------------------

class SparseAttention(Plugin):
    method = "sparse"
    Config = SparseConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._collect = False
        self._layers: list[SparseLayer] = []

    def _install(self, model):
        cfg = self.config
        cfg.validate()
        mods = modules_to_patch(model, cfg.layers, ATTR, NAMES, LABEL)
        train = self._train_params(model)
        # train_modules are base weights: keep the originals, so that detach restores the base exactly
        self._originals = {n: prm.detach().clone() for n, prm in train.items()}
        register(NAMES, sparse_attention)
        ref = next(model.parameters())
        self._mods = mods
        heads = model.config.num_attention_heads
        kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
        rope = _rotary(model)
        for m in self._mods:
            m.add_module(ATTR, SparseLayer(cfg, m.head_dim, m.layer_idx, heads, kv_heads, rope).to(ref.device, ref.dtype))
        self._layers = [getattr(m, ATTR) for m in self._mods]
        self.collect_gate_loss = self._collect
        self._train = train
        for prm in train.values():
            prm.requires_grad_(True)
        self._inner = route(model, NAMES)

    def _train_params(self, model) -> dict[str, nn.Parameter]:
        out = {}
        for name in self.config.train_modules:
            try:
                sub = model.get_submodule(name)
            except AttributeError:
                examples = [n for n, _ in model.named_modules() if n.endswith(("mlp", "self_attn", "attn"))][:3]
                raise PluginError(f"train_modules: the model has no submodule '{name}' "
                                  f"(names look like: {', '.join(examples)})") from None
            out.update({f"{name}.{n}": prm for n, prm in sub.named_parameters()})
        return out

    def _remove(self, model):
        for n, prm in self._train.items():
            prm.requires_grad_(False)
            prm.data = self._originals[n]   # a swap, not a copy: the detached state keeps the trained values
        self._originals = {}
        for m in self._mods:
            delattr(m, ATTR)
        self._layers = []
        unroute(model, self._inner)

    def _parameters(self):
        # an oracle selects by the dense attention itself: its gate is never used, so never trained
        out = {} if self.config.oracle else {n: prm for n, prm in self.model.named_parameters() if f".{ATTR}." in n}
        out.update(self._train)
        return out

    # -- what distillation needs (attnlab.distill uses these, never the private fields) -------------
    @contextlib.contextmanager
    def base_function(self):
        """Inside: the model computes the frozen base exactly: dense attention in the patched layers
        and the original values of the base weights this plug-in trains in place (train_modules)."""
        if self.model is None:
            raise PluginError("attach sparse to a model first")
        trained = self._train
        now = {n: prm.data for n, prm in trained.items()}
        for n, prm in trained.items():
            prm.data = self._originals[n]
        try:
            with dense_reference(self.model):
                yield self.model
        finally:
            for n, prm in trained.items():
                prm.data = now[n]

    def dense_reference(self):
        """Inside: the patched layers compute dense attention (trained weights stay as they are)."""
        if self.model is None:
            raise PluginError("attach sparse to a model first")
        return dense_reference(self.model)

    def capture_attention(self, into=None):
        """capture_attention(model, into) for the model this plug-in is attached to."""
        if self.model is None:
            raise PluginError("attach sparse to a model first")
        return capture_attention(self.model, into)

    def patched_weights(self) -> list[nn.Parameter]:
        """The base model's own weights in the patched attention modules (the gates excluded)."""
        if self.model is None:
            raise PluginError("attach sparse to a model first")
        return [prm for m in self._mods for n, prm in m.named_parameters() if not n.startswith(ATTR + ".")]

    # -- the trainer's objective and the run's extra metrics (attnlab.distill) ----------------------
    def objective(self, model, batch):
        from ...distill import distillation_loss
        if self.config.oracle:
            raise PluginError("oracle selection is for analysis only (it computes the dense attention to choose); "
                              "evaluate it zero-shot with train: {steps: 0}")
        gate = self.config.gate_weight if self.config.variant == "learned" else 0.0
        return distillation_loss(model, self, batch, gate_weight=gate, hidden_weight=self.config.hidden_weight)

    def extra_metrics(self, model, examples, pad_id, batch_size):
        from ...distill import sparse_metrics
        return sparse_metrics(model, self, examples, pad_id, batch_size=1, n_examples=self.config.metric_examples)

    # -- training signal and statistics -----------------------------------------------------------
    @property
    def collect_gate_loss(self) -> bool:
        return self._collect

    @collect_gate_loss.setter
    def collect_gate_loss(self, on: bool) -> None:
        self._collect = bool(on)
        for layer in self._layers:
            layer.collect_gate_loss = self._collect
            layer.last_gate_loss = None

    def replay_state(self):
        """A recomputed block (activation checkpointing) sees the gate-loss setting of its forward;
        the loss it recomputes is dropped (the forward's was already used)."""
        on = self._collect

        @contextlib.contextmanager
        def replay():
            was = [(layer, layer.collect_gate_loss) for layer in self._layers]
            for layer in self._layers:
                layer.collect_gate_loss = on
            try:
                yield
            finally:
                for layer, w in was:
                    layer.collect_gate_loss, layer.last_gate_loss = w, None
        return replay

    def gate_loss(self) -> torch.Tensor:
        """Sum over layers of the last forward's gate distillation loss (differentiable), then cleared.
        Zero for variants without gates. Call it once after each forward."""
        if not self._collect:
            raise PluginError("no gate loss is collected; set plugin.collect_gate_loss = True before the forward")
        if self.model is None:
            raise PluginError("attach sparse to a model first")
        losses = [layer.last_gate_loss for layer in self._layers if layer.last_gate_loss is not None]
        for layer in self._layers:
            layer.last_gate_loss = None
        if not losses:
            if self.config.variant == "learned":
                raise PluginError("no gate loss yet: run a forward with collect_gate_loss = True first")
            return next(self.model.parameters()).new_zeros(())
        return torch.stack(losses).sum()

    def distil_gates(self, sequences, rows: int = 512, steps: int = 2000, lr: float = 3e-3, batch: int = 256,
                     seed: int = 0, log=None, target: str = "peak", teacher=None, unit: str | None = None) -> dict:
        """Train every learned gate layer by layer from a cached dense teacher (teacher.py): one dense
        forward per sequence (1-D token tensors) records `rows` query rows per sequence and layer,
        then each gate takes `steps` Adam steps on them. Returns the teacher pass's and the
        training's seconds and tokens, and each layer's KL before/after on train and held-out rows.
        target: "peak" or "mass" (teacher.train_gates); teacher: the (caches, record) of an earlier
        collect_teacher over the same sequences and rows, instead of running the teacher again.
        unit: what one training example is, a query "row" or a whole query "block" (SeerAttention's
        2-D pooled target; teacher.Recorder); default: the selection's granularity."""
        from .teacher import check_options, collect_teacher, train_gates

        if self.config.variant != "learned" or self.config.oracle:
            raise PluginError("distil_gates trains the learned gate: attach variant 'learned' (without oracle)")
        unit = check_options(self.config.granularity if unit is None else unit, rows=rows, steps=steps, lr=lr,
                             target=target, batch=batch)
        caches, teacher = teacher or collect_teacher(self.model, self, sequences, rows=rows, seed=seed, unit=unit)
        if ("block" in next(iter(caches.values()))) != (unit == "block"):
            raise PluginError(f"the teacher given was recorded per {'row' if unit == 'block' else 'block'}, "
                              f"not per {unit}: collect it with unit={unit!r}")
        start = time.perf_counter()
        layers = self.layers()
        results = train_gates([layer.gate for layer in layers], [caches[layer.layer_idx] for layer in layers],
                              steps=steps, lr=lr, batch=batch, seed=seed, target=target)
        for layer, r in zip(layers, results):
            if log:
                log(f"[gate] layer {layer.layer_idx}: KL train {r['before']['train']:.3f} -> "
                    f"{r['after']['train']:.3f}, held-out {r['before']['heldout']:.3f} -> {r['after']['heldout']:.3f}")
        return {"teacher": teacher, "training": {"seconds": time.perf_counter() - start, "tokens": teacher["tokens"],
                                                 "steps": steps, "rows": rows},
                "layers": {layer.layer_idx: r for layer, r in zip(layers, results)}}

    def calibrate(self, sequences) -> dict:
        """Fit every lowrank indexer in closed form (lowrank.py) from one dense forward per sequence
        (1-D token tensors); returns the pass's seconds and tokens."""
        from .lowrank import calibrate

        return calibrate(self.model, self, sequences)

    def save_pretrained(self, path, *args, **kwargs):
        """Plugin.save_pretrained; an unfitted lowrank indexer (all zeros) is refused naming calibrate."""
        if (self.config.variant == "lowrank" and not self.config.oracle and self.model is not None
                and not all(layer.indexer.fitted for layer in self._layers)):
            raise PluginError("the lowrank indexer is not fitted, so there is nothing to save: call "
                              "plugin.calibrate(sequences) first")
        return super().save_pretrained(path, *args, **kwargs)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Plugin.load_state_dict; a learned gate's weights into another variant, a lowrank indexer's
        into another variant or rank, and gate weights saved with gate_quest into a gate without (or
        the reverse) are refused naming the option."""
        kinds = {"learned": (".gate.", "gate", "distil it with plugin.distil_gates(sequences)"),
                 "lowrank": (".indexer.", "indexer", "fit it with plugin.calibrate(sequences)")}
        held = next((v for v, (part, *_) in kinds.items() if any(part in k for k in state)), None)
        own = self.config.variant if self.config.variant in kinds and not self.config.oracle else None
        if held != own:
            if held:
                raise PluginError(f"these sparse weights are a {held} {kinds[held][1]}; attach sparse with "
                                  f"variant={held!r} to load them (this plug-in is variant {self.config.variant}"
                                  f"{' with oracle' if self.config.oracle else ''})")
            raise PluginError(f"these sparse weights hold no {own} {kinds[own][1]} (saved with another variant, or "
                              f"with oracle): load weights saved with variant {own!r}, or {kinds[own][2]}")
        ranks = {v.shape[-1] for k, v in state.items() if k.endswith(".indexer.wq")}
        if own == "lowrank" and ranks and ranks != {self.config.rank}:
            raise PluginError(f"this lowrank indexer was fitted at rank {min(ranks)}; attach sparse with "
                              f"rank={min(ranks)} to load it (or calibrate one at rank {self.config.rank})")
        saved = any(k.endswith(".gate.quest_scale") for k in state)
        if self.config.variant == "learned" and not self.config.oracle and saved != self.config.gate_quest:
            raise PluginError(f"these gate weights were saved {'with' if saved else 'without'} gate_quest; attach "
                              f"sparse with gate_quest={saved} to load them")
        super().load_state_dict(state)

    def layers(self) -> list[SparseLayer]:
        """The SparseLayer of every patched attention module, in layer order."""
        if self.model is None:
            raise PluginError("attach sparse to a model first")
        return list(self._layers)

    def pairs_scored(self) -> int:
        """(query, key) pairs the kernels scored in the last forward, summed over patched layers, heads
        and batch: the work done (a block kernel scores whole tiles, masked pairs included)."""
        done = [layer.last_pairs_scored for layer in self.layers() if layer.last_pairs_scored is not None]
        if not done:
            raise PluginError("no forward has run through the sparse layers yet (or kernel='flex', which "
                              "does not count its work); run one first")
        return sum(done)

    def layer_sparsity(self) -> dict[int, float]:
        """layer index -> fraction of causal (query, key) pairs skipped in the last forward."""
        if self.model is None:
            raise PluginError("attach sparse to a model first")
        done = {layer.layer_idx: float(layer.last_sparsity) for layer in self._layers
                if layer.last_sparsity is not None}
        if not done:
            raise PluginError("no forward has run through the sparse layers yet; run one first")
        return done

    def sparsity(self) -> float:
        """Fraction of causal (query, key) pairs skipped in the last forward, averaged over patched
        layers: 0 for dense and performer (it approximates every pair), ~1 - window/T for window.
        Counted on the pattern at token level, ignoring padding; the gather/flex kernels compute whole
        blocks, so their work is (kept blocks * block_size) keys per query."""
        per_layer = self.layer_sparsity()
        return sum(per_layer.values()) / len(per_layer)
