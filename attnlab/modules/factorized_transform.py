"""The FactorizedAttention q/k transform of one branch, with a hand-written backward that keeps only
its input.

On each head vector x (d = head_dim, f = factor_dim), parameters shared across heads:
    x_n   = LayerNorm(x) = x̂ ⊙ γ + β                 x̂ = (x - mean) · rstd
    [a|c] = W x_n + b_W                             W = [W1; W2] (2f x d): one matmul for both factors
    u     = a ⊙ c,   z = GELU(u)
    y     = P z + p
    out   = τ_h · (x + s · y)                       s = sigmoid(α); τ_h per query head (keys: τ = 1)

Backward, given g = ∂L/∂out, with g_i = τ_h g (the gradient of the pre-temperature output):
    ∂P = s Σ_n g_i zᵀ = s M,   ∂p = s Σ_n g_i,   ∂α = s(1-s) (⟨M, P⟩ + ⟨Σ_n g_i, p⟩)   (= s(1-s) Σ g_i·y)
    ∂τ_h = Σ_{n in head h} g·x + s (⟨M_h, P⟩ + ⟨Σ_n g, p⟩_h)       M_h = Σ_{n in h} g zᵀ, M = Σ_h τ_h M_h
    ∂z = s Pᵀ g_i,   ∂u = GELU'(u) ∂z,   ∂[a|c] = [∂u ⊙ c | ∂u ⊙ a]
    ∂W = ∂[a|c]ᵀ x_n,  ∂b_W = Σ_n ∂[a|c],  ∂x = g_i + LayerNorm-backward(Wᵀ ∂[a|c])
y itself is never needed: Σ g_i·y comes from M, which ∂P needs anyway. So the backward recomputes
only x_n, [a|c], u and z from the saved x: 2 d·f multiply-adds per vector on top of the 3 of the
forward and the 6 every backward needs, against 3 more (y included) for a generic checkpoint; and
the factor-width intermediates (2f + f + f per vector, 8x the input at f = 2d) are never kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def branch(x, g, b, W, bW, P, pb, alpha, tau, eps):
    """x (..., d) -> (..., d): the formula above through plain autograd (keeps every intermediate
    for the backward). tau: None, or the per-head temperatures shaped to broadcast against x, e.g.
    (H, 1) for x (B, T, H, d) or (H, 1, 1) for x (B, H, T, d): the layout does not matter otherwise."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)                                             # (N, d), a view where x allows
    a, c = F.linear(F.layer_norm(rows, (d,), g, b, eps), W, bW).chunk(2, dim=-1)   # (N, f) each
    out = (rows + torch.sigmoid(alpha) * F.linear(F.gelu(a * c), P, pb)).view(x.shape)
    return out if tau is None else out * tau


class RecomputedBranch(torch.autograd.Function):
    """`branch` that saves only x (and the parameters) and recomputes the rest in the backward."""

    @staticmethod
    def forward(ctx, x, g, b, W, bW, P, pb, alpha, tau, eps):
        ctx.save_for_backward(x, g, b, W, bW, P, pb, alpha, tau)
        ctx.eps = eps
        d = x.shape[-1]
        rows = x.reshape(-1, d)
        a, c = torch.addmm(bW, F.layer_norm(rows, (d,), g, b, eps), W.t()).chunk(2, dim=-1)
        s = torch.sigmoid(alpha)
        out = torch.addmm(s * pb, F.gelu(a * c), (s * P).t()).add_(rows).view(x.shape)   # s·y + x
        return out if tau is None else out.mul_(tau)

    @staticmethod
    def backward(ctx, gout):
        x, g, b, W, bW, P, pb, alpha, tau = ctx.saved_tensors
        d, f = P.shape
        rows = x.reshape(-1, d)                                          # (N, d)
        s = torch.sigmoid(alpha)
        xn, mean, rstd = torch.native_layer_norm(rows, (d,), g, b, ctx.eps)
        h = torch.addmm(bW, xn, W.t())                                   # (N, 2f) = [a | c]
        a, c = h[:, :f], h[:, f:]
        u = a * c
        z = F.gelu(u)                                                    # (N, f)
        go = gout.reshape(-1, d)                                         # (N, d), rows' order: one copy at most
        gtau = None
        if tau is None:
            gi = go
            t = gi @ P                                                   # (N, f): Pᵀ g_i; ∂z = s t
            gi_sum = gi.sum(0)
            gy = torch.vdot(t.view(-1), z.view(-1)) + gi_sum @ pb        # Σ g_i·y
        else:
            per_head, lead = tau.shape, x.shape[:-1]                     # sums over every other axis

            def heads(v):                                                # (N,) -> tau's shape, summed per head
                return v.view(lead).sum_to_size(per_head[:-1]).view(per_head)

            gi = (go.view(x.shape) * tau).view(-1, d)
            t = gi @ P
            gi_sum = gi.sum(0)
            r = heads((t * z).sum(-1))                                   # τ_h Σ_h g·Pz
            gtau = (go.view(x.shape) * rows.view(x.shape)).sum_to_size(per_head) + s * (r / tau + heads(go @ pb))
            gy = r.sum() + gi_sum @ pb
        gu = torch.ops.aten.gelu_backward(t, u)                          # ∂u / s
        gac = torch.empty_like(h)                                        # ∂[a | c] / s
        torch.mul(gu, c, out=gac[:, :f])
        torch.mul(gu, a, out=gac[:, f:])
        gx, gg, gb = torch.ops.aten.native_layer_norm_backward(gac @ (s * W), rows, (d,), mean, rstd, g, b,
                                                               [True, True, True])
        return (gx.add_(gi).view(x.shape), gg, gb, s * (gac.t() @ xn), s * gac.sum(0), s * (gi.t() @ z),
                s * gi_sum, (s * (1 - s) * gy).view(alpha.shape), gtau, None)
