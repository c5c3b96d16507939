"""One patched attention module's state (SparseLayer) and the registered attention function."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..attention import inner_attention
from .config import SparseConfig
from .kernels import flex_attention_kernel, gather_attention, masked_attention
from .patterns import Pattern, normalise_mask
from .performer import orthogonal_features, performer_chunked, performer_features, performer_weights, repeat_kv
from .teacher import dense_probs, teacher_block_mass

ATTR = "attnlab_sparse"


class SparseLayer(nn.Module):
    """One patched layer: its config, the learned gate (Wq, Wk) or the performer features, and the
    per-forward outputs the plug-in reads (sparsity, gate loss, captured probabilities)."""

    def __init__(self, config: SparseConfig, head_dim: int, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        if config.variant == "learned":
            gen = torch.Generator().manual_seed(1000 + layer_idx)
            init = torch.randn(config.gate_dim, head_dim, generator=gen) / math.sqrt(head_dim)
            self.wq = nn.Linear(head_dim, config.gate_dim, bias=False)
            self.wk = nn.Linear(head_dim, config.gate_dim, bias=False)
            with torch.no_grad():  # equal at the start: the score is a similarity of pooled keys
                self.wq.weight.copy_(init)
                self.wk.weight.copy_(init)
        if config.variant == "performer":
            self.register_buffer("features", orthogonal_features(config.features, head_dim, 2000 + layer_idx),
                                 persistent=False)
        self.force_dense = False          # dense_reference()
        self.collect_gate_loss = False
        self.capture: dict | None = None  # capture_attention()
        self.last_sparsity: torch.Tensor | None = None
        self.last_gate_loss: torch.Tensor | None = None

    # -- the learned selection --------------------------------------------------------------------
    def select(self, k, p: Pattern, oracle_q=None, base=None, scale=None):
        """keep (B, Hkv, nq, nb) bool, and the gate logits (B, Hkv, nq, nfull) with their candidate
        mask (nq, nfull), or None when no query block has a candidate yet."""
        cfg, bs = self.config, p.bs
        b, hkv, _, d = k.shape
        keep = p.fixed_keep()[None, None].expand(b, hkv, p.nq, p.nb).clone()
        cand = p.candidates()
        if not bool(cand.any()):
            return keep, None, cand
        pooled = k[:, :, :p.nfull * bs].detach().reshape(b, hkv, p.nfull, bs, d).mean(3)
        proxy = pooled[:, :, (p.qblocks - 1).clamp(0, p.nfull - 1)]          # block i-1 for query block i
        logits = self.wq(proxy) @ self.wk(pooled).transpose(-1, -2) / math.sqrt(cfg.gate_dim)
        if oracle_q is not None:  # analysis: choose by the dense attention's own block mass
            mass = teacher_block_mass(oracle_q, k, p, base, scale)[..., :p.nfull]
            logits = mass.clamp_min(torch.finfo(mass.dtype).tiny).log()
        if cfg.threshold is not None:
            chosen = cand & (gate_log_probs(logits, cand).exp() >= cfg.threshold)
        else:
            top = min(cfg.top_k, p.nfull)
            chosen = torch.zeros_like(keep[..., :p.nfull])
            if top > 0:
                idx = logits.masked_fill(~cand, -math.inf).topk(top, dim=-1).indices
                chosen = chosen.scatter(-1, idx, True) & cand
        keep[..., :p.nfull] |= chosen
        return keep, logits, cand

    def most_kept(self, p: Pattern, keep) -> int:
        """An upper bound on kept blocks per query block, static when possible (no device sync)."""
        cfg = self.config
        if cfg.variant == "window":
            return -(-(cfg.window - 1) // p.bs) + 1 + -(-cfg.sinks // p.bs)
        if cfg.threshold is None:
            return 3 + cfg.top_k
        return int(keep.sum(-1).max())

    # -- the forward --------------------------------------------------------------------------------
    def forward(self, q, k, v, attention_mask, scale):
        cfg = self.config
        k, v, base = normalise_mask(q, k, v, attention_mask)
        window = cfg.window if cfg.variant == "window" else None
        p = Pattern(q.shape[2], k.shape[2], cfg.block_size, q.device, window, cfg.sinks)

        if cfg.variant == "performer":
            return self.performer(q, k, v, p, base, scale)

        logits = cand = None
        if cfg.variant == "window":
            keep = p.window_keep()
        else:
            keep, logits, cand = self.select(k, p, q if cfg.oracle else None, base, scale)
        kernel = cfg.kernel if cfg.kernel != "auto" else ("flex" if q.device.type == "cuda" else "gather")
        if kernel == "masked":
            out = masked_attention(q, k, v, p.full_mask(keep, base), scale)
        elif kernel == "gather":
            out = gather_attention(q, k, v, p, keep, base, self.most_kept(p, keep), scale)
        else:
            out = flex_attention_kernel(q, k, v, p, keep, base, scale)

        kept, total = p.pair_counts(keep)
        self.last_sparsity = 1 - kept / total
        if self.collect_gate_loss and cfg.variant == "learned":
            if logits is None:   # too short for candidates: a zero that still backpropagates
                self.last_gate_loss = self.wq.weight.sum() * 0.0
            else:
                self.last_gate_loss = self.gate_kl(q, k, p, base, logits, cand, scale)
        if self.capture is not None:
            self.capture[self.layer_idx] = (dense_probs(q, k, p.full_mask(keep, base), scale).detach(),
                                            dense_probs(q, k, p.full_mask(None, base), scale).detach())
        return out

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
        if self.capture is not None:
            self.capture[self.layer_idx] = (performer_weights(qf, kf).detach(),
                                            dense_probs(q, k, p.full_mask(None, base), scale).detach())
        return out.transpose(1, 2).contiguous()

    def gate_kl(self, q, k, p: Pattern, base, logits, cand, scale):
        """KL(teacher block distribution || gate softmax) over the candidate blocks, averaged over the
        (batch, kv head, query block) rows that have candidates and real queries."""
        with torch.no_grad():
            mass = teacher_block_mass(q.detach(), k.detach(), p, base, scale)[..., :p.nfull] * cand
            z = mass.sum(-1, keepdim=True)
            rows = (z.squeeze(-1) > 0) & (cand.sum(-1) > 0)
            target = mass / z.clamp_min(torch.finfo(z.dtype).tiny)
        log_gate = gate_log_probs(logits, cand)
        kl = (torch.xlogy(target, target) - target * log_gate).sum(-1)
        return (kl * rows).sum() / rows.sum().clamp_min(1)


def gate_log_probs(logits, cand):
    """log softmax over the candidate blocks. A large finite fill (not -inf) keeps rows without
    candidates finite, so their (zero-weighted) gradients stay finite too."""
    return logits.masked_fill(~cand, -1e9).log_softmax(-1).masked_fill(~cand, 0.0)


# --- the registered attention function -----------------------------------------------------------

def sparse_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the layer's variant where the module is patched, the
    inner kernel everywhere else (and for the dense variant, and inside dense_reference)."""
    layer = getattr(module, ATTR, None)
    if layer is None or layer.force_dense:
        return inner_attention(module)(module, query, key, value, attention_mask, **kwargs)
    if layer.config.variant == "dense":
        out = inner_attention(module)(module, query, key, value, attention_mask, **kwargs)
        layer.last_sparsity = query.new_zeros(())
        if layer.capture is not None:
            k, _, base = normalise_mask(query, key, value, attention_mask)
            p = Pattern(query.shape[2], k.shape[2], 1, query.device)
            probs = dense_probs(query, k, p.full_mask(None, base), _scale(module, query, kwargs)).detach()
            layer.capture[layer.layer_idx] = (probs, probs)
        return out
    return layer(query, key, value, attention_mask, _scale(module, query, kwargs)), None


def _scale(module, query, kwargs):
    scale = kwargs.get("scaling")
    if scale is None:
        scale = getattr(module, "scaling", None)
    return float(scale) if scale is not None else query.shape[-1] ** -0.5
