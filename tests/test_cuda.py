"""The CUDA paths: bf16 by default, fp16 with loss scaling, the flex sparse kernel, the CUDA RNG in
checkpoints, checkpointing on the GPU. Every test here is marked `cuda` and skipped without a GPU
(`pytest -m cuda` runs them; benchmarks/gpu_check.py does, on a GPU)."""

import math

import pytest
import torch

from attnlab import attach, load_backbone
from attnlab.data import collate
from attnlab.precision import resolve_model_dtype
from attnlab.train import TargetLoss, TrainConfig, train

from .conftest import tiny_splits

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

METHODS = [("lora", {"r": 4}), ("factorized", {"lora_r": 2, "factor_dim": 8}), ("sparse", {"kernel": "flex"}),
           ("head_ft", {}), ("backward_head", {"preset": "residual"})]


def test_the_default_base_dtype_on_a_gpu_is_bf16_where_supported():
    assert resolve_model_dtype("auto", "cuda") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_trains_on_a_low_precision_base_on_the_gpu(method, opts, dtype):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    bb = load_backbone("tiny-llama", dtype=resolve_model_dtype(dtype, "cuda"), device="cuda")
    s = tiny_splits(bb, n_train=8)
    torch.manual_seed(0)
    p = attach(bb.model, method, **opts)
    r = train(bb.model, p, s.train, TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, progress=False))
    assert {v.dtype for v in p.trainable_parameters().values()} == {torch.float32}
    assert all(math.isfinite(h["loss"]) for h in r.history) and r.steps == 3
    p.detach()


def test_the_flex_kernel_equals_the_masked_reference_on_the_gpu():
    bb = load_backbone("tiny-llama", device="cuda")
    x = torch.randint(3, 250, (2, 300), device="cuda")
    out = {}
    for kernel in ("flex", "masked"):
        p = attach(bb.model, "sparse", variant="learned", top_k=1, block_size=16, kernel=kernel)
        with torch.no_grad():
            out[kernel] = bb.model(input_ids=x).logits
        p.detach()
    torch.testing.assert_close(out["flex"], out["masked"], rtol=1e-4, atol=1e-4)


def test_a_resumed_run_replays_the_cuda_rng_exactly():
    from benchmarks.gpu_check import rng_resume_check

    r = rng_resume_check("cuda")
    assert r["resumed_from"] == 2 and r["bit_identical"], r


def test_checkpointing_gives_equal_gradients_on_the_gpu():
    from attnlab.checkpointing import checkpointed

    bb = load_backbone("tiny-llama", dtype=torch.bfloat16, device="cuda")
    s = tiny_splits(bb, n_train=4)
    batch = {k: v.cuda() for k, v in collate(s.train[:3], bb.tokenizer.pad_token_id).items()}
    torch.manual_seed(0)
    p = attach(bb.model, "lora", r=4)
    with torch.no_grad():  # LoRA B starts at zero: give it values so every gradient is non-trivial
        for t in p.trainable_parameters().values():
            t.add_(0.01 * torch.randn_like(t))
    grads = []
    for on in (False, True):
        with torch.autocast("cuda", torch.bfloat16), checkpointed(bb.model, on):
            loss = TargetLoss(bb.model)(**batch)
        loss.backward()
        grads.append({n: t.grad.clone() for n, t in p.trainable_parameters().items()})
        for t in p.trainable_parameters().values():
            t.grad = None
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)
