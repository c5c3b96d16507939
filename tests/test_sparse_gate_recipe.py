"""The gate recipe's options: the mass target (what the oracle ranks by) and one teacher pass shared
by several recipes through a saved teacher cache."""

import pytest
import torch

import attnlab
from attnlab.modules.sparse import recipe
from attnlab.modules.sparse.teacher import collect_teacher, mass_target

from .test_sparse_gate import _peaky_llama, _sequences


def test_the_mass_target_is_the_candidates_mass_normalised_per_row():
    cache = {"mass": torch.tensor([[[0.5, 0.2, 0.3, 9.0]], [[0.0, 0.0, 0.0, 0.0]]]),
             "cand": torch.tensor([[True, True, True, False], [True, True, False, False]])}
    t = mass_target(cache)
    assert torch.allclose(t[0, 0], torch.tensor([0.5, 0.2, 0.3, 0.0]))
    assert not t[1].any()                       # no mass on the candidates: an empty row, not nan


def test_a_gate_distilled_towards_mass_comes_much_closer_to_the_block_mass():
    bb = _peaky_llama()
    seqs = _sequences(bb, 8)
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, top_k=2, granularity="row")
    caches, _ = collect_teacher(bb.model, plugin, seqs, rows=32)
    report = plugin.distil_gates(seqs, steps=150, lr=1e-2, batch=64, target="mass",
                                 teacher=(caches, {"seconds": 1.0, "tokens": 1}))
    for r in report["layers"].values():
        assert r["after"]["train"] < 0.6 * r["before"]["train"], r
    with pytest.raises(attnlab.modules.PluginError, match="peak, mass"):
        plugin.distil_gates(seqs, steps=1, target="sum", teacher=(caches, {"seconds": 1.0, "tokens": 1}))
    plugin.detach()


def test_a_saved_teacher_gives_the_same_gate_and_is_refused_for_other_sequences(tmp_path):
    bb = _peaky_llama()
    seqs = _sequences(bb, 4)
    path = tmp_path / "teacher.pt"
    states = []
    for _ in range(2):                          # the first call collects and saves, the second loads
        plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, top_k=2)
        recipe.distil(plugin, seqs, rows=16, steps=20, lr=1e-2, teacher_file=path)
        states.append(plugin.state_dict())
        plugin.detach()
    assert path.is_file()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    plugin = attnlab.attach(bb.model, "sparse", variant="learned", block_size=4, top_k=2)
    with pytest.raises(ValueError, match="other sequences"):
        recipe.distil(plugin, seqs[:3], rows=16, steps=20, teacher_file=path)
    plugin.detach()
