import json
import re

import pytest

from attnlab.data import (IGNORE, EmptyDataset, SkipLog, arithmetic_problems, build_splits, collate,
                          collate_prompts, load_records)
from attnlab.data.sources import code_contests_record, metamath_record, openmath_record

from .conftest import SHARED


def test_arithmetic_is_deterministic_and_correct():
    a, b = arithmetic_problems(50, seed=3), arithmetic_problems(50, seed=3)
    assert a == b
    assert a != arithmetic_problems(50, seed=4)
    for r in a:
        assert r.target.endswith(f"#### {r.answer}")
        # every step line states a true equation
        for lhs, rhs in re.findall(r"((?:\d+ [-+*/] )+\d+) = (\d+)", r.target):
            assert eval(lhs) == int(rhs), (lhs, rhs)
        # the last step's result is the answer
        assert re.findall(r"= (\d+)", r.target)[-1] == r.answer


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_gsm8k_adapter_strips_calculator_and_counts_bad_records(tmp_path):
    p = _jsonl(tmp_path / "g.jsonl", [
        {"question": "Q1?", "answer": "3 * 4 = <<3*4=12>>12 eggs\n#### 12"},
        {"question": "Q2?", "answer": "no final line"},
        {"answer": "#### 1"},
        {"question": "Q4?", "answer": ""},
        {"question": ["not", "text"], "answer": "#### 2"},
        "{broken json",
        {"question": "Q7?", "answer": "1,000 + 234 = <<1000+234=1234>>1,234\n#### 1,234"},
    ])
    log = SkipLog()
    recs = load_records({"dataset_name": "gsm8k", "path": str(p)}, log=log)
    assert [r.answer for r in recs] == ["12", "1234"]
    assert "<<" not in recs[0].target and recs[0].target.endswith("#### 12")
    assert log.seen == 7 and log.kept == 2 and log.skipped == 5
    assert set(log.reasons) == {"answer has no final '#### N' line", "missing field 'question'",
                                "empty field 'answer'", "field 'question' is a list, not text",
                                "g.jsonl line 6: invalid JSON (Expecting property name enclosed in double quotes)"}
    assert len(log.examples) == 5


def test_zero_usable_records_is_a_clear_error(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [{"question": "x"}, {"nothing": 1}])
    from attnlab import load_backbone
    with pytest.raises(EmptyDataset, match="gave 0 train / 0 val / 0 test"):
        build_splits({"dataset_name": "gsm8k", "path": str(p), "n_train": 4, "n_eval": 2},
                     load_backbone("tiny-gpt2").tokenizer)


def test_missing_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="check `path:`"):
        load_records({"dataset_name": "gsm8k", "path": "/no/such/file.jsonl"})


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="choose one of: arithmetic"):
        load_records({"dataset_name": "nope"})


def test_local_csv_and_parquet_with_column_mapping(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("q,sol,ans\nWhat is 1+1?,1+1=2,2\nEmpty?,,3\n")
    log = SkipLog()
    recs = load_records({"dataset_name": "local", "path": str(csv_path),
                         "columns": {"prompt": "q", "target": "sol", "answer": "ans"}}, log=log)
    assert len(recs) == 1 and recs[0].answer == "2" and log.reasons == {"empty field 'sol'": 1}
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"q": ["a?", "b?"], "sol": ["x", "y"]}), tmp_path / "d.parquet")
    recs = load_records({"dataset_name": "local", "path": str(tmp_path / "d.parquet"),
                         "columns": {"prompt": "q", "target": "sol"}})
    assert [r.target for r in recs] == ["x", "y"]


def test_hub_adapters_map_fields():
    r = openmath_record({"problem": "P", "generated_solution": "so \\boxed{7}", "expected_answer": "7",
                         "problem_source": "augmented_math"}, {})
    assert (r.prompt, r.answer, r.source) == ("P", "7", "augmented_math")
    r = openmath_record({"problem": "P", "generated_solution": "so 7", "expected_answer": "7"}, {})
    assert r.target.endswith("\\boxed{7}.")
    r = metamath_record({"query": "Q", "response": "steps\nThe answer is: 42", "type": "GSM_Rephrased"}, {})
    assert (r.answer, r.source) == ("42", "GSM_Rephrased")
    r = code_contests_record({"description": "D", "solutions": {"language": [2, 3], "solution": ["c++", "py"]}}, {})
    assert r.target == "py"


def test_hub_dataset_offline_gives_a_clear_error():
    from attnlab.data.sources import SourceUnavailable
    with pytest.raises(SourceUnavailable, match="give a local copy with `path:`"):
        load_records({"dataset_name": "metamathqa"}, limit=1)


@pytest.mark.parametrize("name", ["python_docs", "python_stdlib"])
def test_offline_text_corpora(name, tiny):
    s = build_splits({"dataset_name": name, "n_train": 4, "n_eval": 2, "max_length": 64}, tiny.tokenizer)
    assert s.kind == "lm" and len(s.train) == 4 and len(s.eval) == 2
    assert all(len(e.input_ids) == 64 and e.labels == e.input_ids for e in s.train + s.eval)
    # held-out: no eval block appears in train
    assert not {tuple(e.input_ids) for e in s.eval} & {tuple(e.input_ids) for e in s.train}


