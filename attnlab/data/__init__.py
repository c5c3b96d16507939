"""Data: one Record schema, dataset adapters, tokenization with target-only loss masks.

    splits = build_splits({"dataset_name": "arithmetic", "n_train": 200, "n_eval": 50}, tokenizer)
    splits.train, splits.eval   # lists of Example; splits.report says what was skipped or cut and why
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .arithmetic import arithmetic_problems
from .records import BadRecord, EmptyDataset, Record, SkipLog
from .sources import SOURCES, SourceUnavailable, get_source, read_local
from .tokenize import IGNORE, Example, collate, collate_prompts, encode_lm, encode_qa, prompt_text

__all__ = ["Record", "Example", "Splits", "SkipLog", "BadRecord", "EmptyDataset", "SOURCES", "IGNORE",
           "build_splits", "load_records", "arithmetic_problems", "collate", "collate_prompts",
           "prompt_text", "read_local", "DATA_DEFAULTS"]

DATA_DEFAULTS = {"dataset_name": "arithmetic", "n_train": 256, "n_eval": 64, "max_length": 256,
                 "seed": 0, "shuffle": True}


@dataclass
class Splits:
    kind: str
    train: list[Example]
    eval: list[Example]
    report: dict = field(default_factory=dict)


def load_records(cfg: dict, limit: int | None = None, log: SkipLog | None = None) -> list[Record]:
    """Read up to `limit` usable records (after de-duplication), counting the bad ones in `log`."""
    cfg = {**DATA_DEFAULTS, **cfg}
    source = get_source(cfg["dataset_name"])
    log = log if log is not None else SkipLog()
    seen_keys = set()
    out = []
    for i, raw in enumerate(source.rows(cfg)):
        if limit is not None and len(out) >= limit:
            break
        log.seen += 1
        try:
            rec = source.to_record(raw, cfg)
        except BadRecord as e:
            log.skip(str(e), f"row {i}")
            continue
        key = (rec.prompt, rec.target)
        if key in seen_keys:
            log.skip("duplicate", f"row {i}")
            continue
        seen_keys.add(key)
        out.append(rec)
    log.kept = len(out)
    return out


def build_splits(cfg: dict, tokenizer) -> Splits:
    """Held-out eval split first, then train, from one dataset; all counts in `report`.

    `fallback:` (data options) is used when the dataset cannot be read (no network, no such file);
    the report says so and why."""
    if cfg.get("fallback"):
        first = {k: v for k, v in cfg.items() if k != "fallback"}
        try:
            return build_splits(first, tokenizer)
        except SourceUnavailable as e:  # only unreachable sources fall back; a typo stays an error
            alt = {**first, **cfg["fallback"]}
            for k in ("path", "config", "split", "hf_name", "data_files"):
                if k in first and k not in cfg["fallback"]:
                    alt.pop(k)  # options of the unreachable source do not carry over
            splits = build_splits(alt, tokenizer)
            splits.report["fallback_from"] = {"dataset_name": first.get("dataset_name"), "path": first.get("path"),
                                              "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            return splits
    cfg = {**DATA_DEFAULTS, **cfg}
    source = get_source(cfg["dataset_name"])
    kind = cfg.get("kind", source.kind)
    n_train, n_eval, max_len = int(cfg["n_train"]), int(cfg["n_eval"]), int(cfg["max_length"])
    if n_train < 0 or n_eval < 0 or max_len < 8:
        raise ValueError(f"need n_train >= 0, n_eval >= 0, max_length >= 8; got {n_train}, {n_eval}, {max_len}")
    log = SkipLog()
    if kind == "qa":
        # Read a little extra so that prompts dropped at tokenization don't shrink the splits much.
        records = load_records(cfg, limit=int(1.1 * (n_train + n_eval)) + 8, log=log)
        _shuffle(records, cfg)
        tok_log = SkipLog()
        examples = encode_qa(records, tokenizer, max_len, tok_log)
        eval_ex, train_ex = examples[:n_eval], examples[n_eval: n_eval + n_train]
    elif kind == "lm":
        records = load_records(cfg, limit=cfg.get("max_documents", 20000), log=log)
        _shuffle(records, cfg)
        tok_log = SkipLog()
        eval_ex, used = encode_lm(records, tokenizer, max_len, n_eval)
        train_ex, _ = encode_lm(records[used:], tokenizer, max_len, n_train)
    else:
        raise ValueError(f"data kind must be 'qa' or 'lm', got '{kind}'")
    if not train_ex and n_train > 0 or not eval_ex and n_eval > 0:
        raise EmptyDataset(
            f"dataset '{cfg['dataset_name']}' gave {len(train_ex)} train / {len(eval_ex)} eval examples "
            f"(wanted {n_train} / {n_eval}). Records: {log.summary()}. "
            f"Tokenization: {tok_log.reasons or 'nothing skipped'}. First problems: {log.examples + tok_log.examples}. "
            f"Check the dataset path and `columns:` mapping, or raise max_length.")
    report = {
        "dataset_name": cfg["dataset_name"], "kind": kind, "records": log.to_dict(),
        "tokenization": tok_log.to_dict(), "n_train": len(train_ex), "n_eval": len(eval_ex),
        "train_target_tokens": sum(e.n_target for e in train_ex),
        "eval_target_tokens": sum(e.n_target for e in eval_ex),
        "shortfall": {"train": max(0, n_train - len(train_ex)), "eval": max(0, n_eval - len(eval_ex))},
    }
    return Splits(kind=kind, train=train_ex, eval=eval_ex, report=report)


def _shuffle(records: list, cfg: dict) -> None:
    if cfg.get("shuffle", True):
        random.Random(f"attnlab-data-{cfg.get('seed', 0)}").shuffle(records)
