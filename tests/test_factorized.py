import pytest
import torch

from attnlab import load_backbone
from attnlab.modules import PluginError, patch, unpatch
from attnlab.modules.attention import attention_modules
from attnlab.modules.factorized import ATTR

from .conftest import logits_of

IDS = torch.tensor([[5, 80, 77, 33, 101, 9, 64, 200, 17, 3]])


def _perturb(plugin, scale=0.1):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in plugin.trainable_parameters().values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_identity_at_init_then_a_real_change_then_exact_unpatch(tiny):
    base = logits_of(tiny.model, IDS)
    p = patch(tiny.model, "factorized")
    assert tiny.model.config._attn_implementation == "attnlab_factorized"
    assert (logits_of(tiny.model, IDS) - base).abs().max() <= 1e-5
    _perturb(p)
    assert (logits_of(tiny.model, IDS) - base).abs().max() > 1e-2
    unpatch(tiny.model)
    assert torch.equal(logits_of(tiny.model, IDS), base)
    assert tiny.model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, ATTR) for m in attention_modules(tiny.model))


def test_only_the_chosen_layers_change(tiny_llama):
    p = patch(tiny_llama.model, "factorized", layers=[1], lora_r=0)
    mods = attention_modules(tiny_llama.model)
    assert not hasattr(mods[0], ATTR) and hasattr(mods[1], ATTR)
    assert all(f"layers.1.self_attn.{ATTR}" in n for n in p.trainable_parameters())
    unpatch(tiny_llama.model)


def test_lora_is_trained_alongside(tiny):
    p = patch(tiny.model, "factorized", lora_r=4)
    names = list(p.trainable_parameters())
    assert any("lora_" in n for n in names) and any(ATTR in n for n in names)
    assert all(q.requires_grad for q in p.trainable_parameters().values())
    unpatch(tiny.model)


def test_kv_cache_generation_matches_no_cache(tiny):
    p = patch(tiny.model, "factorized")
    _perturb(p)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    a = tiny.model.generate(IDS, **kw)
    b = tiny.model.generate(IDS, use_cache=False, **kw)
    assert torch.equal(a, b)
    unpatch(tiny.model)


def test_eager_kernel_gives_the_same_outputs():
    outs = []
    for impl in ("sdpa", "eager"):
        bb = load_backbone("tiny-llama")
        bb.model.config._attn_implementation = impl
        torch.manual_seed(0)
        p = patch(bb.model, "factorized")
        _perturb(p)
        outs.append(logits_of(bb.model, IDS))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_bad_input_is_a_clear_error(tiny_llama):
    m = tiny_llama.model
    with pytest.raises(PluginError, match="out of range for a model with 2 layers"):
        patch(m, "factorized", layers=[0, 5])
    patch(m, "factorized")
    with pytest.raises(PluginError, match="already carries"):
        patch(m, "factorized")
    unpatch(m)
    with pytest.raises(PluginError, match="not patched"):
        unpatch(m)
    from transformers import OPTConfig, OPTForCausalLM
    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(PluginError, match="supported: gpt2, llama"):
        patch(opt, "factorized")


def test_trainable_counts_on_gpt2_small_match_the_proposal():
    # The proposal: 0.81M (LoRA r=8 on c_attn, c_proj) and 1.40M (with FactorizedAttention) on GPT-2
    # small. Factor width 2 x head_dim gives 1.41M; docs/factorized_attention.md explains the 0.8%.
    from transformers import GPT2Config, GPT2LMHeadModel

    from attnlab.modules import attach
    m = GPT2LMHeadModel(GPT2Config(n_positions=32))
    m.config._attn_implementation = "sdpa"
    m.requires_grad_(False)
    lora = attach(m, "lora", r=8, alpha=16)
    assert lora.num_trainable() == 811_008
    lora.detach()
    fa = patch(m, "factorized", lora_r=8, factor_dim=128)
    assert fa.num_trainable() == 1_411_752
    unpatch(m)


