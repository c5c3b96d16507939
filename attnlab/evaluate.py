"""The research proposals' metrics: pure functions (unit-tested on hand-computed cases) and the
loops that apply them to a model.

Teacher-forced scoring only computes the LM head at target positions: the frozen body runs once,
and the head, the costly V-wide part, never sees the prompt tokens.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import decoder, max_positions
from .data import IGNORE, Example, collate, collate_prompts
from .errors import DataError
from .kvcache import generation_cache

# --- answers -------------------------------------------------------------------------------------
#
# An answer counts only when the model gave one: an explicit final-answer marker (\boxed{}, '####',
# 'The answer is', 'Answer:') anywhere, or, in a generation that finished (ended with EOS before
# max_new_tokens), its last number. A cut-off generation without a marker is unanswered: its last
# digits are wherever the cut fell, not an answer. Numbers with more than 15 significant digits
# are unparsed (runaway digit strings, beyond float precision): such an answer is no answer.

# a number: thousands groups ('1,234,567') or a plain digit run, a decimal part, a '/d' fraction
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_DIGIT_RUN = re.compile(r"\d[\d,.]*")
_MARKERS = [re.compile(r"####[ \t]*([^\n]*)"),
            re.compile(r"[Tt]he (?:final )?answer is:?[ \t]*\$?([^\n]*?)[ \t]*(?:\.[ \t]*)?$", re.M),
            re.compile(r"\b(?:[Ff]inal )?[Aa]nswer:[ \t]*([^\n]*?)[ \t]*$", re.M)]
MAX_DIGITS = 15


def _too_long(s: str) -> bool:
    """Whether `s` holds a digit run with more than MAX_DIGITS significant digits."""
    return any(len(run.replace(",", "").replace(".", "").lstrip("0")) > MAX_DIGITS
               for run in _DIGIT_RUN.findall(s))


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _marked(ans: str) -> str:
    """The answer in what follows a marker: all of it when it parses as a number, else the number
    after the last '=' ('9 - 5 = 4 apples' -> '4'), else its first number ('5 apples and 2 pears'
    -> '5'), else the text itself (a text answer)."""
    if parse_number(ans) is not None:
        return ans
    tail = ans.rsplit("=", 1)[-1]
    nums = _NUMBER.findall(tail)
    return nums[0] if nums else ans


def extract_answer(text: str, finished: bool = True) -> str | None:
    """The final answer of a generated solution, or None when it gave none.

    In order: the last \\boxed{...}; else the last (by position) '#### X', 'The answer is X' /
    'the answer is: X' or 'Answer: X' with a non-empty X; else, only if the generation `finished`
    (ended with EOS, not cut off at max_new_tokens), its last number. An answer holding a digit run
    of more than 15 significant digits is None (a runaway digit string, not a number)."""
    if not text:
        return None
    ans = _last_boxed(text)
    if ans is None:
        found = [(m.start(), m.group(1).strip()) for rx in _MARKERS for m in rx.finditer(text)]
        found = [(pos, a) for pos, a in found if a]
        if found:
            ans = _marked(max(found)[1])
        elif finished:
            nums = _NUMBER.findall(text)
            ans = nums[-1] if nums else None
    if not ans or _too_long(ans):
        return None
    return ans


def normalize_answer(ans: str | None) -> str:
    """Compare answers as strings after removing formatting: $, thousands commas, spaces, a final
    period, \\text{}, and '.0' on whole numbers."""
    if ans is None:
        return ""
    s = str(ans).strip().lower()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = s.rstrip(".").strip()
    num = parse_number(s)
    if num is not None and num == int(num) and abs(num) < 1e15:
        return str(int(num))
    return re.sub(r"\s+", " ", s)


def parse_number(ans: str | None) -> float | None:
    """A float from '42', '-3.5', '1,234', '3/4', '\\frac{3}{4}', '$12', '50%' (-> 50); else None.
    More than 15 significant digits, inf and nan are not numbers here."""
    if ans is None:
        return None
    s = str(ans).strip().replace("$", "").replace(",", "").rstrip(".").strip()
    s = s[:-1].strip() if s.endswith("%") else s
    m = re.fullmatch(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    if not re.fullmatch(r"-?(\d+\.?\d*|\.\d+)(/-?(\d+\.?\d*|\.\d+))?", s):
        return None
    for part in s.split("/"):
        if len(part.lstrip("-").replace(".", "").lstrip("0")) > MAX_DIGITS:
            return None
    if "/" in s:
        a, b = s.split("/")
        return float(a) / float(b) if float(b) != 0 else None
    x = float(s)
    return x if math.isfinite(x) else None


def answers_match(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return bool(normalize_answer(pred)) and normalize_answer(pred) == normalize_answer(gold)


def token_prf(pred: str | None, gold: str | None) -> tuple[float, float, float] | None:
    """Token-level precision, recall, F1 of two answer strings (SQuAD-style bag of tokens), for
    text answers. None when the gold is empty: there is nothing to score against."""
    p = normalize_answer(pred).split()
    g = normalize_answer(gold).split()
    if not g:
        return None
    if not p:
        return 0.0, 0.0, 0.0
    common = 0
    rest = list(g)
    for t in p:
        if t in rest:
            rest.remove(t)
            common += 1
    if common == 0:
        return 0.0, 0.0, 0.0
    prec, rec = common / len(p), common / len(g)
    return prec, rec, 2 * prec * rec / (prec + rec)


def numeric_errors(preds: list, golds: list, max_abs: float = 1e6) -> dict:
    """Errors of the answers that parse as numbers: the median absolute error over all of them,
    and MSE / RMSE only over those with |prediction| and |gold| <= max_abs (a runaway number
    would otherwise be the whole RMSE), with both counts."""
    if len(preds) != len(golds):
        raise DataError(f"numeric_errors: {len(preds)} predictions for {len(golds)} gold answers; pass one per problem")
    errs, in_range = [], []
    for p, g in zip(preds, golds):
        a, b = parse_number(p), parse_number(g)
        if a is not None and b is not None:
            errs.append(a - b)
            if abs(a) <= max_abs and abs(b) <= max_abs:
                in_range.append(a - b)
    out = {"n_parsed": len(errs), "n_in_range": len(in_range), "n_total": len(golds), "rmse_range": max_abs,
           "median_abs_error": statistics.median(abs(e) for e in errs) if errs else None}
    if in_range:
        mse = sum(e * e for e in in_range) / len(in_range)
        out.update(mse=mse, rmse=math.sqrt(mse))
    else:
        out.update(mse=None, rmse=None)
    return out


def answer_metrics(texts: list[str], golds: list[str | None], finished: list[bool] | None = None) -> dict:
    """Answer accuracy and its companions over generated solutions.

    Problems without a gold answer are left out of every number and counted (`n_no_gold`).
    accuracy = right / problems. precision = right / answers given (how often an answer, when
    the model commits to one, is right); recall = right / problems (= accuracy); F1 their harmonic
    mean: it differs from accuracy when the model often gives no answer. `per_example['correct']`
    lists 0/1 per problem with a gold answer, in order (for paired intervals).

    `finished[i]`: generation i ended with EOS (see `generate(..., stats=)`['finished']); a
    cut-off one counts only through an explicit marker. None treats every generation as finished.
    The numeric errors (`numeric_errors`) are over the same problems."""
    finished = list(finished) if finished is not None else [True] * len(texts)
    if not len(texts) == len(golds) == len(finished):
        raise DataError(f"answer_metrics: {len(texts)} texts, {len(golds)} gold answers and {len(finished)} "
                        "finished flags; pass one of each per problem")
    keep = [i for i, g in enumerate(golds) if g is not None and str(g).strip()]
    preds = [extract_answer(texts[i], finished[i]) for i in keep]
    gold = [golds[i] for i in keep]
    correct = [int(answers_match(p, g)) for p, g in zip(preds, gold)]
    n = len(keep)
    given = sum(p is not None for p in preds)
    right = sum(correct)
    prec = right / given if given else None
    rec = right / n if n else None
    out = {
        "accuracy": rec,
        "precision": prec,
        "recall": rec,
        "f1": None if rec is None else (2 * prec * rec / (prec + rec) if right else 0.0),
        "n_answered": given,
        "n_generated": len(texts),
        "n_no_gold": len(texts) - n,
        "n_finished": sum(bool(f) for f in finished),
    }
    out.update(numeric_errors(preds, gold))
    out["per_example"] = {"correct": correct}
    return out


# --- next-token distributions --------------------------------------------------------------------

def kl_divergence(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || model) per row, from log-probabilities over the last dimension."""
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions that predict a target token, the tokens they predict): labels shifted by one."""
    nxt = labels[:, 1:]
    keep = nxt != IGNORE
    return keep, nxt[keep]


def _has_plain_head(model: nn.Module) -> bool:
    # Models that scale or cap logits after the head need the full forward for exact logits.
    cfg = model.config
    return not any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier"))


def target_hidden(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict target tokens, and those tokens."""
    out = decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    h = out.last_hidden_state[:, :-1]
    keep, tokens = target_positions(batch["labels"])
    return h[keep], tokens


