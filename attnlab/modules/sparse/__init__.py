"""SparseAttention: cheaper attention patterns swapped into a frozen causal LM, as one registered
attention function (transformers' AttentionInterface), like FactorizedAttention.

    plugin = SparseAttention(SparseConfig(variant="learned", block_size=64, top_k=4)).attach(model)
    plugin.distil_gates(sequences)             # cached dense teacher, then the gates train layer by layer
    plugin.sparsity()                          # fraction of causal (query, key) pairs skipped
    plugin.pairs_scored()                      # work the gather kernel did in the last forward
    with plugin.base_function(): ...           # the frozen base exactly (what distillation compares to)

Variants (per patched layer; the other layers stay dense):
  window     each query sees the last `window` keys (itself included) plus the first `sinks` keys.
  quest      Quest's training-free choice of key blocks (quest.py), per query block (granularity:
             block, the default) or per query row and query head (granularity: row).
  learned    a learned gate's choice of key blocks (gate.py), per query block or per row (each kv head).
  lowrank    a low-rank indexer's choice of key blocks (lowrank.py): every key's logit approximated in
             `rank` dimensions, fitted in closed form by plugin.calibrate(sequences); per query block
             or per row and query head.
  performer  FAVOR+ causal linear attention (positive random features, fixed seed, a buffer).
  dense      the base kernel itself: the reference for benchmarking the harness.

Everything runs after rotary embeddings and the KV cache, so one implementation serves GPT-2 and
the Llama family. The function receives q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D) with Tk >= Tq:
the queries are the LAST Tq of the Tk key positions (a dynamic KV cache; static caches, whose key
slots run past the queries, are not supported). Grouped-query heads are never repeated for the
softmax kernels: the G query heads of one kv head are folded into the query rows.

The pattern is defined on key indices (cache slots), so it is exact for right padding (a padded row
computes what the sequence alone computes) but left padding shifts block boundaries and sinks.
The model's padding/causal mask (bool or additive float 4D, or None for plain causal) is always
applied on top of the pattern. A query that sees no key at all (a padding row outside the window,
an all-padding batch) outputs zeros, which is what SDPA does; the eager kernel would instead
average every value there. Only padding rows are ever affected. Attention dropout is not applied by
the sparse kernels (the frozen base runs in eval mode).

Block selection (quest, learned, lowrank; selection.py), per query block i (granularity: block, one choice
shared by the block's rows, from their pooled queries: pooling.py) or per query row at position p
in block i = p // block_size (granularity: row; every decoding step):
  always kept   key block i (the diagonal, causal inside), i-1 (local) and 0 (sink);
  candidates    the complete key blocks 1 <= j <= i-2, scored by Quest's bound or the gate from the
                row's own query and the blocks' keys, nothing later than p;
  selected      the top_k best (default), or (learned) the fewest whose softmax mass reaches `mass`,
                or those with softmax probability >= `threshold`; `oracle: true` ranks by the row's
                true dense attention mass instead (analysis only: O(T^2)).
A row selects from its own query and complete past blocks only, so a decoding step with the KV cache
selects exactly what a full forward with granularity row selects (tested); a block-shared choice
depends on every row of the block, later ones included, so cached generation equals it on the
prompt only. Decoding reads each complete block's metadata from the layer's page store (pages.py),
computed once per block, and attends to the selected blocks only (decode.py). The hard choice passes no gradient: a
learned gate trains on its own loss against the dense attention's max-pooled block map, from a
cached teacher (teacher.py, plugin.distil_gates) or online (collect_gate_loss / gate_loss()).

Kernels for window/quest/learned, all computing the same function (tested against masked):
  masked   dense SDPA with the pattern as a boolean (Tq, Tk) mask: the reference, no savings.
  gather   block-shared selections without a model mask: blockshared.py, one batched gather per chunk
           of query blocks and one fused flash call on exactly the selected blocks (work = density);
           otherwise blocksparse.py: per tile of query rows, the union of the key blocks its rows selected,
           gathered in chunks and attended with the fused CPU flash kernel; a custom autograd
           backward that keeps only q, k, v, the output, the log-sum-exp and the block indices, and
           re-gathers K/V in the backward. Work O(T * kept blocks * block_size).
  flex     torch FlexAttention with a BlockMask built from the kept blocks (compiled once, lazily;
           compiled kernels are cached in $TORCHINDUCTOR_CACHE_DIR, default $ATTNLAB_CACHE/inductor).
  auto     gather on CPU, flex on CUDA.
Performer has its own chunked causal linear-attention kernel (quadratic within a chunk of
`block_size` queries, a running (features x D) state across chunks; memory O(T * features)), used
for every kernel setting but "masked", which materialises the normalised (Tq, Tk) weights instead.

Files: config.py (options), patterns.py (where queries and key blocks sit, selections), pooling.py
(key-block and query-block statistics), quest.py, gate.py (the learned gate), lowrank.py (the low-rank
indexer and its fit), selection.py (scores ->
Selection, both granularities), pages.py (page metadata beside the KV cache), teacher.py (the dense
attention the selectors approximate; the cached teacher), blockshared.py and blocksparse.py (the
gather kernels), decode.py (a decoding step), kernels.py (masked, flex), performer.py, layer.py (one
patched module's state and the registered function), plugin.py (the plug-in). distill.py imports
nothing from here: it reaches the base through the plug-in's public base_function().
"""

from .config import KERNELS, VARIANTS, SparseConfig
from .layer import ATTR, SparseLayer, sparse_attention
from .plugin import LABEL, NAME, NAMES, SparseAttention, capture_attention, dense_reference

__all__ = ["SparseAttention", "SparseConfig", "SparseLayer", "capture_attention", "dense_reference", "sparse_attention",
           "ATTR", "NAME", "NAMES", "LABEL", "VARIANTS", "KERNELS"]
