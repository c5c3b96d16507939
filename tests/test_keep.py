"""A run with `keep:` survives the loss of its run folder (a fresh checkout): attnlab/keep.py."""

import json
import shutil

import pytest
import yaml

from attnlab.cli import main
from attnlab.errors import DataError
from attnlab.experiment import ConfigError, run_experiment

SWEEP = {
    "name": "kept",
    "model": "tiny-llama",
    "seeds": [0],
    "data": {"dataset_name": "arithmetic", "n_train": 8, "n_val": 4, "n_eval": 4, "max_length": 400},
    "train": {"steps": 6, "batch_size": 4, "lr": [1e-3, 1e-2, 3e-2], "warmup_steps": 1, "eval_every": 2,
              "progress": False},
    "eval": {"batch_size": 4, "generate": False},
    "methods": [{"name": "lora", "method": "lora", "r": 4}],
}


def _run(tmp_path, cfg=SWEEP, **kw):
    logs = []
    res = run_experiment(cfg, out_root=tmp_path / "runs", keep=str(tmp_path / "kept"), log=logs.append, **kw)
    return res, logs


def _fresh_checkout(tmp_path):
    shutil.rmtree(tmp_path / "runs")


class _Stop(KeyboardInterrupt):
    pass


def test_a_killed_sweep_resumes_from_the_kept_points_after_its_run_folder_is_lost(tmp_path):
    def kill_after_first_point(line):
        if "validation loss" in line:
            raise _Stop
    with pytest.raises(_Stop):
        run_experiment(SWEEP, out_root=tmp_path / "runs", keep=str(tmp_path / "kept"), log=kill_after_first_point)
    point = tmp_path / "kept" / "lora" / "seed0" / "sweep" / "lr=0.001.json"
    assert point.is_file() and not (tmp_path / "kept" / "lora" / "seed0" / "result.json").exists()
    assert "safetensors" not in json.dumps(sorted(p.name for p in (tmp_path / "kept").rglob("*")))
    _fresh_checkout(tmp_path)
    res, logs = _run(tmp_path)
    assert sum("read from the kept sweep" in l for l in logs) == 1
    assert sum(": validation loss" in l for l in logs) == 2          # only the two unfinished points trained
    assert len(res["cells"][0]["sweep"]) == 3
    assert (tmp_path / "kept" / "lora" / "seed0" / "result.json").is_file()


def test_a_kept_sweep_retrains_only_the_chosen_point_and_reproduces_its_numbers(tmp_path):
    first, _ = _run(tmp_path)
    (tmp_path / "kept" / "lora" / "seed0" / "result.json").unlink()   # killed during the test evaluation
    _fresh_checkout(tmp_path)
    second, logs = _run(tmp_path)
    assert sum("read from the kept sweep" in l for l in logs) == 3
    assert sum("training it again" in l for l in logs) == 1
    a, b = first["cells"][0], second["cells"][0]
    assert a["sweep"] == b["sweep"] and a["train"]["chosen"] == b["train"]["chosen"]
    retrained = b["train"]["retrained"]
    assert retrained["val_loss"] == pytest.approx(retrained["kept_val_loss"], rel=1e-5)
    assert b["eval"]["cross_entropy"] == pytest.approx(a["eval"]["cross_entropy"], rel=1e-5)  # the same weights


def test_a_finished_cell_is_read_back_from_the_kept_folder_alone(tmp_path):
    first, _ = _run(tmp_path)
    _fresh_checkout(tmp_path)
    second, logs = _run(tmp_path)
    assert any("read from the kept" in l and "result.json" in l for l in logs)
    assert not any("training it again" in l for l in logs)
    assert json.loads(json.dumps(first["cells"])) == second["cells"]


def test_kept_results_of_other_settings_are_refused_in_one_line(tmp_path):
    _run(tmp_path)
    _fresh_checkout(tmp_path)
    changed = {**SWEEP, "methods": [{"name": "lora", "method": "lora", "r": 2}]}
    with pytest.raises(ConfigError, match=r"result\.json was computed with other settings \(method differ\)") as e:
        _run(tmp_path, changed)
    assert "\n" not in str(e.value)
    (tmp_path / "kept" / "lora" / "seed0" / "result.json").unlink()
    _fresh_checkout(tmp_path)
    with pytest.raises(ConfigError, match=r"lr=0\.001\.json was trained with other settings \(run\.plugin differ\)"):
        _run(tmp_path, changed)


def test_fresh_never_deletes_kept_results(tmp_path):
    _run(tmp_path, {**SWEEP, "train": {**SWEEP["train"], "lr": 1e-2}})
    with pytest.raises(ConfigError, match="git rm -r"):
        _run(tmp_path, fresh=True)
    assert (tmp_path / "kept" / "lora" / "seed0" / "result.json").is_file()


