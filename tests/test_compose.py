"""Several plug-ins of different kinds on one base: composition, conflicts, detach in any order,
disable(), and save/load while composed."""

import itertools

import pytest
import torch

import attnlab
from attnlab import attach, attached, disabled, load_backbone, load_plugin, unpatch
from attnlab.backbone import fingerprint
from attnlab.modules import PluginError

from .conftest import logits_of

IDS = torch.tensor([[5, 80, 77, 33, 101, 9, 64, 200, 17, 3, 250, 42]])

OPTIONS = {"lora": {"r": 2}, "head_ft": {}, "backward_head": {"preset": "residual"},
           "factorized": {"factor_dim": 8, "lora_r": 2}, "sparse": {"variant": "window", "block_size": 4, "window": 4}}


def _options(method, combo):
    if method == "lora" and "factorized" in combo:  # factorized carries a LoRA adapter named 'attnlab' already
        return {**OPTIONS["lora"], "adapter_name": "extra"}
    return OPTIONS[method]


def _perturb(plugin, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plugin.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_base(model, base_logits, base_params, impl):
    assert torch.equal(logits_of(model, IDS), base_logits), "the base function is not restored bit for bit"
    now = dict(model.named_parameters())
    assert set(now) == set(base_params), sorted(set(now) ^ set(base_params))[:4]
    assert all(torch.equal(now[n], base_params[n]) for n in now)
    assert all(not p.requires_grad for p in now.values())
    assert model.config._attn_implementation == impl and not hasattr(model.config, "_attnlab_inner_attn")
    assert attached(model) == [] and model._attnlab_plugin is None and not hasattr(model, "peft_config")


PAIRS = [("lora", "head_ft"), ("sparse", "backward_head"), ("factorized", "lora"), ("lora", "backward_head"),
         ("sparse", "lora")]
TRIPLES = [("factorized", "lora", "head_ft"), ("sparse", "lora", "backward_head")]


def _cases(combos):
    cases = [(c, order) for c in combos for order in itertools.permutations(range(len(c)))]
    return {"argvalues": cases, "ids": [f"{'+'.join(c)}-detach{''.join(map(str, o))}" for c, o in cases]}


@pytest.mark.parametrize("combo,order", **_cases(PAIRS))
def test_detaching_two_composed_plugins_in_either_order_restores_the_exact_base(tiny, combo, order):
    _compose_and_detach(tiny.model, combo, order)


@pytest.mark.parametrize("combo,order", **_cases(TRIPLES))
def test_detaching_three_composed_plugins_in_every_order_restores_the_exact_base(tiny_llama, combo, order):
    _compose_and_detach(tiny_llama.model, combo, order)


def _compose_and_detach(m, combo, order):
    base, params, impl, fp = logits_of(m, IDS), _snapshot(m), m.config._attn_implementation, fingerprint(m, "x")
    plugins = []
    for i, method in enumerate(combo):
        plugins.append(attach(m, method, **_options(method, combo)))
        _perturb(plugins[-1], seed=i + 1)
    assert [p for p in attached(m) if p._owner is None] == plugins
    assert not torch.allclose(logits_of(m, IDS), base)
    assert fingerprint(m, "x") == fp, "the base fingerprint must not see attached plug-ins"
    for i in order:
        plugins[i].detach()
    _assert_base(m, base, params, impl)


def _alone(spec, plugin):
    """The function of `plugin` with its weights, alone on a fresh base."""
    bb = load_backbone(spec)
    attach(bb.model, plugin.method, **vars(plugin.config)).load_state_dict(plugin.state_dict())
    return logits_of(bb.model, IDS)


@pytest.mark.parametrize("combo", [("lora", "head_ft"), ("sparse", "backward_head"), ("factorized", "lora"),
                                   ("lora", "backward_head")], ids="+".join)
def test_composition_adds_each_change_and_disable_leaves_out_exactly_one(tiny, combo):
    m = tiny.model
    base = logits_of(m, IDS)
    a, b = (attach(m, method, **_options(method, combo)) for method in combo)
    _perturb(a, 1)
    _perturb(b, 2)
    both = logits_of(m, IDS)
    a_alone, b_alone = _alone(tiny.spec, a), _alone(tiny.spec, b)
    assert not torch.allclose(both, a_alone) and not torch.allclose(both, b_alone)
    params_a, params_b = a.trainable_parameters(), b.trainable_parameters()
    with a.disable():
        torch.testing.assert_close(logits_of(m, IDS), b_alone, rtol=0, atol=1e-6)
        assert a.model is None and attached(m)[-1] is b
    with b.disable():
        torch.testing.assert_close(logits_of(m, IDS), a_alone, rtol=0, atol=1e-6)
    with disabled(m):
        assert torch.equal(logits_of(m, IDS), base)
    assert torch.equal(logits_of(m, IDS), both), "after disable the composed function is back, bit for bit"
    # the same parameter objects: an optimizer built before disable() still trains the live weights
    for before, plugin in ((params_a, a), (params_b, b)):
        after = plugin.trainable_parameters()
        assert before.keys() == after.keys() and all(after[k] is before[k] for k in before)
        assert all(p.requires_grad for p in after.values())


def test_an_optimizer_built_before_disable_still_trains_the_plugin(tiny_llama):
    m = tiny_llama.model
    lora = attach(m, "lora", r=2)
    head = attach(m, "head_ft")
    _perturb(lora)
    opt = torch.optim.SGD(lora.trainable_parameters().values(), lr=1.0)
    with lora.disable():
        ref = logits_of(m, IDS)      # e.g. a reference pass without the adapter
    before = logits_of(m, IDS)
    loss = m(input_ids=IDS).logits.float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(logits_of(m, IDS), before), "the optimizer stepped parameters the model no longer uses"
    assert not torch.equal(ref, before)
    head.detach()
    lora.detach()


@pytest.mark.parametrize("first,second,needle", [
    ({"method": "factorized", "factor_dim": 8}, {"method": "sparse", "variant": "window", "block_size": 4},
     "attention implementation"),
    ({"method": "sparse", "variant": "window", "block_size": 4}, {"method": "factorized", "factor_dim": 8},
     "attention implementation"),
    ({"method": "head_ft"}, {"method": "backward_head"}, "output head"),
    ({"method": "backward_head"}, {"method": "lora", "target_modules": ["lm_head"]}, "output head"),
    ({"method": "lora", "r": 2}, {"method": "lora", "r": 4}, "already carries a 'lora' plug-in with adapter_name"),
    ({"method": "factorized", "factor_dim": 8}, {"method": "lora"}, r"lora' plug-in \(part of 'factorized'\)"),
    ({"method": "head_ft"}, {"method": "head_ft"}, "already carries a 'head_ft'"),
])
def test_a_conflicting_second_plugin_is_refused_in_one_line_and_changes_nothing(tiny, first, second, needle):
    m = tiny.model
    base, params, impl = logits_of(m, IDS), _snapshot(m), m.config._attn_implementation
    p = attach(m, **first)
    _perturb(p)
    with_first, on = logits_of(m, IDS), attached(m)
    with pytest.raises(PluginError, match=needle) as e:
        attach(m, **second)
    assert "\n" not in str(e.value)
    assert attached(m) == on and m._attnlab_plugin is p
    assert torch.equal(logits_of(m, IDS), with_first)
    p.detach()
    _assert_base(m, base, params, impl)


def test_factorized_composes_its_lora_as_a_part(tiny):
    m = tiny.model
    fa = attach(m, "factorized", factor_dim=8, lora_r=2)
    (part,) = [p for p in attached(m) if p._owner is fa]
    assert part.method == "lora" and m._attnlab_plugin is fa
    assert set(part.trainable_parameters()) < set(fa.trainable_parameters())
    with pytest.raises(PluginError, match="part of the 'factorized' plug-in; detach that one"):
        part.detach()
    with pytest.raises(PluginError, match="part of the 'factorized' plug-in; disable that one"):
        with part.disable():
            pass
    _perturb(fa)
    alone = logits_of(m, IDS)
    extra = attach(m, "lora", r=2, adapter_name="extra")
    _perturb(extra, 3)
    shared = [mod for mod in m.modules() if hasattr(mod, "lora_A") and len(mod.lora_A) == 2]
    assert shared and all(mod.active_adapters == ["attnlab", "extra"] for mod in shared)
    assert not torch.allclose(logits_of(m, IDS), alone)
    extra.detach()  # deletes its own adapter only; factorized's stays active
    assert torch.equal(logits_of(m, IDS), alone)
    assert all(mod.active_adapters == ["attnlab"] for mod in shared)
    fa.detach()
    assert attached(m) == [] and part.model is None


def test_unpatch_removes_the_attention_plugin_and_keeps_the_others(tiny_llama):
    m = tiny_llama.model
    head = attach(m, "head_ft")
    attnlab.patch(m, "sparse", variant="window", block_size=4)
    unpatch(m)
    assert attached(m) == [head] and m.config._attn_implementation == "sdpa"
    with pytest.raises(PluginError, match="not patched"):
        unpatch(m)
    head.detach()


def test_composed_plugins_save_and_load_one_by_one(tiny, tmp_path):
    m = tiny.model
    lora, head = attach(m, "lora", r=2), attach(m, "backward_head", preset="residual")
    _perturb(lora, 1)
    _perturb(head, 2)
    expected = logits_of(m, IDS)
    lora.save_pretrained(tmp_path / "lora")
    head.save_pretrained(tmp_path / "head")
    fresh = load_backbone(tiny.spec)
    load_plugin(fresh.model, tmp_path / "head")
    load_plugin(fresh.model, tmp_path / "lora")
    assert torch.equal(logits_of(fresh.model, IDS), expected)


def test_the_fingerprint_ignores_lora_on_the_head_and_three_plugins_at_once(tiny):
    m = tiny.model
    fp = fingerprint(m, "x")
    p = attach(m, "lora", r=2, target_modules=["lm_head"])
    _perturb(p)
    assert fingerprint(m, "x") == fp
    p.detach()
    ps = [attach(m, "sparse", variant="window", block_size=4), attach(m, "lora", r=2), attach(m, "head_ft")]
    for q in ps:
        _perturb(q)
    assert fingerprint(m, "x") == fp
    for q in ps:
        q.detach()
