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


def sweep_recovered(model, train, sequences: dict, points: list[tuple[str, dict]], common: dict, gate_state,
                    data: dict, adapters: dict, steps: int = 100, lr: float = 1e-3, r: int = 8, save=None,
                    log=None) -> dict:
    """recipe.sweep with recovery: every (selector, budget) of `points` first gets its own adapter,
    `recover` on the `train` sequences with that selection in place (the same budget for every point;
    `adapters` {point key: LoRA state} holds the finished ones and is filled, so a rerun reuses them),
    then is read on every held-out sequence with its adapter, against the dense base function (every
    plug-in off). Records as recipe.sweep, in data["points"]; the recoveries' records in data["recovery"]."""
    from . import recipe
    from ... import attach

    data.setdefault("points", {})
    rec = data.setdefault("recovery", {})
    for s, b in points:
        k = recipe.key(s, b)
        if k in adapters:
            continue
        plugin = recipe.attach(model, s, b, common, gate_state)
        try:
            lora, rec[k] = recover(model, train, steps=steps, lr=lr, r=r, log=log)
            adapters[k] = lora.state_dict()
            lora.detach()
        finally:
            plugin.detach()
        if save:
            save(data)
        if log:
            log(f"[recover] {k}: KL {rec[k]['kl_first']:.4f} -> {rec[k]['kl_last']:.4f} in {rec[k]['seconds']:.0f} s")
    dev = next(model.parameters()).device
    for si, seq in sequences.items():
        si = str(si)
        todo = [(s, b) for s, b in points if si not in data["points"].get(recipe.key(s, b), {}).get("sequences", {})]
        if not todo:
            continue
        x = seq.view(1, -1).to(dev)
        with torch.no_grad(), disabled(model):
            dense_logits = model(input_ids=x, use_cache=False).logits
        entry = data["points"].setdefault("dense", {"selector": "dense", "budget": {}, "sequences": {}})
        entry["sequences"][si] = {**recipe.token_stats(dense_logits, x[0], None), "density": 1.0}
        dense_logp = F.log_softmax(dense_logits[0, :-1].float(), -1)
        del dense_logits
        for s, b in todo:
            k = recipe.key(s, b)
            plugin = recipe.attach(model, s, b, common, gate_state)
            lora = attach(model, "lora", r=r)
            try:
                lora.load_state_dict(adapters[k])
                start = time.perf_counter()
                with torch.no_grad():
                    logits = model(input_ids=x, use_cache=False).logits
                row = recipe.token_stats(logits, x[0], dense_logp)
                row.update(density=1 - plugin.sparsity(), seconds=time.perf_counter() - start)
                del logits
            finally:
                lora.detach()
                plugin.detach()
            data["points"].setdefault(k, {"selector": s, "budget": b, "sequences": {}})["sequences"][si] = row
            if save:
                save(data)
            if log:
                log(f"[{k} recovered] seq {si}: density {row['density']:.3f}, nll/token {row['nll'] / row['tokens']:.4f}, "
                    f"KL {row['kl'] / row['tokens']:.4f}")
    return data
