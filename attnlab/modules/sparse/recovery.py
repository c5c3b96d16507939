"""Recovery training with the selection frozen (issue 27, item 3; what SeerAttention and NSA do after
the gate): the selector stays as it is and a LoRA adapter on the attention projections learns to make
up for what it drops, by the token KL to the dense model

    L = (1 / N) sum_t KL( P_dense(. | x_<t) || P_sparse+LoRA(. | x_<t) ),

the teacher being the base function itself (every plug-in off: dense attention, no adapter), the
student the sparse model with the adapter. Nothing of the selector trains: window and quest have no
weights, and the learned gate is frozen (its top-k is not differentiable, and moving it would move
the density). So every selector can get the same recovery budget (steps, rank, learning rate,
tokens): the fair comparison of item 3 (quality.py compares the recovered selectors at equal density
as before, the dense reference being the base function).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..base import disabled


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), both (..., V) logits, in fp32."""
    s = F.log_softmax(student_logits.float(), -1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), -1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def recover(model, sequences, steps: int = 100, lr: float = 1e-3, r: int = 8, seed: int = 0, log=None):
    """Attach LoRA (rank r, the family's attention projections) to `model`, which already carries the
    sparse plug-in whose selection stays frozen, and train only the adapter for `steps` Adam steps by
    token_kl against the dense base, one sequence (1-D tokens) per step in a seeded order. Returns
    the attached LoRA plug-in and the record: first and last 10 steps' mean KL, tokens, seconds."""
    from ... import attach

    lora = attach(model, "lora", r=r)
    params = list(lora.trainable_parameters().values())
    opt = torch.optim.Adam(params, lr=lr)
    dev = next(model.parameters()).device
    order = torch.randperm(len(sequences) * (steps // max(1, len(sequences)) + 1),
                           generator=torch.Generator().manual_seed(seed)) % len(sequences)
    losses, tokens, start = [], 0, time.perf_counter()
    for step in range(steps):
        x = sequences[int(order[step])].view(1, -1).to(dev)
        with torch.no_grad(), disabled(model):
            teacher = model(input_ids=x, use_cache=False).logits
        loss = token_kl(model(input_ids=x, use_cache=False).logits, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        tokens += x.numel()
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"[recover] step {step}: KL {losses[-1]:.4f}")
    k = min(10, len(losses))
    return lora, {"steps": steps, "lr": lr, "r": r, "tokens": tokens, "seconds": time.perf_counter() - start,
                  "kl_first": sum(losses[:k]) / max(k, 1), "kl_last": sum(losses[-k:]) / max(k, 1)}
