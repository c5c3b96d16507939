"""The lm-evaluation-harness adapter (attnlab/lm_eval_adapter.py) and the offline tasks it ships,
on the tiny random Llama and a few lines of data written here."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install -e '.[eval]')")
TASKS = Path(__file__).resolve().parents[1] / "attnlab" / "lm_eval_tasks"

TEXT = (" \n = Alpha = \n \n Alpha is a letter . It comes first , before beta . \n \n = = History = = \n \n"
        " It is very old . \n \n = Beta = \n \n Beta is the second letter . \n")


def problems(n=4):
    return [{"question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
             "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"} for i in range(n)]


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "gsm8k.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems()))
    (d / "wiki.txt").write_text(TEXT)
    return d


@pytest.fixture
def head_ft_plugin(tmp_path):
    """A saved head_ft plug-in of tiny-llama whose head is moved away from the base's."""
    from attnlab import attach, load_backbone

    bb = load_backbone("tiny-llama")
    p = attach(bb.model, "head_ft")
    torch.manual_seed(1)
    with torch.no_grad():
        p.trainable_parameters()["lm_head.weight"].add_(0.5 * torch.randn_like(bb.model.lm_head.weight))
    return p.save_pretrained(tmp_path / "head_ft")


def rolling_loglikelihood(lm, text):
    from lm_eval.api.instance import Instance

    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    return lm.loglikelihood_rolling([req], disable_tqdm=True)[0]


def direct_loglikelihood(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    return float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())


@needs_lm_eval
def test_lm_eval_scores_text_through_the_plugin_exactly_as_the_model_computes_it(head_ft_plugin):
    from attnlab.lm_eval_adapter import AttnlabLM

    text = "Alpha is a letter. It comes first, before beta."
    base = AttnlabLM(base="tiny-llama", batch_size=1)
    with_head = AttnlabLM(base="tiny-llama", plugin=str(head_ft_plugin), batch_size=1)
    assert base.plugin is None and with_head.plugin.method == "head_ft"
    ids = [base.prefix_token_id] + base.tok_encode(text)
    ll_base, ll_head = rolling_loglikelihood(base, text), rolling_loglikelihood(with_head, text)
    assert math.isfinite(ll_base) and math.isfinite(ll_head)
    assert ll_base == pytest.approx(direct_loglikelihood(base.model, ids), rel=1e-4)
    # HFLM's constructor re-ties a tied base's head; the plug-in must still be what is scored
    assert with_head.model.lm_head is with_head.plugin._head
    assert ll_head == pytest.approx(direct_loglikelihood(with_head.model, ids), rel=1e-4)
    assert abs(ll_head - ll_base) > 1.0


@needs_lm_eval
def test_tasks_read_local_files_and_results_json_is_written_inside_the_output_folder(data, tmp_path, head_ft_plugin):
    from attnlab.lm_eval_adapter import evaluate

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t_gsm8k.yaml").write_text(
        f"include: {TASKS / 'attnlab_gsm8k.yaml'}\ntask: t_gsm8k\nnum_fewshot: 1\n"
        f"dataset_kwargs: {{data_files: {{train: {data / 'gsm8k.jsonl'}}}}}\n"
        "generation_kwargs: {until: ['Question:'], do_sample: false, max_gen_toks: 4}\n")
    (tasks / "t_wiki.yaml").write_text(
        f"include: {TASKS / 'attnlab_wikitext.yaml'}\ntask: t_wiki\n"
        f"dataset_kwargs: {{data_files: {{validation: {data / 'wiki.txt'}}}, sample_by: document}}\n")
    before = set(tmp_path.rglob("*"))
    runs = {}
    for name, plugin in (("base", None), ("head_ft", head_ft_plugin)):
        out = tmp_path / "out" / name
        res = evaluate("tiny-llama", plugin, ["t_gsm8k", "t_wiki"], out, limit=2, include_path=[tasks])
        assert json.loads((out / "results.json").read_text()) == res
        assert res["n-samples"]["t_gsm8k"]["effective"] == 2 and res["n-samples"]["t_wiki"]["effective"] == 2
        assert 0.0 <= res["results"]["t_gsm8k"]["exact_match,strict-match"] <= 1.0
        runs[name] = res["results"]["t_wiki"]
    for r in runs.values():
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("word_perplexity,none", "bits_per_byte,none"))
    assert runs["head_ft"]["word_perplexity,none"] != pytest.approx(runs["base"]["word_perplexity,none"], rel=1e-3)
    written = set(tmp_path.rglob("*")) - before
    assert written and all((tmp_path / "out") in p.parents or p == tmp_path / "out" for p in written)


@needs_lm_eval
def test_the_cli_runs_a_shipped_task_on_another_data_file_and_records_its_command(data, tmp_path, capsys):
    from attnlab.cli import main

    out = tmp_path / "out"
    argv = ["lm-eval", "--model", "tiny-llama", "--tasks", "attnlab_wikitext", "--limit", "1",
            "--data-file", f"attnlab_wikitext={data / 'wiki.txt'}", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == "attnlab " + " ".join(argv)          # a results file says what made it
    assert res["n-samples"]["attnlab_wikitext"] == {"original": 2, "effective": 1}
    assert math.isfinite(res["results"]["attnlab_wikitext"]["byte_perplexity,none"])
    assert "attnlab_wikitext" in capsys.readouterr().out


@needs_lm_eval
def test_a_data_file_that_is_not_there_is_one_line_naming_data_file(tmp_path, monkeypatch):
    from attnlab.errors import AttnlabError
    from attnlab.lm_eval_adapter import task_specs

    monkeypatch.chdir(tmp_path)  # the default ../shared/data/... is not there
    with pytest.raises(AttnlabError, match="--data-file attnlab_gsm8k=PATH"):
        task_specs(["attnlab_gsm8k"], [], {})
    with pytest.raises(AttnlabError, match="no task"):
        task_specs(["attnlab_nope"], [], {})


def test_attnlab_imports_and_says_how_to_install_lm_eval_without_it():
    code = ("import sys; sys.modules['lm_eval'] = None\n"   # as if it were not installed
            "import attnlab, attnlab.cli\n"
            "rc = attnlab.cli.main(['lm-eval', '--model', 'tiny-llama', '--tasks', 'attnlab_wikitext'])\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert 'pip install -e ".[eval]"' in r.stderr and "Traceback" not in r.stderr


def test_a_raw_wikitext_file_is_cut_into_articles_at_its_top_level_headings():
    import datasets

    spec = importlib.util.spec_from_file_location("attnlab_lm_eval_task_utils", TASKS / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    pages = utils.wikitext_articles(datasets.Dataset.from_dict({"text": [TEXT]}))["page"]
    assert [p.splitlines()[0] for p in pages] == [" = Alpha = ", " = Beta = "]
    assert "= = History = =" in pages[0] and "".join(pages) == TEXT[len(" \n"):]
