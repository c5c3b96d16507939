import pytest
import torch

from attnlab import attach, load_backbone, load_plugin
from attnlab.modules import METHODS, PluginError
from attnlab.train import TrainConfig, train

from .conftest import logits_of, tiny_splits

IDS = torch.tensor([[5, 80, 77, 33, 101, 9, 64, 200]])


def _perturb(plugin):
    # A trained-looking plug-in: nonzero everywhere (LoRA's B starts at zero).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in plugin.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# every registered method, in the configuration that starts from the base function
AT_INIT = {"frozen": {}, "lora": {}, "head_ft": {}, "backward_head": {"preset": "residual"}, "factorized": {},
           "sparse": {"variant": "dense"}, "mos_head": {"n_components": 3, "rank": 8}}


def test_every_method_is_covered():
    assert set(AT_INIT) == set(METHODS)


@pytest.mark.parametrize("method", list(AT_INIT))
def test_identity_at_init_and_exact_detach(tiny, method):
    base = logits_of(tiny.model, IDS)
    plugin = attach(tiny.model, method, **AT_INIT[method])
    # compare distributions: a head may return log-probabilities rather than raw logits
    torch.testing.assert_close(logits_of(tiny.model, IDS).log_softmax(-1), base.log_softmax(-1), atol=1e-5, rtol=0)
    _perturb(plugin)
    if plugin.num_trainable():
        assert not torch.allclose(logits_of(tiny.model, IDS), base)
    plugin.detach()
    assert torch.equal(logits_of(tiny.model, IDS), base), "detach must restore the base bit for bit"
    assert all(not p.requires_grad for p in tiny.model.parameters())


def test_lora_defaults_per_family():
    g, l = load_backbone("tiny-gpt2"), load_backbone("tiny-llama")
    pg, pl = attach(g.model, "lora", r=4), attach(l.model, "lora", r=4)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in pg.trainable_parameters()} == {"c_attn", "c_proj"}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in pl.trainable_parameters()} == \
        {"q_proj", "k_proj", "v_proj", "o_proj"}
    # tiny-gpt2: 2 layers; c_attn 64->192, attn c_proj 64->64, mlp c_proj 256->64; r=4 (A: r x in, B: out x r)
    assert pg.num_trainable() == 2 * 4 * ((64 + 192) + (64 + 64) + (256 + 64))


@pytest.mark.parametrize("method", ["lora", "head_ft", "backward_head", "factorized", "mos_head"])
def test_training_changes_only_the_plugin(tiny, method):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    s = tiny_splits(tiny, n_train=8)
    plugin = attach(tiny.model, method, **AT_INIT[method])
    trainable = plugin.trainable_parameters()
    start = {n: p.detach().clone() for n, p in trainable.items()}
    train(tiny.model, plugin, s.train, TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0,
                                                   progress=False), pad_id=tiny.tokenizer.pad_token_id)
    assert any(not torch.equal(p, start[n]) for n, p in trainable.items()), "the plug-in did not train"
    plugin.detach()
    after = dict(tiny.model.named_parameters())
    assert set(after) == set(before)
    for n, p in after.items():
        assert torch.equal(p, before[n]), f"base weight {n} changed"


@pytest.mark.parametrize("method", ["lora", "head_ft", "backward_head", "factorized", "mos_head"])
def test_save_load_roundtrip_and_fingerprint(tiny, method, tmp_path):
    plugin = attach(tiny.model, method, **AT_INIT[method])
    _perturb(plugin)
    expected = logits_of(tiny.model, IDS)
    plugin.save_pretrained(tmp_path / "p")
    plugin.detach()
    fresh = load_backbone(tiny.spec)
    loaded = load_plugin(fresh.model, tmp_path / "p")
    assert torch.equal(logits_of(fresh.model, IDS), expected)
    loaded.detach()
    other = load_backbone("tiny-llama" if tiny.spec == "tiny-gpt2" else "tiny-gpt2")
    with pytest.raises(PluginError, match="Load it onto the base it was trained on"):
        load_plugin(other.model, tmp_path / "p")
    assert getattr(other.model, "_attnlab_plugin", None) is None


def test_misuse_gives_clear_errors(tiny_llama, tmp_path):
    m = tiny_llama.model
    p = attach(m, "lora")
    with pytest.raises(PluginError, match="already attached"):
        p.attach(m)
    with pytest.raises(PluginError, match="already carries a 'lora'"):  # another kind composes (tests/test_compose.py)
        attach(m, "lora")
    p.detach()
    with pytest.raises(PluginError, match="not attached"):
        p.detach()
    with pytest.raises(PluginError, match="unknown method 'nope'"):
        attach(m, "nope")
    with pytest.raises(PluginError, match="has no option"):
        attach(m, "lora", rank=4)
    with pytest.raises(PluginError, match="matched no module"):
        attach(m, "lora", target_modules=["no_such_proj"])
    assert getattr(m, "_attnlab_plugin", None) is None
    with pytest.raises(PluginError, match="not an attnlab plug-in"):
        load_plugin(m, tmp_path)


def test_registry_lists_the_baselines():
    assert {"frozen", "lora", "head_ft"} <= set(METHODS)


def test_reattach_keeps_learned_weights(tiny_llama):
    p = attach(tiny_llama.model, "lora", r=2)
    _perturb(p)
    trained = logits_of(tiny_llama.model, IDS)
    p.detach()
    p.attach(tiny_llama.model)
    assert torch.equal(logits_of(tiny_llama.model, IDS), trained)
    p.detach()
