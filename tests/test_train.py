import json
import math

import pytest

from attnlab.atomic import write_manifest
import torch

from attnlab import attach
from attnlab.train import NonFiniteLoss, TrainConfig, batch_order, lr_at, train

from .conftest import tiny_splits


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, lr=5e-3, warmup_steps=2, progress=False)
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [lr_at(s, c) for s in (0, 1)] == [0.5, 1.0]
    assert math.isclose(lr_at(2, c), 1.0)
    assert math.isclose(lr_at(6, c), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lr_at(10, c), 0.1)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    c = TrainConfig(batch_size=3, grad_accum=2, seed=7)
    epoch = [i for s in range(2) for mb in batch_order(12, c, s) for i in mb]
    assert sorted(epoch) == list(range(12))
    assert batch_order(12, c, 1) == batch_order(12, c, 1)
    assert batch_order(12, c, 0) != batch_order(12, TrainConfig(batch_size=3, grad_accum=2, seed=8), 0)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="train.lr: nan is not a finite number"):
        TrainConfig(lr=float("nan"))


def test_loss_goes_down_and_metrics_are_logged(tiny_llama, tmp_path):
    s = tiny_splits(tiny_llama, n_train=8)
    p = attach(tiny_llama.model, "lora", r=8)
    r = train(tiny_llama.model, p, s.train, _cfg(steps=12, lr=2e-2), out_dir=tmp_path,
              pad_id=tiny_llama.tokenizer.pad_token_id)
    losses = [h["loss"] for h in r.history]
    assert losses[-1] < losses[0] - 0.3
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert r.tokens == rows[-1]["tokens"] > 0 and r.tokens_per_s > 0
    assert (tmp_path / "checkpoint" / "plugin.safetensors").is_file()
    p.detach()


def _run(bb, out, steps, **kw):
    s = tiny_splits(bb, n_train=8)
    torch.manual_seed(0)  # LoRA's A matrices are random: seed before attaching, as the runner does
    p = attach(bb.model, "lora", r=4)
    r = train(bb.model, p, s.train, _cfg(steps=steps, **kw), out_dir=out, pad_id=bb.tokenizer.pad_token_id)
    state = {k: v.clone() for k, v in p.state_dict().items()}
    p.detach()
    return r, state


def test_seeded_runs_are_identical_and_resume_is_exact(tiny_llama, tmp_path):
    full, w_full = _run(tiny_llama, tmp_path / "a", 6, checkpoint_every=3)
    again, w_again = _run(tiny_llama, tmp_path / "b", 6, checkpoint_every=3)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in again.history]
    # an interrupted run: 3 steps and a checkpoint, then the same command with more steps resumes
    _run(tiny_llama, tmp_path / "c", 3, checkpoint_every=3, )
    state = json.loads((tmp_path / "c" / "checkpoint" / "state.json").read_text())
    state["train"]["steps"] = 6  # as if the first run had been stopped after step 3 of 6
    (tmp_path / "c" / "checkpoint" / "state.json").write_text(json.dumps(state))
    write_manifest(tmp_path / "c" / "checkpoint")  # the checkpoint a 6-step run writes at step 3
    resumed, w_resumed = _run(tiny_llama, tmp_path / "c", 6, checkpoint_every=3)
    assert resumed.resumed_from == 3
    for k in w_full:
        torch.testing.assert_close(w_resumed[k], w_full[k], atol=1e-6, rtol=0)
    assert len((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()) == 6


def test_resume_refuses_changed_settings(tiny_llama, tmp_path):
    _run(tiny_llama, tmp_path, 2)
    with pytest.raises(ValueError, match="other training settings"):
        _run(tiny_llama, tmp_path, 2, lr=1e-1)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path):
    s = tiny_splits(tiny_llama, n_train=8)
    p = attach(tiny_llama.model, "lora", r=4)
    # Adam's first step moves every weight by ~lr: 1e30 overflows the next forward.
    with pytest.raises(NonFiniteLoss, match="last good checkpoint is kept"):
        train(tiny_llama.model, p, s.train, _cfg(steps=4, lr=1e30, warmup_steps=0, checkpoint_every=1),
              out_dir=tmp_path, pad_id=tiny_llama.tokenizer.pad_token_id)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    p.detach()


def test_frozen_base_trains_nothing(tiny_llama):
    p = attach(tiny_llama.model, "frozen")
    r = train(tiny_llama.model, p, [], _cfg())
    assert r.steps == 0 and r.tokens == 0
    p.detach()


def test_resume_refuses_a_checkpoint_of_other_plugin_options(tiny_llama, tmp_path):
    s = tiny_splits(tiny_llama, n_train=8)
    pad = tiny_llama.tokenizer.pad_token_id
    p = attach(tiny_llama.model, "lora", r=4)
    train(tiny_llama.model, p, s.train, _cfg(steps=4, checkpoint_every=2), out_dir=tmp_path, pad_id=pad)
    p.detach()
    q = attach(tiny_llama.model, "lora", r=4, alpha=4)   # same shapes, another function
    with pytest.raises(ValueError, match="written by 'lora' with options"):
        train(tiny_llama.model, q, s.train, _cfg(steps=4, checkpoint_every=2), out_dir=tmp_path, pad_id=pad)
    q.detach()


@pytest.mark.parametrize("method,opts", [("backward_head", {"preset": "paper", "dropout": 0.5}),
                                         ("lora", {"r": 2, "dropout": 0.5})])
def test_a_plug_ins_dropout_acts_in_training_steps_only(tiny_llama, method, opts):
    """Dropout set on a plug-in changes the training loss (it was silently inert when the trainer left
    every module in eval mode); validation and everything after training run without it."""
    from attnlab import attach

    s = tiny_splits(tiny_llama, n_train=8)
    pad = tiny_llama.tokenizer.pad_token_id
    losses, vals = {}, {}
    for drop in (0.0, opts["dropout"]):
        torch.manual_seed(0)
        p = attach(tiny_llama.model, method, **{**opts, "dropout": drop})
        assert not any(m.training for m in p.training_modules()), "dropout off outside training steps"
        with torch.no_grad():  # LoRA's B starts at zero, where dropout on its input changes nothing
            for q in p.trainable_parameters().values():
                q.add_(0.05 * torch.randn_like(q))
        modes = []
        r = train(tiny_llama.model, p, s.train, TrainConfig(steps=2, batch_size=4, lr=1e-9, eval_every=1,
                                                            progress=False), pad_id=pad,
                  val_fn=lambda: modes.append(any(m.training for m in p.training_modules())) or 0.0)
        assert p.training_modules() and modes == [False, False]
        assert not any(m.training for m in p.training_modules())
        losses[drop] = r.history[0]["loss"]
        p.detach()
    # inert dropout gives bit-identical losses (same seed, same weights); active dropout does not
    assert abs(losses[0.0] - losses[opts["dropout"]]) > 1e-7 * abs(losses[0.0])
