"""Performer (FAVOR+): causal linear attention through positive random features."""

from __future__ import annotations

import math

import torch

def orthogonal_features(m: int, d: int, seed: int) -> torch.Tensor:
    """(m, d) orthogonal random features with gaussian row norms (FAVOR+), from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range((m + d - 1) // d):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        blocks.append(qmat.T)
    w = torch.cat(blocks)[:m]
    return w * torch.randn(m, d, generator=gen).norm(dim=1, keepdim=True)


def performer_features(q, k, w, scale, key_valid):
    """Positive random features phi(x) = exp(w.x - |x|^2/2), x scaled so phi(q).phi(k) estimates
    exp(scale * q.k). Each query row is divided by its own max and all keys by one shared max
    (detached): both cancel in the normalised ratio and keep exp() finite."""
    root = scale ** 0.5

    def logits(x):
        x = x * root
        return x @ w.T - (x * x).sum(-1, keepdim=True) / 2

    lq = logits(q)
    qf = torch.exp(lq - lq.amax(-1, keepdim=True).detach())
    lk = logits(k)
    valid = key_valid[:, None, :, None] if key_valid is not None else torch.ones_like(lk[:1, :1, :, :1], dtype=torch.bool)
    top = lk.masked_fill(~valid, -math.inf).amax((2, 3), keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    kf = torch.exp((lk - top).masked_fill(~valid, -math.inf))      # padding keys: exactly 0
    return qf, kf


def repeat_kv(x: torch.Tensor, g: int) -> torch.Tensor:
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def safe_divide(num, den):
    return num / torch.where(den > 0, den, torch.ones_like(den))


def performer_chunked(qf, kf, v, chunk: int):
    """Causal linear attention with queries the last Tq of Tk positions: quadratic inside a chunk,
    a running (features x D) state and (features) normaliser across chunks."""
    tq, tk = qf.shape[2], kf.shape[2]
    past = tk - tq
    state = kf[:, :, :past].transpose(-1, -2) @ v[:, :, :past]          # (B, H, m, D)
    norm = kf[:, :, :past].sum(2)                                       # (B, H, m)
    outs = []
    for c0 in range(0, tq, chunk):
        c1 = min(tq, c0 + chunk)
        qc, kc, vc = qf[:, :, c0:c1], kf[:, :, past + c0:past + c1], v[:, :, past + c0:past + c1]
        a = (qc @ kc.transpose(-1, -2)).tril()
        num = a @ vc + qc @ state
        den = a.sum(-1, keepdim=True) + qc @ norm.unsqueeze(-1)
        outs.append(safe_divide(num, den))
        state = state + kc.transpose(-1, -2) @ vc
        norm = norm + kc.sum(2)
    return torch.cat(outs, 2)


def performer_weights(qf, kf):
    """(B, H, Tq, Tk) normalised causal linear-attention weights (the materialised reference)."""
    tq, tk = qf.shape[2], kf.shape[2]
    causal = torch.ones(tq, tk, dtype=torch.bool, device=qf.device).tril(tk - tq)
    a = (qf @ kf.transpose(-1, -2)) * causal
    return safe_divide(a, a.sum(-1, keepdim=True))
