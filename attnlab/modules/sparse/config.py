"""The sparse attention's options, validated when the config is built (a bad value is one line
naming the fix)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import PluginError

VARIANTS = ("window", "learned", "performer", "dense")
KERNELS = ("auto", "flex", "gather", "masked")


@dataclass
class SparseConfig:
    variant: str = "learned"             # window | learned | performer | dense
    layers: list[int] | None = None      # None: every layer
    kernel: str = "auto"                 # auto | flex | gather | masked
    window: int = 10                     # window: keys seen per query, itself included
    sinks: int = 0                       # window: the first `sinks` keys are always seen
    block_size: int = 64                 # learned: block of the selection; all: tile of gather/flex
    top_k: int = 4                       # learned: selected key blocks per query block, beyond the 3 kept
    threshold: float | None = None       # learned: keep candidates with gate prob >= threshold instead
    gate_dim: int = 32                   # learned: width of Wq, Wk
    features: int = 64                   # performer: random features
    train_modules: list[str] = field(default_factory=list)  # e.g. ["model.layers.5.mlp"]
    # distillation from the dense base (attnlab.distill): per token KL(P_base || P_sparse) plus
    gate_weight: float = 1.0             # x the gates' block-map KL (what trains a learned gate)
    hidden_weight: float = 0.0           # x every layer's hidden-state MSE (intermediate layers)
    oracle: bool = False                 # learned: select by the dense attention's true block mass
                                         # instead of the gate (an upper bound for any gate at this
                                         # top_k; O(T^2) and it sees a block's later queries: analysis only)
    metric_examples: int = 2             # eval examples for attention MSE and gradient cosine (O(T^2); 0: skip)

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.variant not in VARIANTS:
            raise PluginError(f"unknown sparse variant '{self.variant}'; use one of: {', '.join(VARIANTS)}")
        if self.kernel not in KERNELS:
            raise PluginError(f"unknown sparse kernel '{self.kernel}'; use one of: {', '.join(KERNELS)}")
        for name, low in (("window", 1), ("sinks", 0), ("block_size", 1), ("top_k", 0), ("gate_dim", 1),
                          ("features", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise PluginError(f"sparse option {name} must be an integer >= {low}, got {value!r}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise PluginError(f"sparse option threshold must be in (0, 1] (or None for top_k), got {self.threshold}")