def target_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the target positions only (exactly what a full forward gives there), and the tokens."""
    if _has_plain_head(model):
        h, tokens = target_hidden(model, batch)
        return model.get_output_embeddings()(h), tokens
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    keep, tokens = target_positions(batch["labels"])
    return logits[:, :-1][keep], tokens


@dataclass
class Reference:
    """The frozen base's final hidden states at every eval target position, plus its head: enough to
    recompute the base's exact next-token distribution for KL without running the base again."""

    hidden: torch.Tensor
    head: nn.Module


def _batches(examples: list[Example], batch_size: int):
    """(indices, examples) per batch, longest first: a batch of similar lengths pads little (GSM8K
    in data order pads ~1.5x its real tokens). base_reference and score walk the same order;
    score puts its per-example results back in the examples' order."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        yield idx, [examples[j] for j in idx]


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def base_reference(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8) -> Reference:
    dev = _device(model)
    hs = []
    for _, chunk in _batches(examples, batch_size):
        batch = {k: v.to(dev) for k, v in collate(chunk, pad_id).items()}
        h, _ = target_hidden(model, batch)
        hs.append(h.float().cpu())
    return Reference(hidden=torch.cat(hs) if hs else torch.zeros(0), head=model.get_output_embeddings())


@torch.no_grad()
def score(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8,
          reference: Reference | None = None, body_frozen: bool = False) -> dict:
    """Teacher-forced cross-entropy, perplexity and next-token accuracy over target tokens, and
    KL(base || model) and top-1 agreement with the base when a base `reference` is given.

    `body_frozen`: the model differs from the base at most in its output head (the frozen base, a
    head-only plug-in), so its final hidden states are the reference's: only the head runs. Exact,
    and it skips the whole transformer body.

    `per_example` (from the same forward passes, for paired intervals over examples): "nll" the
    summed NLL of each example's target tokens, "n_tokens" their count, and with a reference "kl"
    the summed KL(base || model); sum(nll) / sum(n_tokens) is `cross_entropy`. Callers that
    store the metrics pop it."""
    if not examples:
        raise DataError("score() needs at least one example")
    if body_frozen and (reference is None or not _has_plain_head(model)):
        body_frozen = False
    dev = _device(model)
    nll = correct = n = 0.0
    kl = agree = 0.0
    offset = 0
    ex_nll, ex_tok, ex_kl = [0.0] * len(examples), [0] * len(examples), [0.0] * len(examples)
    for idx, chunk in _batches(examples, batch_size):
        batch = {k: v.to(dev) for k, v in collate(chunk, pad_id).items()}
        if body_frozen:
            _, tokens = target_positions(batch["labels"])
            logits = model.get_output_embeddings()(reference.hidden[offset: offset + tokens.numel()].to(dev))
        else:
            logits, tokens = target_logits(model, batch)
        # rows come example by example (boolean-mask order is row-major)
        counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
        logp = F.log_softmax(logits.float(), dim=-1)
        tok_nll = -logp.gather(1, tokens[:, None])[:, 0]
        nll += tok_nll.sum().item()
        for j, x, c in zip(idx, tok_nll.split(counts), counts):
            ex_nll[j], ex_tok[j] = x.sum().item(), c
        correct += (logp.argmax(-1) == tokens).sum().item()
        n += tokens.numel()
        if reference is not None:
            h = reference.hidden[offset: offset + tokens.numel()].to(dev)
            ref_logp = F.log_softmax(reference.head(h).float(), dim=-1)
            tok_kl = kl_divergence(ref_logp, logp)
            kl += tok_kl.sum().item()
            for j, x in zip(idx, tok_kl.split(counts)):
                ex_kl[j] = x.sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            offset += tokens.numel()
    if n == 0:
        raise DataError("the examples have no target tokens to score")
    ce = nll / n
    out = {"cross_entropy": ce, "perplexity": math.exp(min(ce, 700)), "next_token_accuracy": correct / n,
           "target_tokens": int(n)}
    out["per_example"] = {"nll": ex_nll, "n_tokens": ex_tok}
    if reference is not None:
        if offset != reference.hidden.shape[0]:
            raise DataError("the reference was computed on other examples (target counts differ); "
                            "compute base_reference on the examples being scored")
        out["kl_base_model"] = kl / n
        out["top1_agreement"] = agree / n
        out["per_example"]["kl"] = ex_kl
    return out


def _room(model: nn.Module, prompt_len: int, max_new_tokens: int) -> int:
    """max_new_tokens, capped so that prompt and output fit the model's positions (an output that
    reaches the cap counts as cut off)."""
    limit = max_positions(model)
    if limit is None:
        return max_new_tokens
    if prompt_len >= limit:
        raise DataError(f"prompts of {prompt_len} tokens fill the model's {limit} positions; nothing can be "
                        f"generated (lower max_length)")
    return min(max_new_tokens, limit - prompt_len)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, examples: list[Example], max_new_tokens: int = 128,
             batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, stats: dict | None = None) -> list[str]:
    """Continue each example's prompt (greedy by default); returns the generated text only.
    With a `stats` dict, counts the outputs cut off at max_new_tokens in stats["n_cut_off"] and
    lists per example whether it finished (ended before max_new_tokens) in stats["finished"]."""
    dev = _device(model)
    texts = []
    eos = tokenizer.eos_token_id
    for i in range(0, len(examples), batch_size):     # in data order: a sampled answer depends only on its seed
        chunk = examples[i: i + batch_size]
        batch = {k: v.to(dev) for k, v in collate_prompts(chunk, tokenizer.pad_token_id).items()}
        max_new = _room(model, batch["input_ids"].shape[1], max_new_tokens)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=eos)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k or 0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        cache = generation_cache(model)             # a sparse plug-in: appends in place (kvcache.py)
        if cache is not None:
            kwargs["past_key_values"] = cache
        out = model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
        if stats is not None:
            ended = (new == eos).any(dim=1) if eos is not None else torch.zeros(len(new), dtype=torch.bool)
            cut = (new.shape[1] == max_new) & ~ended
            stats["n_cut_off"] = stats.get("n_cut_off", 0) + int(cut.sum())
            stats.setdefault("finished", []).extend((~cut).tolist())
    return texts
