import pytest
import torch
from torch import nn

from attnlab import attach
from attnlab.features import build_feature_cache
from attnlab.modules import PluginError
from attnlab.modules.mos_head import MoSConfig, MoSHead
from attnlab.train import TrainConfig, train

from .conftest import logits_of, tiny_splits


def _head(K=3, r=4, V=300, E=24, bias=True):
    g = torch.Generator().manual_seed(4)
    out = nn.Linear(E, V, bias=bias)
    out.requires_grad_(False)
    head = MoSHead(MoSConfig(n_components=K, rank=r), out)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))   # far from the start: components differ
    return head


def _reference(head, h):
    """The mixture written out: Σ_k π_k softmax(c_k W^T + b), c_k = h + tanh(A_k B_k h)."""
    w, b = head._base["w"], head._base["b"]
    pi = torch.softmax(h @ head.prior.t(), -1)
    p = 0
    for k in range(head.cfg.n_components):
        c = h + torch.tanh(h @ head.down[k].t() @ head.up[k].t())
        p = p + pi[:, k:k + 1] * torch.softmax(nn.functional.linear(c, w, b), -1)
    return p.log()


@pytest.mark.parametrize("bias", [True, False])
def test_the_mixture_and_its_loss_equal_the_formula_with_the_same_gradients(bias):
    head = _head(bias=bias)
    h = torch.randn(11, 24, generator=torch.Generator().manual_seed(1)) * 2
    y = torch.randint(0, 300, (11,), generator=torch.Generator().manual_seed(2))
    ref = _reference(head, h)
    with torch.no_grad():
        assert (head(h) - ref).abs().max() <= 1e-5
        spread = ref.max(-1).values - ref.min(-1).values
    assert spread.min() > 1.0, "a distribution far from uniform"
    params = list(head.parameters())
    want = torch.autograd.grad(-ref[torch.arange(11), y].sum(), params)
    loss = head.target_loss(h, y)
    got = torch.autograd.grad(loss, params)
    assert abs(loss.item() + ref[torch.arange(11), y].sum().item()) <= 1e-4 * abs(loss.item())
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max())


def test_the_parameter_count_is_k_times_2er_plus_e(tiny_llama):
    E = tiny_llama.model.get_input_embeddings().weight.shape[1]
    p = attach(tiny_llama.model, "mos_head", n_components=3, rank=8)
    assert p.num_trainable() == 3 * (2 * E * 8 + E)
    p.detach()


def test_it_starts_at_the_base_learns_and_trains_from_the_cache_as_live(tiny_llama, tmp_path):
    """Starts at the base exactly (every context is h), lowers the loss, and the cached-feature
    curve equals the live one up to the fp16 rounding of the cache."""
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    base = logits_of(tiny_llama.model, ids).log_softmax(-1)
    s = tiny_splits(tiny_llama, n_train=8)
    pad = tiny_llama.tokenizer.pad_token_id
    cache = build_feature_cache(tiny_llama.model, "tiny-llama", s.train, pad, root=tmp_path, log=lambda *_: None)
    curves = []
    for feats in (None, cache):
        torch.manual_seed(0)
        p = attach(tiny_llama.model, "mos_head", n_components=2, rank=8)
        torch.testing.assert_close(logits_of(tiny_llama.model, ids), base, atol=1e-5, rtol=0)
        r = train(tiny_llama.model, p, s.train, TrainConfig(steps=8, batch_size=4, lr=3e-2, warmup_steps=0,
                                                            progress=False), pad_id=pad, features=feats)
        curves.append([x["loss"] for x in r.history])
        head = tiny_llama.model.get_output_embeddings()
        assert (head.up.abs().sum((1, 2)) > 0).all(), "every component moved away from the start"
        p.detach()
    assert curves[0][-1] < curves[0][0]
    for live, cached in zip(*curves):
        assert abs(live - cached) < 2e-3 * max(1.0, abs(live))


def test_bad_options_are_clear_errors(tiny_llama):
    with pytest.raises(PluginError, match="rank 999 exceeds the hidden size"):
        attach(tiny_llama.model, "mos_head", rank=999)
    with pytest.raises(PluginError, match="must be >= 1"):
        attach(tiny_llama.model, "mos_head", n_components=0)
    assert tiny_llama.model.get_output_embeddings().__class__ is nn.Linear
