import math

import pytest
import torch
import torch.nn.functional as F

from attnlab.data import collate
from attnlab.errors import DataError
from attnlab.evaluate import (answer_metrics, answers_match, base_reference, extract_answer, generate, kl_divergence,
                              normalize_answer, numeric_errors, parse_number, score, target_logits, token_prf)

from .conftest import tiny_splits


@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234\nmore text", "1,234"),
    ("I get 12 apples, then 15 apples.", "15"),
    ("it is -3.5 degrees", "-3.5"),
    ("no digits here", None),
    ("", None),
    ("\\boxed{unclosed", None),
    ("#### ", None),  # an empty marker is no answer
    ("I list 1,2,3", "3"),  # commas only group thousands
    ("The answer is 5 apples and 2 pears.", "5"),
    ("so the answer: 7 apples", "7"),
    ("The answer is Paris.", "Paris"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_and_parse():
    assert normalize_answer(" $1,234. ") == "1234"
    assert normalize_answer("7.0") == "7"
    assert normalize_answer("\\text{Paris}") == "paris"
    assert parse_number("3/4") == 0.75
    assert parse_number("\\frac{1}{8}") == 0.125
    assert parse_number("50%") == 50.0
    assert parse_number("1/0") is None
    assert parse_number("x+1") is None
    assert parse_number("inf") is None and parse_number("nan") is None and parse_number("-Infinity") is None
    assert parse_number("1" * 15 + ".5") is None and parse_number("0.000123") == 0.000123
    assert answers_match("1,000", "1000") and answers_match("0.5", "1/2")
    assert not answers_match("12", "13") and not answers_match(None, "1")


def test_token_prf_hand_computed():
    # pred tokens {a, b, c}, gold {b, c, d, e}: common 2 -> P 2/3, R 2/4, F1 = 2PR/(P+R) = 4/7
    p, r, f = token_prf("a b c", "b c d e")
    assert (p, r) == (2 / 3, 0.5) and math.isclose(f, 4 / 7)
    assert token_prf("x", "y") == (0.0, 0.0, 0.0)
    assert token_prf(None, "y") == (0.0, 0.0, 0.0)
    assert token_prf("", "") is None  # an empty gold is not scored (it used to count as a perfect 1.0)


def test_numeric_errors_hand_computed():
    # errors: 1 - 3 = -2, 10 - 10 = 0, 7 - 4 = 3; 'abc' does not parse
    e = numeric_errors(["1", "10", "abc", "7"], ["3", "10", "5", "4"])
    assert e["n_parsed"] == 3 and e["n_total"] == 4
    assert math.isclose(e["mse"], (4 + 0 + 9) / 3)
    assert math.isclose(e["rmse"], math.sqrt(13 / 3))
    assert e["median_abs_error"] == 2
    assert numeric_errors(["x"], ["1"])["rmse"] is None


def test_answer_metrics():
    m = answer_metrics(["... #### 12", "\\boxed{5}", "nothing"], ["12", "6", "3"])
    assert math.isclose(m["accuracy"], 1 / 3)
    assert m["n_answered"] == 2 and m["n_parsed"] == 2
    assert math.isclose(m["mse"], (0 + 1) / 2)


def test_kl_hand_computed():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.25, 0.75]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert math.isclose(kl_divergence(p.log(), q.log()).item(), expected, rel_tol=1e-6)
    assert kl_divergence(p.log(), p.log()).item() == 0


