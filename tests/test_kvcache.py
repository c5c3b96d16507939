"""GrowingCache (attnlab.kvcache): appending in place gives what transformers' DynamicCache gives.

Generation with it equals generation with the DynamicCache (dense and sparse, a left-padded batch
too), appends do not copy the past (the buffer is reused until it is full, then grows by a
fraction), and what DynamicLayer's methods do to the cache (crop, reorder) still holds."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from attnlab.kvcache import GrowingCache, GrowingLayer, generation_cache
from attnlab.modules.sparse import SparseAttention, SparseConfig
from attnlab.modules.sparse.decode import cache_rows


def attach(model, **options):
    return SparseAttention(SparseConfig(**{"block_size": 4, "top_k": 1, "granularity": "row", **options})).attach(model)


def prompts(n=26, batch=1, seed=3):
    return torch.randint(3, 250, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", [None, "quest", "learned", "window"])
def test_generation_with_the_growing_cache_equals_the_dynamic_cache(tiny_llama, variant):
    model = tiny_llama.model
    plugin = attach(model, variant=variant) if variant else None
    x = prompts(26, batch=2)
    mask = torch.ones_like(x)
    mask[1, :5] = 0                                      # a left-padded row: the masked sparse kernel
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tiny_llama.tokenizer.pad_token_id)
    with torch.no_grad():
        for m in (None, mask):
            dynamic = model.generate(x, attention_mask=m, past_key_values=DynamicCache(), **kw)
            cache = GrowingCache()
            growing = model.generate(x, attention_mask=m, past_key_values=cache, **kw)
            assert torch.equal(dynamic, growing)
            assert isinstance(cache.layers[0], GrowingLayer) and cache.layers[0].kbuf is not None
    if plugin is not None:
        plugin.detach()


def test_appends_write_in_place_and_the_buffer_grows_by_a_fraction():
    layer = GrowingLayer()
    k = torch.randn(1, 2, 100, 8)
    assert layer.update(k, k + 1)[0] is k                # a prefill gets its own tensors back
    buffers, steps = {layer.kbuf.data_ptr()}, 400
    for t in range(steps):
        new = torch.full((1, 2, 1, 8), float(t))
        keys, values = layer.update(new, new + 1)
        assert keys.data_ptr() == layer.kbuf.data_ptr() and keys.shape[2] == 101 + t
        buffers.add(layer.kbuf.data_ptr())
    assert torch.equal(keys[:, :, :100], k) and torch.equal(keys[:, :, 100:, 0], torch.arange(steps, dtype=torch.float).expand(1, 2, -1))
    assert torch.equal(values, keys + 1)
    assert len(buffers) <= 7                             # 500 tokens in ~x1.25 steps from 189, not one per token


def test_crop_and_reorder_keep_the_dynamic_cache_semantics():
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    new = torch.randn(2, 2, 3, 8, generator=gen)
    caches = [DynamicCache(), GrowingCache()]
    for c in caches:
        c.update(k, v, 0)
        c.crop(-3)                                     # drop the last 3
        c.update(new, new, 0)
        c.reorder_cache(torch.tensor([1, 0]))          # a beam reorder replaces the tensors: adopted
        c.update(new[:, :, :1], new[:, :, :1], 0)
    (dk, dv), (gk, gv) = [(c.layers[0].keys, c.layers[0].values) for c in caches]
    assert gk.shape == dk.shape == (2, 2, 13, 8) and torch.equal(gk, dk) and torch.equal(gv, dv)


def test_a_key_that_requires_grad_is_appended_as_dynamic_layer_does():
    layer = GrowingLayer()
    k = torch.randn(1, 2, 5, 8, requires_grad=True)
    layer.update(k, k)
    keys, _ = layer.update(k[:, :, :1] * 2, k[:, :, :1])
    keys.sum().backward()
    assert k.grad[0, 0, 0, 0] == 3                    # through the cat: 1 (its own slot) + 2 (the appended one)


def test_cache_rows_reads_a_strided_view_of_the_buffer_without_a_copy():
    buf = torch.randn(2, 3, 20, 4)
    view = buf[:, :, :13]
    rows, start = cache_rows(view)
    assert rows.data_ptr() == buf.data_ptr()
    b, h, t = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(13), indexing="ij")
    assert torch.equal(rows[(start[..., 0, 0][..., None] + t[0, 0]).flatten()].view(2, 3, 13, 4), view)


def test_generation_uses_the_growing_cache_only_with_a_sparse_plug_in(tiny_llama):
    assert generation_cache(tiny_llama.model) is None
    plugin = attach(tiny_llama.model, variant="quest")
    assert isinstance(generation_cache(tiny_llama.model), GrowingCache)
    plugin.detach()
