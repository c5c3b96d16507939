"""`attnlab eval --plugin`: the frozen base on the same examples, the paired change, per-example JSONL."""

import json
import math

import pytest
import torch

from attnlab import attach, load_backbone
from attnlab.cli import main


def _saved_lora(tmp_path, perturb: bool):
    bb = load_backbone("tiny-llama")
    p = attach(bb.model, "lora", r=2)
    if perturb:  # LoRA starts as the identity (B = 0); a trained one does not
        torch.manual_seed(0)
        with torch.no_grad():
            for name, t in p.trainable_parameters().items():
                t.add_(0.5 * torch.randn_like(t))
    p.save_pretrained(tmp_path / "p")
    return tmp_path / "p"


def test_eval_scores_the_base_on_the_same_examples_and_the_change_follows_from_the_per_example_file(tmp_path, capsys):
    plugin = _saved_lora(tmp_path, perturb=True)
    rows_path = tmp_path / "per_example.jsonl"
    assert main(["eval", "--model", "tiny-llama", "--plugin", str(plugin), "--n", "6", "--max-length", "400",
                 "--generate", "2", "--max-new-tokens", "4", "--per-example", str(rows_path)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(rows) == 6 and all("base_nll" in r and "kl_base_model" in r for r in rows)
    assert all("output" in r and "base_output" in r for r in rows[:2]) and "output" not in rows[2]
    nll, tok = sum(r["nll"] for r in rows), sum(r["n_tokens"] for r in rows)
    bnll, btok = sum(r["base_nll"] for r in rows), sum(r["base_n_tokens"] for r in rows)
    ppl = out["vs_base"]["perplexity"]
    assert ppl["change"] == pytest.approx(math.exp(nll / tok - bnll / btok) - 1)
    assert ppl["lo"] <= ppl["change"] <= ppl["hi"] and ppl["n_examples"] == 6
    assert out["base_metrics"]["perplexity"] == pytest.approx(math.exp(bnll / btok), rel=1e-5)
    assert "vs the frozen base (paired bootstrap over 6 examples, 95%)" in captured.err


def test_a_plugin_equal_to_the_base_changes_nothing_within_noise(tmp_path, capsys):
    plugin = _saved_lora(tmp_path, perturb=False)
    assert main(["eval", "--model", "tiny-llama", "--plugin", str(plugin), "--n", "4", "--max-length", "400"]) == 0
    ppl = json.loads(capsys.readouterr().out)["vs_base"]["perplexity"]
    assert abs(ppl["change"]) < 1e-6 and ppl["verdict"] == "within noise"


def test_per_example_never_writes_over_an_existing_file(tmp_path, capsys):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("keep me\n")
    assert main(["eval", "--model", "tiny-llama", "--n", "2", "--max-length", "400", "--per-example", str(mine)]) == 2
    assert "the file exists" in capsys.readouterr().err and mine.read_text() == "keep me\n"
