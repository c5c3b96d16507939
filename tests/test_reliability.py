"""Issue 9 (reliability), config, run-folder and data cases: each was reproduced against the old
code (data loss, a silent wrong answer, or a traceback) and is now a clear one-line error, a
counted skip, or refused. Artifact and checkpoint cases are in test_reliability_artifacts.py."""

import json
import math

import pytest

from attnlab.cli import main
from attnlab.errors import AttnlabError, ConfigError, DataError, UnsafePath
from attnlab.experiment import MARKER, load_config, run_experiment

TINY = {
    "name": "tiny",
    "model": "tiny-gpt2",
    "seeds": [0],
    "data": {"dataset_name": "arithmetic", "n_train": 4, "n_val": 2, "n_eval": 2, "max_length": 400},
    "train": {"steps": 1, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False},
    "eval": {"batch_size": 4, "generate": False},
    "methods": [{"name": "lora", "method": "lora", "r": 2}],
}
quiet = {"log": lambda *_: None}


def write_yaml(path, text):
    path.write_text(text)
    return path


def cli_error(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- 1. data loss: names, run folder, --fresh ------------------------------------------------------

@pytest.mark.parametrize("bad", ["../victim", "a/b", "..", "", 123, "x/../../y"])
def test_a_run_name_must_be_one_folder_name(bad):
    with pytest.raises(ConfigError, match="name"):
        load_config({**TINY, "name": bad})


def test_a_method_name_cannot_leave_the_run_folder():
    with pytest.raises(ConfigError, match="not a valid name"):
        load_config({**TINY, "methods": [{"name": "../../x", "method": "lora"}]})


def test_fresh_never_deletes_a_folder_attnlab_did_not_create(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    with pytest.raises(UnsafePath, match="not created by attnlab"):
        run_experiment({**TINY, "out_dir": str(victim)}, fresh=True, **quiet)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_out_dir_dot_never_empties_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(UnsafePath):
        run_experiment({**TINY, "out_dir": "."}, fresh=True, **quiet)
    with pytest.raises(UnsafePath):
        run_experiment({**TINY, "out_dir": ".."}, fresh=True, **quiet)
    assert (tmp_path / "config.yaml").is_file()


def test_fresh_deletes_only_what_attnlab_wrote_in_a_marked_run_folder(tmp_path):
    run_experiment(TINY, out_root=tmp_path, **quiet)
    out = tmp_path / "tiny"
    assert (out / MARKER).is_file()
    (out / "old_method" / "seed0").mkdir(parents=True)
    (out / "old_method" / "seed0" / "result.json").write_text("{}")   # attnlab's, from an earlier config
    (out / "notes.txt").write_text("the user's")
    run_experiment(TINY, out_root=tmp_path, fresh=True, **quiet)
    assert not (out / "old_method").exists() and (out / "results.json").is_file()
    assert (out / "notes.txt").read_text() == "the user's"


# --- 4. values that trained silently in the wrong direction ---------------------------------------

@pytest.mark.parametrize("key,value", [("max_grad_norm", -1), ("min_lr_ratio", -3), ("weight_decay", -1),
                                       ("steps", "ten"), ("steps", 2.5), ("warmup_steps", -1)])
def test_bad_train_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config({**TINY, "train": {**TINY["train"], key: value}})


def test_a_repeated_seed_is_refused():
    with pytest.raises(ConfigError, match="repeats a seed"):
        load_config({**TINY, "seeds": [0, 0]})


def test_unknown_data_keys_are_refused():
    with pytest.raises(ConfigError, match="n_trian"):
        load_config({**TINY, "data": {"n_trian": 5}})


def test_negative_n_on_the_command_line_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "tiny-gpt2", "--n", "-1"])
    assert e.value.code == 2 and "expected a number >= 1" in capsys.readouterr().err


# --- 6. non-finite results --------------------------------------------------------------------------

def test_a_non_finite_result_is_an_error_and_saves_no_plugin(tmp_path, monkeypatch):
    import attnlab.experiment as ex

    real = ex._evaluate

    def nan_metrics(*a, **k):
        metrics, per_example, samples = real(*a, **k)
        metrics["test"].update(cross_entropy=math.nan, perplexity=math.nan)
        return metrics, per_example, samples

    monkeypatch.setattr(ex, "_evaluate", nan_metrics)
    with pytest.raises(AttnlabError, match="not finite"):
        run_experiment(TINY, out_root=tmp_path, **quiet)
    assert not (tmp_path / "tiny" / "lora" / "seed0" / "plugin").exists()
    assert not (tmp_path / "tiny" / "lora" / "seed0" / "result.json").exists()


