"""Issue 24 (reliability v2), saved plug-ins, manifests, checkpoints and temp folders: save_pretrained
never replaces what is not its own, manifests are required and confined to their folder, a failed
write names the file and leaves the run resumable, and only temp folders attnlab marked are
cleaned. Each test failed against the code before this issue."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab import attach, load_plugin
from attnlab.atomic import TEMP_MARK, WriteFailed, verify_dir, write_manifest
from attnlab.errors import DamagedFile, UnsafePath
from attnlab.modules import PluginError

from .test_reliability_artifacts import _train


def _user_folder(path: Path) -> Path:
    (path / "chapters").mkdir(parents=True)
    (path / "thesis.tex").write_text("three years")
    (path / "chapters" / "one.tex").write_text("intro")
    return path


def _saved(bb, path):
    p = attach(bb.model, "lora", r=2)
    p.save_pretrained(path)
    p.detach()
    return path


# --- save_pretrained writes only into a new, empty or its own folder ---------------------------------

@pytest.mark.parametrize("target", ["user_folder", "file", "plugin_with_user_file", "symlink_to_user_folder"])
def test_save_pretrained_refuses_anything_but_a_new_empty_or_plugin_folder(tiny_llama, tmp_path, target):
    user = _user_folder(tmp_path / "thesis")
    path = {"user_folder": user, "file": user / "thesis.tex", "plugin_with_user_file": tmp_path / "p",
            "symlink_to_user_folder": tmp_path / "link"}[target]
    if target == "plugin_with_user_file":
        _saved(tiny_llama, path)
        (path / "my_notes.txt").write_text("mine")
    if target == "symlink_to_user_folder":
        path.symlink_to(user)
    p = attach(tiny_llama.model, "lora", r=2)
    with pytest.raises(UnsafePath, match="save_pretrained: .*(new or empty folder)"):
        p.save_pretrained(path)
    p.detach()
    assert (user / "thesis.tex").read_text() == "three years" and (user / "chapters" / "one.tex").is_file()
    assert not list(user.parent.glob(".thesis*")) and not list(user.glob(".thesis.tex*"))
    if target == "plugin_with_user_file":
        assert (path / "my_notes.txt").read_text() == "mine"


def test_save_pretrained_may_replace_its_own_plugin_and_fill_an_empty_folder(tiny_llama, tmp_path):
    _saved(tiny_llama, tmp_path / "p")
    _saved(tiny_llama, tmp_path / "p")          # saved again over its own
    (tmp_path / "empty").mkdir()
    _saved(tiny_llama, tmp_path / "empty")
    assert verify_dir(tmp_path / "p") and verify_dir(tmp_path / "empty")


# --- manifests are required, well-formed and confined ---------------------------------------------------

def test_a_plugin_whose_manifest_was_deleted_is_refused_even_if_its_weights_were_changed(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tiny_llama, tmp_path / "p")
    state = load_file(str(path / "plugin.safetensors"))
    save_file({k: v * 100 for k, v in state.items()}, str(path / "plugin.safetensors"))
    (path / "manifest.json").unlink()
    with pytest.raises(DamagedFile, match="has no manifest.json"):
        load_plugin(tiny_llama.model, path)
    assert getattr(tiny_llama.model, "_attnlab_plugin", None) is None


def test_a_checkpoint_without_manifest_is_not_resumed_from(tiny_llama, tmp_path):
    _train(tiny_llama, tmp_path, 4, checkpoint_every=2)
    st = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({**st, "step": 30, "train": {
        **st["train"], "steps": 40}}))
    (tmp_path / "checkpoint" / "manifest.json").unlink()
    logs = []
    r, _ = _train(tiny_llama, tmp_path, 4, checkpoint_every=2, logs=logs)
    assert r.resumed_from == 2, logs   # from checkpoint.prev, the last one that verifies
    assert any("has no manifest.json" in line for line in logs), logs


def test_a_plugin_without_body_hash_is_refused_unless_the_user_says_so(tiny_llama, tmp_path):
    path = _saved(tiny_llama, tmp_path / "p")
    meta = json.loads((path / "attnlab_plugin.json").read_text())
    del meta["base"]["body_sha256"]
    (path / "attnlab_plugin.json").write_text(json.dumps(meta))
    write_manifest(path)
    with pytest.raises(PluginError, match="does not record its base's body_sha256.*allow_missing_body_hash"):
        load_plugin(tiny_llama.model, path)
    load_plugin(tiny_llama.model, path, allow_missing_body_hash=True).detach()


@pytest.mark.parametrize("entry", ["../../../../../../../etc/passwd", "/etc/passwd", "link"])
def test_a_manifest_may_name_only_files_inside_its_folder(tiny_llama, tmp_path, entry):
    path = _saved(tiny_llama, tmp_path / "p")
    outside = tmp_path / "secret.txt"
    outside.write_text("not attnlab's")
    if entry == "link":
        (path / "link").symlink_to(outside)
    m = json.loads((path / "manifest.json").read_text())
    m["files"][entry] = {"sha256": "0" * 64, "size": 1}
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DamagedFile, match="is not a file inside"):
        load_plugin(tiny_llama.model, path)


@pytest.mark.parametrize("manifest", [{"files": []}, {"files": {"plugin.safetensors": 1}}, {"files": None},
                                      {"files": {"plugin.safetensors": {"sha256": 1, "size": "2"}}}])
def test_a_manifest_of_the_wrong_shape_is_a_damaged_file_not_a_crash(tiny_llama, tmp_path, manifest):
    path = _saved(tiny_llama, tmp_path / "p")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DamagedFile, match="manifest.json is damaged"):
        load_plugin(tiny_llama.model, path)


def test_a_manifest_that_leaves_out_the_weights_is_refused(tiny_llama, tmp_path):
    path = _saved(tiny_llama, tmp_path / "p")
    m = json.loads((path / "manifest.json").read_text())
    del m["files"]["plugin.safetensors"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DamagedFile, match="does not list plugin.safetensors"):
        load_plugin(tiny_llama.model, path)


# --- a failed write names the file and leaves the run resumable ------------------------------------------

def test_disk_full_while_checkpointing_names_the_file_and_the_rerun_resumes(tiny_llama, tmp_path, monkeypatch):
    import attnlab.train as tr

    _, want = _train(tiny_llama, tmp_path / "whole", 4, checkpoint_every=2)
    real, calls = tr.save_file, []

    def full_disk(state, path):
        calls.append(path)
        if len(calls) > 2:   # the second checkpoint's optimizer file (first: plugin, optimizer)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(state, path)

    monkeypatch.setattr(tr, "save_file", full_disk)
    with pytest.raises(WriteFailed, match=r"could not write .*checkpoint \(No space left on device\); free disk space"):
        _train(tiny_llama, tmp_path / "cut", 4, checkpoint_every=2)
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "cut").iterdir() if p.name.startswith(".checkpoint.")]
    r, got = _train(tiny_llama, tmp_path / "cut", 4, checkpoint_every=2)
    assert r.resumed_from == 2
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_file_size_limit_during_a_run_is_one_line_naming_the_checkpoint(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model: tiny-gpt2\ndata: {dataset_name: arithmetic, n_train: 4, n_val: 2, n_eval: 2, max_length: 400}\n"
        "train: {steps: 2, batch_size: 2, progress: false, warmup_steps: 0}\neval: {generate: false}\n"
        "methods:\n  - {method: lora, r: 2}\n")
    code = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 1024, 20 * 1024))\nfrom attnlab.cli import main\n"
            "sys.exit(main(['run', 'c.yaml', '--out', 'runs']))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "could not write" in err[-1] and "checkpoint (File too large); raise the file size limit" in err[-1], err[-1]
    from attnlab.cli import main   # the same command, without the limit, finishes the run

    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "c" / "lora" / "seed0" / "result.json").is_file()


# --- temp folders: cleaned at the next start, only attnlab's own ---------------------------------------

def _temp(folder: Path, name: str, marked: bool) -> Path:
    t = folder / name
    t.mkdir(parents=True)
    (t / "half.bin").write_bytes(b"x" * 10)
    if marked:
        (t / TEMP_MARK).write_text("")
    return t


def test_marked_temp_folders_in_a_run_folder_are_cleaned_at_the_next_start_and_no_others(tmp_path):
    from attnlab.experiment import run_experiment

    from .test_reliability_v2 import TINY, quiet

    run_experiment(TINY, out_root=tmp_path, **quiet)
    cell = tmp_path / "tiny" / "lora" / "seed0"
    ours = [_temp(cell, ".plugin.a1b2c3", True), _temp(cell, ".checkpoint.d4e5f6", True)]
    theirs = _temp(cell, ".plugin.mine", False)
    run_experiment(TINY, out_root=tmp_path, **quiet)
    assert not any(t.exists() for t in ours) and (theirs / "half.bin").is_file()


def test_only_marked_checkpoint_and_feature_cache_temps_are_removed(tiny, tmp_path):
    from attnlab.features import build_feature_cache

    from .conftest import tiny_splits

    ours = [_temp(tmp_path / "run", ".checkpoint.x1", True), _temp(tmp_path / "features", ".abc.x2", True)]
    theirs = [_temp(tmp_path / "run", ".checkpoint.user", False), _temp(tmp_path / "features", ".abc.user", False)]
    _train(tiny, tmp_path / "run", 1)
    s = tiny_splits(tiny, n_train=2)
    build_feature_cache(tiny.model, tiny.spec, s.train, tiny.tokenizer.pad_token_id, root=tmp_path / "features",
                        log=lambda *_: None)
    assert not any(t.exists() for t in ours)
    assert all((t / "half.bin").is_file() for t in theirs)


def test_two_writers_of_one_file_never_share_a_temp_and_the_file_gets_an_ordinary_mode(tmp_path):
    import stat
    import threading

    from attnlab.atomic import write_text_atomic
    target = tmp_path / "result.json"
    texts = [f'{{"writer": {i}}}' * 20000 for i in range(8)]
    errors = []

    def write(text):
        for _ in range(5):
            try:
                write_text_atomic(target, text)
            except Exception as e:                          # a shared temp: renamed away by another writer
                errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert target.read_text() in texts                     # one writer's whole text, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]   # no temp left behind
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & stat.S_IRUSR and mode & stat.S_IWUSR and not mode & stat.S_IXUSR


def test_a_text_write_that_fails_midway_leaves_no_temp_and_keeps_the_old_file(tmp_path):
    from attnlab.atomic import write_text_atomic
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(Exception):
        write_text_atomic(target, "lone surrogate \udcff cannot be encoded")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]      # the temp used to stay behind


def test_text_writes_are_utf8_whatever_the_locale(tmp_path):
    # under the C locale without UTF-8 mode, open() encodes ASCII: a '±' in a report failed, and a
    # Latin-1 locale would have written bytes that docs check then calls not UTF-8
    code = ("import sys; from attnlab.atomic import write_text_atomic; "
            "write_text_atomic(sys.argv[1], 'PPL 3.5 \\u00b1 0.1')")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.md")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-300:]
    assert (tmp_path / "r.md").read_bytes() == "PPL 3.5 \u00b1 0.1".encode("utf-8")


@pytest.mark.parametrize("where, message", [
    ("folder", r"out: it is a folder, not a file"),
    ("under_file", r"afile is a file, not a folder"),
    ("under_broken_link", r"gone is a broken symlink, not a folder")])
def test_a_text_write_onto_a_folder_or_under_a_file_names_what_is_in_the_way(tmp_path, where, message):
    from attnlab.atomic import write_text_atomic
    (tmp_path / "out").mkdir()
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    target = {"folder": tmp_path / "out", "under_file": tmp_path / "afile" / "sub" / "r.md",
              "under_broken_link": tmp_path / "gone" / "r.md"}[where]
    with pytest.raises(WriteFailed, match=message) as e:
        write_text_atomic(target, "text")
    assert "\n" not in str(e.value) and ".tmp" not in str(e.value)    # it used to name its temp file
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["afile", "gone", "out"]


def test_fresh_removes_a_temp_an_interrupted_atomic_write_left_and_keeps_a_user_file_of_a_like_name(tmp_path):
    import tempfile

    from attnlab.runfolder import clean, prepare_run_folder, unlock
    out = tmp_path / "tiny"
    unlock(prepare_run_folder(out, False, "tiny"))
    fd, left = tempfile.mkstemp(prefix=".results.json.", suffix=".tmp", dir=out)   # as write_text_atomic names it
    os.close(fd)
    mine = [out / ".my.json.x1.tmp", out / ".results.json.tmp.bak", out / "results.json.abc.tmp"]
    for p in mine:
        p.write_text("mine")
    kept = clean(out)
    assert not Path(left).exists()
    assert sorted(kept) == sorted(mine) and all(p.read_text() == "mine" for p in mine)
