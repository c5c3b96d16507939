"""train.log_with: tensorboard through Accelerate's trackers, beside metrics.jsonl."""

import json

import pytest

from attnlab import attach, load_backbone
from attnlab.errors import ConfigError
from attnlab.train import TrainConfig, train

from .conftest import tiny_splits

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    EventAccumulator = None
needs_tensorboard = pytest.mark.skipif(EventAccumulator is None, reason="tensorboard is not installed (pip install tensorboard)")


@needs_tensorboard
def test_tensorboard_gets_every_logged_record_inside_the_run_folder_and_nowhere_else(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    bb = load_backbone("tiny-llama")
    plugin = attach(bb.model, "head_ft")
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, progress=False, log_with="tensorboard")
    run = tmp_path / "run"
    train(bb.model, plugin, tiny_splits(bb, n_train=8).train, cfg, out_dir=run, pad_id=bb.tokenizer.pad_token_id,
          log=lambda *a: None)
    events = sorted((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    assert not list(cwd.iterdir()) and {p.name for p in tmp_path.iterdir()} == {"cwd", "run"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert [e.step for e in acc.Scalars("lr")] == [1, 2, 3]


def test_log_with_takes_tensorboard_or_none_and_nothing_else():
    assert TrainConfig(log_with="none").log_with is None
    assert TrainConfig.from_dict({"log_with": None}).log_with is None
    with pytest.raises(ConfigError, match="train.log_with: 'wandb' is not supported; use tensorboard or none"):
        TrainConfig(log_with="wandb")


def test_log_with_tensorboard_when_it_is_not_installed_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setattr("accelerate.utils.is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        TrainConfig.from_dict({"log_with": "tensorboard"}, where="methods.lora.train")


@needs_tensorboard
def test_log_with_needs_a_run_folder_to_write_into():
    bb = load_backbone("tiny-llama")
    plugin = attach(bb.model, "head_ft")
    cfg = TrainConfig(steps=1, batch_size=2, progress=False, log_with="tensorboard")
    with pytest.raises(ConfigError, match="needs an out_dir"):
        train(bb.model, plugin, tiny_splits(bb, n_train=4).train, cfg, pad_id=bb.tokenizer.pad_token_id)
