import json

import pytest

from attnlab import attach, load_backbone
from attnlab.cli import build_parser, main


@pytest.mark.parametrize("argv", [[], ["run"], ["eval"], ["generate"], ["data"], ["data", "preview"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv + ["--help"])
    assert e.value.code == 0
    assert "usage: attnlab" in capsys.readouterr().out


def test_data_preview(capsys):
    assert main(["data", "preview", "--list"]) == 0
    assert "gsm8k" in capsys.readouterr().out
    assert main(["data", "preview", "--dataset", "arithmetic", "--n", "2"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and set(rows[0]) == {"prompt", "target", "answer", "source"}


def test_generate_and_eval_with_a_saved_plugin(tmp_path, capsys):
    bb = load_backbone("tiny-llama")
    attach(bb.model, "lora", r=2).save_pretrained(tmp_path / "p")
    assert main(["generate", "--model", "tiny-llama", "--plugin", str(tmp_path / "p"), "--prompt", "1+1?",
                 "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-llama", "--plugin", str(tmp_path / "p"), "--n", "2",
                 "--max-length", "400", "--generate", "1", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["target_tokens"] > 0 and "kl_base_model" in out["metrics"] and "accuracy" in out["metrics"]


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-gpt2", "--plugin", str(tmp_path), "--prompt", "x"]) == 2
    assert "not an attnlab plug-in" in capsys.readouterr().err
