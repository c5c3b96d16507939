"""sparse_quality.py's counts and budgets are refused before the model loads, one line naming the
flag: a negative count, a budget named twice or read by no selector, a budget that keeps every
causal pair (dense), --headline-top-k or --metrics-only without metric sequences; and every command
a committed results file records still passes."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sparse_quality_flags", ROOT / "benchmarks" / "sparse_quality.py")
sq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sq)


class Passed(Exception):
    """Raised where the benchmark would go on to load the model."""


@pytest.fixture
def checked(monkeypatch):
    """main up to its flag checks: Passed when they pass, and the model is never loaded."""
    own = sq.check_flags

    def check_then_stop(args, *rest):
        own(args, *rest)
        raise Passed

    monkeypatch.setattr(sq, "check_flags", check_then_stop)
    monkeypatch.setattr(sq.attnlab, "load_backbone", lambda *a, **k: pytest.fail("the model was loaded"))
    return sq.main


@pytest.mark.parametrize("argv, message", [
    ("--train -1", "--train -1: expected an integer >= 0"),
    ("--heldout -2", "--heldout -2: expected an integer >= 1"),
    ("--split validation --heldout 16 --validation 0", "--validation 0: expected an integer >= 1"),
    ("--metric-sequences -1", "--metric-sequences -1"),
    ("--recover-steps -5", "--recover-steps -5"),
    ("--length 0 --selectors window", "--length 0: expected an integer >= 1"),
    ("--top-k -1", "--top-k -1: a top-k budget is a number of extra blocks"),
    ("--window 64 64 --selectors window", "a budget is named twice"),
    ("--top-k 2 2", "a budget is named twice"),
    ("--window 64 --selectors learned quest", "--selectors names none of them: add one, or drop --window"),
    ("--top-k 7 --selectors window", "add one, or drop --top-k"),
    ("--window 2044 --selectors window", "--window 2044 keeps every causal pair of a --length 2048 sequence"),
    ("--window 100000 --selectors window", "use a window below 2044"),
    ("--top-k 29", "--top-k 29 keeps every causal pair at --length 2048"),
    ("--headline-top-k 1000 --metric-sequences 1", "--headline-top-k 1000 keeps every causal pair"),
    ("--headline-top-k -1 --metric-sequences 1", "--headline-top-k -1: a top-k budget is a number of extra blocks"),
    ("--headline-top-k 2", "name --metric-sequences N and a top-k selector"),
    ("--headline-top-k 2 --metric-sequences 1 --selectors window", "name --metric-sequences N and a top-k selector"),
    ("--metrics-only", "--metrics-only reads only the metrics"),
    ("--heldout 2 --metric-sequences 5", "--metric-sequences 5 reads more sequences than the --heldout 2"),
    ("--split validation --heldout 16 --validation 4 --metric-sequences 8", "than the --validation 4"),
    ("--train 0 --selectors window --recover-steps 4", "--recover-steps trains each adapter on the --train sequences"),
    ("--gate-steps -1", "steps must be an integer >= 0, got -1"),
    ("--gate-lr 0", "lr must be a positive number"),
    ("--train 0 --selectors learned", "--train 0 leaves the learned gate no sequence to distil from"),
    ("--selectors lowrank --rank 0", "--rank 0: expected an integer >= 1"),
    ("--selectors lowrank --train 4 --calibrate 8", "--calibrate 8 fits the lowrank indexer from the first --calibrate"),
    ("--selectors lowrank --train 0", "--train 0 leaves the lowrank indexer no sequence to fit from"),
    ("--selectors lowrank --rank 65", "--rank 65 is above the head dimension 64 of smollm2-135m: use --rank 64"),
])
def test_a_bad_count_or_budget_is_refused_naming_the_flag_before_the_model_loads(checked, tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message.replace("-", r"\-")):
        checked(shlex.split(argv) + ["--out", str(tmp_path / "q.json")])


def test_the_largest_sparse_budgets_pass(checked, tmp_path):
    # at 2048 tokens and block 64 the last query block has 29 candidate blocks: top-k 28 skips one
    with pytest.raises(Passed):
        checked(["--top-k", "28", "--window", "2043", "--out", str(tmp_path / "q.json")])


@pytest.mark.parametrize("argv, fitted_from", [("--selectors lowrank", 8), ("--selectors lowrank --train 20", 16),
                                                ("--selectors lowrank --train 3", 3)])
def test_lowrank_with_the_default_calibrate_passes_and_fits_from_at_most_16_train_sequences(tmp_path, argv,
                                                                                             fitted_from):
    argv = shlex.split(argv) + ["--out", str(tmp_path / "q.json")]
    args = sq.parse(argv, "")
    assert args.calibrate == fitted_from
    sq.check_flags(args, tmp_path)


def _committed_commands() -> list[str]:
    commands = set()
    for path in (ROOT / "benchmarks" / "results").rglob("*.json"):
        meta = json.loads(path.read_text()).get("meta")
        if isinstance(meta, dict) and "sparse_quality.py" in str(meta.get("command", "")):
            commands |= set(meta.get("commands") or [meta["command"]])
    return sorted(commands)


def test_every_committed_sparse_quality_command_passes_the_checks(checked):
    commands = _committed_commands()
    assert len(commands) > 10
    for command in commands:
        argv = shlex.split(command)
        with pytest.raises(Passed):
            checked(argv[argv.index(next(a for a in argv if a.endswith("sparse_quality.py"))) + 1:])


@pytest.mark.parametrize("length", [64, 60])
def test_a_budget_is_refused_as_dense_exactly_where_the_plugin_skips_no_pair(length):
    import argparse

    import torch

    import attnlab

    model = attnlab.load_backbone("tiny-llama").model
    x = torch.randint(0, 100, (1, length))
    for variant, budget in [("quest", {"top_k": k}) for k in (4, 5)] + [
            ("window", {"window": w, "sinks": 4}) for w in (length - 5, length - 4)]:
        plugin = attnlab.attach(model, "sparse", variant=variant, block_size=8, granularity="row", kernel="masked",
                                **budget)
        with torch.no_grad():
            model(input_ids=x)
        dense = plugin.sparsity() == 0
        plugin.detach()
        args = argparse.Namespace(length=length, block_size=8, selectors=[variant], heldout=1, validation=1,
                                  train=0, metric_sequences=0, recover_steps=0,
                                  window=[budget["window"]] if variant == "window" else None,
                                  top_k=[budget["top_k"]] if variant == "quest" else None)
        if dense:
            with pytest.raises(SystemExit, match="keeps every causal pair"):
                sq.check_budgets(args)
        else:
            sq.check_budgets(args)
