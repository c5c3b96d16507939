"""Probes of the sparse gate options added on 2026-12-07 (gate_quest, distillation per query block):
bad or unusual inputs are one line naming the fix, before any work is spent, and a gate that reads
Quest's bound is read with that bound in `attnlab run`'s held-out sweep. Each test failed before
its fix (probe7)."""

import pytest
import torch

import attnlab
from attnlab.experiment import ConfigError, run_experiment
from attnlab.modules import PluginError

from .test_sparse_distill import CFG, DISTILLED


def _sequences(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (length,), generator=g) for _ in range(n)]


@pytest.fixture
def learned(tiny_llama):
    plugin = attnlab.attach(tiny_llama.model, "sparse", variant="learned", block_size=8, gate_dim=8, top_k=1)
    yield plugin
    plugin.detach()


def test_a_distilled_gate_that_reads_quest_is_swept_with_quest_in_attnlab_run(tmp_path):
    method = {**DISTILLED, "gate_quest": True, "distill": {**DISTILLED["distill"], "steps": 3, "heldout": 1}}
    res = run_experiment({**CFG, "methods": [method]}, out_root=tmp_path, log=lambda *a: None)
    data = res["cells"][0]["sparse_quality"]
    assert data["meta"]["common"]["gate_quest"] is True
    assert any(p["selector"] == "learned" for p in data["points"].values())


@pytest.mark.parametrize("unit", ["blocks", "Block", 1])
def test_an_unknown_gate_unit_is_one_line_naming_the_units_even_with_a_teacher_given(learned, unit):
    seqs = _sequences(2, 64)
    with pytest.raises(PluginError, match="unit.*row, block"):
        learned.distil_gates(seqs, rows=16, steps=1, unit=unit)
    from attnlab.modules.sparse.teacher import collect_teacher
    teacher = collect_teacher(learned.model, learned, seqs, rows=16, unit="row")
    with pytest.raises(PluginError, match="unit.*row, block"):     # it used to train on the row teacher
        learned.distil_gates(seqs, rows=16, steps=1, unit=unit, teacher=teacher)


@pytest.mark.parametrize("unit", ["row", "block"])
@pytest.mark.parametrize("option", ["rows", "batch"])
def test_zero_rows_or_batch_is_refused_for_either_unit(learned, unit, option):
    with pytest.raises(PluginError, match=f"{option} must be an integer >= 1"):
        learned.distil_gates(_sequences(1, 64), steps=1, unit=unit, **{"rows": 16, option: 0})


def test_block_unit_on_sequences_of_three_and_a_half_blocks_names_the_length_it_needs(learned):
    # 28 tokens at block 8: more than 3 blocks, but only 3 complete query blocks, none with candidates
    with pytest.raises(PluginError, match="4 complete blocks.*32 tokens"):
        learned.distil_gates(_sequences(2, 28), rows=16, steps=1, unit="block")


def test_distill_on_training_examples_shorter_than_four_blocks_is_a_config_error_naming_max_length(tmp_path):
    cfg = {**CFG, "data": {**CFG["data"], "max_length": 24}, "methods": [DISTILLED]}
    with pytest.raises(ConfigError, match="max_length.*block_size"):
        run_experiment(cfg, out_root=tmp_path, log=lambda *a: None)


def test_loading_gate_weights_across_gate_quest_names_the_option(learned):
    quest = attnlab.attach(attnlab.load_backbone("tiny-llama").model, "sparse", variant="learned", block_size=8,
                           gate_dim=8, top_k=1, gate_quest=True)
    try:
        with pytest.raises(PluginError, match="gate_quest"):
            learned.load_state_dict(quest.state_dict())
        with pytest.raises(PluginError, match="gate_quest"):
            quest.load_state_dict(learned.state_dict())
    finally:
        quest.detach()


def test_an_empty_distill_key_is_refused_rather_than_training_the_gate_online():
    from attnlab.experiment import load_config
    with pytest.raises(ConfigError, match=r"distill: is empty; write distill: \{\}"):
        load_config({**CFG, "methods": [{**DISTILLED, "distill": None}]})


