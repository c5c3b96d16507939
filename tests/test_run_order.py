"""`order:` runs an experiment's cells in a chosen order (attnlab/run_order.py)."""

import pytest

from attnlab.errors import ConfigError
from attnlab.run_order import cell_order

CFG = {"seeds": [0, 1, 2], "sweep_seeds": "first",
       "methods": [{"name": "frozen", "method": "frozen"}, {"name": "a", "method": "lora"},
                   {"name": "b", "method": "lora", "seeds": [0]}, {"name": "c", "method": "lora"}]}


def _cells(cfg, methods=None):
    return [(m["name"], s) for m, s in cell_order(cfg, methods)]


def test_without_order_each_arm_runs_all_its_seeds_in_config_order():
    assert _cells(CFG) == [("frozen", 0), ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 0), ("c", 1), ("c", 2)]


def test_order_runs_first_seeds_first_and_the_arms_it_leaves_out_last():
    cfg = {**CFG, "order": ["frozen", "a:0", "b", "a"]}
    assert _cells(cfg) == [("frozen", 0), ("a", 0), ("b", 0), ("a", 1), ("a", 2), ("c", 0), ("c", 1), ("c", 2)]


def test_order_follows_a_methods_selection():
    cfg = {**CFG, "order": ["a:0", "c:0", "a", "c"]}
    assert _cells(cfg, [m for m in CFG["methods"] if m["name"] == "c"]) == [("c", 0), ("c", 1), ("c", 2)]


@pytest.mark.parametrize("order, message", [
    (["a:1", "a"], "list a:0 first"),
    (["x"], "no arm is named 'x'"),
    (["b:2"], "b runs seeds \\[0\\], not 2"),
    (["a:0", "a:0"], "listed twice"),
    (["a:zero"], "must be an integer"),
    ("a", "expected a list"),
    ({}, "expected a list"),
    ("", "expected a list"),
    (0, "expected a list"),
    (["a", "a"], "a is listed twice"),
])
def test_a_bad_order_is_refused_in_one_line(order, message):
    with pytest.raises(ConfigError, match=message):
        cell_order({**CFG, "order": order})


def test_later_seeds_may_come_first_when_every_seed_sweeps():
    assert _cells({**CFG, "sweep_seeds": "all", "order": ["a:1"]})[0] == ("a", 1)


def test_a_run_in_another_order_reports_its_cells_in_the_config_order(tmp_path):
    from attnlab.experiment import run_experiment

    cfg = {"name": "ordered", "model": "tiny-llama", "seeds": [0, 1], "order": ["lora:0", "frozen", "lora"],
           "data": {"dataset_name": "arithmetic", "n_train": 8, "n_eval": 4, "max_length": 400},
           "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "progress": False},
           "eval": {"batch_size": 4, "generate": False},
           "methods": [{"name": "frozen", "method": "frozen"}, {"name": "lora", "method": "lora", "r": 4}]}
    logs = []
    res = run_experiment(cfg, out_root=tmp_path, log=logs.append)
    ran = [(l.split()[1], l.split()[3].rstrip(":")) for l in logs if "test ppl" in l]
    assert ran == [("lora", "0"), ("frozen", "0"), ("lora", "1")]
    assert [(c["method"], c["seed"]) for c in res["cells"]] == [("frozen", 0), ("lora", 0), ("lora", 1)]
