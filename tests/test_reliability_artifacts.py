"""Issue 9 (reliability), checkpoints, caches and artifacts: resume refuses another run's
checkpoint, damage is caught by checksums, non-finite weights are refused, bookkeeping survives a
resume."""

import json

import pytest
import torch

from attnlab import attach, load_backbone, load_plugin
from attnlab.atomic import verify_dir
from attnlab.backbone import fingerprint
from attnlab.errors import AttnlabError, DamagedFile
from attnlab.experiment import run_experiment
from attnlab.modules import PluginError
from attnlab.train import TrainConfig, train

from .conftest import tiny_splits


def _cfg(**kw):
    return TrainConfig(**{"steps": 6, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False, **kw})


def _train(bb, out, steps, fp=None, logs=None, **kw):
    s = tiny_splits(bb, n_train=6)
    torch.manual_seed(0)  # the same LoRA initialisation in every run
    p = attach(bb.model, "lora", r=2)
    try:
        r = train(bb.model, p, s.train, _cfg(steps=steps, **kw), out_dir=out, pad_id=bb.tokenizer.pad_token_id,
                  run_fingerprint=fp, log=(logs.append if logs is not None else lambda *_: None))
        return r, {k: v.clone() for k, v in p.state_dict().items()}
    finally:
        p.detach()


def _stop_at(out, step):
    """Make the checkpoint look like the one a longer run wrote at `step` (as if it was killed there)."""
    from attnlab.atomic import write_manifest
    st = json.loads((out / "checkpoint" / "state.json").read_text())
    st["train"]["steps"] = step
    (out / "checkpoint" / "state.json").write_text(json.dumps(st))
    write_manifest(out / "checkpoint")


# --- 2. resume checks base, data and plug-in ------------------------------------------------------

def test_resume_refuses_a_checkpoint_of_another_base_or_data(tiny_llama, tmp_path):
    fp = {"base": "aaa", "data": "d1", "plugin": {"method": "lora"}}
    _train(tiny_llama, tmp_path, 3, fp=fp, checkpoint_every=3)
    _stop_at(tmp_path, 6)
    with pytest.raises(AttnlabError, match=r"another data \(data: d1 then, d2 now\).*--fresh"):
        _train(tiny_llama, tmp_path, 6, fp={**fp, "data": "d2"}, checkpoint_every=3)
    with pytest.raises(AttnlabError, match="another base"):
        _train(tiny_llama, tmp_path, 6, fp={**fp, "base": "bbb"}, checkpoint_every=3)


def test_a_run_resumed_onto_other_data_is_refused_not_finished(tmp_path):
    cfg = {"name": "r", "model": "tiny-gpt2", "seeds": [0],
           "data": {"dataset_name": "arithmetic", "n_train": 6, "n_val": 2, "n_eval": 2, "max_length": 400},
           "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False,
                     "checkpoint_every": 2},
           "eval": {"batch_size": 4, "generate": False}, "methods": [{"name": "lora", "method": "lora", "r": 2}]}
    run_experiment(cfg, out_root=tmp_path, log=lambda *_: None)
    cell = tmp_path / "r" / "lora" / "seed0"
    (cell / "result.json").unlink()  # as if it was killed before the result was written
    with pytest.raises(AttnlabError, match="data"):
        run_experiment({**cfg, "data": {**cfg["data"], "seed": 1}}, out_root=tmp_path, log=lambda *_: None)


# --- 3. the base fingerprint covers the body -------------------------------------------------------

def test_the_fingerprint_sees_a_different_body_behind_the_same_embedding(tiny):
    before = fingerprint(tiny.model, "x")
    other = load_backbone(tiny.spec)
    with torch.no_grad():
        next(p for n, p in other.model.named_parameters() if ".1." in n).add_(1e-3)  # layer 1 only
    after = fingerprint(other.model, "x")
    assert after["embedding_sha256"] == before["embedding_sha256"] and after["body_sha256"] != before["body_sha256"]