def test_the_keep_flag_and_the_config_key_name_the_same_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = {**SWEEP, "train": {**SWEEP["train"], "lr": 1e-2, "steps": 2}, "keep": "from_config"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", "c.yaml", "--out", "runs"]) == 0
    assert (tmp_path / "from_config" / "lora" / "seed0" / "result.json").is_file()
    assert main(["run", "c.yaml", "--out", "runs2", "--keep", "from_flag"]) == 0
    assert (tmp_path / "from_flag" / "lora" / "seed0" / "result.json").is_file()
    capsys.readouterr()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**cfg, "methods": [{"name": "lora", "method": "lora", "r": 2}]}))
    shutil.rmtree(tmp_path / "runs")
    assert main(["run", "c.yaml", "--out", "runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "from_config/lora/seed0/result.json" in err and "differ" in err


def test_the_kept_cells_render_as_the_in_progress_tables(tmp_path, monkeypatch):
    from attnlab.published import render_one

    monkeypatch.chdir(tmp_path)
    cfg = {**SWEEP, "seeds": [0, 1], "sweep_seeds": "first", "keep": "kept", "order": ["lora:0", "frozen"],
           "methods": [{"name": "frozen", "method": "frozen"}, *SWEEP["methods"]]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert render_one("kept_sweep:c.yaml", tmp_path) == "No sweep point has finished yet."
    assert "| 1 | lora | 0 | to do |" in render_one("kept_run:c.yaml", tmp_path)
    res = run_experiment(str(tmp_path / "c.yaml"), out_root=tmp_path / "runs", log=lambda *_: None)
    (tmp_path / "kept" / "lora" / "seed1" / "result.json").unlink()
    table = render_one("kept_run:c.yaml", tmp_path)
    lora, frozen = res["cells"][1], res["cells"][0]
    assert table.startswith("2 of 3 cells done (kept in `kept`).")
    assert f"| 1 | lora | 0 | done | lr {lora['train']['chosen']['lr']:g} | {lora['val_loss']:.4f} |" in table
    assert f"| {lora['eval']['cross_entropy']:.4f} | {lora['eval']['perplexity']:.3f} |" in table
    change = lora["eval"]["perplexity"] / frozen["eval"]["perplexity"] - 1
    assert f"| {change:+.1%} |" in table and "| 3 | lora | 1 | to do |" in table
    sweep = render_one("kept_sweep:c.yaml", tmp_path)
    assert sweep.count("| lora | 0 | lr ") == 3 and sweep.count("✓") == 1 and "cap 6" in sweep


def test_the_chosen_point_is_retrained_only_to_its_kept_best_step(tmp_path):
    _run(tmp_path)
    cell = tmp_path / "kept" / "lora" / "seed0"
    (cell / "result.json").unlink()
    for f in (cell / "sweep").glob("*.json"):   # as if every point's best validation had come at step 2 of 6
        p = json.loads(f.read_text())
        step2 = dict(p["train"]["val_history"])[2]
        p["row"].update(best_step=2, val_loss=step2)
        p["train"]["best_step"] = 2
        f.write_text(json.dumps(p))
    _fresh_checkout(tmp_path)
    res, logs = _run(tmp_path)
    c = res["cells"][0]
    assert any("to its best step 2" in l for l in logs)
    assert c["train"]["retrained"]["val_loss"] == pytest.approx(c["val_loss"], rel=1e-6)
    assert c["train"]["best_step"] == 2


@pytest.mark.parametrize("text", ["[1, 2]", "null", '{"val_loss": 1.5}'])
def test_a_sweep_point_file_attnlab_did_not_write_is_refused_in_one_line_not_retrained_over(tmp_path, text):
    from attnlab.keep import Keep

    path = tmp_path / "kept" / "lora" / "seed0" / "sweep" / "lr0.001.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ConfigError, match="is not a sweep point attnlab kept"):
        Keep(tmp_path / "kept").point("lora", 0, "lr0.001", {"base": "x"})
    assert path.read_text() == text


def test_a_keep_folder_under_home_is_read_as_the_run_folder_reads_it(monkeypatch, tmp_path):
    from attnlab.keep import Keep

    monkeypatch.setenv("HOME", str(tmp_path))
    assert Keep("~/kept").root == tmp_path / "kept"


def test_a_run_sharing_the_keep_folder_never_overwrites_a_cell_or_point_another_config_kept_meanwhile(tmp_path):
    from attnlab.keep import Keep

    keep = Keep(tmp_path / "kept")
    theirs = {"spec": {"method": {"lr": 1e-2}}, "test": {"ppl": 3.0}}
    keep.save_result("lora", 0, theirs)                     # the other run finished first
    with pytest.raises(ConfigError, match="computed with other settings"):
        keep.save_result("lora", 0, {"spec": {"method": {"lr": 1e-3}}, "test": {"ppl": 4.0}})
    keep.save_point("lora", 0, "lr0.01", {"plugin": "theirs"}, {"val_loss": 1.0})
    with pytest.raises(ConfigError, match="trained with other settings"):
        keep.save_point("lora", 0, "lr0.01", {"plugin": "ours"}, {"val_loss": 2.0})
    assert json.loads((tmp_path / "kept" / "lora" / "seed0" / "result.json").read_text()) == theirs
    assert keep.point("lora", 0, "lr0.01", {"plugin": "theirs"})["row"] == {"val_loss": 1.0}


def test_kept_cells_and_points_of_an_edited_arm_are_refused_by_the_renderers_not_published(tmp_path):
    import dataclasses

    from attnlab.modules import make_config
    from attnlab.published import render_one

    cfg = {**SWEEP, "keep": "kept", "methods": [{"name": "lora", "method": "lora", "r": 8}]}   # r was 4
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cell = tmp_path / "kept" / "lora" / "seed0"
    (cell / "sweep").mkdir(parents=True)
    plugin = json.loads(json.dumps({"method": "lora", "options": dataclasses.asdict(make_config("lora", r=4))}))
    (cell / "sweep" / "lr0.001.json").write_text(json.dumps({"mark": {"run": {"plugin": plugin}, "point": {"steps": 6}},
                                                            "row": {"lr": 1e-3, "val_loss": 2.0}}))
    with pytest.raises(DataError, match="a point trained with other settings of lora"):
        render_one("kept_sweep:c.yaml", tmp_path)
    (cell / "result.json").write_text(json.dumps({"spec": {"method": {"name": "lora", "method": "lora", "r": 4}}}))
    with pytest.raises(DataError, match=r"computed with other settings of lora \(r differ\)"):
        render_one("kept_run:c.yaml", tmp_path)
