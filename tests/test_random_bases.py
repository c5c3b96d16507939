"""`random:<name>`: a published model's shape with seeded random weights, built offline."""

import pytest
import torch

from attnlab import attach, load_backbone
from attnlab.backbone import RANDOM, BackboneError, random_config, random_model

# parameter counts of the published models (their model cards / config.json), in millions
PUBLISHED_M = {"smollm2-135m": 134.5, "smollm2-360m": 361.8, "qwen2-0.5b": 494.0, "qwen3-0.6b": 596.0,
               "llama-1b": 1235.8, "llama-3b": 3212.7, "llama-8b": 8030.3, "gpt2": 124.4}


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_each_random_shape_has_the_published_parameter_count(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: nothing allocated
        model = AutoModelForCausalLM.from_config(random_config(name))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(PUBLISHED_M[name], abs=0.1)


def test_a_random_base_loads_frozen_seeded_and_trains_a_plugin():
    bb = load_backbone("random:smollm2-135m", dtype=torch.bfloat16)
    assert bb.info["n_params"] == 134_515_008 and bb.info["vocab_size"] == 49152 and bb.info["n_layers"] == 30
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in bb.model.parameters())
    ids = bb.tokenizer("12 + 30 =", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < bb.info["vocab_size"]
    with torch.no_grad():
        assert torch.isfinite(bb.model(input_ids=ids).logits).all()
    p = attach(bb.model, "lora", r=2)
    assert p.num_trainable() > 0
    p.detach()


def test_random_weights_are_seeded_and_overrides_shrink_the_model():
    a, _ = random_model("gpt2", num_hidden_layers=1, n_embd=64, n_head=4)
    b, _ = random_model("gpt2", num_hidden_layers=1, n_embd=64, n_head=4)
    assert a.config.n_layer == 1 and a.config.n_embd == 64 and all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_an_unknown_random_base_names_the_available_ones():
    with pytest.raises(BackboneError, match="unknown random base 'random:llama-70b'; available: random:smollm2-135m"):
        load_backbone("random:llama-70b")