# --- 8. config mistakes: one line naming the key, the value and what is expected ---------------------

def test_lr_written_1e_3_is_a_number(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", "model: tiny-gpt2\ntrain:\n  lr: 1e-3\nmethods:\n  - method: lora\n")
    cfg = load_config(p)
    assert cfg["train"]["lr"] == "1e-3"  # as written; it trains as the number 0.001
    from attnlab.experiment import train_points
    assert train_points(cfg["train"], "train")[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("text,needle", [
    ("train:\n  steps: ten\n", "train.steps: 'ten' is not an integer"),
    ("train:\n  steps: 2.5\n", "train.steps: 2.5 is not an integer"),
    ("methods:\n  - method: lora\n    r: four\n", "methods.lora.r: 'four' is not an integer"),
    ("train:\n  stepz: 3\n", "unknown key"),
    ("data:\n  - arithmetic\n", "data: expected a mapping"),
    ("- a\n- b\n", "expected a mapping"),
    ("name: [unclosed\n", "not valid YAML at line"),
    ("name: 123\n", "name: 123 is not a valid name"),
    ("methods: []\n", "non-empty list"),
    ("methods:\n  - method: loar\n", "unknown method 'loar'; available: frozen, lora"),
    ("eval_sets:\n  t: {dataset_name: arithmetic, families: tranfer}\n", "eval_sets.t.families: 'tranfer' is not"),
    ("data: {level: 9}\n", "data.level: 9 is not a level in 1..5"),
    ("train: {batch_size: [1, 2]}\n", "['batch_size'] cannot be a list"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, capsys, text, needle):
    p = write_yaml(tmp_path / "bad.yaml", "model: tiny-gpt2\n" + text if not text.startswith("-") else text)
    err = cli_error(capsys, ["run", str(p), "--out", str(tmp_path / "runs")])
    assert needle in err, err
    assert not (tmp_path / "runs").exists(), "nothing is written before the config is valid"


def test_an_empty_train_section_means_the_defaults(tmp_path):
    p = write_yaml(tmp_path / "c.yaml", "model: tiny-gpt2\ntrain:\nmethods:\n  - method: frozen\n")
    assert load_config(p)["train"]["steps"] == 50


# --- 10. bad data ------------------------------------------------------------------------------------

def test_a_folder_as_data_path_is_an_error_even_with_a_fallback(tmp_path):
    from attnlab import load_backbone
    from attnlab.data import build_splits

    bb = load_backbone("tiny-gpt2")
    with pytest.raises(DataError, match="is a folder"):
        build_splits({"dataset_name": "gsm8k", "path": str(tmp_path), "fallback": {"dataset_name": "arithmetic"}},
                     bb.tokenizer)


def test_a_non_utf8_jsonl_line_is_skipped_and_counted_with_its_line_number(tmp_path):
    from attnlab.data import SkipLog, load_records

    p = tmp_path / "g.jsonl"
    good = [json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) for i in range(3)]
    p.write_bytes((good[0] + "\n").encode() + b'{"question": "caf\xe9", "answer": "#### 1"}\n'
                  + "\n".join(good[1:]).encode() + b"\n")
    log = SkipLog()
    recs = load_records({"dataset_name": "gsm8k", "path": str(p)}, log=log)
    assert len(recs) == 3 and log.skipped == 1
    assert any("g.jsonl line 2: not UTF-8" in x for x in log.examples)


def test_columns_without_equals_is_a_one_line_error(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"q": "a", "a": "b"}) + "\n")
    err = cli_error(capsys, ["data", "preview", "--dataset", "local", "--path", str(p), "--columns", "q"])
    assert "--columns: 'q' is not FIELD=COLUMN" in err
    with pytest.raises(ConfigError, match="data.columns: 'q' is not a mapping"):
        load_config({**TINY, "data": {"dataset_name": "local", "path": str(p), "columns": "q"}})


# --- 11. a typo in --methods fails first --------------------------------------------------------------

def test_a_methods_typo_fails_before_anything_is_overwritten(tmp_path, capsys):
    run_experiment(TINY, out_root=tmp_path, **quiet)
    results = (tmp_path / "tiny" / "results.json").read_text()
    p = tmp_path / "c.yaml"
    import yaml
    p.write_text(yaml.safe_dump({**TINY, "name": "tiny"}))
    err = cli_error(capsys, ["run", str(p), "--out", str(tmp_path), "--methods", "loar"])
    assert "['loar'] not in this config; its methods are: lora" in err
    err = cli_error(capsys, ["run", str(p), "--out", str(tmp_path), "--methods", ""])
    assert "its methods are: lora" in err
    assert (tmp_path / "tiny" / "results.json").read_text() == results