def test_recompute_gives_the_same_loss_and_gradients(tiny):
    ids = IDS.repeat(2, 3)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        p = patch(tiny.model, "factorized", lora_r=4, recompute=recompute)
        _perturb(p)
        tiny.model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: q.grad.clone() for n, q in p.trainable_parameters().items()})
        unpatch(tiny.model)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_the_module_equals_a_literal_implementation_of_the_proposal_away_from_identity():
    """The proposal's formula written out by hand (LayerNorm on q/k, w1 q ⊙ w2 q and w3 k ⊙ w4 k, GELU,
    projection, sigmoid-gated residual, per-head temperature), against the patched GPT-2 attention's
    output inside a real forward, with every added parameter perturbed away from its initial value."""
    import math

    import torch.nn.functional as F

    from attnlab import load_backbone, patch, unpatch

    bb = load_backbone("tiny-gpt2")
    plugin = patch(bb.model, "factorized", layers=[0], lora_r=0, factor_dim=8)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in plugin.trainable_parameters().values():
            p.add_(0.5 * torch.randn_like(p))
    attn = bb.model.transformer.h[0].attn
    P = attn.attnlab_factorized
    seen = {}

    def hook(module, args, kwargs, out):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["out"] = out[0]

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    ids = torch.randint(0, 250, (2, 11))
    with torch.no_grad():
        bb.model(input_ids=ids)
    handle.remove()

    def literal(x):
        B, T, E = x.shape
        H, d = attn.num_heads, attn.head_dim
        q, k, v = attn.c_attn(x).split(E, dim=2)
        q, k, v = (t.view(B, T, H, d).transpose(1, 2) for t in (q, k, v))

        def transform(z, norm, wa, wb, proj, alpha):
            zn = F.layer_norm(z, (d,), norm.weight, norm.bias, norm.eps)
            inter = F.gelu((zn @ wa.weight.T + wa.bias) * (zn @ wb.weight.T + wb.bias))
            return z + torch.sigmoid(alpha) * (inter @ proj.weight.T + proj.bias)

        q2 = transform(q, P.q_norm, P.q_w1, P.q_w2, P.q_proj, P.alpha_q)
        k2 = transform(k, P.k_norm, P.k_w3, P.k_w4, P.k_proj, P.alpha_k)
        logits = (q2 @ k2.transpose(-1, -2)) * P.log_temperature.exp().view(1, H, 1, 1) / math.sqrt(d)
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, E)
        return attn.c_proj(out)

    with torch.no_grad():
        want = literal(seen["x"])
    assert (P.q_proj.weight.abs().sum() > 0) and not torch.allclose(P.log_temperature, torch.zeros_like(P.log_temperature))
    assert torch.allclose(seen["out"], want, atol=1e-5), (seen["out"] - want).abs().max()
    unpatch(bb.model)


# --- placement: pre_rope / post_rope --------------------------------------------------------------

