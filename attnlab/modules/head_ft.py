"""Output-head-only fine-tuning: an untied trainable copy of the LM head; everything else frozen.

Tied models (SmolLM2, GPT-2) share the head with the input embedding, so the copy is what keeps
the input side, and the base, unchanged.

The training loss at N target positions is  sum_n -log softmax(h_n W^T + b)[y_n].  As
F.cross_entropy(F.linear(h, W, b)) it keeps the N x V log-probabilities for the backward, whose
softmax gradient (another N x V) gives dW = (P - Y)^T h (V x E). With `fused_ce` the trainer
calls the head's `target_loss`: F.linear_cross_entropy with
LinearCrossEntropyOptions(batch_chunk_size=256), chunks of 256 rows whose gradients are computed in
the forward, so no N x V tensor is stored; the V x E gradient remains (twice: the op's buffer and
W.grad). Same loss and gradients to fp32 rounding (tests/test_head_ft_loss.py).

Measured, one step, gradient for W only, E = 576, V = 49152 (SmolLM2-135M's head), fp32, 2 CPU
threads on a shared machine, one round (`python benchmarks/linear_cross_entropy.py --n 512 --grad w
--variants 0 1 2 4 5 6 --rounds 1` and `--n 2048 --grad w x --variants 0 1 4 5 6 --rounds 1`):

    N = 512 target tokens      time vs linear+CE   peak memory vs linear+CE
    options=None (reference)   0.96x               1.00x  (303 MiB)
    chunked, "auto" chunks     12.44x              0.98x  (4-row chunks on CPU fp32)
    chunked, 256 rows          0.98x               1.00x
    N = 2048
    options=None (reference)   0.79x               1.00x  (1167 MiB)
    chunked, 256 rows          0.81x               0.26x  (302 MiB)

(options=None is the same computation as linear+CE, so its 0.79x shows the timing noise.) The
256-row path is not slower and its memory stays ~300 MiB at any N, while linear+CE grows by
~0.4 MiB per target token; only below ~500 target tokens per micro-batch does it hold more (one
run at N = 256: 301 vs 171 MiB). Hence `fused_ce: None` (the default) uses it whenever the head is
a plain h W^T + b (not for models that scale or cap logits after the head); true requires it,
false never uses it. GPU timings were not measured.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Plugin, PluginError

FUSED_ROWS = 256  # rows per chunk of the fused loss (see the measurements above)


@dataclass
class HeadFTConfig:
    fused_ce: bool | None = None   # row-chunked F.linear_cross_entropy; None: when the head is plain h W^T + b


class FusedCEHead(nn.Linear):
    """The trainable head; the trainer calls `target_loss(h, tokens)` on a head that has one."""

    def target_loss(self, h, tokens):
        """Summed cross-entropy of the targets `tokens` (N,) from final hidden states `h` (N, E).
        From a bf16/fp16 base (under autocast) the fused op runs in fp32, autocast off: it would
        otherwise sum the loss in bf16 (~3 significant digits); the head's matmul then runs at fp32 speed."""
        if h.dtype != self.weight.dtype or torch.is_autocast_enabled(h.device.type):
            with torch.autocast(h.device.type, enabled=False):
                return self.target_loss(h.to(self.weight.dtype), tokens)
        return F.linear_cross_entropy(h, self.weight, tokens, linear_bias=self.bias, reduction="sum",
                                      options=nn.LinearCrossEntropyOptions(batch_chunk_size=FUSED_ROWS))


class HeadFineTune(Plugin):
    method = "head_ft"
    Config = HeadFTConfig
    head_only = True

    def _install(self, model):
        old = model.get_output_embeddings()
        from ..evaluate import _has_plain_head

        fused = self.config.fused_ce
        possible = hasattr(F, "linear_cross_entropy") and _has_plain_head(model)
        if fused and not possible:
            raise PluginError("head_ft fused_ce needs torch >= 2.13 and logits = h W^T + b (this model scales or "
                              "caps its logits after the head, or torch is older); set fused_ce: false")
        cls = FusedCEHead if (fused or fused is None) and possible else nn.Linear
        new = cls(old.in_features, old.out_features, bias=old.bias is not None,
                  device=old.weight.device, dtype=old.weight.dtype)
        new.weight = nn.Parameter(old.weight.detach().clone())
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone())
        self._original, self._head = old, new
        model.set_output_embeddings(new)

    def _remove(self, model):
        model.set_output_embeddings(self._original)

    def _parameters(self):
        return {f"lm_head.{k}": p for k, p in self._head.named_parameters()}
