"""One patched attention module's state (SparseLayer) and the registered attention function."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import inner_attention
from . import blockshared
from .blocksparse import block_sparse_attention
from .config import SparseConfig
from .decode import decode_attention
from .gate import BlockGate, gate_kl
from .kernels import flex_attention_kernel, masked_attention
from .lowrank import LowRankIndexer
from .pages import Pages
from .patterns import Pattern, Selection, normalise_mask, scatter_blocks
from .performer import orthogonal_features, performer_chunked, performer_features, performer_weights, repeat_kv
from .quest import quest_bound
from .selection import gate_scores, select
from .teacher import dense_probs, gate_target, row_block_stats

ATTR = "attnlab_sparse"


class SparseLayer(nn.Module):
    """One patched layer: its config, the learned gate or the performer features, and the
    per-forward outputs the plug-in reads (sparsity, pairs scored, gate loss, captured maps).
    `rope`: (inv_freq, attention_scaling) of the model's rotary embedding, or None (GPT-2)."""

    def __init__(self, config: SparseConfig, head_dim: int, layer_idx: int, heads: int, kv_heads: int,
                 rope: tuple[torch.Tensor, float] | None = None):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.rope = rope
        if config.variant == "learned":
            self.gate = BlockGate(head_dim, kv_heads, heads // kv_heads, config.gate_dim, config.block_size,
                                  seed=1000 + layer_idx, quest=config.gate_quest)
        if config.variant == "lowrank":
            self.indexer = LowRankIndexer(head_dim, kv_heads, config.rank)
        if config.variant == "performer":
            self.register_buffer("features", orthogonal_features(config.features, head_dim, 2000 + layer_idx),
                                 persistent=False)
        self.pages = (Pages(config.variant, config.gate_quest) if config.variant in ("quest", "learned", "lowrank")
                      else None)
        self.force_dense = False          # dense_reference()
        self.collect_gate_loss = False
        self.recorder = None              # teacher.Recorder (the cached teacher), lowrank.Moments (calibrate)
        self.capture: dict | None = None  # capture_attention()
        self._sparsity: torch.Tensor | None = None
        self._counts: tuple | None = None  # (pattern, selection) of the last forward: sparsity on demand
        self.last_pairs_scored: int | None = None
        self.last_gate_loss: torch.Tensor | None = None

    @property
    def last_sparsity(self) -> torch.Tensor | None:
        """Fraction of causal pairs the last forward skipped (counted when asked: not per decode step)."""
        if self._counts is not None:
            kept, total = self._counts[0].pair_counts(self._counts[1])
            self._sparsity, self._counts = 1 - kept / total, None
        return self._sparsity

    @last_sparsity.setter
    def last_sparsity(self, value) -> None:
        self._sparsity, self._counts = value, None

    # -- which key blocks each query computes (selection.py) --------------------------------------
    def select(self, q, k, p: Pattern, base, scale) -> Selection:
        """The selection of this layer's variant at the call's granularity."""
        return select(self.config, q, k, p, base, scale, self.pages, getattr(self, "gate", None), self.rope,
                      getattr(self, "indexer", None))

    def gate_scores(self, q, k, p: Pattern, scale: float) -> torch.Tensor:
        """(B, Hkv, Tq, nfull): the learned gate's scores per row, from the rows' own queries and the
        complete key blocks (both before the model's RoPE; detached, so its loss trains the gate only)."""
        meta = self.pages.get(k.detach(), p, self.rope)
        bound = quest_bound(q.detach(), *meta[1:], p, False, None, scale) if self.gate.reads_quest else None
        return gate_scores(self.gate, q.detach(), p, meta[0], self.rope, block=False, bound=bound)

    # -- the forward --------------------------------------------------------------------------------
    def forward(self, q, k, v, attention_mask, scale):
        cfg = self.config
        k, v, base = normalise_mask(q, k, v, attention_mask)
        window = cfg.window if cfg.variant == "window" else None
        p = Pattern(q.shape[2], k.shape[2], cfg.block_size, q.device, window, cfg.sinks)
        g = q.shape[1] // k.shape[1]

        if cfg.variant == "performer":
            return self.performer(q, k, v, p, base, scale)

        with torch.no_grad():   # a selection is discrete; only the gate's own loss has a gradient
            sel = self.select(q.detach(), k.detach(), p, base, scale)
        scores = None
        if self.collect_gate_loss and cfg.variant == "learned" and p.has_candidates:
            scores = self.gate_scores(q, k, p, scale)
        kernel = cfg.kernel if cfg.kernel != "auto" else ("flex" if q.device.type == "cuda" else "gather")
        decoding = (cfg.variant in ("quest", "learned", "lowrank") and p.tq == 1 and p.qoff > 0
                    and (base is None or bool(base.all())))
        if kernel == "gather" and decoding:
            out, self.last_pairs_scored = decode_attention(q, k, v, p, sel, scale)
        elif kernel == "gather" and blockshared.supported(p, sel, base) and cfg.variant != "window":
            out, self.last_pairs_scored = blockshared.block_shared_attention(q, k, v, p, sel, scale)
        elif kernel == "masked":
            out = masked_attention(q, k, v, p.full_mask(sel, base, g), scale)
            self.last_pairs_scored = q.shape[0] * q.shape[1] * p.tq * p.tk
        elif kernel == "gather":
            out, self.last_pairs_scored = block_sparse_attention(q, k, v, p, sel, base, scale)
        else:
            keep, rows = flex_blocks(sel, p)
            out = flex_attention_kernel(q, k, v, p, keep, base, scale, rows)
            self.last_pairs_scored = None

        self._counts = (p, sel)
        if self.collect_gate_loss and cfg.variant == "learned":
            self.last_gate_loss = self.gate_loss(q, k, p, base, scale, scores)
        if self.capture is not None:
            self.capture[self.layer_idx] = (dense_probs(q, k, p.full_mask(sel, base, g), scale).detach(),
                                            dense_probs(q, k, p.full_mask(None, base, g), scale).detach())
        return out

    def gate_loss(self, q, k, p: Pattern, base, scale, scores):
        """KL(dense max-pooled block attention || gate softmax) over the candidates, averaged over the
        rows that have candidates (teacher.gate_target)."""
        if scores is None:   # too short for candidates: a zero that still backpropagates
            return self.gate.wq.sum() * 0.0
        cand = p.candidates()
        peak = row_block_stats(q.detach(), k.detach(), p, base, scale)[1]
        return gate_kl(scores, gate_target(peak, k.shape[1], cand), cand)

    def performer(self, q, k, v, p: Pattern, base, scale):
        key_valid = base[:, 0].any(1) if base is not None else None         # padding keys drop out
        qf, kf = performer_features(q, k, self.features, scale, key_valid)
        g = q.shape[1] // k.shape[1]
        kf, v = repeat_kv(kf, g), repeat_kv(v, g)
        if self.config.kernel == "masked":
            out = performer_weights(qf, kf) @ v
        else:
            out = performer_chunked(qf, kf, v, self.config.block_size)
        self.last_sparsity = q.new_zeros(())   # nothing skipped: every pair is approximated
        self.last_pairs_scored = q.shape[0] * q.shape[1] * p.tq * p.tk
        if self.capture is not None:
            self.capture[self.layer_idx] = (performer_weights(qf, kf).detach(),
                                            dense_probs(q, k, p.full_mask(None, base, g), scale).detach())
        return out.transpose(1, 2).contiguous()