def _tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    m = Qwen3ForCausalLM(Qwen3Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    m.config._attn_implementation = "sdpa"
    return m.eval().requires_grad_(False)


def _model(family):
    return load_backbone("tiny-llama").model if family == "llama" else _tiny_qwen3()


@pytest.mark.parametrize("family,placement", [("llama", "post_rope"), ("llama", "pre_rope"), ("qwen3", "pre_rope")])
def test_identity_at_init_and_cached_decoding_equals_the_full_forward(family, placement):
    model = _model(family)
    base = logits_of(model, IDS)
    p = patch(model, "factorized", placement=placement, lora_r=2)
    assert (logits_of(model, IDS) - base).abs().max() <= 1e-5
    _perturb(p)
    full = logits_of(model, IDS)
    assert (full - base).abs().max() > 1e-2
    # the prompt's first 4 tokens at once, then one token at a time through the cache
    with torch.no_grad():
        out = model(input_ids=IDS[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, IDS.shape[1]):
            out = model(input_ids=IDS[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    unpatch(model)


def test_pre_rope_and_post_rope_compute_different_functions_with_the_same_weights(tiny_llama):
    m = tiny_llama.model
    p = patch(m, "factorized", placement="post_rope", lora_r=0)
    _perturb(p)
    state = p.state_dict()
    post = logits_of(m, IDS)
    unpatch(m)
    p = patch(m, "factorized", placement="pre_rope", lora_r=0)
    p.load_state_dict(state)
    pre = logits_of(m, IDS)
    unpatch(m)
    assert (pre - post).abs().max() > 1e-2


def test_detaching_pre_rope_restores_the_base_exactly_and_removes_its_hooks(tiny_llama):
    m = tiny_llama.model
    base = logits_of(m, IDS)
    p = patch(m, "factorized", placement="pre_rope")
    attn = attention_modules(m)[0]
    assert attn.q_proj._forward_hooks and attn._forward_pre_hooks
    _perturb(p)
    unpatch(m)
    assert torch.equal(logits_of(m, IDS), base)
    for a in attention_modules(m):
        assert not (a._forward_pre_hooks or a.q_proj._forward_hooks or a.k_proj._forward_hooks)


def test_pre_rope_is_refused_on_gpt2_and_an_unknown_placement_is_a_clear_error():
    bb = load_backbone("tiny-gpt2")
    with pytest.raises(PluginError, match="GPT-2 has none"):
        patch(bb.model, "factorized", placement="pre_rope")
    assert bb.model.config._attn_implementation == "sdpa" and not any(p.requires_grad for p in bb.model.parameters())
    with pytest.raises(PluginError, match="placement must be one of post_rope, pre_rope"):
        patch(bb.model, "factorized", placement="before")


@pytest.mark.parametrize("placement", ["post_rope", "pre_rope"])
def test_recompute_gives_the_same_gradients_on_llama(tiny_llama, placement):
    ids = IDS.repeat(2, 3)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)  # LoRA's initialisation
        p = patch(tiny_llama.model, "factorized", lora_r=4, recompute=recompute, placement=placement)
        _perturb(p)
        tiny_llama.model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: q.grad.clone() for n, q in p.trainable_parameters().items()})
        unpatch(tiny_llama.model)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_temperature", [True, False])
def test_the_hand_written_backward_passes_gradcheck(with_temperature):
    from attnlab.modules.factorized_transform import RecomputedBranch
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    H, d, f = 3, 6, 5
    for x, tau_shape in ((r(2, H, 4, d).transpose(1, 2), (H, 1)),    # (B, T, H, d), not contiguous
                         (r(2, H, 4, d), (H, 1, 1))):                # (B, H, T, d)
        args = (x, r(d, scale=0.3, shift=1), r(d, scale=0.2), r(2 * f, d), r(2 * f), r(d, f), r(d),
                r((), scale=0.5), r(*tau_shape, scale=0.2, shift=1) if with_temperature else None)
        assert torch.autograd.gradcheck(lambda *a: RecomputedBranch.apply(*a, 1e-5), args)


def test_pre_rope_equals_a_literal_implementation_written_before_the_rotary_embedding(tiny_llama):
    """The proposal's formula on the per-head q and k that the projections (with the LoRA part)
    produce, then RoPE, grouped-query attention and the output projection, all written out by hand,
    against the patched Llama attention inside a real forward, every added parameter perturbed."""
    import math

    import torch.nn.functional as F

    m = tiny_llama.model
    plugin = patch(m, "factorized", layers=[1], lora_r=2, factor_dim=8, placement="pre_rope")
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in plugin.trainable_parameters().items():
            p.add_((0.02 if "lora_" in n else 0.5) * torch.randn_like(p))
    attn = m.model.layers[1].self_attn
    P = getattr(attn, ATTR)
    seen = {}

    def hook(module, args, kwargs, out):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["out"] = out[0]

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    ids = torch.randint(0, 250, (2, 11))
    with torch.no_grad():
        m(input_ids=ids)
    handle.remove()

    def literal(x):
        B, T, _ = x.shape
        d, H, Hkv = attn.head_dim, m.config.num_attention_heads, m.config.num_key_value_heads
        # .forward skips the module's hooks: the projections (base + LoRA) as they are, untransformed
        q = attn.q_proj.forward(x).view(B, T, H, d)
        k = attn.k_proj.forward(x).view(B, T, Hkv, d)
        v = attn.v_proj.forward(x).view(B, T, Hkv, d).transpose(1, 2)

        def transform(z, norm, wa, wb, proj, alpha):
            zn = F.layer_norm(z, (d,), norm.weight, norm.bias, norm.eps)
            inter = F.gelu((zn @ wa.weight.T + wa.bias) * (zn @ wb.weight.T + wb.bias))
            return z + torch.sigmoid(alpha) * (inter @ proj.weight.T + proj.bias)

        q = transform(q, P.q_norm, P.q_w1, P.q_w2, P.q_proj, P.alpha_q).transpose(1, 2)   # (B, H, T, d)
        k = transform(k, P.k_norm, P.k_w3, P.k_w4, P.k_proj, P.alpha_k).transpose(1, 2)
        theta = m.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rope(z):
            z1, z2 = z[..., : d // 2], z[..., d // 2:]
            return z * cos + torch.cat([-z2, z1], -1) * sin

        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        logits = (q @ k.transpose(-1, -2)) * P.log_temperature.exp().view(1, H, 1, 1) / math.sqrt(d)
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * d)
        return attn.o_proj.forward(out)

    with torch.no_grad():
        want = literal(seen["x"])
    assert P.q_proj.weight.abs().sum() > 0 and P.log_temperature.abs().sum() > 0
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in plugin.trainable_parameters().items())
    assert torch.allclose(seen["out"], want, atol=1e-5), (seen["out"] - want).abs().max()
    unpatch(m)


