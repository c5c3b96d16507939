"""Data: one Record schema, dataset adapters, splits that cannot leak, tokenization with
target-only loss masks.

    splits = build_splits({"dataset_name": "arithmetic", "n_train": 200, "n_eval": 50}, tokenizer)
    splits.train, splits.val, splits.eval   # lists of Example (eval is the test split)
    splits.report                           # what was read, skipped, cut, de-duplicated, and why

Train / validation / test are disjoint by construction: each record is assigned by a hash of its
normalised problem text (`split_of`), so the same problem always lands in the same split whatever
n_train, n_eval or the seed, and exact duplicates are removed and counted. Validation chooses
(learning rates, steps, early stopping); test is read once per run.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from ..config import DATA_KEYS, data_config
from ..errors import DataError
from .arithmetic import arithmetic_problems
from .records import BadRecord, EmptyDataset, Record, SkipLog
from .sources import SOURCES, SourceUnavailable, get_source, read_local, source_kind
from .tokenize import IGNORE, Example, collate, collate_prompts, encode_lm, encode_qa, prompt_text

__all__ = ["Record", "Example", "Splits", "SkipLog", "BadRecord", "EmptyDataset", "SOURCES", "IGNORE",
           "build_splits", "load_records", "arithmetic_problems", "collate", "collate_prompts",
           "prompt_text", "read_local", "DATA_KEYS", "split_of", "normalise_text", "data_fingerprint"]

SPLITS = ("train", "val", "test")


@dataclass
class Splits:
    kind: str
    train: list[Example]
    eval: list[Example]                      # the test split: read once per run
    report: dict = field(default_factory=dict)
    val: list[Example] = field(default_factory=list)


def normalise_text(text: str) -> str:
    """Lower case, white space folded: two problems that differ only in spacing or case are one."""
    return " ".join(text.lower().split())


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """'test', 'val' or 'train' for a problem, from a hash of its normalised text alone."""
    h = hashlib.sha256(("attnlab-split|" + normalise_text(text)).encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0 ** 64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _clean(cfg: dict) -> dict:
    """Validated data options with defaults, None-valued options dropped (sources use .get)."""
    return {k: v for k, v in data_config(cfg).items() if v is not None}


def _records(cfg: dict, log: SkipLog, want=None, limit: int | None = None):
    """Yield (index, Record) of the usable, de-duplicated records of the source, counting skips.
    `want(rec) -> bool` may stop the reading early by returning False for "enough"."""
    source = get_source(cfg["dataset_name"])
    seen_keys = set()
    for i, raw in enumerate(source.rows(cfg)):
        if limit is not None and log.kept >= limit:
            break
        log.seen += 1
        try:
            rec = source.to_record(raw, cfg)
        except BadRecord as e:
            log.skip(str(e), f"row {i + 1}")
            continue
        key = (normalise_text(rec.prompt), normalise_text(rec.target))
        if key in seen_keys:
            log.skip("duplicate", f"row {i + 1}")
            continue
        seen_keys.add(key)
        log.kept += 1
        yield rec
        if want is not None and not want():
            break


def load_records(cfg: dict, limit: int | None = None, log: SkipLog | None = None) -> list[Record]:
    """Read up to `limit` usable records (after de-duplication), counting the bad ones in `log`."""
    cfg = _clean(cfg)
    log = log if log is not None else SkipLog()
    return list(_records(cfg, log, limit=limit))


def _problem_text(rec: Record) -> str:
    return rec.prompt if rec.prompt.strip() else rec.target


def build_splits(cfg: dict, tokenizer) -> Splits:
    """Test, validation and train splits of one dataset (disjoint by a hash of each problem's
    text); all counts in `report`.

    `fallback:` (data options) is used when the dataset cannot be read (no network, no such file);
    the report says so and why."""
    cfg = data_config(cfg)
    if cfg.get("fallback"):
        first = {k: v for k, v in cfg.items() if k != "fallback"}
        try:
            return build_splits(first, tokenizer)
        except SourceUnavailable as e:  # only unreachable sources fall back; a typo stays an error
            alt = {**first, **cfg["fallback"]}
            for k in ("path", "config", "split", "hf_name", "hf_config", "data_files"):
                if k not in cfg["fallback"]:
                    alt[k] = None  # options of the unreachable source do not carry over
            splits = build_splits(alt, tokenizer)
            splits.report["fallback_from"] = {"dataset_name": first.get("dataset_name"), "path": first.get("path"),
                                              "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            return splits
    cfg = {k: v for k, v in cfg.items() if v is not None}
    kind = source_kind(cfg)
    n = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_eval"]}
    fractions = (cfg["val_fraction"], cfg["test_fraction"])
    log = SkipLog()
    by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
    if kind == "qa":
        # Read a little extra so that prompts dropped at tokenization don't shrink the splits much;
        # stop once every split has what it needs (sources may be endless, e.g. the generator).
        quota = {s: (math.ceil(1.1 * k) + 4 if k else 0) for s, k in n.items()}
        max_seen = 200 * (sum(quota.values()) + 10)

        def want():
            return any(len(by_split[s]) < quota[s] for s in SPLITS) and log.seen < max_seen
    elif kind == "lm":
        quota, want = None, None
    else:
        raise DataError(f"data.kind must be 'qa' or 'lm', got '{kind}'")
    for rec in _records(cfg, log, want=want, limit=cfg["max_documents"] if kind == "lm" else None):
        s = split_of(_problem_text(rec), *fractions)
        if quota is None or len(by_split[s]) < quota[s]:
            by_split[s].append(rec)
    usable = log.kept
    log.kept = sum(len(v) for v in by_split.values())
    for s in SPLITS:
        _shuffle(by_split[s], cfg, s)
    tok_log = SkipLog()
    ex = {}
    for s in SPLITS:
        if kind == "qa":
            ex[s] = encode_qa(by_split[s], tokenizer, cfg["max_length"], tok_log)[: n[s]]
        else:
            ex[s], _ = encode_lm(by_split[s], tokenizer, cfg["max_length"], n[s])
    if any(n[s] > 0 and not ex[s] for s in SPLITS):
        got = " / ".join(f"{len(ex[s])} {s}" for s in SPLITS)
        want_s = " / ".join(f"{n[s]}" for s in SPLITS)
        raise EmptyDataset(
            f"dataset '{cfg['dataset_name']}' gave {got} examples (wanted {want_s}). Records: {log.summary()}. "
            f"Tokenization: {tok_log.reasons or 'nothing skipped'}. First problems: {log.examples + tok_log.examples}. "
            f"Check the dataset path and `columns:` mapping, or raise max_length.")
    report = {
        "dataset_name": cfg["dataset_name"], "kind": kind,
        "records": {**log.to_dict(), "usable_not_needed": usable - log.kept},
        "tokenization": tok_log.to_dict(), "n_train": len(ex["train"]), "n_val": len(ex["val"]),
        "n_eval": len(ex["test"]),
        "train_target_tokens": sum(e.n_target for e in ex["train"]),
        "val_target_tokens": sum(e.n_target for e in ex["val"]),
        "eval_target_tokens": sum(e.n_target for e in ex["test"]),
        "shortfall": {"train": max(0, n["train"] - len(ex["train"])), "val": max(0, n["val"] - len(ex["val"])),
                      "eval": max(0, n["test"] - len(ex["test"]))},
        "split": {"by": "sha256 of the normalised problem text", "val_fraction": fractions[0],
                  "test_fraction": fractions[1], "duplicates_removed": log.reasons.get("duplicate", 0)},
        "options": {k: cfg[k] for k in (("level", "families") if cfg["dataset_name"] == "arithmetic" else ())
                    + ("path", "seed") if k in cfg},
    }
    splits = Splits(kind=kind, train=ex["train"], eval=ex["test"], val=ex["val"], report=report)
    report["fingerprint"] = data_fingerprint(splits)
    return splits


def data_fingerprint(splits: Splits) -> str:
    """A hash of every token id and loss mask of the three splits: a checkpoint or finished result
    is reused only on the very same data."""
    h = hashlib.sha256()
    for name, exs in (("train", splits.train), ("val", splits.val), ("test", splits.eval)):
        h.update(f"|{name}|{len(exs)}|".encode())
        for e in exs:
            h.update(",".join(map(str, e.input_ids)).encode() + b";" + ",".join(map(str, e.labels)).encode() + b"\n")
    return h.hexdigest()[:16]


def _shuffle(records: list, cfg: dict, split: str) -> None:
    if cfg.get("shuffle", True):
        random.Random(f"attnlab-data-{cfg.get('seed', 0)}-{split}").shuffle(records)
