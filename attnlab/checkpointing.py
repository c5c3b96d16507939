"""Activation checkpointing of the frozen body: keep each transformer block's input, recompute the
block in the backward.

    with checkpointed(model):   # or train: {gradient_checkpointing: true}
        loss = ...              # each block: torch.utils.checkpoint(block, use_reentrant=False)
    loss.backward()             # blocks recomputed one at a time

Memory: the body's saved activations drop from every intermediate of every block (attention
projections, MLP up/gate, norms: ~10-20 x hidden per token per block) to one hidden state per token
per block, plus one block's intermediates during its recompute; time: one more forward of the body.

Why not transformers' `gradient_checkpointing_enable()`: it acts only in train mode, and the frozen
base stays in eval mode (its dropout off) in attnlab. Why non-reentrant: with a frozen base no input
of a block requires grad (the embeddings are frozen), and the reentrant implementation then returns
outputs that do not require grad at all: the plug-in parameters inside the block (LoRA, the
factorized transform, a sparse gate) would get no gradient, silently. The non-reentrant one records
the block's graph as usual and only drops its saved tensors, so gradients reach every parameter
used inside, whatever requires grad outside. The RNG state is replayed in the recompute (dropout in a
plug-in draws the same mask twice), and the recomputed tensors are checked against the original ones.

A plug-in whose forward reads a setting that changes before the backward (sparse's gate-loss
switch) says so through `Plugin.replay_state`, and the recomputation runs under the setting of the
forward. Blocks are wrapped per call of the context (an instance attribute over `forward`, removed on exit);
the backward after the context still recomputes correctly: the checkpoint keeps the function it ran.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import layers
from .modules.base import attached


def _recomputed(model: nn.Module, forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # inference: nothing would be saved anyway
            return forward(*args, **kwargs)
        replays = [p.replay_state() for p in attached(model)]  # the plug-ins' settings now
        calls = []

        def block(*a, **k):
            if not calls:  # the forward itself
                calls.append(1)
                return forward(*a, **k)
            with contextlib.ExitStack() as stack:  # the recomputation, in the backward
                for replay in replays:
                    stack.enter_context(replay())
                return forward(*a, **k)
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return run


@contextlib.contextmanager
def checkpointed(model: nn.Module, on: bool = True):
    """Inside, every transformer block of `model` is activation-checkpointed (`on=False`: as is)."""
    if not on:
        yield model
        return
    blocks = [b for b in layers(model) if "forward" not in vars(b)]  # not already wrapped (nested use)
    for b in blocks:
        b.forward = _recomputed(model, b.forward)
    try:
        yield model
    finally:
        for b in blocks:
            del b.forward
