"""Issue 24 (reliability v2), run folders, configs and data: nothing of the user's is deleted, one
run per folder, YAML aliases and `imports:` code cannot run away, lengths and odd data give one line
or a correct result. Each test failed against the code before this issue (checked by running this
file against that checkout). Plug-in, manifest and checkpoint cases: test_reliability_v2_artifacts.py;
command-line cases: probe_cli.py / test_reliability_cli.py."""

import json
import os
import subprocess
import sys
import time

import pytest

from attnlab.errors import AttnlabError, ConfigError, UnsafePath
from attnlab.experiment import load_config, run_experiment

from .test_reliability import TINY, quiet  # the tiny config the reliability tests share


def _user_files(folder):
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("three years")
    (folder / "sub" / "data.csv").write_text("1,2")


def _intact(folder):
    return (folder / "thesis.tex").read_text() == "three years" and (folder / "sub" / "data.csv").read_text() == "1,2"


# --- --fresh and the run folder --------------------------------------------------------------------

def test_fresh_refuses_the_run_folder_of_another_config_named_by_out_dir(tmp_path):
    run_experiment({**TINY, "name": "theirs"}, out_root=tmp_path, **quiet)
    theirs = tmp_path / "theirs"
    before = (theirs / "results.json").read_text()
    with pytest.raises(UnsafePath, match="run folder of config 'theirs', not of 'mine'"):
        run_experiment({**TINY, "name": "mine", "out_dir": str(theirs)}, fresh=True, **quiet)
    assert (theirs / "results.json").read_text() == before


def test_fresh_never_follows_a_symlinked_run_folder_out_of_out(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    run_experiment({**TINY, "out_dir": str(elsewhere)}, **quiet)   # a marked run folder of this config
    _user_files(elsewhere)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(elsewhere)
    with pytest.raises(UnsafePath, match="is a symlink"):
        run_experiment(TINY, out_root=tmp_path / "runs", fresh=True, **quiet)
    assert _intact(elsewhere) and (elsewhere / "results.json").is_file()


def test_fresh_keeps_every_file_attnlab_did_not_write_and_says_so(tmp_path):
    run_experiment(TINY, out_root=tmp_path, **quiet)
    out = tmp_path / "tiny"
    _user_files(out)
    (out / "lora" / "seed0" / "my_notes.md").write_text("mine")
    logs = []
    run_experiment(TINY, out_root=tmp_path, fresh=True, log=logs.append)
    assert _intact(out) and (out / "lora" / "seed0" / "my_notes.md").read_text() == "mine"
    assert any("kept 3 file(s) attnlab did not write" in line for line in logs), logs
    assert (out / "results.json").is_file()


# --- one run per folder --------------------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_is_refused_naming_the_first_ones_pid(tmp_path):
    from attnlab.runfolder import prepare_run_folder, unlock

    out = tmp_path / "tiny"
    unlock(prepare_run_folder(out, False, "tiny"))
    (out / "results.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '.attnlab-lock')!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AttnlabError, match=f"in use by another attnlab run \\(pid {holder.pid}\\)"):
            run_experiment(TINY, out_root=tmp_path, fresh=True, **quiet)
        assert (out / "results.json").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from attnlab.runfolder import prepare_run_folder, unlock

    out = tmp_path / "tiny"
    unlock(prepare_run_folder(out, False, "tiny"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".attnlab-lock").write_text(dead.stdout)
    logs = []
    lock = prepare_run_folder(out, True, "tiny", log=logs.append)
    unlock(lock)
    assert any(f"took over the lock of pid {dead.stdout.strip()}" in line for line in logs), logs
    assert (out / ".attnlab-lock").read_text().strip() == str(os.getpid())


def test_the_lock_is_released_when_a_run_fails(tmp_path, monkeypatch):
    import attnlab.experiment as ex

    monkeypatch.setattr(ex, "_run_one", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        run_experiment(TINY, out_root=tmp_path, **quiet)
    monkeypatch.undo()
    run_experiment(TINY, out_root=tmp_path, **quiet)  # not refused by a lock of its own


# --- YAML and imports: ------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "model: tiny-gpt2\ndata: &d {dataset_name: arithmetic}\neval_sets: {t: *d}\n",
    "model: tiny-gpt2\nseeds: &s [0]\n",
    "model: tiny-gpt2\nx: &a [1, 2]\ny: [*a, *a]\n",
])
def test_yaml_anchors_and_aliases_are_refused_while_parsing(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="anchors and aliases .* are not allowed"):
        load_config(p)


def test_a_billion_laughs_config_is_refused_at_once(tmp_path):
    rows = ["  - &a [x, x, x, x, x, x, x, x, x]"] + [f"  - &{c} [{', '.join(['*' + p] * 9)}]"
                                                   for p, c in zip("abcdefgh", "bcdefghi")]
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny-gpt2\ndata:\n dataset_name: arithmetic\n families:\n" + "\n".join(rows) + "\n")
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="anchors"):
        load_config(p)
    assert time.perf_counter() - t < 5


def _module(tmp_path, monkeypatch, name, code):
    (tmp_path / "mods").mkdir(exist_ok=True)
    (tmp_path / "mods" / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))


