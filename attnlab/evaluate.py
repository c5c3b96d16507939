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

from .backbone import decoder
from .data import IGNORE, Example, collate, collate_prompts

# --- answers -------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


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


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the last \\boxed{...}, else what follows '####', else the
    last number in the text, else None."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    m = re.search(r"####\s*([^\n]+)", text)
    if m:
        return m.group(1).strip()
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


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
    if num is not None and math.isfinite(num) and num == int(num) and abs(num) < 1e15:
        return str(int(num))
    return re.sub(r"\s+", " ", s)


def parse_number(ans: str | None) -> float | None:
    """A float from '42', '-3.5', '1,234', '3/4', '\\frac{3}{4}', '$12', '50%' (-> 50); else None."""
    if ans is None:
        return None
    s = str(ans).strip().replace("$", "").replace(",", "").rstrip(".").strip()
    s = s[:-1].strip() if s.endswith("%") else s
    m = re.fullmatch(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    try:
        if re.fullmatch(r"-?[\d.]+/-?[\d.]+", s):
            a, b = s.split("/")
            return float(a) / float(b) if float(b) != 0 else None
        return float(s)
    except ValueError:
        return None


def answers_match(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return normalize_answer(pred) == normalize_answer(gold)


def token_prf(pred: str | None, gold: str | None) -> tuple[float, float, float]:
    """Token-level precision, recall, F1 of the answer strings (SQuAD-style bag of tokens)."""
    p = normalize_answer(pred).split()
    g = normalize_answer(gold).split()
    if not p and not g:
        return 1.0, 1.0, 1.0
    if not p or not g:
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


def numeric_errors(preds: list, golds: list) -> dict:
    """MSE, RMSE and median absolute error over the pairs where both answers parse as numbers."""
    errs = []
    for p, g in zip(preds, golds):
        a, b = parse_number(p), parse_number(g)
        if a is not None and b is not None:
            errs.append(a - b)
    out = {"n_parsed": len(errs), "n_total": len(golds)}
    if errs:
        mse = sum(e * e for e in errs) / len(errs)
        out.update(mse=mse, rmse=math.sqrt(mse), median_abs_error=statistics.median(abs(e) for e in errs))
    else:
        out.update(mse=None, rmse=None, median_abs_error=None)
    return out


def answer_metrics(texts: list[str], golds: list[str | None]) -> dict:
    """Exact-match accuracy, token P/R/F1 and numeric errors of generated solutions."""
    preds = [extract_answer(t) for t in texts]
    prf = [token_prf(p, g) for p, g in zip(preds, golds)]
    n = max(len(golds), 1)
    out = {
        "accuracy": sum(answers_match(p, g) for p, g in zip(preds, golds)) / n,
        "precision": sum(x[0] for x in prf) / n,
        "recall": sum(x[1] for x in prf) / n,
        "f1": sum(x[2] for x in prf) / n,
        "n_answered": sum(p is not None for p in preds),
        "n_generated": len(golds),
    }
    out.update(numeric_errors(preds, golds))
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
    for i in range(0, len(examples), batch_size):
        yield examples[i: i + batch_size]


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def base_reference(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8) -> Reference:
    dev = _device(model)
    hs = []
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(dev) for k, v in collate(chunk, pad_id).items()}
        h, _ = target_hidden(model, batch)
        hs.append(h.float().cpu())
    return Reference(hidden=torch.cat(hs) if hs else torch.zeros(0), head=model.get_output_embeddings())


@torch.no_grad()
def score(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8,
          reference: Reference | None = None) -> dict:
    """Teacher-forced cross-entropy, perplexity and next-token accuracy over target tokens, and
    KL(base || model) and top-1 agreement with the base when a base `reference` is given."""
    if not examples:
        raise ValueError("score() needs at least one example")
    dev = _device(model)
    nll = correct = n = 0.0
    kl = agree = 0.0
    offset = 0
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(dev) for k, v in collate(chunk, pad_id).items()}
        logits, tokens = target_logits(model, batch)
        logp = F.log_softmax(logits.float(), dim=-1)
        nll += -logp.gather(1, tokens[:, None]).sum().item()
        correct += (logp.argmax(-1) == tokens).sum().item()
        n += tokens.numel()
        if reference is not None:
            h = reference.hidden[offset: offset + tokens.numel()].to(dev)
            ref_logp = F.log_softmax(reference.head(h).float(), dim=-1)
            kl += kl_divergence(ref_logp, logp).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            offset += tokens.numel()
    if n == 0:
        raise ValueError("the examples have no target tokens to score")
    ce = nll / n
    out = {"cross_entropy": ce, "perplexity": math.exp(min(ce, 700)), "next_token_accuracy": correct / n,
           "target_tokens": int(n)}
    if reference is not None:
        if offset != reference.hidden.shape[0]:
            raise ValueError("the reference was computed on other examples (target counts differ)")
        out["kl_base_model"] = kl / n
        out["top1_agreement"] = agree / n
    return out


@torch.no_grad()
def generate(model: nn.Module, tokenizer, examples: list[Example], max_new_tokens: int = 128,
             batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, stats: dict | None = None) -> list[str]:
    """Continue each example's prompt (greedy by default); returns the generated text only.
    With a `stats` dict, counts the outputs cut off at max_new_tokens in stats["n_cut_off"]."""
    dev = _device(model)
    texts = []
    eos = tokenizer.eos_token_id
    for chunk in _batches(examples, batch_size):
        batch = {k: v.to(dev) for k, v in collate_prompts(chunk, tokenizer.pad_token_id).items()}
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=eos)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k or 0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
        if stats is not None:
            cut = (new.shape[1] == max_new_tokens) & ~(new == eos).any(dim=1)
            stats["n_cut_off"] = stats.get("n_cut_off", 0) + int(cut.sum())
    return texts