def test_the_fingerprint_is_the_same_with_any_plugin_attached(tiny):
    before = fingerprint(tiny.model, "x")
    for method, kw in [("lora", {}), ("head_ft", {}), ("backward_head", {"preset": "residual"}),
                       ("factorized", {"factor_dim": 8}), ("sparse", {"variant": "window", "block_size": 4})]:
        p = attach(tiny.model, method, **kw)
        assert fingerprint(tiny.model, "x") == before, method
        p.detach()


def test_a_plugin_is_refused_on_a_base_with_another_body(tiny, tmp_path):
    attach(tiny.model, "lora", r=2).save_pretrained(tmp_path / "p")
    other = load_backbone(tiny.spec)
    with torch.no_grad():
        next(p for n, p in other.model.named_parameters() if ".1." in n).mul_(1.01)
    with pytest.raises(PluginError, match="body_sha256"):
        load_plugin(other.model, tmp_path / "p")


# --- 5. bookkeeping after a resume with log_every > 1 ----------------------------------------------

def test_tokens_and_the_loss_curve_survive_a_resume_with_log_every(tiny_llama, tmp_path):
    import shutil
    whole, w_whole = _train(tiny_llama, tmp_path / "a", 6, checkpoint_every=3, log_every=2)
    # the same run killed during step 6: its last checkpoint is the one of step 3, metrics went on to 4
    _train(tiny_llama, tmp_path / "b", 6, checkpoint_every=3, log_every=2)
    shutil.rmtree(tmp_path / "b" / "checkpoint")
    (tmp_path / "b" / "checkpoint.prev").rename(tmp_path / "b" / "checkpoint")
    logs = []
    resumed, w_resumed = _train(tiny_llama, tmp_path / "b", 6, logs=logs, checkpoint_every=3, log_every=2)
    assert any("resumed from step 3" in x for x in logs)
    assert resumed.tokens == whole.tokens and [h["step"] for h in resumed.history] == [2, 4, 6]
    drop = ("elapsed_s", "tokens_per_s")
    strip = lambda hs: [{k: v for k, v in h.items() if k not in drop} for h in hs]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert strip(a) == strip(b)
    assert all(torch.equal(w_whole[k], w_resumed[k]) for k in w_whole)


# --- 6. non-finite weights --------------------------------------------------------------------------

def test_nan_weights_are_never_saved_or_loaded(tiny_llama, tmp_path):
    p = attach(tiny_llama.model, "lora", r=2)
    p.save_pretrained(tmp_path / "ok")
    with torch.no_grad():
        next(iter(p.trainable_parameters().values())).fill_(float("nan"))
    with pytest.raises(PluginError, match="NaN or inf"):
        p.save_pretrained(tmp_path / "nan")
    p.detach()
    # a file with NaN weights written by someone else (manifest and all) is refused on load
    from safetensors.torch import load_file, save_file
    from attnlab.atomic import write_manifest
    state = load_file(str(tmp_path / "ok" / "plugin.safetensors"))
    state[next(iter(state))].fill_(float("nan"))
    save_file(state, str(tmp_path / "ok" / "plugin.safetensors"))
    write_manifest(tmp_path / "ok")
    with pytest.raises(PluginError, match="NaN or inf"):
        load_plugin(tiny_llama.model, tmp_path / "ok")
    assert getattr(tiny_llama.model, "_attnlab_plugin", None) is None


# --- 7 and 9. damaged files -------------------------------------------------------------------------

def test_a_truncated_plugin_file_is_refused_naming_the_file(tiny_llama, tmp_path):
    attach(tiny_llama.model, "lora", r=2).save_pretrained(tmp_path / "p")
    tiny_llama.model._attnlab_plugin.detach()
    f = tmp_path / "p" / "plugin.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DamagedFile, match="plugin.safetensors is damaged"):
        load_plugin(tiny_llama.model, tmp_path / "p")


