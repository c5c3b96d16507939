import json

import pytest

from attnlab.experiment import ConfigError, load_config, run_experiment
from attnlab.report import markdown, summarize

TINY = {
    "name": "tiny",
    "model": "tiny-llama",
    "seeds": [0, 1],
    "data": {"dataset_name": "arithmetic", "n_train": 8, "n_eval": 4, "max_length": 400},
    "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "progress": False},
    "eval": {"batch_size": 4, "generate": True, "n_generate": 2, "max_new_tokens": 8},
    "methods": [{"name": "frozen", "method": "frozen"},
                {"name": "lora", "method": "lora", "r": 4},
                {"name": "head_ft", "method": "head_ft", "train": {"lr": 1e-3}}],
}


def test_run_writes_report_results_and_plots(tmp_path):
    logs = []
    res = run_experiment(TINY, out_root=tmp_path, log=logs.append)
    out = tmp_path / "tiny"
    for f in ("report.md", "results.json", "loss_curves.png", "metrics.png"):
        assert (out / f).is_file(), f
    assert [(c["method"], c["seed"]) for c in res["cells"]] == [
        ("frozen", 0), ("lora", 0), ("lora", 1), ("head_ft", 0), ("head_ft", 1)]
    saved = json.loads((out / "results.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(res["cells"]))
    lora = [c for c in res["cells"] if c["method"] == "lora"]
    assert lora[0]["eval"] != lora[1]["eval"], "different seeds should give different runs"
    assert lora[0]["train"]["tokens"] == [c for c in res["cells"] if c["method"] == "head_ft"][0]["train"]["tokens"]
    assert (out / "lora" / "seed0" / "plugin" / "plugin.safetensors").is_file()
    # the report shows the numbers of results.json
    report = (out / "report.md").read_text()
    s = summarize(res["cells"])
    mean, std = s["lora"]["perplexity"]
    assert f"{mean:.3f} ± {std:.3f}" in report
    assert "## In-distribution vs transfer" in report and "| lora | " in report and "Δ vs frozen [95% CI]" in report
    assert "Change against **lora** (paired by seed" in report
    # compare_against names the references: a paired-interval table against each, in that order
    both = markdown({**res, "config": {**res["config"], "compare_against": ["head_ft", "lora"]}})
    assert both.index("Change against **head_ft**") < both.index("Change against **lora**")
    assert "| lora | " in both.split("Change against **head_ft**")[1].split("Change against **lora**")[0]
    assert s["lora"]["accuracy"][0] is not None and s["frozen"]["kl_base_model"][0] < 1e-6
    # tiny random models never emit eos within 8 tokens: every generation is cut off, and reported so
    assert all(c["eval"]["n_cut_off"] == 2 for c in res["cells"])
    assert "2 cut off at max_new_tokens" in report


def test_rerun_resumes_finished_cells(tmp_path):
    cfg = {**TINY, "seeds": [0], "methods": TINY["methods"][:2]}
    first = run_experiment(cfg, out_root=tmp_path, log=lambda *_: None)
    logs = []
    second = run_experiment(cfg, out_root=tmp_path, log=logs.append)
    assert sum("done earlier" in l for l in logs) == 2
    assert first["cells"] == second["cells"]


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config({**TINY, "modle": "x"})
    with pytest.raises(ConfigError, match="unique name"):
        load_config({**TINY, "methods": [{"method": "lora"}, {"method": "lora"}]})
    with pytest.raises(Exception, match="has no option"):
        load_config({**TINY, "methods": [{"method": "lora", "rank": 3}]})
    with pytest.raises(ConfigError, match="seeds"):
        load_config({**TINY, "seeds": []})
    with pytest.raises(ConfigError, match="compare_against: 'lroa' is not one of the methods"):
        load_config({**TINY, "compare_against": ["lora", "lroa"]})
    with pytest.raises(ConfigError, match="distinct"):
        load_config({**TINY, "compare_against": ["lora", "lora"]})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_are_valid():
    from pathlib import Path
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(path)


def test_datasets_run_side_by_side_with_paired_changes(tmp_path):
    cfg = {**TINY, "name": "multi", "eval": {**TINY["eval"], "generate": False},
           "datasets": {"math": {"dataset_name": "arithmetic"},
                        "code": {"dataset_name": "python_stdlib", "max_length": 64}},
           "paired_baseline": "lora",
           "methods": [{"name": "lora", "method": "lora", "r": 4},
                       {"name": "lora_factorized", "method": "factorized", "lora_r": 4, "factor_dim": 8}]}
    res = run_experiment(cfg, out_root=tmp_path, log=lambda *_: None)
    out = tmp_path / "multi"
    assert set(res["datasets"]) == {"math", "code"}
    assert res["datasets"]["code"]["data"]["dataset_name"] == "python_stdlib"
    for label in ("math", "code"):
        assert (out / label / "report.md").is_file() and (out / label / "lora" / "seed1" / "result.json").is_file()
        cells = res["datasets"][label]["cells"]
        # the same data order and token budget within each seed pair
        for seed in (0, 1):
            a, b = [c for c in cells if c["seed"] == seed]
            assert a["train"]["tokens"] == b["train"]["tokens"]
    from attnlab.report import paired_changes
    cells = res["datasets"]["code"]["cells"]
    assert "frozen" not in paired_changes(cells + [{"method": "frozen", "type": "frozen", "seed": 0,
                                                    "eval": {"perplexity": 9.0}}], "lora")
    pc = paired_changes(cells, "lora")["lora_factorized"]
    by = {(c["method"], c["seed"]): c["eval"]["perplexity"] for c in cells}
    want = [100 * (by["lora_factorized", s] - by["lora", s]) / by["lora", s] for s in (0, 1)]
    assert pc["changes"] == pytest.approx(want)
    m, sd = pc["mean_std"]
    # one seed has no spread: the change is marked as one seed, not given a "± 0.00%"
    from attnlab.report import _pct_change
    one = paired_changes([c for c in cells if c["seed"] == 0], "lora")["lora_factorized"]
    assert _pct_change(one) == f"{one['changes'][0]:+.2f}% (one seed)"
    report = (out / "report.md").read_text()
    assert f"{m:+.2f}% ± {sd:.2f}%" in report and "| code | `python_stdlib` | lora_factorized |" in report
    code_report = (out / "code" / "report.md").read_text()
    assert "Paired by seed against **lora**" in code_report
    # plain text is split by document, then packed into blocks; the report says so, not "problem text"
    assert "test blocks, packed after splitting the documents by a hash" in code_report
    assert "disjoint by a hash of the normalised problem text" in (out / "math" / "report.md").read_text()
    # the saved artifact (factorized parameters + LoRA in one file) reproduces the evaluation exactly
    from attnlab import load_backbone
    from attnlab.data import build_splits
    from attnlab.evaluate import score
    from attnlab.modules import load_plugin
    bb = load_backbone("tiny-llama")
    load_plugin(bb.model, out / "code" / "lora_factorized" / "seed1" / "plugin")
    splits = build_splits(res["datasets"]["code"]["config"]["data"], bb.tokenizer)
    again = score(bb.model, splits.eval, bb.tokenizer.pad_token_id, 4)
    assert again["perplexity"] == by["lora_factorized", 1]
    with pytest.raises(ConfigError, match="paired_baseline"):
        load_config({**cfg, "paired_baseline": "nope"})
    with pytest.raises(ConfigError, match="datasets is a mapping"):
        load_config({**cfg, "datasets": ["math"]})


def test_sparse_attention_run_on_text(tmp_path):
    cfg = {"name": "sparse", "model": "tiny-llama", "seeds": [0],
           "data": {"dataset_name": "wikitext", "path": str(tmp_path / "absent.txt"),
                    "fallback": {"dataset_name": "python_docs"}, "n_train": 6, "n_eval": 2, "max_length": 48},
           "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "progress": False},
           "eval": {"batch_size": 2, "generate": True, "n_generate": 2, "prompt_tokens": 16, "max_new_tokens": 4},
           "methods": [{"name": "dense", "method": "frozen"},
                       {"name": "window", "method": "sparse", "variant": "window", "window": 3, "block_size": 4,
                        "train": {"steps": 0}},
                       {"name": "learned", "method": "sparse", "variant": "learned", "block_size": 4, "top_k": 1}]}
    res = run_experiment(cfg, out_root=tmp_path, log=lambda *_: None)
    cells = {c["method"]: c for c in res["cells"]}
    assert res["data"]["fallback_from"]["dataset_name"] == "wikitext"
    assert cells["window"]["train"]["steps"] == 0 and cells["learned"]["train"]["steps"] == 3
    for name in ("window", "learned"):
        ev = cells[name]["eval"]
        assert 0 < ev["sparsity"] < 1 and ev["attention_mse"] > 0 and -1 <= ev["grad_cosine"] <= 1
        assert ev["kl_base_model"] > 0 and 0 <= ev["top1_agreement"] <= 1
    assert cells["dense"]["eval"]["top1_agreement"] == 1.0
    # generation samples: the same held-out prompts for every method, shown side by side
    prompts = {c["method"]: [s["prompt"] for s in c["samples"]] for c in res["cells"]}
    assert prompts["dense"] == prompts["window"] and len(prompts["dense"]) == 2
    report = (tmp_path / "sparse" / "report.md").read_text()
    assert "could not be read" in report and "**Prompt 1**" in report and "sparsity" in report


def test_a_finished_cell_is_not_reused_under_other_settings(tmp_path):
    cfg = {**TINY, "seeds": [0], "methods": [{"name": "lora", "method": "lora", "r": 4}]}
    run_experiment(cfg, out_root=tmp_path, log=lambda *_: None)
    changed = {**cfg, "methods": [{"name": "lora", "method": "lora", "r": 4, "alpha": 4}]}
    with pytest.raises(ConfigError, match="method differ"):
        run_experiment(changed, out_root=tmp_path, log=lambda *_: None)
    with pytest.raises(ConfigError, match="data differ"):
        run_experiment({**cfg, "data": {**cfg["data"], "n_eval": 3}}, out_root=tmp_path, log=lambda *_: None)
    run_experiment(changed, out_root=tmp_path, fresh=True, log=lambda *_: None)
