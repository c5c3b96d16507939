"""SparseAttention: cheaper attention patterns swapped into a frozen causal LM, as one registered
attention function (transformers' AttentionInterface), like FactorizedAttention.

    plugin = SparseAttention(SparseConfig(variant="learned", block_size=64, top_k=4)).attach(model)
    plugin.collect_gate_loss = True            # distil the gates from the dense attention
    loss = lm_loss + plugin.gate_loss()        # the gates learn only from this term
    plugin.sparsity()                          # fraction of causal (query, key) pairs skipped

Variants (per patched layer; the other layers stay dense):
  window     each query sees the last `window` keys (itself included) plus the first `sinks` keys.
  learned    block-sparse attention with a learned, causal block selector (below).
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

Kernels for window/learned, all computing the same function:
  masked   dense SDPA with the pattern as a boolean (Tq, Tk) mask: the reference, no savings.
  gather   pure torch, no compile: per query block, gather only its kept key blocks
           (index, then SDPA on (B*Hkv, n_query_blocks, G*block, kept*block)). Memory and work are
           O(T * kept * block) instead of O(T^2); window keeps ceil((window-1)/block)+1 blocks.
  flex     torch FlexAttention with a BlockMask built from the kept blocks (compiled once, lazily;
           compiled kernels are cached in $TORCHINDUCTOR_CACHE_DIR, default $ATTNLAB_CACHE/inductor).
  auto     gather on CPU, flex on CUDA.
Performer has its own chunked causal linear-attention kernel (quadratic within a chunk of
`block_size` queries, a running (features x D) state across chunks; memory O(T * features)), used
for every kernel setting but "masked", which materialises the normalised (Tq, Tk) weights instead.

The learned selector, and why it is causal. SeerAttention pools the QUERIES of a block to pick its
key blocks; the pooled query of block i contains tokens after position p, so the choice for p would
depend on the future and generation with a KV cache (which has not seen them) would differ from a
full forward. Here, for query block i (positions [i*b, (i+1)*b)):
  always kept   key block i (the diagonal, causal inside), i-1 (local) and 0 (sink);
  candidates    key blocks 1 <= j <= i-2, scored per kv head h by
                    s_h(i, j) = (Wq kpool_{i-1,h}) . (Wk kpool_{j,h}) / sqrt(gate_dim)
                where kpool_j is the mean key of block j. Block i-1 stands in for block i's queries:
                it is complete and in the past for every query of block i;
  selected      the top_k candidates, or those whose softmax probability >= threshold.
Only complete key blocks before block i are pooled, so a decoding step (Tq=1) scores exactly the
keys the full forward scored. The selection is per kv head, shared by its G query heads. Wq, Wk
(head_dim -> gate_dim, shared across heads, one pair per layer) start equal and random, so the
initial score is a similarity of pooled keys. The hard top-k passes no gradient: the gates learn
only from gate_loss(), SeerAttention-style distillation: KL(teacher || gate) where the teacher is
the dense attention of the same q, k summed into (query block, key block) mass over the candidate
blocks (computed under no_grad, chunked over query blocks). The gates read detached keys, so that
loss reaches the gate parameters only.

Files: config.py (options), patterns.py (where queries and key blocks sit), kernels.py (masked,
gather, flex), performer.py, teacher.py (the dense attention the gates learn from), layer.py (one
patched module's state and the registered function), plugin.py (the plug-in).
"""

from .config import KERNELS, VARIANTS, SparseConfig
from .layer import ATTR, SparseLayer, sparse_attention
from .plugin import LABEL, NAME, NAMES, SparseAttention, capture_attention, dense_reference

__all__ = ["SparseAttention", "SparseConfig", "SparseLayer", "capture_attention", "dense_reference", "sparse_attention",
           "ATTR", "NAME", "NAMES", "LABEL", "VARIANTS", "KERNELS"]