@pytest.mark.parametrize("code,needle", [("1 / 0\n", "raised ZeroDivisionError: division by zero"),
                                         ("raise SystemExit(3)\n", "raised SystemExit: 3"),
                                         ("raise KeyError('x')\n", "raised KeyError: 'x'")])
def test_a_module_in_imports_that_raises_is_one_line_naming_it(tmp_path, monkeypatch, code, needle):
    name = f"bad_{abs(hash(code)) % 10**6}"
    _module(tmp_path, monkeypatch, name, code)
    with pytest.raises(ConfigError, match=f"imports: importing '{name}' {needle}"):
        load_config({**TINY, "imports": [name]})


def test_imports_run_only_after_the_rest_of_the_config_is_valid(tmp_path, monkeypatch):
    flag = tmp_path / "ran"
    _module(tmp_path, monkeypatch, "side_effect_methods", f"open({str(flag)!r}, 'w').write('ran')\n")
    with pytest.raises(ConfigError, match="train.steps"):
        load_config({**TINY, "imports": ["side_effect_methods"], "train": {"steps": "ten"}})
    with pytest.raises(ConfigError, match="data.n_eval"):
        load_config({**TINY, "imports": ["side_effect_methods"], "data": {**TINY["data"], "n_eval": 0}})
    assert not flag.exists()
    load_config({**TINY, "imports": ["side_effect_methods"]})
    assert flag.read_text() == "ran"


# --- lengths ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["data", "eval_sets", "datasets"])
def test_a_max_length_past_the_models_positions_is_one_line_naming_the_key(tmp_path, where):
    cfg = {**TINY}
    if where == "data":
        cfg["data"] = {**TINY["data"], "max_length": 600}
    elif where == "eval_sets":
        cfg["eval_sets"] = {"long": {"dataset_name": "arithmetic", "n_eval": 2, "max_length": 513}}
    else:
        cfg["datasets"] = {"long": {"max_length": 1000}}
    with pytest.raises(AttnlabError, match=f"{where}.*max_length: .* is past the 512 positions tiny-gpt2 reads"):
        run_experiment(cfg, out_root=tmp_path, **quiet)


def test_generation_never_runs_past_the_models_positions():
    from attnlab import load_backbone
    from attnlab.data import Example
    from attnlab.evaluate import generate

    bb = load_backbone("tiny-gpt2")
    ex = [Example(input_ids=[65] * 508, labels=[-100] * 508, prompt_len=508)]
    stats = {}
    texts = generate(bb.model, bb.tokenizer, ex, max_new_tokens=100, batch_size=1, stats=stats)
    assert len(texts) == 1 and stats["n_cut_off"] <= 1   # 4 tokens fit; past them, an IndexError before


# --- data ---------------------------------------------------------------------------------------------

def _gsm(i):
    return {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_is_not_data(tmp_path, ext):
    from attnlab.data import SkipLog, load_records

    rows = [_gsm(i) for i in range(3)]
    p = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif ext == "json":
        text = json.dumps(rows)
    else:
        text = "question,answer\n" + "".join(f"\"{r['question']}\",\"{r['answer']}\"\n" for r in rows)
    p.write_text("\ufeff" + text, encoding="utf-8")
    log = SkipLog()
    recs = load_records({"dataset_name": "gsm8k", "path": str(p)}, log=log)
    assert len(recs) == 3 and log.skipped == 0, log.summary()


def test_a_pathological_jsonl_line_is_skipped_and_counted(tmp_path):
    from attnlab.data import SkipLog, load_records

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(_gsm(1)) + "\n" + "[" * 100_000 + "\n" + json.dumps(_gsm(2)) + "\n")
    log = SkipLog()
    recs = load_records({"dataset_name": "gsm8k", "path": str(p)}, log=log)
    assert len(recs) == 2 and log.skipped == 1
    assert any("d.jsonl line 2: JSON nested too deeply" in x for x in log.examples)


def test_a_txt_file_in_local_is_packed_into_blocks_like_wikitext(tmp_path):
    from attnlab import load_backbone
    from attnlab.data import build_splits

    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(f"Paragraph {i}: " + "some words of running text " * 12 for i in range(60)))
    bb = load_backbone("tiny-gpt2")
    s = build_splits({"dataset_name": "local", "path": str(p), "n_train": 4, "n_val": 1, "n_eval": 2,
                      "max_length": 64, "doc_chars": 300}, bb.tokenizer)
    assert s.kind == "lm" and len(s.train) == 4 and len(s.eval) == 2
    assert all(len(e.input_ids) == 64 for e in s.train + s.eval)


def test_qa_data_without_answers_scores_perplexity_and_says_it_skipped_answer_metrics(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Say {i} twice.", "target": f"{i} {i}"}) + "\n" for i in range(80)))
    cfg = {**TINY, "data": {"dataset_name": "local", "path": str(p), "n_train": 4, "n_val": 2, "n_eval": 3,
                            "max_length": 64},
           "eval": {"batch_size": 4, "generate": True, "n_generate": 2, "max_new_tokens": 4}}
    res = run_experiment(cfg, out_root=tmp_path, **quiet)
    cell = next(c for c in res["cells"] if c["method"] == "lora")
    assert cell["eval"]["perplexity"] > 0 and "accuracy" not in cell["eval"]
    assert "the data has no answers, so answer metrics" in (tmp_path / "tiny" / "report.md").read_text()