def _benchmark():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "sparse_quality_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "sparse_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, message", [
    (["--gate-unit", "block", "--length", "100", "--block-size", "32"], r"--length 100 .*128 tokens"),
    (["--granularity", "row", "--length", "64", "--block-size", "32"], r"--length 64 .*97 tokens"),
    (["--block-size", "0"], "block_size must be an integer >= 1"),
    (["--gate-dim", "7", "--gate-quest"], "gate_dim must be even")])
def test_the_quality_benchmark_refuses_bad_gate_flags_before_loading_its_model(tmp_path, monkeypatch, flags, message):
    sq = _benchmark()

    def never(*a, **k):
        raise AssertionError("the benchmark loaded its 135M model before checking its flags")
    monkeypatch.setattr(sq.attnlab, "load_backbone", never)
    stem = f"probe_{tmp_path.name}"
    runs = sq.ROOT / "runs" / stem
    try:
        with pytest.raises(SystemExit, match=message) as e:
            sq.main(["--selectors", "learned", "quest", "--out", str(tmp_path / f"{stem}.json"), *flags])
        assert "\n" not in str(e.value)
        assert not runs.exists()                                   # nothing made in the repository either
    finally:
        if runs.is_dir() and not any(runs.iterdir()):
            runs.rmdir()


def test_a_teacher_file_of_another_unit_or_without_quest_bounds_is_an_attnlab_error_naming_the_fix(learned, tmp_path):
    from attnlab.errors import AttnlabError
    from attnlab.modules.sparse import recipe
    seqs, path = _sequences(2, 64), tmp_path / "teacher.pt"
    recipe.distil(learned, seqs, rows=16, steps=1, unit="row", teacher_file=path)
    with pytest.raises(AttnlabError, match="unit.*give another teacher file"):
        recipe.distil(learned, seqs, rows=16, steps=1, unit="block", teacher_file=path)
    caches, record = recipe.teacher(learned, seqs, 16, path, unit="row")
    for cache in caches.values():
        assert "quest" not in cache                       # a plain gate's teacher records no Quest bounds
    quest = attnlab.attach(attnlab.load_backbone("tiny-llama").model, "sparse", variant="learned", block_size=8,
                           gate_dim=8, top_k=1, gate_quest=True)
    try:
        with pytest.raises(AttnlabError, match="collect the teacher again"):
            quest.distil_gates(seqs, rows=16, steps=1, unit="row", teacher=(caches, record))
    finally:
        quest.detach()


@pytest.mark.parametrize("option, message", [
    ({"target": "Mass"}, "unknown gate target 'Mass'; use one of: peak, mass"),
    ({"steps": -1}, "steps must be an integer >= 0"), ({"lr": -1e-3}, "lr must be a positive number"),
    ({"lr": 0}, "lr must be a positive number")])
def test_a_bad_target_steps_or_lr_is_refused_before_the_teacher_pass(learned, monkeypatch, option, message):
    from attnlab.modules.sparse import teacher

    def never(*a, **k):
        raise AssertionError("the teacher pass ran before the options were checked")
    monkeypatch.setattr(teacher, "collect_teacher", never)
    with pytest.raises(PluginError, match=message):
        learned.distil_gates(_sequences(1, 64), **{"rows": 16, "steps": 1, **option})


def test_the_recipe_checks_its_options_before_collecting_or_saving_a_teacher_file(learned, tmp_path):
    from attnlab.modules.sparse import recipe
    path = tmp_path / "teacher.pt"
    with pytest.raises(PluginError, match="rows must be an integer >= 1"):
        recipe.distil(learned, _sequences(1, 64), rows=0, steps=1, teacher_file=path)
    with pytest.raises(PluginError, match="unknown gate target"):
        recipe.distil(learned, _sequences(1, 64), rows=16, steps=1, target="Peak", teacher_file=path)
    assert not path.exists()