def test_target_logits_equal_the_full_forward(tiny):
    s = tiny_splits(tiny, n_train=3, n_eval=1)
    b = collate(s.train, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        fast, tokens = target_logits(tiny.model, b)
        full = tiny.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    keep = b["labels"][:, 1:] != -100
    torch.testing.assert_close(fast, full[:, :-1][keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, b["labels"][:, 1:][keep])


def test_score_matches_a_manual_computation(tiny):
    s = tiny_splits(tiny, n_train=1, n_eval=3)
    pad = tiny.tokenizer.pad_token_id
    ref = base_reference(tiny.model, s.eval, pad, batch_size=2)
    m = score(tiny.model, s.eval, pad, batch_size=2, reference=ref)
    nll, correct, n = 0.0, 0, 0
    for e in s.eval:  # one at a time, full forward, no padding
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logp = F.log_softmax(tiny.model(ids).logits[0, :-1], -1)
        tgt = torch.tensor(e.labels[1:])
        keep = tgt != -100
        nll -= logp[keep].gather(1, tgt[keep][:, None]).sum().item()
        correct += (logp[keep].argmax(-1) == tgt[keep]).sum().item()
        n += int(keep.sum())
    assert m["target_tokens"] == n
    assert math.isclose(m["cross_entropy"], nll / n, rel_tol=1e-5)
    assert math.isclose(m["perplexity"], math.exp(nll / n), rel_tol=1e-5)
    assert math.isclose(m["next_token_accuracy"], correct / n)
    assert abs(m["kl_base_model"]) < 1e-6  # the base against itself


def test_score_rejects_empty_input(tiny):
    with pytest.raises(DataError, match="at least one example"):
        score(tiny.model, [], 0)


# --- sound answer metrics (issue 10) -------------------------------------------------------------

def test_a_127_digit_run_is_unparsed():
    run = "9" * 127
    assert parse_number(run) is None and parse_number("1" * 16) is None and parse_number("1" * 15) == 111111111111111
    m = answer_metrics([f"so {run}"], ["5"])
    assert m["n_parsed"] == 0 and m["n_answered"] == 0 and m["rmse"] is None and m["accuracy"] == 0.0
    # behind a marker too: a runaway digit string is no answer
    assert extract_answer(f"#### {run}") is None and extract_answer(f"\\boxed{{{run}}}") is None


def test_an_empty_gold_is_excluded_and_counted_not_scored_as_right():
    m = answer_metrics(["#### 3", "#### 4", "#### 5"], ["3", "", None])
    assert m["n_no_gold"] == 2 and m["accuracy"] == 1.0 and m["per_example"]["correct"] == [1]
    assert answer_metrics(["#### "], [""])["accuracy"] is None


def test_a_cut_off_generation_without_a_marker_is_unparsed_but_with_a_marker_it_is_parsed():
    assert extract_answer("3 + 4 = 7 then 7 * 2 = 1", finished=False) is None
    assert extract_answer("3 + 4 = 7\n#### 7\nand then 99", finished=False) == "7"
    assert extract_answer("So the answer is 12.", finished=False) == "12"
    assert extract_answer("3 + 4 = 7", finished=True) == "7"
    m = answer_metrics(["we get 12", "#### 12"], ["12", "12"], finished=[False, False])
    assert m["per_example"]["correct"] == [0, 1] and m["n_answered"] == 1


def test_rmse_leaves_out_of_range_answers_out_and_says_so():
    m = numeric_errors(["10", "12", "5000000"], ["10", "10", "10"], max_abs=1e6)
    assert m["n_parsed"] == 3 and m["n_in_range"] == 2 and m["rmse_range"] == 1e6
    assert m["rmse"] == pytest.approx(math.sqrt(2)) and m["median_abs_error"] == 2


def test_precision_differs_from_accuracy_when_answers_are_missing():
    m = answer_metrics(["#### 1", "#### 9", "no idea", "thinking"], ["1", "2", "3", "4"], finished=[True, True, True, False])
    # answered: "1" (right), "9" (wrong); "no idea" finished without a number; "thinking" was cut off
    assert m["accuracy"] == 0.25 and m["recall"] == 0.25 and m["precision"] == 0.5
    assert m["f1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    none = answer_metrics(["thinking", "more"], ["1", "2"], finished=[False, False])
    assert none["precision"] is None and none["recall"] == 0.0 and none["f1"] == 0.0 and none["n_answered"] == 0


def test_mismatched_lengths_are_a_user_error():
    with pytest.raises(DataError):
        answer_metrics(["#### 1", "#### 2"], ["1"])
    with pytest.raises(DataError):
        answer_metrics(["#### 1"], ["1"], finished=[True, False])
    with pytest.raises(DataError):
        numeric_errors(["1"], ["1", "2"])


class _Scripted(torch.nn.Module):
    """A stand-in model whose generate() appends fixed continuations (for the finished flags)."""

    def __init__(self, new):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.new = torch.tensor(new)

    def generate(self, input_ids, attention_mask, **kw):
        assert kw["max_new_tokens"] == self.new.shape[1]
        return torch.cat([input_ids, self.new[: len(input_ids)]], 1)


def test_generate_lists_per_example_whether_it_finished():
    from attnlab import load_backbone
    bb = load_backbone("tiny-gpt2")
    s = tiny_splits(bb, n_train=1, n_eval=3)
    eos, pad = bb.tokenizer.eos_token_id, bb.tokenizer.pad_token_id
    # example 1 ends with EOS (then padding), 2 is cut off at 3 new tokens, 3 ends with EOS at the last step
    st = {}
    texts = generate(_Scripted([[11, eos, pad], [11, 12, 13], [11, 12, eos]]), bb.tokenizer, s.eval, 3, 8, stats=st)
    assert st["finished"] == [True, False, True] and st["n_cut_off"] == 1 and len(texts) == 3
    # a real model, batches of 2: one flag per example, in order, consistent with the count
    st = {}
    texts = generate(bb.model, bb.tokenizer, s.eval, max_new_tokens=4, batch_size=2, stats=st)
    assert len(st["finished"]) == len(texts) == 3 and st["n_cut_off"] == 3 - sum(st["finished"])
    assert len(generate(bb.model, bb.tokenizer, s.eval[:1], max_new_tokens=2)) == 1  # stats stays optional


def test_score_per_example_nll_sums_to_the_total(tiny):
    s = tiny_splits(tiny, n_train=2, n_eval=5)
    ref = base_reference(tiny.model, s.eval, tiny.tokenizer.pad_token_id, 2)
    m = score(tiny.model, s.eval, tiny.tokenizer.pad_token_id, 2, reference=ref)
    pe = m["per_example"]
    assert len(pe["nll"]) == len(pe["n_tokens"]) == len(pe["kl"]) == 5
    assert sum(pe["n_tokens"]) == m["target_tokens"] == sum(e.n_target for e in s.eval)
    assert sum(pe["nll"]) / sum(pe["n_tokens"]) == pytest.approx(m["cross_entropy"], rel=1e-6)


def test_scoring_a_head_only_plugin_from_the_cached_body_is_exact(tiny):
    from attnlab import attach
    s = tiny_splits(tiny, n_train=2, n_eval=5)
    ref = base_reference(tiny.model, s.eval, tiny.tokenizer.pad_token_id, 2)
    p = attach(tiny.model, "head_ft")
    with torch.no_grad():
        for v in p.trainable_parameters().values():
            v.add_(0.05 * torch.randn_like(v))
    full = score(tiny.model, s.eval, tiny.tokenizer.pad_token_id, 2, reference=ref)
    fast = score(tiny.model, s.eval, tiny.tokenizer.pad_token_id, 2, reference=ref, body_frozen=True)
    p.detach()
    assert fast["kl_base_model"] > 0
    for k in ("cross_entropy", "kl_base_model", "top1_agreement", "next_token_accuracy"):
        assert fast[k] == pytest.approx(full[k], rel=1e-5, abs=1e-7), k


def test_a_marker_followed_by_a_computation_gives_the_number_it_arrives_at():
    assert extract_answer("So, the answer is 9 - 5 = 4 apples left.", finished=False) == "4"
    assert extract_answer("#### 1,234") == "1,234" and extract_answer("The answer is: \\frac{1}{2}") == "\\frac{1}{2}"


def test_scoring_batches_by_length_keeps_each_example_s_result_in_its_place_and_pads_less(tiny):
    from attnlab.evaluate import _batches
    s = tiny_splits(tiny, n_train=2, n_eval=7)
    pad = tiny.tokenizer.pad_token_id
    alone = [score(tiny.model, [e], pad, 1)["per_example"]["nll"][0] for e in s.eval]
    ref = base_reference(tiny.model, s.eval, pad, 3)
    batched = score(tiny.model, s.eval, pad, 3, reference=ref)["per_example"]
    assert batched["nll"] == pytest.approx(alone, rel=1e-5)
    assert batched["n_tokens"] == [e.n_target for e in s.eval]
    assert max(abs(k) for k in batched["kl"]) < 1e-5         # the reference rows line up with the scored ones
    lengths = [len(e.input_ids) for e in s.eval]
    assert len(set(lengths)) > 1                     # the check below means something only with varied lengths
    padded = sum(len(c) * max(len(e.input_ids) for e in c) for _, c in _batches(s.eval, 3))
    in_order = sum(len(lengths[i:i + 3]) * max(lengths[i:i + 3]) for i in range(0, len(lengths), 3))
    assert sum(lengths) <= padded <= in_order
