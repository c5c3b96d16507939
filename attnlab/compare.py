"""`attnlab eval --plugin`: the plug-in and the frozen base on the same examples, the change with a
paired 95% interval, and the per-example records behind it.

A user checking a plug-in on their own data needs to know whether a change is more than noise.
Both models are scored on the same n examples, so the change is paired: for perplexity
PPL_plugin / PPL_base − 1 with a percentile bootstrap over examples (`stats.paired_bootstrap_ppl`,
the same interval `attnlab run` reports use), for answer accuracy the difference in points
(`stats.paired_bootstrap_diff`). One evaluation of one plug-in is one seed: the interval covers
which examples were drawn, not how another training run would differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError


def _answers(model, tokenizer, examples, max_new_tokens, batch_size) -> tuple[dict, list[str]]:
    from .evaluate import answer_metrics, generate

    st = {}
    texts = generate(model, tokenizer, examples, max_new_tokens, batch_size, stats=st)
    am = answer_metrics(texts, [e.answer for e in examples], finished=st.get("finished"))
    am["n_cut_off"] = st.get("n_cut_off")
    return am, texts


def _summary(what: str, r: dict, pct: bool) -> dict:
    from .stats import within_noise

    k, unit = 100.0, "%" if pct else " pp"
    noise = within_noise(r["lo"], r["hi"])
    verdict = "within noise" if noise else ("better" if (r["change"] < 0) == pct else "worse")
    return {"change": r["change"], "lo": r["lo"], "hi": r["hi"], "n_examples": r["n_examples"], "verdict": verdict,
            "text": f"{what} {k * r['change']:+.1f}{unit} [{k * r['lo']:+.1f}, {k * r['hi']:+.1f}] vs the frozen base "
                    f"(paired bootstrap over {r['n_examples']} examples, 95%): {verdict}"}


def evaluate_against_base(bb, plugin, examples, batch_size: int = 8, generate_k: int = 0,
                          max_new_tokens: int = 128, qa: bool = True) -> dict:
    """Score the model (with `plugin` attached, or the base alone when it is None) on `examples`;
    with a plug-in, also the frozen base on the same examples and the paired changes.

    Returns {"metrics", "base_metrics" (None without a plug-in), "vs_base" ({} without one),
    "per_example": one dict per example}."""
    from .evaluate import base_reference, score
    from .stats import paired_bootstrap_diff, paired_bootstrap_ppl

    model, pad = bb.model, bb.tokenizer.pad_token_id
    gen = examples[:generate_k] if generate_k and qa else []
    base = base_answers = base_texts = reference = None
    if plugin is not None:
        plugin.detach()
        try:
            reference = base_reference(model, examples, pad, batch_size)
            base = score(model, examples, pad, batch_size)
            if gen:
                base_answers, base_texts = _answers(model, bb.tokenizer, gen, max_new_tokens, batch_size)
        finally:
            plugin.attach(model)
    metrics = score(model, examples, pad, batch_size, reference=reference)
    answers = texts = None
    if gen:
        answers, texts = _answers(model, bb.tokenizer, gen, max_new_tokens, batch_size)
    vs_base = {}
    if base is not None:
        m, b = metrics["per_example"], base["per_example"]
        vs_base["perplexity"] = _summary("perplexity", paired_bootstrap_ppl(m["nll"], m["n_tokens"], b["nll"],
                                                                             b["n_tokens"]), pct=True)
        if answers is not None and answers["per_example"]["correct"]:
            vs_base["accuracy"] = _summary("answer accuracy", paired_bootstrap_diff(
                answers["per_example"]["correct"], base_answers["per_example"]["correct"]), pct=False)
    rows = _per_example_rows(examples, metrics, base, answers, texts, base_answers, base_texts)
    for d in (metrics, base, answers, base_answers):
        if d is not None:
            d.pop("per_example", None)
    if answers is not None:
        metrics.update(answers)
    if base is not None and base_answers is not None:
        base.update(base_answers)
    return {"metrics": metrics, "base_metrics": base, "vs_base": vs_base, "per_example": rows}


def _per_example_rows(examples, metrics, base, answers, texts, base_answers, base_texts) -> list[dict]:
    m = metrics["per_example"]
    rows = [{"index": i, "nll": m["nll"][i], "n_tokens": m["n_tokens"][i]} for i in range(len(examples))]
    for i, r in enumerate(rows):
        if "kl" in m:
            r["kl_base_model"] = m["kl"][i]
        if base is not None:
            r["base_nll"], r["base_n_tokens"] = base["per_example"]["nll"][i], base["per_example"]["n_tokens"][i]
    if texts is not None:
        with_gold = [i for i, e in enumerate(examples[:len(texts)]) if e.answer is not None and str(e.answer).strip()]
        for i, text in enumerate(texts):
            rows[i].update(gold=examples[i].answer, output=text)
            if base_texts is not None:
                rows[i]["base_output"] = base_texts[i]
        for k, i in enumerate(with_gold):
            rows[i]["correct"] = answers["per_example"]["correct"][k]
            if base_answers is not None:
                rows[i]["base_correct"] = base_answers["per_example"]["correct"][k]
    return rows


def check_new_file(path: str) -> Path:
    """`path` as a Path, if a new file can be written there (checked before any work is done)."""
    p = Path(path)
    if p.exists():
        raise ConfigError(f"--per-example {path}: the file exists; give a new path (attnlab never writes over a file)")
    if not p.parent.is_dir():
        raise ConfigError(f"--per-example {path}: folder {p.parent} does not exist; create it or give another path")
    return p


def write_per_example(path: str, rows: list[dict]) -> Path:
    """One JSON object per line; refuses to write over an existing file (it may be the user's)."""
    from .atomic import write_text_atomic

    return write_text_atomic(check_new_file(path), "".join(json.dumps(r) + "\n" for r in rows))