def test_qa_tokenization_masks_the_prompt_and_uses_the_chat_template(tiny):
    s = build_splits({"dataset_name": "arithmetic", "n_train": 8, "n_eval": 4, "max_length": 512}, tiny.tokenizer)
    tok = tiny.tokenizer
    for e in s.train:
        assert all(l == IGNORE for l in e.labels[: e.prompt_len])
        assert e.labels[e.prompt_len:] == e.input_ids[e.prompt_len:]
        prompt = tok.decode(e.input_ids[: e.prompt_len])
        target = tok.decode(e.input_ids[e.prompt_len:])
        assert e.record.prompt in prompt and target == e.record.target + tok.eos_token
        assert ("<|im_start|>user" in prompt) == bool(tok.chat_template)
    train_prompts = {e.record.prompt for e in s.train}
    assert not train_prompts & {e.record.prompt for e in s.eval}


def test_truncation_and_drops_are_counted(tiny):
    s = build_splits({"dataset_name": "arithmetic", "n_train": 8, "n_eval": 2, "max_length": 200}, tiny.tokenizer)
    tk = s.report["tokenization"]
    assert tk["truncated"] + tk["skipped"] > 0  # byte tokens: 200 is too short for most problems
    assert all(len(e.input_ids) <= 200 for e in s.train)
    assert s.report["n_train"] + s.report["shortfall"]["train"] == 8


def test_collate_pads_right_for_training_and_left_for_generation(tiny):
    s = build_splits({"dataset_name": "arithmetic", "n_train": 3, "n_eval": 1, "max_length": 512}, tiny.tokenizer)
    b = collate(s.train, pad_id=0)
    n = max(len(e.input_ids) for e in s.train)
    assert b["input_ids"].shape == (3, n)
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
    g = collate_prompts(s.train, pad_id=0)
    assert (g["attention_mask"][:, -1] == 1).all()
    with pytest.raises(ValueError, match="empty batch"):
        collate([], 0)


@pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").is_file(), reason="../shared/data/gsm8k not present")
def test_real_gsm8k_file():
    log = SkipLog()
    recs = load_records({"dataset_name": "gsm8k", "path": str(SHARED / "gsm8k" / "train.jsonl")}, limit=200, log=log)
    assert len(recs) == 200 and log.skipped == 0
    assert all("<<" not in r.target and r.answer for r in recs)


@pytest.mark.skipif(not (SHARED / "wikitext-2" / "valid.txt").is_file(), reason="../shared/data/wikitext-2 not present")
def test_real_wikitext_file(tiny):
    s = build_splits({"dataset_name": "wikitext", "path": str(SHARED / "wikitext-2" / "valid.txt"),
                      "n_train": 4, "n_eval": 2, "max_length": 128}, tiny.tokenizer)
    assert len(s.train) == 4 and len(s.eval) == 2


def test_generic_hf_adapter_on_local_files(tmp_path, tiny):
    p = _jsonl(tmp_path / "d.jsonl", [{"q": f"What is {i}+1?", "a": f"{i}+1={i + 1}", "n": i + 1} for i in range(60)])
    cfg = {"dataset_name": "hf", "hf_name": "json", "data_files": str(p), "n_val": 0,
           "columns": {"prompt": "q", "target": "a", "answer": "n"}, "n_train": 8, "n_eval": 4, "max_length": 512}
    s = build_splits(cfg, tiny.tokenizer)
    assert len(s.train) == 8 and len(s.eval) == 4
    assert {e.answer for e in s.train + s.eval} <= {str(i + 1) for i in range(60)}
    assert not {e.answer for e in s.train} & {e.answer for e in s.eval}
    t = tmp_path / "t.txt"
    t.write_text("\n".join(f"line {i} of plain text for a language model" for i in range(400)))
    s = build_splits({"dataset_name": "hf", "hf_name": "text", "data_files": str(t), "kind": "lm",
                      "columns": {"text": "text"}, "n_train": 2, "n_eval": 1, "max_length": 64}, tiny.tokenizer)
    assert len(s.train) == 2 and s.kind == "lm"


def test_fallback_when_the_dataset_cannot_be_read(tmp_path):
    from attnlab import load_backbone
    from attnlab.data import build_splits
    tok = load_backbone("tiny-gpt2").tokenizer
    cfg = {"dataset_name": "wikitext", "path": str(tmp_path / "missing.txt"), "n_train": 2, "n_eval": 2,
           "max_length": 64, "fallback": {"dataset_name": "python_docs"}}
    s = build_splits(cfg, tok)
    assert s.report["dataset_name"] == "python_docs" and len(s.eval) == 2
    assert s.report["fallback_from"]["dataset_name"] == "wikitext"
    assert "missing.txt" in s.report["fallback_from"]["reason"]
    with pytest.raises(Exception, match="missing.txt"):
        build_splits({k: v for k, v in cfg.items() if k != "fallback"}, tok)


def test_a_typo_does_not_fall_back():
    from attnlab import load_backbone
    from attnlab.data import build_splits
    tok = load_backbone("tiny-gpt2").tokenizer
    with pytest.raises(Exception, match="wikitxt"):
        build_splits({"dataset_name": "wikitxt", "n_train": 2, "n_eval": 2, "fallback": {"dataset_name": "python_docs"}},
                     tok)
