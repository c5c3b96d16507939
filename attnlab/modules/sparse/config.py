"""The sparse attention's options, validated when the config is built (a bad value is one line
naming the fix)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..base import PluginError

VARIANTS = ("window", "learned", "quest", "lowrank", "performer", "dense")
KERNELS = ("auto", "flex", "gather", "masked")
GRANULARITIES = ("block", "row")


@dataclass
class SparseConfig:
    variant: str = "learned"             # window | learned | quest | lowrank | performer | dense
    layers: list[int] | None = None      # None: every layer
    kernel: str = "auto"                 # auto | flex | gather | masked (kernels.py, blocksparse.py)
    window: int = 10                     # window: keys seen per query, itself included
    sinks: int = 0                       # window: the first `sinks` keys are always seen
    block_size: int = 64                 # key block of the selection; all: tile of gather/flex
    # learned / quest / lowrank: per query row, blocks 0, i-1, i (sinks, local) plus those chosen among 1..i-2 by
    top_k: int = 4                       #   the top_k best scores (the default), or
    mass: float | None = None            #   learned: the fewest whose softmax mass over the candidates
                                         #   reaches `mass` (density adapts per row), or
    threshold: float | None = None       #   learned: those whose softmax probability is >= threshold
    granularity: str = "block"           # learned / quest / lowrank: one choice per query block (block: every row of a
                                         # block sees the same blocks; work = density) or per query row (row);
                                         # a decoding step is one row: row-wise (selection.py)
    gate_dim: int = 64                   # learned: width of the gate's query and key projections (even; 64: the
                                         # width the distilled recipe measured, benchmarks/sparse_quality.py)
    gate_quest: bool = False             # learned: the gate's score adds a learned multiple (per kv head, from 1)
                                         # of Quest's bound, in logit units (gate.py): a gate that starts at Quest
    rank: int = 16                       # lowrank: dimensions of the indexer's approximate logits (lowrank.py;
                                         # fitted by plugin.calibrate)
    features: int = 64                   # performer: random features
    train_modules: list[str] = field(default_factory=list)  # e.g. ["model.layers.5.mlp"]
    # distillation from the dense base (attnlab.distill): per token KL(P_base || P_sparse) plus
    gate_weight: float = 1.0             # x the gates' block-map KL (what trains a learned gate online)
    hidden_weight: float = 0.0           # x every layer's hidden-state MSE (intermediate layers)
    oracle: bool = False                 # learned / quest: score blocks by the row's true dense attention
                                         # mass instead (the best any selector can do at this budget;
                                         # O(T^2): analysis only)
    metric_examples: int = 2             # eval examples for attention MSE and gradient cosine (O(T^2); 0: skip)

    def __post_init__(self):
        self.validate()

    def validate(self):
        if self.variant not in VARIANTS:
            raise PluginError(f"unknown sparse variant '{self.variant}'; use one of: {', '.join(VARIANTS)}")
        if self.kernel not in KERNELS:
            raise PluginError(f"unknown sparse kernel '{self.kernel}'; use one of: {', '.join(KERNELS)}")
        if self.granularity not in GRANULARITIES:
            raise PluginError(f"unknown sparse granularity '{self.granularity}'; use one of: {', '.join(GRANULARITIES)}")
        for name, low in (("window", 1), ("sinks", 0), ("block_size", 1), ("top_k", 0), ("gate_dim", 1),
                          ("features", 1), ("rank", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PluginError(f"sparse option {name} must be an integer >= {low}, got {value!r}")
        for name in ("threshold", "mass"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise PluginError(f"sparse option {name} must be in (0, 1] (or None for top_k), got {value!r}")
        if self.threshold is not None and self.mass is not None:
            raise PluginError("sparse options threshold and mass are two ways to choose blocks; give one of them")
        if not isinstance(self.gate_quest, bool):
            raise PluginError(f"sparse option gate_quest must be true or false, got {self.gate_quest!r}")
        if self.gate_quest and self.variant != "learned":
            hint = " (variant quest ranks by Quest's bound already)" if self.variant == "quest" else ""
            raise PluginError(f"sparse option gate_quest is an option of variant learned (the gate reads Quest's "
                              f"bound), not of variant {self.variant}{hint}: drop gate_quest, or use variant learned")
        if self.gate_dim % 2:
            raise PluginError(f"sparse option gate_dim must be even (the gate's rotary embedding pairs its "
                              f"dimensions), got {self.gate_dim}")
