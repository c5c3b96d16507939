"""head_ft's fused loss (F.linear_cross_entropy, row-chunked) against F.linear + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from attnlab import attach, load_backbone, load_plugin
from attnlab.modules import PluginError
from attnlab.modules.head_ft import FUSED_ROWS, FusedCEHead
from attnlab.train import TrainConfig, train

from .conftest import tiny_splits


@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_loss_equals_linear_plus_cross_entropy_in_value_and_gradients(bias):
    torch.manual_seed(0)
    n, e, v = FUSED_ROWS + 44, 48, 1000        # two chunks, the second partial
    head = FusedCEHead(e, v, bias=bias)
    with torch.no_grad():
        head.weight.mul_(8)                    # logits of a few units, so the softmax is not flat
    x = torch.randn(n, e, requires_grad=True)  # the gradient that flows into a body, too
    t = torch.randint(0, v, (n,))
    fused = head.target_loss(x, t)
    grads = torch.autograd.grad(fused, [x, *head.parameters()])
    ref = F.cross_entropy(F.linear(x, head.weight, head.bias), t, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [x, *head.parameters()])
    assert float(fused.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for g, r in zip(grads, ref_grads):   # fp32 rounding: relative to the gradient's scale
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


def test_training_head_ft_with_fused_ce_runs_the_fused_loss_and_follows_the_same_curve(tmp_path, monkeypatch):
    calls = []
    real = F.linear_cross_entropy

    def counting(*a, **k):
        calls.append(k.get("options"))
        return real(*a, **k)

    monkeypatch.setattr(F, "linear_cross_entropy", counting)
    cfg = TrainConfig(steps=4, batch_size=4, lr=3e-3, warmup_steps=0, progress=False)
    runs = {}
    for fused in (False, True):
        bb = load_backbone("tiny-llama")
        splits = tiny_splits(bb, n_train=8)
        p = attach(bb.model, "head_ft", fused_ce=fused)
        n = len(calls)
        res = train(bb.model, p, splits.train, cfg, pad_id=bb.tokenizer.pad_token_id, log=lambda *a: None)
        assert (len(calls) - n == cfg.steps) == fused   # one fused call per step, and only when asked
        runs[fused] = ([h["loss"] for h in res.history], p.state_dict()["lm_head.weight"])
    assert all(o is not None and o.batch_chunk_size == FUSED_ROWS for o in calls)  # the chunked path, not options=None
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True][0][-1] < runs[True][0][0]
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-6)


def test_fused_ce_is_the_default_on_a_plain_head_and_left_out_where_logits_are_capped():
    bb = load_backbone("tiny-llama")
    p = attach(bb.model, "head_ft")
    assert isinstance(bb.model.get_output_embeddings(), FusedCEHead)
    p.detach()
    bb.model.config.final_logit_softcapping = 30.0
    with pytest.raises(PluginError, match="set fused_ce: false"):
        attach(bb.model, "head_ft", fused_ce=True)
    assert bb.model.get_output_embeddings() is bb.model.lm_head  # nothing was installed
    p = attach(bb.model, "head_ft")                               # the default: the plain loss there
    assert not hasattr(bb.model.get_output_embeddings(), "target_loss")


def test_a_saved_fused_head_loads_back_fused_and_predicts_like_the_plain_one(tmp_path):
    bb = load_backbone("tiny-llama")
    p = attach(bb.model, "head_ft", fused_ce=True)
    with torch.no_grad():
        p.trainable_parameters()["lm_head.weight"].add_(0.1)
    p.save_pretrained(tmp_path / "h")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = bb.model(input_ids=ids).logits
    p.detach()
    q = load_plugin(bb.model, tmp_path / "h")
    assert q.config.fused_ce and isinstance(bb.model.get_output_embeddings(), FusedCEHead)
    with torch.no_grad():
        torch.testing.assert_close(bb.model(input_ids=ids).logits, want)
