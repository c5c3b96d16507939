"""bf16 on the tiny models (small enough for bf16 on CPU): the base in bf16, plug-in weights kept
in fp32, losses in fp32, and the settings that cannot work refused in one line."""

import math
import warnings

import pytest
import torch

from attnlab import attach, load_backbone
from attnlab.data import collate
from attnlab.errors import ConfigError
from attnlab.experiment import load_config, run_experiment
from attnlab.precision import autocast, compute_dtype, resolve_model_dtype
from attnlab.train import TargetLoss, TrainConfig, train

from .conftest import tiny_splits

METHODS = [("lora", {"r": 4}), ("factorized", {"lora_r": 2, "factor_dim": 8}), ("sparse", {}), ("head_ft", {}),
           ("backward_head", {"preset": "residual"}), ("backward_head", {"projection": "mlp", "latent_dim": 16})]


@pytest.fixture
def bf16_llama():
    bb = load_backbone("tiny-llama", dtype=torch.bfloat16)
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}
    return bb


@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}{o}" for m, o in METHODS])
def test_a_bf16_base_trains_fp32_plugin_weights_with_an_fp32_loss(bf16_llama, method, opts):
    bb = bf16_llama
    s = tiny_splits(bb, n_train=8)
    torch.manual_seed(0)
    p = attach(bb.model, method, **opts)
    before = {k: v.float().clone() for k, v in p.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on CPU is warned about: wanted here
        r = train(bb.model, p, s.train, TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, progress=False))
    params = p.trainable_parameters()
    assert {v.dtype for v in params.values()} == {torch.float32}, "plug-in weights are fp32 master weights"
    assert all(q.dtype == torch.bfloat16 for q in bb.model.parameters() if not q.requires_grad), "the base stays bf16"
    assert all(math.isfinite(h["loss"]) for h in r.history) and r.steps == 2
    assert any(not torch.equal(before[k], v.detach().cpu()) for k, v in params.items()), "training changed nothing"
    batch = collate(s.train[:2], bb.tokenizer.pad_token_id)
    with autocast(bb.model, torch.bfloat16):
        loss = TargetLoss(bb.model, p.objective)(**batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    p.detach()


def test_mixed_precision_on_an_fp32_base_keeps_everything_fp32_but_the_matmuls(tiny_llama):
    s = tiny_splits(tiny_llama, n_train=8)
    p = attach(tiny_llama.model, "lora", r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = train(tiny_llama.model, p, s.train, TrainConfig(steps=2, batch_size=4, mixed_precision="bf16",
                                                             progress=False))
    assert all(math.isfinite(h["loss"]) for h in r.history)
    assert {q.dtype for q in tiny_llama.model.parameters()} == {torch.float32}


def test_precision_settings_that_cannot_work_are_refused_in_one_line(tiny_llama, bf16_llama):
    with pytest.raises(ConfigError, match=r"train.mixed_precision: 'fp8' is not one of \['bf16', 'fp16', 'no'\]"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ConfigError, match="the base is stored in bf16: set mixed_precision: bf16"):
        compute_dtype(bf16_llama.model, "no")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_model_dtype("fp16", "cpu")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        compute_dtype(tiny_llama.model, "fp16")
    with pytest.raises(ConfigError, match="model_dtype: 'half' is not one of"):
        load_config({"model": "tiny-llama", "model_dtype": "half"})
    with pytest.warns(UserWarning, match="bf16 on CPU is far slower than fp32"):
        assert resolve_model_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_model_dtype("auto", "cpu") == torch.float32 and resolve_model_dtype(None, "cpu") == torch.float32
    with pytest.warns(UserWarning, match="bf16 on CPU"):
        assert compute_dtype(tiny_llama.model, None) is None and compute_dtype(bf16_llama.model, None) == torch.bfloat16


def test_a_bf16_experiment_runs_end_to_end_on_cpu(tmp_path):
    cfg = {"name": "bf16", "model": "tiny-llama", "model_dtype": "bf16", "seeds": [0],
           "data": {"dataset_name": "arithmetic", "n_train": 8, "n_val": 4, "n_eval": 4, "max_length": 400},
           "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "progress": False},
           "eval": {"batch_size": 4, "generate": True, "n_generate": 2, "max_new_tokens": 4},
           "methods": [{"name": "frozen", "method": "frozen"}, {"name": "lora", "method": "lora", "r": 4},
                       {"name": "backward_head", "method": "backward_head", "preset": "residual"},
                       {"name": "factorized", "method": "factorized", "lora_r": 2, "factor_dim": 8}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_experiment(cfg, out_root=tmp_path, log=lambda *_: None)
    cells = {c["method"]: c for c in res["cells"]}
    assert set(cells) == {"frozen", "lora", "backward_head", "factorized"}
    for c in cells.values():
        assert math.isfinite(c["eval"]["cross_entropy"]), c["method"]
    assert cells["frozen"]["eval"]["kl_base_model"] < 1e-6
    assert (tmp_path / "bf16" / "lora" / "seed0" / "plugin" / "plugin.safetensors").is_file()


def test_flush_subnormals_sets_values_below_the_smallest_normal_float_to_zero():
    from attnlab.precision import flush_subnormals
    torch.set_flush_denormal(False)         # an in-process `attnlab` (cli.main) of an earlier test left it on
    tiny = torch.tensor([1e-39, 1e-30])
    assert tiny[0].item() != 0.0
    try:
        if not flush_subnormals():
            pytest.skip("this CPU cannot flush subnormals")
        out = (tiny * 1.0).tolist()
        assert out[0] == 0.0 and out[1] == pytest.approx(1e-30)
    finally:
        torch.set_flush_denormal(False)     # the default: leave the test process as it was
    assert (tiny * 1.0)[0].item() != 0.0