@pytest.mark.parametrize("meta,needle", [({"method": "lora", "config": {}}, "missing or wrong: base"),
                                         ("not json", "not JSON")])
def test_a_plugin_config_without_base_or_unreadable_is_a_clear_error(tiny_llama, tmp_path, meta, needle):
    from attnlab.atomic import write_manifest
    attach(tiny_llama.model, "lora", r=2).save_pretrained(tmp_path / "p")
    tiny_llama.model._attnlab_plugin.detach()
    (tmp_path / "p" / "attnlab_plugin.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    write_manifest(tmp_path / "p")
    with pytest.raises(AttnlabError, match=needle):
        load_plugin(tiny_llama.model, tmp_path / "p")


def test_a_plugin_of_an_unknown_method_is_a_clear_error(tiny_llama, tmp_path):
    from attnlab.atomic import write_manifest
    attach(tiny_llama.model, "lora", r=2).save_pretrained(tmp_path / "p")
    tiny_llama.model._attnlab_plugin.detach()
    meta = json.loads((tmp_path / "p" / "attnlab_plugin.json").read_text())
    (tmp_path / "p" / "attnlab_plugin.json").write_text(json.dumps({**meta, "method": "mystery"}))
    write_manifest(tmp_path / "p")
    with pytest.raises(PluginError, match="'mystery', which is not registered here; available: frozen"):
        load_plugin(tiny_llama.model, tmp_path / "p")


@pytest.mark.parametrize("damage", ["truncate_plugin", "truncate_optimizer", "empty_state", "torn_state"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_good_one(tiny_llama, tmp_path, damage):
    _train(tiny_llama, tmp_path, 4, checkpoint_every=2)  # checkpoints at 2 (kept as .prev) and 4
    _stop_at(tmp_path, 6)
    st = json.loads((tmp_path / "checkpoint.prev" / "state.json").read_text())
    assert st["step"] == 2
    ck = tmp_path / "checkpoint"
    f = {"truncate_plugin": ck / "plugin.safetensors", "truncate_optimizer": ck / "optimizer.safetensors",
         "empty_state": ck / "state.json", "torn_state": ck / "state.json"}[damage]
    data = f.read_bytes()
    f.write_bytes(b"" if damage == "empty_state" else data[: len(data) // 2])
    logs = []
    with pytest.raises(AttnlabError, match="other training settings"):  # .prev was written by a 4-step run
        _train(tiny_llama, tmp_path, 6, logs=logs, checkpoint_every=2)
    assert any("is damaged" in x for x in logs)


def test_a_damaged_checkpoint_with_nothing_to_fall_back_to_starts_fresh(tiny_llama, tmp_path):
    _train(tiny_llama, tmp_path, 2, checkpoint_every=2)
    _stop_at(tmp_path, 4)
    (tmp_path / "checkpoint" / "optimizer.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / ".checkpoint.x1y2").mkdir()  # a half-written folder a crash left
    logs = []
    r, _ = _train(tiny_llama, tmp_path, 4, logs=logs, checkpoint_every=2)
    assert r.resumed_from == 0 and r.steps == 4
    assert any("starting lora from step 0" in x for x in logs) and any("half-written" in x for x in logs)
    assert not (tmp_path / ".checkpoint.x1y2").exists()
    assert verify_dir(tmp_path / "checkpoint")


def test_a_torn_last_metrics_line_is_dropped_not_a_crash(tiny_llama, tmp_path):
    _train(tiny_llama, tmp_path, 2, checkpoint_every=2)
    _stop_at(tmp_path, 4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    logs = []
    r, _ = _train(tiny_llama, tmp_path, 4, logs=logs, checkpoint_every=2)
    assert r.resumed_from == 2 and any("torn" in x for x in logs)
    assert [h["step"] for h in r.history] == [1, 2, 3, 4]


def test_a_damaged_feature_cache_is_rebuilt(tiny, tmp_path):
    from attnlab.features import build_feature_cache
    s = tiny_splits(tiny, n_train=4)
    c = build_feature_cache(tiny.model, tiny.spec, s.train, tiny.tokenizer.pad_token_id, 2, root=tmp_path)
    good = c.batch([0, 1])[0].clone()
    raw = bytearray((c.path / "hidden.npy").read_bytes())
    raw[-8:] = b"\x00\x7c" * 4  # plausible fp16 bytes (inf), same size
    (c.path / "hidden.npy").write_bytes(bytes(raw))
    logs = []
    c2 = build_feature_cache(tiny.model, tiny.spec, s.train, tiny.tokenizer.pad_token_id, 2, root=tmp_path,
                             log=logs.append)
    assert any("damaged" in x and "rebuilding" in x for x in logs)
    assert torch.equal(c2.batch([0, 1])[0], good)


def test_a_damaged_result_file_is_recomputed(tmp_path):
    cfg = {"name": "r", "model": "tiny-gpt2", "seeds": [0],
           "data": {"dataset_name": "arithmetic", "n_train": 4, "n_val": 2, "n_eval": 2, "max_length": 400},
           "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False},
           "eval": {"batch_size": 4, "generate": False}, "methods": [{"name": "lora", "method": "lora", "r": 2}]}
    first = run_experiment(cfg, out_root=tmp_path, log=lambda *_: None)
    (tmp_path / "r" / "lora" / "seed0" / "result.json").write_text('{"method": "lo')
    logs = []
    again = run_experiment(cfg, out_root=tmp_path, log=logs.append)
    assert any("damaged" in x for x in logs)
    assert again["cells"][0]["eval"]["perplexity"] == first["cells"][0]["eval"]["perplexity"]


# --- early stopping on validation ------------------------------------------------------------------

def test_early_stopping_keeps_the_best_weights(tiny_llama, tmp_path):
    s = tiny_splits(tiny_llama, n_train=6)
    script = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    seen = {}

    def val():
        v = next(script)
        seen[v] = {k: t.clone() for k, t in p.state_dict().items()}
        return v

    p = attach(tiny_llama.model, "lora", r=2)
    r = train(tiny_llama.model, p, s.train, _cfg(steps=12, eval_every=1, patience=2), pad_id=tiny_llama.tokenizer.pad_token_id,
              val_fn=val, log=lambda *_: None)
    assert r.stopped_early and r.steps == 4 and r.best_step == 2
    assert [v for _, v in r.val_history] == [3.0, 2.0, 2.5, 2.6]
    assert all(torch.equal(p.state_dict()[k], seen[2.0][k]) for k in seen[2.0])
    p.detach()


def test_validation_history_and_best_weights_survive_a_resume(tiny_llama, tmp_path):
    import shutil
    s = tiny_splits(tiny_llama, n_train=6)

    def run(out):
        torch.manual_seed(0)
        p = attach(tiny_llama.model, "lora", r=2)
        val = lambda: float((sum(v.float().abs().sum() for v in p.state_dict().values()) - 3.0) ** 2)  # noqa: E731
        r = train(tiny_llama.model, p, s.train, _cfg(steps=6, eval_every=1, checkpoint_every=2), out_dir=out,
                  pad_id=tiny_llama.tokenizer.pad_token_id, val_fn=val, log=lambda *_: None)
        w = {k: v.clone() for k, v in p.state_dict().items()}
        p.detach()
        return r, w

    whole, w_whole = run(tmp_path / "a")
    run(tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoint")  # killed after step 5: the last checkpoint is step 4's
    (tmp_path / "b" / "checkpoint.prev").rename(tmp_path / "b" / "checkpoint")
    resumed, w_resumed = run(tmp_path / "b")
    assert resumed.resumed_from == 4
    assert resumed.val_history == whole.val_history and resumed.best_step == whole.best_step
    assert all(torch.equal(w_whole[k], w_resumed[k]) for k in w_whole)
