"""Recovery training with the selection frozen: a LoRA adapter trained by token KL to the dense base
brings the sparse model closer to dense, and leaves the selector untouched. (On the random tiny model
the text has little to generalise from, so the test reads the sequences trained on; the held-out
effect is what the 2048-token runs measure.)"""

import pytest
import torch

import attnlab
from attnlab.modules.base import disabled
from attnlab.modules.sparse.recovery import recover, sweep_recovered, token_kl

from .test_sparse_gate import _peaky_llama, _sequences


def _kl_to_dense(model, seqs):
    with torch.no_grad():
        out = []
        for s in seqs:
            x = s.view(1, -1)
            with disabled(model):
                dense = model(input_ids=x).logits
            out.append(token_kl(model(input_ids=x).logits, dense).item())
    return sum(out) / len(out)


def test_the_token_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert token_kl(a, a).abs() < 1e-6 and token_kl(a, a.flip(-1)) > 0


def test_recovery_brings_a_frozen_window_selection_closer_to_dense():
    bb = _peaky_llama()
    train = _sequences(bb, 8)
    sparse = attnlab.attach(bb.model, "sparse", variant="window", window=4, block_size=4)
    before = _kl_to_dense(bb.model, train)
    lora, record = recover(bb.model, train, steps=40, lr=1e-3, r=4)
    after = _kl_to_dense(bb.model, train)
    assert after < 0.75 * before, (before, after)
    assert record["kl_last"] < record["kl_first"] and record["tokens"] == 40 * 64
    lora.detach()
    assert abs(_kl_to_dense(bb.model, train) - before) < 1e-6       # the adapter was all that changed
    sparse.detach()


def test_recovery_trains_only_the_adapter_and_not_the_learned_gate():
    bb = _peaky_llama()
    sparse = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, top_k=1)
    gate = {n: p.detach().clone() for n, p in sparse.trainable_parameters().items()}
    lora, _ = recover(bb.model, _sequences(bb, 2), steps=3, lr=1e-2, r=2)
    assert all(torch.equal(p, gate[n]) for n, p in sparse.trainable_parameters().items())
    lora.detach()
    sparse.detach()


def test_a_recovered_sweep_reads_each_point_with_its_own_adapter_against_the_base():
    from attnlab.modules.sparse import quality

    bb = _peaky_llama()
    seqs = _sequences(bb, 4)
    points = [("window", {"window": 4, "sinks": 0}), ("quest", {"top_k": 1})]
    data, adapters = {}, {}
    sweep_recovered(bb.model, seqs[:2], {7: seqs[2], 8: seqs[3]}, points, {"block_size": 4}, None, data, adapters,
                    steps=4, lr=1e-3, r=2)
    assert sorted(adapters) == ["quest:top_k=1", "window:window=4,sinks=0"] and not attnlab.attached(bb.model)
    assert sorted(data["points"]) == ["dense", "quest:top_k=1", "window:window=4,sinks=0"]
    assert quality.complete(data) == ["7", "8"] and data["recovery"]["quest:top_k=1"]["steps"] == 4
    with torch.no_grad():                                    # dense is the base function itself
        base = bb.model(input_ids=seqs[2].view(1, -1)).logits
    assert data["points"]["dense"]["sequences"]["7"]["nll"] == pytest.approx(
        -torch.log_softmax(base[0, :-1], -1).gather(-1, seqs[2][1:, None]).sum().item(), rel=1e-5)
    del adapters["quest:top_k=1"]                            # a rerun trains only what is missing
    sweep_recovered(bb.model, seqs[:2], {7: seqs[2], 8: seqs[3]}, points, {"block_size": 4}, None, data, adapters,
                    steps=1, lr=1e-3, r=2)
    assert data["recovery"]["quest:top_k=1"]["steps"] == 1 and data["recovery"]["window:window=4,sinks=0"]["steps"] == 4
