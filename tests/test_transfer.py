"""Issue 10 (results that transfer): splits that cannot leak, eval sets in every run, validation
chooses and test is read once, intervals in the report."""

import json

import pytest

from attnlab.data import build_splits, split_of
from attnlab.errors import ConfigError
from attnlab.experiment import load_config, run_experiment

quiet = {"log": lambda *_: None}


def gsm8k_file(path, n=600, dup_every=25):
    rows = []
    for i in range(n):
        rows.append({"question": f"Tom has {i} apples and buys {i % 7 + 1} more. How many apples now?",
                     "answer": f"{i} + {i % 7 + 1} = {i + i % 7 + 1}\n#### {i + i % 7 + 1}"})
        if i % dup_every == 0:  # an exact duplicate, differently spaced and cased
            rows.append({"question": rows[-1]["question"].upper().replace(" ", "  "), "answer": rows[-1]["answer"]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def prompts(exs):
    return {e.record.prompt.lower() for e in exs}


def test_train_validation_and_test_are_disjoint_and_duplicates_are_counted(tmp_path, tiny):
    p = gsm8k_file(tmp_path / "g.jsonl")
    s = build_splits({"dataset_name": "gsm8k", "path": str(p), "n_train": 100, "n_val": 20, "n_eval": 30,
                      "max_length": 400}, tiny.tokenizer)
    tr, va, te = prompts(s.train), prompts(s.val), prompts(s.eval)
    assert len(tr) == 100 and len(va) == 20 and len(te) == 30
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert s.report["split"]["duplicates_removed"] >= 5  # of the rows read before every split was full
    assert len(tr | va | te) == 150  # case- and space-insensitive: a duplicate never comes back in another split
    for e in s.eval:
        assert split_of(e.record.prompt, 0.1, 0.2) == "test"


def test_the_test_split_does_not_move_when_the_training_set_grows(tmp_path, tiny):
    p = gsm8k_file(tmp_path / "g.jsonl")
    small = build_splits({"dataset_name": "gsm8k", "path": str(p), "n_train": 10, "n_eval": 20, "max_length": 400},
                         tiny.tokenizer)
    big = build_splits({"dataset_name": "gsm8k", "path": str(p), "n_train": 150, "n_eval": 20, "max_length": 400},
                       tiny.tokenizer)
    assert prompts(small.eval) == prompts(big.eval)
    assert not prompts(big.train) & prompts(small.eval)


def test_text_corpora_split_by_document(tiny):
    s = build_splits({"dataset_name": "python_docs", "n_train": 4, "n_val": 2, "n_eval": 2, "max_length": 64},
                     tiny.tokenizer)
    assert len(s.train) == 4 and len(s.val) == 2 and len(s.eval) == 2
    ids = [tuple(e.input_ids) for e in s.train + s.val + s.eval]
    assert len(set(ids)) == len(ids)


TINY = {
    "name": "transfer",
    "model": "tiny-gpt2",
    "seeds": [0, 1],
    "data": {"dataset_name": "arithmetic", "families": "train", "n_train": 8, "n_val": 4, "n_eval": 6,
             "max_length": 400},
    "eval_sets": {"transfer": {"dataset_name": "arithmetic", "families": "transfer", "n_eval": 6},
                  "missing": {"dataset_name": "gsm8k", "path": "/nonexistent/gsm8k.jsonl"}},
    "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "progress": False},
    "eval": {"batch_size": 6, "generate": True, "n_generate": 3, "max_new_tokens": 4, "bootstrap": 200},
    "methods": [{"name": "frozen", "method": "frozen"},
                {"name": "lora", "method": "lora", "r": 2, "train": {"lr": [1e-4, 3e-2]}},
                {"name": "head_ft", "method": "head_ft", "train": {"lr": [1e-5, 1e-3]}}],
}


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    logs = []
    res = run_experiment(TINY, out_root=out, log=logs.append)
    return res, out / "transfer", logs


def test_every_method_is_scored_on_test_and_on_every_eval_set(transfer_run):
    res, out, _ = transfer_run
    saved = json.loads((out / "results.json").read_text())
    for c in saved["cells"]:
        assert c["eval"]["perplexity"] > 0 and c["eval_sets"]["transfer"]["perplexity"] > 0
        assert set(c["per_example"]) == {"test", "transfer"}
        assert len(c["per_example"]["transfer"]["nll"]) == 6
    assert saved["eval_sets"]["transfer"]["options"]["families"] == "transfer"


def test_an_unreachable_eval_set_is_skipped_and_said_so(transfer_run):
    res, out, logs = transfer_run
    assert "missing" in res["eval_sets_skipped"]
    report = (out / "report.md").read_text()
    assert "**Eval set `missing` skipped**" in report
    assert any("eval set missing: skipped" in line for line in logs)


def test_the_sweep_keeps_the_value_with_the_lowest_validation_loss(transfer_run):
    res, out, _ = transfer_run
    for c in res["cells"]:
        if c["method"] == "frozen":
            continue
        assert len(c["sweep"]) == 2
        best = min(c["sweep"], key=lambda x: x["val_loss"])
        assert c["train"]["chosen"] == {"lr": best["lr"]} and c["val_loss"] == best["val_loss"]
        assert (out / c["method"] / f"seed{c['seed']}" / "sweep" / f"lr={best['lr']:g}").is_dir()


def test_the_report_leads_with_in_distribution_vs_transfer_with_intervals(transfer_run):
    res, out, _ = transfer_run
    report = (out / "report.md").read_text()
    assert report.index("## In-distribution vs transfer") < report.index("## Validation chooses")
    assert "| method | test PPL | Δ vs frozen [95% CI] | transfer PPL | Δ vs frozen [95% CI] |" in report
    from attnlab.report import ppl_change
    r = ppl_change(res["cells"], "lora", "frozen", "transfer", n_boot=200)
    assert r["lo"] <= r["change"] <= r["hi"] and len(r["seed_values"]) == 2
    assert f"{100 * r['change']:+.1f}% [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]" in report
    assert "| lora | 0 |" in report and "✓" in report  # the sweep table marks the chosen value
    for f in ("loss_curves.png", "metrics.png"):
        assert (out / f).is_file()


def test_test_is_read_once_per_cell(tmp_path, monkeypatch):
    import attnlab.experiment as ex

    seen = []
    real = ex.score

    def counting(model, examples, *a, **k):
        seen.append(id(examples))
        return real(model, examples, *a, **k)

    monkeypatch.setattr(ex, "score", counting)
    cfg = {**TINY, "seeds": [0], "eval_sets": {}, "eval": {**TINY["eval"], "generate": False},
           "methods": [TINY["methods"][1]]}
    res = run_experiment(cfg, out_root=tmp_path, **quiet)
    # validation is read by every sweep point (and early stopping); test exactly once, for the chosen point
    test_ids = {i for i in seen if seen.count(i) == 1}
    assert len(test_ids) == 1 and len(seen) >= 3


def test_shipped_experiment_configs_use_eval_sets():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("quickstart", "backward_head", "factorized_attention"):
        assert load_config(root / f"{name}.yaml")["eval_sets"], name


def test_a_diverging_sweep_value_is_recorded_and_the_sweep_goes_on(tmp_path):
    cfg = {**TINY, "seeds": [0], "eval_sets": {}, "eval": {**TINY["eval"], "generate": False},
           "methods": [{"name": "lora", "method": "lora", "r": 2, "train": {"lr": [1e-3, 1e30]}}]}
    res = run_experiment(cfg, out_root=tmp_path, **quiet)
    (cell,) = res["cells"]
    assert [x.get("diverged", False) for x in cell["sweep"]] == [False, True]
    assert cell["train"]["chosen"] == {"lr": 1e-3}
    assert "| lora | 0 | 1e+30 | – | diverged |  |" in (tmp_path / "transfer" / "report.md").read_text()
    logs = []
    run_experiment({**cfg, "methods": cfg["methods"]}, out_root=tmp_path, fresh=True, log=logs.append)
    assert any("diverged (" in x for x in logs)


def test_eval_sets_work_with_several_datasets_side_by_side(tmp_path):
    cfg = {**TINY, "name": "multi", "seeds": [0], "eval": {**TINY["eval"], "generate": False},
           "datasets": {"math": {"dataset_name": "arithmetic"},
                        "code": {"dataset_name": "python_stdlib", "max_length": 64, "n_val": 2}},
           "eval_sets": {"docs": {"dataset_name": "python_docs", "n_eval": 3, "max_length": 64}},
           "methods": [{"name": "frozen", "method": "frozen"}, {"name": "lora", "method": "lora", "r": 2}]}
    res = run_experiment(cfg, out_root=tmp_path, **quiet)
    for label in ("math", "code"):
        cells = res["datasets"][label]["cells"]
        assert all(c["eval_sets"]["docs"]["perplexity"] > 0 for c in cells)
    report = (tmp_path / "multi" / "report.md").read_text()
    assert "| dataset | method | PPL | CE | next-tok acc | docs PPL | train tok/s |" in report


def test_a_method_without_trainable_parameters_is_not_swept(tmp_path):
    cfg = {**TINY, "seeds": [0], "eval_sets": {}, "eval": {**TINY["eval"], "generate": False},
           "train": {**TINY["train"], "lr": [1e-3, 1e-2]}, "methods": [{"name": "frozen", "method": "frozen"}]}
    (cell,) = run_experiment(cfg, out_root=tmp_path, **quiet)["cells"]
    assert len(cell["sweep"]) == 1 and cell["train"]["chosen"] is None


def test_with_sweep_seeds_first_later_seeds_train_the_value_the_first_seed_chose(tmp_path):
    cfg = {**TINY, "seeds": [0, 1], "sweep_seeds": "first", "eval_sets": {},
           "eval": {**TINY["eval"], "generate": False},
           "methods": [{"name": "lora", "method": "lora", "r": 2, "train": {"lr": [1e-3, 3e-2]}},
                       {"name": "head_ft", "method": "head_ft", "seeds": [0], "train": {"lr": [1e-5, 1e-3]}}]}
    res = run_experiment(cfg, out_root=tmp_path, **quiet)
    first, second = res["cells"][:2]
    assert len(first["sweep"]) == 2 and first["train"]["chosen_on_seed"] is None
    assert len(second["sweep"]) == 1 and second["train"]["chosen_on_seed"] == 0
    assert second["spec"]["train"][0]["lr"] == first["train"]["chosen"]["lr"]
    report = (tmp_path / "transfer" / "report.md").read_text()
    assert "Later seeds were not swept" in report
    assert "Unequal tuning" not in report  # two values each: a later seed's single value is not a third
    with pytest.raises(Exception, match="sweep_seeds"):
        load_config({**cfg, "sweep_seeds": "some"})


def test_the_decoding_grid_table_averages_seeds_inside_problems_and_uses_wilson_for_one_seed():
    from attnlab.report import decoding_lines

    ref = [1, 0, 1, 0, 0, 0, 1, 0]

    def cell(method, seed, greedy, sampled):
        return {"method": method, "seed": seed, "eval": {}, "per_example": {"level1": {"correct": greedy}},
                "eval_sets": {"level1": {"sampling": [{"temperature": t, "top_k": k, "correct": c}
                                                      for (t, k), c in sampled.items()]}}}
    cells = [cell("frozen", 0, ref, {(0.7, 20): [1, 1, 1, 0, 0, 0, 1, 0]}),
             cell("head", 0, [1] * 8, {(1.0, None): [0] * 8}), cell("head", 1, [1] * 7 + [0], {(1.0, None): [0] * 8})]
    lines = decoding_lines({"cells": cells, "eval_sets": {"level1": {}}}, n_boot=200)
    text = "\n".join(lines)
    assert "### Decoding on `level1`" in text
    assert "| frozen | greedy | 3/8 = 0.375 |" in text and "| frozen | T=0.7, top-k=20 | 4/8 = 0.500 |" in text
    head_greedy = next(x for x in lines if x.startswith("| head | greedy |"))
    assert "15/16 = 0.938" in head_greedy and "+56.2 pp [+25.0, +87.5]" in head_greedy
    # two seeds on 8 problems: per-problem means seven 1s and one 0.5, so a resample's mean is
    # 1 - 0.5 c / 8 with c ~ Binomial(8, 1/8); P(c >= 3) = 0.067 > 0.025 > P(c >= 4) = 0.013: lo = 0.8125
    # (Wilson on 15/16 pooled answers would claim [0.717, 0.989] from twice the problems there are)
    assert "[0.812, 1.000] | bootstrap over 8 problems, 2 seeds averaged |" in head_greedy
    assert "| Wilson |" in next(x for x in lines if x.startswith("| frozen | greedy |"))
    assert "*within noise*" in head_greedy  # over problems it is better; over two seeds' spread not yet
    assert "**worse**" in next(x for x in lines if x.startswith("| head | T=1, top-k=off |"))


def test_an_arm_may_run_a_subset_of_the_seeds_and_a_foreign_seed_is_one_line(tmp_path):
    cfg = {**TINY, "seeds": [0, 1], "eval_sets": {}, "eval": {**TINY["eval"], "generate": False},
           "methods": [{"name": "frozen", "method": "frozen"},
                       {"name": "lora", "method": "lora", "r": 2, "seeds": [1]},
                       {"name": "head_ft", "method": "head_ft"}]}
    res = run_experiment(cfg, out_root=tmp_path, **quiet)
    assert [(c["method"], c["seed"]) for c in res["cells"]] == [("frozen", 0), ("lora", 1), ("head_ft", 0),
                                                                 ("head_ft", 1)]
    assert "seeds" not in res["cells"][1]["spec"]["method"]  # a later subset does not invalidate finished cells
    assert "Arms run on a subset of the seeds (with one seed, an interval is over examples only): lora (seeds [1])." in (
        tmp_path / "transfer" / "report.md").read_text()
    for bad in ([2], [], [1, 1], ["0"], [True]):
        with pytest.raises(ConfigError, match=r"methods\.lora\.seeds: .* drawn from the experiment's seeds"):
            load_config({**cfg, "methods": [{"name": "lora", "method": "lora", "seeds": bad}]})


def test_the_report_shows_validation_curves_and_says_which_arms_were_still_falling():
    from attnlab.report import curve_lines

    cells = [{"method": "frozen", "seed": 0},
             {"method": "lora", "seed": 0, "val_curve": [[16, 1.10], [32, 1.04], [48, 1.00], [64, 0.988]]},
             {"method": "fa", "seed": 0, "val_curve": [[16, 1.10], [32, 1.00], [48, 0.990], [64, 0.989]]},
             {"method": "fa", "seed": 1, "val_curve": [[16, 1.10], [32, 1.00]]},
             {"method": "long", "seed": 0, "val_curve": [[32, 1.00], [64, 1.02]]},
             {"method": "flat", "seed": 0, "val_curve": [[16, 1.10], [32, 1.00], [64, 1.001]]}]
    lines = curve_lines({"cells": cells})
    text = "\n".join(lines)
    assert "| step 16 | step 32 | step 48 | step 64 |" in text
    assert "| lora | 0 | 1.1000 | 1.0400 | 1.0000 | 0.9880 | -1.20% | still falling |" in text
    assert "| fa | 0 | 1.1000 | 1.0000 | 0.9900 | 0.9890 | -0.10% | falling slowly |" in text  # still its best
    assert "| flat | 0 | 1.1000 | 1.0000 | – | 1.0010 | +0.10% | flat |" in text  # no gain over the last interval
    assert "*flat* otherwise" in text  # the report states its criterion
    assert "| fa | 1 | 1.1000 | 1.0000 | – | – | -9.09% | still falling |" in text  # a shorter curve: gaps
    assert "| long | 0 | – | 1.0000 | – | 1.0200 | +2.00% | rising |" in text  # overfitting is not "flat"
    assert "**Still falling at the end** (≥ 0.5% over the last interval): lora seed 0, fa seed 1." in text
    assert "frozen" not in text
    assert curve_lines({"cells": cells[:1]}) == []
