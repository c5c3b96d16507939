"""What a saved plug-in folder holds: a PEFT adapter for LoRA (loaded by PEFT alone with the same
outputs), a model card, attnlab_plugin.json (config.json of older saves still read), every file
under the checksum manifest."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from attnlab import attach, load_backbone, load_plugin
from attnlab.atomic import write_manifest
from attnlab.backbone import fingerprint_hash
from attnlab.errors import DamagedFile

from .conftest import logits_of, tiny_splits

IDS = torch.tensor([[5, 80, 77, 33, 101, 9, 64, 200, 17, 3]])


def _perturb(plugin):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in plugin.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("options", [{"r": 2}, {"r": 4, "alpha": 4.0, "adapter_name": "mine"}],
                         ids=["default", "named"])
def test_a_saved_lora_loads_with_peft_alone_and_computes_the_same_function(tiny, tmp_path, options):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    lora = attach(tiny.model, "lora", **options)
    head = attach(tiny.model, "head_ft")   # composed: the LoRA alone is exported
    _perturb(lora)
    head.detach()
    expected = logits_of(tiny.model, IDS)
    lora.save_pretrained(tmp_path / "p", base_name=tiny.spec)
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == tiny.spec
    assert cfg["fan_in_fan_out"] is (tiny.spec == "tiny-gpt2") and cfg["r"] == options["r"]
    assert sorted(cfg["target_modules"]) == sorted({"tiny-gpt2": ["c_attn", "c_proj"],
                                                    "tiny-llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}[tiny.spec])
    saved = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in saved)

    base = load_backbone(tiny.spec).model          # transformers model, no attnlab plug-in
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "p"))
    peft_model.eval()
    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    torch.testing.assert_close(logits_of(peft_model, IDS), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_of(load_backbone(tiny.spec).model, IDS), expected, atol=1e-3)


def test_every_saved_plugin_has_a_model_card(tiny_llama, tmp_path):
    from huggingface_hub import ModelCard

    p = attach(tiny_llama.model, "head_ft")
    card = {"data": {"dataset_name": "arithmetic", "n_train": 16}, "metrics": {"test": {"perplexity": 3.25}},
            "training": {"steps": 5}, "command": "attnlab run configs/x.yaml"}
    p.save_pretrained(tmp_path / "p", base_name="tiny-llama", card=card)
    meta = json.loads((tmp_path / "p" / "attnlab_plugin.json").read_text())
    c = ModelCard.load(tmp_path / "p" / "README.md")
    assert c.data.library_name == "attnlab" and "attnlab-head_ft" in c.data.tags
    for needle in ("`head_ft` plug-in for `tiny-llama`", fingerprint_hash(meta["base"]), meta["base"]["body_sha256"],
                   f"{p.num_trainable():,}", '"dataset_name": "arithmetic"', "| test | perplexity | 3.25 |",
                   "attnlab run configs/x.yaml", "attnlab.load_plugin(bb.model"):
        assert needle in c.text, needle
    p.save_pretrained(tmp_path / "q")  # saved outside a run: says so
    assert "None recorded" in (tmp_path / "q" / "README.md").read_text()
    lora = attach(tiny_llama.model, "lora", r=2)
    lora.save_pretrained(tmp_path / "l")
    c = ModelCard.load(tmp_path / "l" / "README.md")
    assert c.data.library_name == "peft" and "PeftModel.from_pretrained" in c.text


def test_the_plugin_config_is_not_config_json_and_an_old_config_json_still_loads(tiny_llama, tmp_path):
    p = attach(tiny_llama.model, "lora", r=2)
    _perturb(p)
    expected = logits_of(tiny_llama.model, IDS)
    p.save_pretrained(tmp_path / "p")
    p.detach()
    names = {f.name for f in (tmp_path / "p").iterdir()}
    assert names == {"plugin.safetensors", "attnlab_plugin.json", "README.md", "manifest.json",
                     "adapter_config.json", "adapter_model.safetensors"}
    assert set(json.loads((tmp_path / "p" / "manifest.json").read_text())["files"]) == names - {"manifest.json"}
    # a folder as attnlab saved it before: plugin.safetensors + config.json (+ manifest)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tmp_path / "p" / "plugin.safetensors", old)
    shutil.copy(tmp_path / "p" / "attnlab_plugin.json", old / "config.json")
    write_manifest(old)
    load_plugin(tiny_llama.model, old)
    assert torch.equal(logits_of(tiny_llama.model, IDS), expected)


@pytest.mark.parametrize("name", ["README.md", "adapter_model.safetensors", "adapter_config.json"])
def test_a_damaged_exported_file_is_refused_naming_it(tiny_llama, tmp_path, name):
    attach(tiny_llama.model, "lora", r=2).save_pretrained(tmp_path / "p")
    tiny_llama.model._attnlab_plugin.detach()
    f = tmp_path / "p" / name
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(DamagedFile, match=name):
        load_plugin(tiny_llama.model, tmp_path / "p")


def test_the_runner_writes_its_data_metrics_and_command_into_the_card(tmp_path, monkeypatch):
    import yaml

    from attnlab.experiment import run_experiment

    monkeypatch.chdir(tmp_path)
    cfg = {"name": "card", "model": "tiny-gpt2", "seeds": [0],
           "data": {"dataset_name": "arithmetic", "n_train": 6, "n_val": 2, "n_eval": 2, "max_length": 400},
           "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False},
           "eval": {"batch_size": 4, "generate": False}, "methods": [{"name": "lora", "method": "lora", "r": 2}]}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(cfg))
    res = run_experiment("card.yaml", out_root="runs", log=lambda *_: None)
    text = (tmp_path / "runs" / "card" / "lora" / "seed0" / "plugin" / "README.md").read_text()
    ppl = res["cells"][0]["eval"]["perplexity"]
    for needle in ("attnlab run card.yaml", f"| test | perplexity | {ppl:.4g} |", '"n_train": 6', '"steps_done": 2',
                   res["cells"][0]["spec"]["base"]):
        assert needle in text, needle