def test_a_saved_pre_rope_plugin_loads_as_pre_rope_and_an_old_save_without_placement_as_post_rope(tmp_path):
    import json

    from attnlab.modules import load_plugin
    from attnlab.modules.base import CONFIG_NAME

    bb = load_backbone("tiny-llama")
    p = patch(bb.model, "factorized", placement="pre_rope", lora_r=2)
    _perturb(p)
    want = logits_of(bb.model, IDS)
    p.save_pretrained(tmp_path / "fa")
    unpatch(bb.model)
    q = load_plugin(bb.model, tmp_path / "fa")
    assert q.config.placement == "pre_rope" and torch.equal(logits_of(bb.model, IDS), want)
    unpatch(bb.model)
    # a plug-in saved before `placement` (and with the old recompute default) reads as post_rope
    meta = json.loads((tmp_path / "fa" / CONFIG_NAME).read_text())
    del meta["config"]["placement"]
    meta["config"]["recompute"] = False
    from attnlab.modules import make_config
    assert make_config("factorized", **meta["config"]).placement == "post_rope"


def test_pre_rope_follows_a_lora_attached_after_it_and_the_order_does_not_matter(tiny_llama):
    """pre_rope hooks the projections' outputs; a LoRA attached afterwards replaces the projections,
    and the hooks move onto the new modules: both attach orders compute the same function, and
    detaching the LoRA leaves the factorized transform in place."""
    from attnlab.modules import attach

    m = tiny_llama.model
    torch.manual_seed(0)
    fa = patch(m, "factorized", placement="pre_rope", lora_r=0)
    _perturb(fa)
    fa_alone = logits_of(m, IDS)
    lora = attach(m, "lora", r=2)
    _perturb(lora, scale=0.05)
    after = logits_of(m, IDS)
    states = fa.state_dict(), lora.state_dict()
    lora.detach()
    assert torch.equal(logits_of(m, IDS), fa_alone)
    fa.detach()
    lora = attach(m, "lora", r=2)
    lora.load_state_dict(states[1])
    fa = patch(m, "factorized", placement="pre_rope", lora_r=0)
    fa.load_state_dict(states[0])
    assert (after - fa_alone).abs().max() > 1e-3
    torch.testing.assert_close(logits_of(m, IDS), after, atol=1e-6, rtol=1e-6)
    fa.detach()
    lora.detach()
