"""Backward Attention output head: the final linear decoder replaced by attention over the vocabulary.

The method as specified (preset `paper`), for a final hidden state h at one position:
    IE    = RMSNorm(input embedding matrix)                       V x E
    L     = IE W_L^T  (optional latent projection E -> d; else L = IE)
    K     = L W_K^T,  Vv = L W_V^T                                 V x d
    Dot   = sum_v logit_v * Vv_v / V,  logit = h W_out^T + b (the frozen base's logits)
    Q     = Dot W_Q^T;  scores = Q K^T / sqrt(d);  p = softmax(scores)

Exact reassociation (no approximation; K and Vv are never built). Write the norm as
RMSNorm(IE) = diag(r) IE diag(g), with r the per-row RMS scale of the frozen embedding and g the
trainable gain, and R = diag(r) IE (a constant V x E table: the base's, not the head's). With linear
projections A_K = W_K (W_L) and A_V = W_V (W_L):
    K  = R diag(g) A_K^T                         so  scores = ((Q A_K) * g) R^T / sqrt(d)
    Vv = R diag(g) A_V^T                         so  Dot    = ((h C + c) * g) A_V^T / V
with C = W_out^T R (E x E) and c = b^T R (E): constants of the base, computed once. Every trainable
product is then E-wide or d-wide per token, and the only V-wide product is u R^T with
u = (Q A_K) * g / sqrt(d): one LM-head-sized matmul against a frozen table, whose backward needs
no table gradient. A step costs about one LM-head cross-entropy, not a rebuild of two V x d tables.
Weights from probabilities or log-probabilities change only the per-token constant z that
replaces h C + c: softmax(logits) R, or h C + c - logsumexp(logits) * sum_v R_v.

The residual form, log p = log_softmax(base logits + g_res * scores), is the same product with the
frozen table [W_out, b, R] (column blocks: the base's own LM head and R, never concatenated) and the
features [h, 1, g_res * u]; its gate starts at 0, so the head
starts out reproducing the base distribution exactly.

Other variants a careful researcher compares: several heads (a mixture of their softmaxes), dropout
on the query, and a non-linear (GELU MLP) projection. The MLP cannot be reassociated: it builds the
K (and Vv) tables once per optimizer step (see on_step_start / on_step_end).
The training loss comes from chunked_ce, which never stores more than the N x V scores.

Initialisation (`init`): "uniform" (0.02-std weights: the scores start near zero, the uniform
distribution, loss ~ ln V) or, for the `paper` form, "base": W_V, W_Q, W_K and the gain chosen so
that the scores are as close to the base's logits as the RMSNorm'd rows allow (derived in
backward_head_init.py; exact is out of reach because the head scales each vocabulary row by its
own inverse RMS). Fitted data-free at construction, then again on the first training hidden states
at the start of a fresh training run (`BackwardHead.on_train_start`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..chunked_ce import ConcatTable, mixture_cross_entropy, mixture_log_probs
from .backward_head_init import INITS, check_base_start, fit_base_start
from .base import Plugin, PluginError

WEIGHTS = ("logits", "probs", "logprobs")
PROJECTIONS = ("linear", "mlp")


@dataclass
class BackwardHeadConfig:
    preset: str | None = None        # "paper" or "residual": named option sets (explicit options win)
    attn_dim: int | None = None      # d; None: the base's hidden size
    latent_dim: int | None = None    # size of the latent projection W_L; None: K, Vv from IE directly
    n_heads: int = 1                 # > 1: a mixture of per-head softmaxes
    weights: str = "logits"          # what weighs Vv: raw base "logits", softmax "probs", or "logprobs"
    residual: bool = False           # log_softmax(base logits + gate * scores), gate starting at gate_init
    gate_init: float = 0.0
    projection: str = "linear"       # "mlp": K, Vv through Linear-GELU-Linear (the proposal's future work)
    dropout: float = 0.0             # on the query
    chunk_size: int = 8192           # vocabulary rows per step of the chunked loss
    init_std: float = 0.02
    init: str = "uniform"            # "base": the paper head starts at (near) the base's logits

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got '{self.init}'")
        if self.init == "base":
            check_base_start(self)
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got '{self.weights}'")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got '{self.projection}'")
        if self.n_heads < 1 or self.chunk_size < 1:
            raise ValueError(f"n_heads and chunk_size must be >= 1, got {self.n_heads}, {self.chunk_size}")
        if self.attn_dim is not None and self.attn_dim % self.n_heads:
            raise ValueError(f"attn_dim {self.attn_dim} is not divisible by n_heads {self.n_heads}")


PRESETS = {
    # The literal method: raw-logit weights, one head, no latent projection, d = hidden size.
    "paper": {"weights": "logits", "n_heads": 1, "latent_dim": None, "residual": False, "projection": "linear"},
    # Starts from the base distribution and learns a gated correction: the best variant in our runs
    # (docs/backward_head.md), used there with latent_dim = attn_dim = 64.
    "residual": {"weights": "logits", "n_heads": 1, "latent_dim": 64, "attn_dim": 64, "residual": True,
                 "projection": "linear"},
}


def _row_rms_inverse(emb: torch.Tensor) -> torch.Tensor:
    """1 / RMS of each row (V x 1), accumulated in fp32 without an fp32 copy of the table, then in
    the table's dtype: the constants stay in the base's dtype (bf16 on a GPU: half of fp32's bytes)."""
    ms = torch.linalg.vector_norm(emb, dim=-1, keepdim=True, dtype=torch.float32).pow(2) / emb.shape[-1]
    return torch.rsqrt(ms + 1e-6).to(emb.dtype)


def _proj(n_in: int, n_out: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(n_in, n_out, bias=False)
    return nn.Sequential(nn.Linear(n_in, n_out), nn.GELU(), nn.Linear(n_out, n_out))


class BackwardAttentionHead(nn.Module):
    """Drop-in replacement for the LM head: forward(h) gives next-token log-probabilities (..., V)."""

    def __init__(self, cfg: BackwardHeadConfig, embedding: torch.Tensor, out_head: nn.Linear):
        super().__init__()
        if embedding.dim() != 2 or out_head.weight.shape != embedding.shape:
            raise PluginError(f"the input embedding {tuple(embedding.shape)} and the LM head "
                              f"{tuple(out_head.weight.shape)} must both be vocab x hidden")
        V, E = embedding.shape
        d = cfg.attn_dim or E
        if d % cfg.n_heads:
            raise PluginError(f"attn_dim {d} is not divisible by n_heads {cfg.n_heads}")
        self.cfg, self.vocab, self.hidden, self.dim = cfg, V, E, d
        # Frozen base tensors, held by reference in a plain dict so that nn.Module does not register
        # them: never saved with the head, never trained.
        self._base = {"emb": embedding, "out_w": out_head.weight, "out_b": out_head.bias}
        self.norm_weight = nn.Parameter(torch.ones(E, dtype=embedding.dtype, device=embedding.device))
        n_in = E
        if cfg.latent_dim:
            self.W_L = nn.Linear(E, cfg.latent_dim, bias=False)
            n_in = cfg.latent_dim
        self.W_K = _proj(n_in, d, cfg.projection)
        self.W_V = _proj(n_in, d, cfg.projection)
        self.W_Q = nn.Linear(d, d, bias=False)
        self.gate = nn.Parameter(torch.tensor(float(cfg.gate_init))) if cfg.residual else None
        self.drop = nn.Dropout(cfg.dropout)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=cfg.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Small random weights: the scores start near zero, i.e. near the uniform distribution (loss ~ ln V).
        self.to(device=embedding.device, dtype=embedding.dtype)
        if cfg.init == "base":
            fit_base_start(self)   # data-free (uniform token weights) until the trainer refits it
        self._const = None      # (base version key, constants of the base): see constants()
        self._cache = None      # (version key, tables) for inference (MLP variant)
        self._step = None       # (leaf tables, graph tables) during an optimizer step

    # -- constants of the base: the normalised-embedding table and its products with the LM head -----
    def constants(self) -> dict:
        """R = diag(r) IE (V x E), C = W_out^T R (E x E), c = b^T R, s = sum_v R_v, and the frozen
        table the scores are taken against: R, or [W_out, b, R] for the residual form. Computed once
        per base (no gradient: nothing here is trained), recomputed only if a base tensor changes."""
        emb, out_w, out_b = self._base["emb"], self._base["out_w"], self._base["out_b"]
        key = tuple((id(t), t._version) for t in (emb, out_w, out_b) if t is not None)
        if self._const is not None and self._const[0] == key:
            return self._const[1]
        with torch.no_grad():
            r = _row_rms_inverse(emb)                                                   # V x 1
            R = (emb * r).contiguous()                                                  # V x E
            if self.cfg.residual:  # [W_out, b, R] as column blocks: the base's own head, never copied
                b = out_b if out_b is not None else out_w.new_zeros(self.vocab)
                table = ConcatTable([out_w[None], b[None, :, None], R[None]])          # 1 x V x (2E + 1)
            else:
                table = R[None]                                                         # 1 x V x E
            c = {"R": R, "table": table, "C": out_w.t() @ R,
                 "c": out_b @ R if out_b is not None else R.new_zeros(self.hidden)}
            if self.cfg.weights == "logprobs":
                c["s"] = R.sum(0)
        self._const = (key, c)
        return c

    def constant_bytes(self) -> int:
        """Bytes of what constants() keeps for the base, each storage counted once, the base's own
        tensors (the residual table's W_out and b blocks) not counted: what the head adds to memory
        besides its parameters."""
        base = {t.untyped_storage().data_ptr() for t in self._base.values() if t is not None}
        tensors = [t for v in self.constants().values() for t in (v.parts if isinstance(v, ConcatTable) else [v])]
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(n for ptr, n in seen.items() if ptr not in base)

    def _token_constant(self, h: torch.Tensor, c: dict) -> torch.Tensor:
        """z (N x E) with Dot = (z * g) A_V^T / V: a function of h and the frozen base only."""
        w = self.cfg.weights
        if w == "logits":
            return h @ c["C"] + c["c"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and h.requires_grad):
            logits = self._base_logits(h)                                               # N x V, once
            if w == "probs":
                return torch.softmax(logits, -1) @ c["R"]
            return h @ c["C"] + c["c"] - torch.logsumexp(logits, -1, keepdim=True) * c["s"]

    def _reassociated(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.constants()
        H, N, dh = self.cfg.n_heads, h.shape[0], self.dim // self.cfg.n_heads
        g = self.norm_weight
        zg = self._token_constant(h, c) * g                                             # N x E
        if self.cfg.latent_dim:
            zg = zg @ self.W_L.weight.t()                                               # N x l
        dot = zg @ self.W_V.weight.t() / self.vocab                                     # N x d
        q = self.W_Q(self.drop(dot)).view(N, H, dh).transpose(0, 1)                    # H x N x dh
        u = torch.bmm(q, self.W_K.weight.view(H, dh, -1))                               # H x N x (l or E)
        if self.cfg.latent_dim:
            u = u @ self.W_L.weight                                                     # H x N x E
        u = u * (g / math.sqrt(dh))
        if self.gate is not None:
            hb = torch.cat([h, torch.ones_like(h[:, :1])], -1)
            u = torch.cat([hb.expand(H, -1, -1), self.gate * u], -1)                   # H x N x (2E + 1)
        return u, c["table"]

    # -- the MLP variant: tables rebuilt from the head's weights (no reassociation exists) ------------
    def _normed(self, layer: nn.Module, ie: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """layer(RMSNorm(ie)) without materialising the V x E normalised embedding (nor saving it for
        backward): Linear(ie * r * g) = r * (ie @ (W * g)^T) + b, exactly."""
        if isinstance(layer, nn.Sequential):
            return layer[1:](self._normed(layer[0], ie, r))
        out = r * (ie @ (layer.weight * self.norm_weight).t())
        return out + layer.bias if layer.bias is not None else out

    def compute_tables(self) -> dict:
        ie = self._base['emb']
        with torch.no_grad():  # the RMS of each frozen embedding row: V x 1, no gradient needed
            r = _row_rms_inverse(ie)
        if self.cfg.latent_dim:
            lat = self._normed(self.W_L, ie, r)
            K, Vv = self.W_K(lat), self.W_V(lat)
        else:
            K, Vv = self._normed(self.W_K, ie, r), self._normed(self.W_V, ie, r)
        H, dh = self.cfg.n_heads, self.dim // self.cfg.n_heads
        W = K.view(self.vocab, H, dh).transpose(0, 1)                             # H, V, dh
        if self.cfg.residual:
            # base logits + g * scores = [h, 1, g X] . [W_out, b, K]: one linear map, still chunkable
            out_b = self._base['out_b']
            wb = torch.cat([self._base['out_w'], (out_b if out_b is not None
                                                  else self._base['out_w'].new_zeros(self.vocab))[:, None]], -1)
            W = torch.cat([wb.expand(H, -1, -1), W], -1)
        t = {"W": W.contiguous()}  # laid out once here, never copied per call
        if self.cfg.weights == "probs":
            t["Vv"] = Vv
        else:
            t["M"] = self._base['out_w'].t() @ Vv / self.vocab                      # E x d
            t["c"] = (self._base['out_b'] @ Vv / self.vocab) if self._base['out_b'] is not None else torch.zeros_like(Vv[0])
            if self.cfg.weights == "logprobs":
                t["mean_v"] = Vv.mean(0)
        return t

    def _version(self):
        return tuple((id(p), p._version) for p in self.parameters()) + ((id(self._base['emb']), self._base['emb']._version),)

    def tables(self) -> dict:
        if self._step is not None:
            return self._step[0]
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self.compute_tables()  # a caller's own training loop: exact, recomputed per call
        key = self._version()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.compute_tables())
        return self._cache[1]

    def on_step_start(self) -> None:
        """MLP variant: compute the tables once for the whole optimizer step; micro-batches use
        detached leaves. (The linear head has no per-step tables: nothing to do.)"""
        if self.cfg.projection != "mlp":
            return
        graph = self.compute_tables()
        leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in graph.items()}
        self._step = (leaves, graph)

    def on_step_end(self, reduce=None) -> None:
        """Send the gradients the micro-batches left on the leaves back through the tables, once."""
        if self._step is None:
            return
        leaves, graph = self._step
        self._step = None
        pairs = [(graph[k], reduce(leaves[k].grad) if reduce else leaves[k].grad)
                 for k in graph if leaves[k].grad is not None]
        if pairs:
            torch.autograd.backward([g for g, _ in pairs], [d for _, d in pairs])

    def _tabled(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tables()
        w = self.cfg.weights
        if w == "probs":
            dot = torch.softmax(self._base_logits(h), -1) @ t["Vv"] / self.vocab
        else:
            dot = h @ t["M"] + t["c"]
            if w == "logprobs":
                dot = dot - torch.logsumexp(self._base_logits(h), -1, keepdim=True) * t["mean_v"]
        q = self.W_Q(self.drop(dot))
        H, N = self.cfg.n_heads, h.shape[0]
        dh = self.dim // H
        X = q.view(N, H, dh).transpose(0, 1) / math.sqrt(dh)                    # H, N, dh
        if self.gate is not None:
            hb = torch.cat([h, torch.ones_like(h[:, :1])], -1)
            X = torch.cat([hb.expand(H, -1, -1), self.gate * X], -1)
        return X.contiguous(), t["W"]

    # -- per token ------------------------------------------------------------------------------------
    def _base_logits(self, h):
        return F.linear(h, self._base['out_w'], self._base['out_b'])

    def features(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, W) with log p = log of the mixture over heads of softmax(X[i] @ W[i].T); h: (N, E).
        W is (1, V, D) when every head shares one frozen table."""
        if h.dim() != 2 or h.shape[-1] != self.hidden:
            raise PluginError(f"expected final hidden states (N, {self.hidden}), got {tuple(h.shape)}")
        if self.cfg.projection == "mlp":
            return self._tabled(h)
        return self._reassociated(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.hidden:
            raise PluginError(f"expected final hidden states (..., {self.hidden}), got {tuple(h.shape)}")
        lead = h.shape[:-1]
        X, W = self.features(h.reshape(-1, self.hidden))
        return mixture_log_probs(X, W).view(*lead, self.vocab)

    def target_loss(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of `tokens` under the head; the V-wide scores are kept for the
        backward only when they fit (chunked_ce.SAVE_BYTES), else recomputed chunk by chunk."""
        X, W = self.features(h)
        # in the MLP tables of the residual form the [W_out, b] columns are frozen
        frozen = self.hidden + 1 if self.gate is not None and W.requires_grad else 0
        return mixture_cross_entropy(X, W, tokens, self.cfg.chunk_size, w_grad_from=frozen).sum()

    # -- the literal formula, for tests -------------------------------------------------------------
    def reference_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """The specification computed literally: base logits over V, weights, Dot, Q, scores."""
        ie = self._base['emb'] * torch.rsqrt(self._base['emb'].pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        lat = self.W_L(ie) if self.cfg.latent_dim else ie
        K, Vv = self.W_K(lat), self.W_V(lat)
        logits = self._base_logits(h)                                            # N x V
        wts = {"logits": logits, "probs": torch.softmax(logits, -1),
               "logprobs": torch.log_softmax(logits, -1)}[self.cfg.weights]
        dot = wts @ Vv / self.vocab
        q = self.W_Q(self.drop(dot))
        H, dh = self.cfg.n_heads, self.dim // self.cfg.n_heads
        outs = []
        for i in range(H):
            s = q[:, i * dh:(i + 1) * dh] @ K[:, i * dh:(i + 1) * dh].t() / math.sqrt(dh)
            if self.gate is not None:
                s = logits + self.gate * s
            outs.append(torch.log_softmax(s, -1))
        return torch.logsumexp(torch.stack(outs), 0) - math.log(H)


class BackwardHead(Plugin):
    method = "backward_head"
    Config = BackwardHeadConfig
    PRESETS = PRESETS
    head_only = True

    def _install(self, model):
        self._original = model.get_output_embeddings()
        if not isinstance(self._original, nn.Linear):
            raise PluginError(f"backward_head replaces a linear LM head; this model's is {type(self._original).__name__}")
        self._head = BackwardAttentionHead(self.config, model.get_input_embeddings().weight, self._original)
        model.set_output_embeddings(self._head)

    def _remove(self, model):
        model.set_output_embeddings(self._original)

    def _parameters(self):
        return {f"head.{k}": p for k, p in self._head.named_parameters()}

    def _training_modules(self):
        return [self._head]  # its query dropout

    def on_train_start(self, hidden_fn):
        """init: base: refit the start with the token weights of the training data's hidden states."""
        if self.config.init == "base":
            fit_base_start(self._head, hidden_fn())

    def on_step_start(self):
        self._head.on_step_start()

    def on_step_end(self, reduce=None):
        self._head.on_step_end(reduce)
