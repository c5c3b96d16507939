"""A base-reproducing start for the Backward Attention head (`init: base`): the derivation.

With raw-logit weights and linear projections the head's scores are a bilinear form of h
(backward_head.py). Write z = h C + c with C = W_outᵀ R, c = bᵀ R (R = diag(r) IE, the RMSNorm'd
embedding without its gain g; r_v = the inverse RMS of embedding row v) and

    u      = (z ⊙ g) · A_Vᵀ · W_Qᵀ · A_K ⊙ g / (V √d)  =  z · N      (E x E, rank <= d)
    scores = u · Rᵀ,   i.e.  scores_v = r_v · (u · IE_v)

so every trainable weight (W_V, W_Q, W_K and the gain g) enters only through the one E x E matrix
N = diag(g) A_Vᵀ W_Qᵀ A_K diag(g) / (V √d). The base's logits are ℓ_v = h · W_out,v + b_v.

**Exact is out of reach.** On a tied base (W_out = IE, as SmolLM2) scores_v = r_v · (u · IE_v)
while ℓ_v = h · IE_v: the head multiplies each vocabulary row by its own r_v, and no choice of N
(nor of g, which scales columns, not rows) can undo a per-row factor. The head reproduces the base
exactly only when every row has the same RMS r (then u = h / r: N = C⁻¹ / r on a tied base).
u = h gives scores_v = r_v ℓ_v, the base logits up to the per-row scale r_v; on SmolLM2 r ranges
over 3.2-13.4 (mean 7.7), so that start is far from the base (docs/backward_head.md).

**The closest start.** Softmax ignores a constant added to all scores, and to second order
KL(p_base || p_head) = ½ Σ_v p_v (δ_v − Σ_w p_w δ_w)² with δ = scores − ℓ. Replacing the
per-position p_v(h) by its mean D_v = E_h p_v(h) (the base's average next-token distribution on
the data) decouples h from v and turns this into weighted least squares:

    minimise  Σ_v D_v ‖ [h,1] Z N R̃_vᵀ − [h,1] X̃_v ‖²  over N,   Z = [C; c],  X = [W_outᵀ; b]

with R̃ = R − Σ_v D_v R_v and X̃ centred the same way (the constant per position drops out). Its
solution is the weighted projection of the base logits onto the head's reachable set:

    T = X D R̃ (R̃ᵀ D R̃)⁻¹          ((E+1) x E: the best map from [h,1] to u)
    N = Z⁺ T                        (= C⁻¹ T_h without an LM-head bias: optimal for every h)

With an LM-head bias Z⁺ weighs the E hidden directions and the bias row equally (least squares
over the rows of T). Without data, D is uniform (1/V); `fit_base_start(head, hidden)` takes D from
hidden states of the training data (the trainer passes it the first ones at the start of a fresh
run: `BackwardHead.on_train_start`). How close each start gets on SmolLM2-135M is measured in
docs/backward_head.md ("A fair start for the literal head").

**Splitting N into the weights.** g = 1 (the gain only rescales N's rows and columns, which the
projections already do). With N's SVD U S Vhᵀ truncated to the top d values (rank d: the closest N
in Frobenius norm when d < E) and σ = (V √d S)^(1/3), balanced so that no factor carries the
V √d ≈ 10⁶ alone:

    W_V.weight = diag(σ) Uᵀ,   W_Q.weight = diag(σ),   W_K.weight = diag(σ) Vhᵀ
    ⇒  A_Vᵀ W_Qᵀ A_K / (V √d) = U diag(σ³) Vhᵀ / (V √d) = N.

Only the `paper` form is covered: one head, no latent projection, linear projections, raw-logit
weights (probabilities or log-probabilities make z non-linear in h), and not the residual form
(which already starts exactly at the base).
"""

from __future__ import annotations

import math

import torch

from .base import PluginError

INITS = ("uniform", "base")
FIT_ROWS = 4096        # hidden states the token weights D are averaged over


def check_base_start(cfg) -> None:
    """A one-line error naming the fix for a head `init: base` does not cover."""
    bad = [f"{k} = {v}" for k, v, ok in (("n_heads", cfg.n_heads, cfg.n_heads == 1),
                                         ("latent_dim", cfg.latent_dim, not cfg.latent_dim),
                                         ("projection", cfg.projection, cfg.projection == "linear"),
                                         ("weights", cfg.weights, cfg.weights == "logits"),
                                         ("residual", cfg.residual, not cfg.residual)) if not ok]
    if bad:
        raise PluginError(f"init: base covers the `paper` form only (one head, no latent projection, linear "
                          f"projections, raw-logit weights, not residual: the residual form already starts at the "
                          f"base); this head has {', '.join(bad)}: use init: uniform or the paper options")


def token_weights(head, hidden: torch.Tensor | None) -> torch.Tensor:
    """D (V,), summing to 1: the base's mean next-token distribution over `hidden` (N x E), or
    uniform without it. At most FIT_ROWS rows, evenly spaced, are used."""
    V = head.vocab
    if hidden is None or hidden.shape[0] == 0:
        return torch.full((V,), 1.0 / V, dtype=torch.float64)
    step = max(1, math.ceil(hidden.shape[0] / FIT_ROWS))
    h = hidden[::step].to(head._base["out_w"].dtype)
    D = torch.zeros(V, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, h.shape[0], 512):
            D += torch.softmax(head._base_logits(h[i: i + 512]).double(), -1).sum(0).cpu()
    return D / D.sum()


@torch.no_grad()
def base_map(head, D: torch.Tensor) -> torch.Tensor:
    """N (E x E, float64): z = h C + c times N gives the u whose scores are closest to the base logits."""
    emb, out_w, out_b = (t.detach().double().cpu() if t is not None else None
                         for t in (head._base["emb"], head._base["out_w"], head._base["out_b"]))
    R = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + 1e-6)                       # V x E
    Rt = R - D @ R                                                                        # centred under D
    DR = D[:, None] * Rt                                                                  # V x E
    G = Rt.t() @ DR                                                                       # E x E
    X = out_w.t() if out_b is None else torch.cat([out_w.t(), out_b[None]])              # (E [+1]) x V
    T = torch.linalg.solve(G, (X @ DR).t()).t()                                           # (E [+1]) x E
    C = out_w.t() @ R
    if out_b is None:
        return torch.linalg.solve(C, T)
    return torch.linalg.lstsq(torch.cat([C, (out_b @ R)[None]]), T).solution


@torch.no_grad()
def fit_base_start(head, hidden: torch.Tensor | None = None) -> None:
    """Set W_V, W_Q, W_K and the gain so that the head's scores are the closest the parametrisation
    allows to the base's logits (weighted by the base's mean distribution over `hidden`)."""
    check_base_start(head.cfg)
    set_map(head, base_map(head, token_weights(head, hidden)))


@torch.no_grad()
def set_map(head, N: torch.Tensor) -> None:
    """Weights (g = 1, balanced SVD factors, rank d) with u = (h C + c) N, N an E x E matrix."""
    U, S, Vh = torch.linalg.svd(N.double())
    d = head.dim
    sigma = (head.vocab * math.sqrt(d) * S[:d]).pow(1.0 / 3.0)
    like = head.W_Q.weight
    head.norm_weight.fill_(1.0)
    head.W_V.weight.copy_((sigma[:, None] * U[:, :d].t()).to(like))
    head.W_Q.weight.copy_(torch.diag(sigma).to(like))
    head.W_K.weight.copy_((sigma[:, None] * Vh[:d]).to(like))
