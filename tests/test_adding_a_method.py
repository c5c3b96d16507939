"""docs/adding_a_method.md runs verbatim (its Python blocks, in order), and register_method checks
what it is given."""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.errors import ConfigError
from attnlab.modules import METHODS, Plugin, PluginError, register_method

from .conftest import logits_of

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"
IDS = torch.tensor([[5, 80, 77, 33, 101, 9]])


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def registry():
    """The registry as it was before the test (a registered example must not leak into other tests)."""
    saved = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(saved)


def test_the_documented_example_trains_saves_loads_composes_and_runs_in_the_runner(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) == 3 and "register_method" in blocks[0]
    ns = {"__name__": "doc_example"}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), ns)
    assert METHODS["logit_bias"] is ns["LogitBias"]
    r = ns["result"]
    assert r.steps == 8 and r.history[-1]["loss"] < r.history[0]["loss"], "the documented training did not learn"
    assert attnlab.attached(ns["bb"].model) == []
    # the saved plug-in computes base logits + b on a fresh base
    fresh = attnlab.load_backbone("tiny-gpt2")
    base = logits_of(fresh.model, IDS)
    p = attnlab.load_plugin(fresh.model, tmp_path / "out" / "logit_bias" / "plugin")
    b = p.trainable_parameters()["bias"]
    assert b.abs().max() > 0 and torch.equal(logits_of(fresh.model, IDS), base + b.detach())
    p.detach()
    assert torch.equal(logits_of(fresh.model, IDS), base)
    # the runner trained it (from the feature cache: head_only) and saved it with its card
    cell = ns["results"]["cells"][1]
    assert cell["type"] == "logit_bias" and cell["train"]["from_feature_cache"] and cell["train"]["steps"] == 4
    card = (tmp_path / "out" / "runs" / "logit_bias_demo" / "bias" / "seed0" / "plugin" / "README.md").read_text()
    assert "`logit_bias` plug-in" in card and "doc_example" in card


def test_a_plugin_of_a_method_not_registered_here_names_the_module_to_import(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "my_methods.logit_bias"}
    exec(compile(_blocks()[0], str(DOC), "exec"), ns)
    bb = attnlab.load_backbone("tiny-llama")
    attnlab.attach(bb.model, "logit_bias", init=0.5).save_pretrained(tmp_path / "p")
    bb.model._attnlab_plugin.detach()
    del METHODS["logit_bias"]
    with pytest.raises(PluginError, match=r"'logit_bias', which is not registered here.*`import my_methods.logit_bias`"):
        attnlab.load_plugin(bb.model, tmp_path / "p")


def test_a_config_imports_the_module_that_registers_its_method(registry, tmp_path, monkeypatch):
    from attnlab.experiment import load_config

    (tmp_path / "my_methods_doc.py").write_text(_blocks()[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_methods_doc", raising=False)
    cfg = {"model": "tiny-gpt2", "methods": [{"name": "bias", "method": "logit_bias", "init": 0.1}]}
    with pytest.raises(ConfigError, match="unknown method 'logit_bias'.*imports:"):
        load_config(cfg)
    load_config({**cfg, "imports": ["my_methods_doc"]})
    assert METHODS["logit_bias"].__module__ == "my_methods_doc"
    with pytest.raises(ConfigError, match="imports: cannot import 'no_such_module_xyz'"):
        load_config({**cfg, "imports": ["no_such_module_xyz"]})
    with pytest.raises(ConfigError, match="imports: expected a list of module names"):
        load_config({**cfg, "imports": "my_methods_doc"})
    monkeypatch.delitem(sys.modules, "my_methods_doc")


@dataclass
class _Cfg:
    k: int = 1


@dataclass
class _NoDefault:
    k: int


def _cls(**attrs):
    body = {"method": "mine", "Config": _Cfg, "_install": lambda s, m: None, "_remove": lambda s, m: None,
            "_parameters": lambda s: {}}
    body.update(attrs)
    return type("Mine", (Plugin,), {k: v for k, v in body.items() if v is not ...})


@pytest.mark.parametrize("cls,needle", [
    (dict, "takes a subclass of attnlab.modules.Plugin"),
    (_cls(method=...), "must name the method"),
    (_cls(method="my method"), "must name the method"),
    (_cls(Config=dict), "must be a dataclass"),
    (_cls(Config=_NoDefault), "every option needs a default"),
    (_cls(_remove=...), "does not define _remove"),
    (_cls(method="lora"), "'lora' is already registered by attnlab.modules.lora.LoRA"),
])
def test_register_method_refuses_what_cannot_work_in_one_line(registry, cls, needle):
    with pytest.raises(PluginError, match=needle) as e:
        register_method(cls)
    assert "\n" not in str(e.value)


def test_register_method_replaces_only_when_asked_and_returns_the_class(registry):
    mine = _cls(method="lora")
    assert register_method(mine, replace=True) is mine and METHODS["lora"] is mine
    again = _cls(method="mine")
    assert register_method(again) is again and register_method(_cls(method="mine")) is not None  # a re-definition