def flex_blocks(sel: Selection, p: Pattern):
    """FlexAttention's inputs: the blocks of each query block (B|1, Hkv|1, nq, nb) bool for its
    BlockMask, and for per-row selections each row's own (B, Hkv, S, Tq, nb) for its mask_mod."""
    if sel.per_block:
        return scatter_blocks(sel, p.nb)[:, :, 0], None
    blocks, valid = p.union(sel)
    return scatter_blocks(Selection(blocks, valid, True), p.nb), p.row_keep(sel)


# --- the registered attention function -----------------------------------------------------------

def sparse_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the layer's variant where the module is patched, the
    inner kernel everywhere else (and for the dense variant, and inside dense_reference)."""
    layer = getattr(module, ATTR, None)
    if layer is None or layer.force_dense:
        out = inner_attention(module)(module, query, key, value, attention_mask, **kwargs)
        if layer is not None and layer.recorder is not None:   # the cached teacher
            k, _, base = normalise_mask(query, key, value, attention_mask)
            p = Pattern(query.shape[2], k.shape[2], layer.config.block_size, query.device)
            layer.recorder(layer, query, k, base, _scale(module, query, kwargs), p)
        return out
    if layer.config.variant == "dense":
        out = inner_attention(module)(module, query, key, value, attention_mask, **kwargs)
        layer.last_sparsity = query.new_zeros(())
        layer.last_pairs_scored = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2]
        if layer.capture is not None:
            k, _, base = normalise_mask(query, key, value, attention_mask)
            p = Pattern(query.shape[2], k.shape[2], 1, query.device)
            g = query.shape[1] // k.shape[1]
            probs = dense_probs(query, k, p.full_mask(None, base, g), _scale(module, query, kwargs)).detach()
            layer.capture[layer.layer_idx] = (probs, probs)
        return out
    return layer(query, key, value, attention_mask, _scale(module, query, kwargs)), None


def _scale(module, query, kwargs):
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None)
    return float(scale) if scale is not None else query.shape[-1] ** -0.5
