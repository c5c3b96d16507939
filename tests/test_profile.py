import json

import pytest

from attnlab.cli import main
from attnlab.profile import build_model, parse_variant, profile


def test_profile_rows_for_every_variant_length_and_mode(tmp_path):
    model = build_model("tiny-llama")
    variants = ["dense-eager", "dense-sdpa", "window:window=8,block_size=16", "learned:block_size=16,top_k=1",
                "performer:block_size=16"]
    rows = profile(model, variants, [64, 256], repeat=1, log=lambda *_: None)
    assert len(rows) == len(variants) * 2 * 2
    for r in rows:
        assert r["seconds"] > 0 and r["peak_MiB"] > 0
        assert (r["mode"] == "inference") == ("attention_seconds" in r)
    by = {(r["variant"], r["tokens"], r["mode"]): r for r in rows}
    # the eager kernel keeps T x T probabilities for the backward; SDPA and the block kernels do not
    assert by["dense-eager", 256, "training"]["peak_MiB"] > by["dense-sdpa", 256, "training"]["peak_MiB"]
    assert by["window:window=8,block_size=16", 256, "inference"]["sparsity"] > 0.9
    assert model.config._attn_implementation == "sdpa", "profiling leaves the model as it found it"
    assert getattr(model, "_attnlab_plugin", None) is None


def test_profile_command_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--model", "tiny-gpt2", "--lengths", "32", "64", "--repeat", "1",
                 "--variants", "dense-sdpa", "window:window=4,block_size=16", "--out", str(out)]) == 0
    for f in ("profile.md", "profile.json", "profile_time.png", "profile_memory.png"):
        assert (out / f).is_file(), f
    rows = json.loads((out / "profile.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"dense-sdpa", "window:window=4,block_size=16"}
    assert "| window:window=4,block_size=16 | 64 |" in capsys.readouterr().out


def test_bad_variant_specs_are_clear_errors():
    with pytest.raises(ValueError, match="not key=value"):
        parse_variant("window:256")
    with pytest.raises(ValueError, match="takes no options"):
        parse_variant("dense-sdpa:x=1")
    with pytest.raises(Exception, match="unknown sparse variant"):
        profile(build_model("tiny-gpt2"), ["sliding"], [32], repeat=1, log=lambda *_: None)


def test_profiling_a_truncated_model():
    import torch
    model = build_model("tiny-llama", layers=1)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="between 1 and 2"):
        build_model("tiny-llama", layers=5)


def test_random_weights_have_the_embedded_models_shape():
    import torch
    model = build_model("smollm2-135m", random_weights=True, layers=1)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (576, 9, 3, 49152)
    assert cfg.num_hidden_layers == 1 and not any(p.requires_grad for p in model.parameters())
    assert model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.shape == (1, 4, 49152)


def test_profile_restores_the_model_when_a_variant_is_bad():
    model = build_model("tiny-llama")
    with pytest.raises(Exception):
        profile(model, ["window:window=0"], [32], repeat=1, log=lambda *_: None)
    assert model.config._attn_implementation == "sdpa" and getattr(model, "_attnlab_plugin", None) is None
    with pytest.raises(ValueError, match="unknown dense kernel"):
        parse_variant("dense-flash")
    with pytest.raises(ValueError, match="random weights are available"):
        build_model("openai-community/gpt2-medium", random_weights=True)


def test_decode_mode_times_one_cached_token_and_the_sparse_step_reads_fewer_keys():
    model = build_model("tiny-llama")
    rows = profile(model, ["dense-sdpa", "quest:block_size=16,top_k=1"], [256], modes=("decode",), repeat=1,
                   log=lambda *_: None)
    by = {r["variant"]: r for r in rows}
    assert all(r["mode"] == "decode" and r["seconds"] > 0 and "attention_seconds" in r for r in rows)
    assert by["quest:block_size=16,top_k=1"]["work"] < 0.3          # 4 blocks of 16 of the 257 keys
    assert model.config._attn_implementation == "sdpa"
    # the cache generation would use: appending in place with a sparse plug-in, transformers' otherwise
    assert by["dense-sdpa"]["cache"] == "dynamic" and by["quest:block_size=16,top_k=1"]["cache"] == "growing"
    same = profile(model, ["dense-sdpa"], [64], modes=("decode",), repeat=1, log=lambda *_: None, decode_cache="growing")
    assert same[0]["cache"] == "growing"
