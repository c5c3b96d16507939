"""`attnlab run CONFIG`: every method x every seed, trained and evaluated on a held-out split.

The config (YAML) names the model, the data (`dataset_name`), the methods, the seeds and the
budgets; see configs/quickstart.yaml. Each (method, seed) writes its own result.json atomically,
so a run that is stopped resumes where it was (finished cells are read back, a cell in training
resumes from its checkpoint). The frozen base is the same function for every seed: it is
evaluated once, and its target-position hidden states are kept to give every method's KL(base||m).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import random
import time
from pathlib import Path

import torch
import yaml

from . import __version__
from .backbone import load_backbone
from .data import build_splits
from .errors import ConfigError
from .evaluate import answer_metrics, base_reference, generate, score
from .modules import METHODS, make_config
from .train import TrainConfig, train

DEFAULTS = {
    "name": None,
    "model": "smollm2-135m",
    "seeds": [0],
    "data": {},
    "train": {"steps": 50, "batch_size": 8, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 5},
    "eval": {"batch_size": 8, "generate": True, "n_generate": 32, "max_new_tokens": 128,
             "prompt_tokens": 32},  # text data: generation continues the first prompt_tokens of eval texts
    "methods": [{"name": "frozen", "method": "frozen"}, {"name": "lora", "method": "lora"}],
    "feature_cache": True,   # head-only methods train from the base's cached hidden states
    "paired_baseline": None, # a method name: the report adds changes against it, paired by seed
    "datasets": None,        # label -> data options (over `data`): the whole run once per dataset
}
_TOP_KEYS = set(DEFAULTS) | {"description", "out_dir"}
_EVAL_KEYS = set(DEFAULTS["eval"]) | {"sampling"}


def load_config(path_or_dict) -> dict:
    """Read a YAML config, fill defaults, and check it before any model is loaded."""
    if isinstance(path_or_dict, dict):
        raw, where = copy.deepcopy(path_or_dict), "config"
    else:
        p = Path(path_or_dict)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        raw, where = yaml.safe_load(p.read_text()) or {}, str(p)
        raw.setdefault("name", p.stem)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at top level")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    cfg = {**copy.deepcopy(DEFAULTS), **raw}
    cfg["train"] = {**DEFAULTS["train"], **raw.get("train", {})}
    cfg["eval"] = {**DEFAULTS["eval"], **raw.get("eval", {})}
    cfg["name"] = cfg["name"] or "experiment"
    for ev in [cfg["eval"]] + [m.get("eval", {}) for m in cfg["methods"] if isinstance(m, dict)]:
        bad = set(ev) - _EVAL_KEYS
        if bad:
            raise ConfigError(f"{where}: unknown eval key(s) {sorted(bad)}; allowed: {sorted(_EVAL_KEYS)}")
        for sset in ev.get("sampling", []) or []:
            if not isinstance(sset, dict) or set(sset) - {"temperature", "top_k"}:
                raise ConfigError(f"{where}: each eval.sampling entry is {{temperature: T, top_k: K}}, got {sset!r}")
    if not isinstance(cfg["seeds"], list) or not cfg["seeds"] or not all(isinstance(s, int) for s in cfg["seeds"]):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {cfg['seeds']!r}")
    if cfg["datasets"] is not None:
        if not isinstance(cfg["datasets"], dict) or not cfg["datasets"] or not all(
                isinstance(v, dict) for v in cfg["datasets"].values()):
            raise ConfigError(f"{where}: datasets is a mapping label -> data options, e.g. "
                              f"{{math: {{dataset_name: arithmetic}}, code: {{dataset_name: python_stdlib}}}}")
    names = set()
    for m in cfg["methods"]:
        if not isinstance(m, dict) or "method" not in m:
            raise ConfigError(f"{where}: each entry of methods needs `method:` (one of {', '.join(METHODS)})")
        m.setdefault("name", m["method"])
        if m["name"] in names:
            raise ConfigError(f"{where}: two methods are named '{m['name']}'; give each a unique name")
        names.add(m["name"])
        make_config(m["method"], **_options(m))  # raises on unknown methods and options
        TrainConfig(**{**cfg["train"], **m.get("train", {})})
    if cfg["paired_baseline"] is not None and cfg["paired_baseline"] not in names:
        raise ConfigError(f"{where}: paired_baseline '{cfg['paired_baseline']}' is not one of the methods "
                          f"{sorted(names)}")
    return cfg


def _options(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("name", "method", "train", "eval")}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_experiment(config, out_root: str | os.PathLike = "runs", fresh: bool = False,
                   only_methods: list[str] | None = None, log=print) -> dict:
    """Run the config; returns the results dict also written to runs/<name>/results.json.

    With `datasets:` the whole run happens once per dataset, in runs/<name>/<label>/, and
    runs/<name>/report.md puts the datasets side by side."""
    from .report import write_report, write_multi_report

    cfg = load_config(config)
    out = Path(cfg.get("out_dir") or Path(out_root) / cfg["name"])
    if fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    labels = list(cfg["datasets"]) if cfg["datasets"] else [None]
    log(f"[attnlab] {cfg['name']}: model {cfg['model']}, data "
        f"{labels if labels != [None] else cfg['data'].get('dataset_name', 'arithmetic')}, "
        f"methods {[m['name'] for m in cfg['methods']]}, seeds {cfg['seeds']} -> {out}")
    t = time.perf_counter()
    bb = load_backbone(cfg["model"], device="cuda" if torch.cuda.is_available() else None)
    log(f"[attnlab] loaded {cfg['model']} ({bb.info['n_params'] / 1e6:.1f}M params) in {time.perf_counter() - t:.1f}s")
    per = {}
    for label in labels:
        one = copy.deepcopy(cfg)
        if label is not None:
            one["data"] = {**cfg["data"], **cfg["datasets"][label]}
            one["name"] = f"{cfg['name']}/{label}"
            log(f"[attnlab] dataset {label}: {one['data'].get('dataset_name', 'arithmetic')}")
        d_out = out / label if label is not None else out
        d_out.mkdir(parents=True, exist_ok=True)
        per[label] = _run_one(bb, one, d_out, only_methods, log, time.perf_counter())
        if label is not None:
            write_report(d_out, per[label])
    if labels == [None]:
        results = per[None]
        results["wall_time_s"] = round(time.perf_counter() - t_start, 1)
        _atomic_json(out / "results.json", results)
        write_report(out, results)
    else:
        results = {"name": cfg["name"], "config": cfg, "datasets": per,
                   "wall_time_s": round(time.perf_counter() - t_start, 1)}
        _atomic_json(out / "results.json", results)
        write_multi_report(out, results)
    log(f"[attnlab] wrote {out / 'report.md'} in {results['wall_time_s']:.0f}s total")
    return results


def _run_one(bb, cfg, out, only_methods, log, t_start) -> dict:
    """Every method x seed of `cfg` on its one dataset; results.json in `out`."""
    tok = bb.tokenizer
    splits = build_splits(cfg["data"], tok)
    dr = splits.report
    log(f"[attnlab] data: {dr['n_train']} train / {dr['n_eval']} eval examples, "
        f"{dr['train_target_tokens']} / {dr['eval_target_tokens']} target tokens; "
        f"records {dr['records']['kept']}/{dr['records']['seen']} kept, "
        f"{dr['tokenization']['truncated']} truncated, {dr['tokenization']['skipped']} dropped at tokenization")
    ev = cfg["eval"]
    gen_examples = splits.eval[: int(ev["n_generate"])] if ev["generate"] else []
    if splits.kind == "lm":  # continue the opening of each held-out text
        gen_examples = [dataclasses.replace(e, prompt_len=min(int(ev["prompt_tokens"]), len(e.input_ids) - 1))
                        for e in gen_examples]

    t = time.perf_counter()
    reference = base_reference(bb.model, splits.eval, tok.pad_token_id, ev["batch_size"])
    log(f"[attnlab] base reference over {reference.hidden.shape[0]} eval target tokens in {time.perf_counter() - t:.1f}s")

    cells = []
    methods = [m for m in cfg["methods"] if not only_methods or m["name"] in only_methods]
    features = {}  # built on first use by a head-only method, shared by all of them
    for m in methods:
        seeds = cfg["seeds"] if m["method"] != "frozen" else cfg["seeds"][:1]
        for seed in seeds:
            cells.append(_run_cell(bb, splits, gen_examples, reference, cfg, m, seed, out, log, features))
    results = {
        "name": cfg["name"], "config": cfg, "data": dr, "model": bb.info,
        "fingerprint": bb.fingerprint, "cells": cells,
        "environment": {"attnlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "device": "cuda" if torch.cuda.is_available() else "cpu",
                        "threads": torch.get_num_threads(), "platform": platform.platform()},
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    _atomic_json(out / "results.json", results)
    return results


def _features(bb, splits, cfg, features, log):
    from .features import build_feature_cache

    if "cache" not in features:
        t = time.perf_counter()
        features["cache"] = build_feature_cache(bb.model, bb.spec, splits.train, bb.tokenizer.pad_token_id,
                                                cfg["eval"]["batch_size"], log=log)
        features["seconds"] = round(time.perf_counter() - t, 2)
        if features["cache"] is not None:
            log(f"[attnlab] feature cache: {features['cache'].n_tokens} train target tokens at "
                f"{features['cache'].path} ({features['seconds']:.1f}s)")
    return features["cache"]


def _run_cell(bb, splits, gen_examples, reference, cfg, m, seed, out, log, features=None) -> dict:
    cell_dir = out / m["name"] / f"seed{seed}"
    done = cell_dir / "result.json"
    tok = bb.tokenizer
    ev = {**cfg["eval"], **m.get("eval", {})}
    tcfg = TrainConfig(**{**cfg["train"], **m.get("train", {}), "seed": seed})
    # everything the cell's numbers depend on: a finished cell is reused only if it all matches
    spec = json.loads(json.dumps({
        "method": m, "train": {k: v for k, v in dataclasses.asdict(tcfg).items()
                               if k not in ("progress", "log_every", "checkpoint_every")},
        "eval": ev, "data": {k: splits.report.get(k) for k in ("dataset_name", "kind", "n_train", "n_eval",
                                                                "train_target_tokens", "eval_target_tokens")},
        "base": bb.fingerprint["embedding_sha256"]}, default=str))
    if done.is_file():
        cell = json.loads(done.read_text())
        if "spec" in cell and cell["spec"] != spec:
            diff = sorted(k for k in spec if cell["spec"].get(k) != spec[k])
            raise ConfigError(f"{done} was computed with other settings ({', '.join(diff)} differ); rerun with "
                              f"--fresh, or give the config another name (or out_dir) to keep both")
        log(f"[attnlab] {m['name']} seed {seed}: done earlier, read from {done}")
        return cell
    seed_everything(seed)
    plugin = METHODS[m["method"]](make_config(m["method"], **_options(m))).attach(bb.model)
    try:
        n_trainable = plugin.num_trainable()
        log(f"[attnlab] {m['name']} seed {seed}: {n_trainable:,} trainable parameters")
        feats = None
        if plugin.head_only and n_trainable and cfg["feature_cache"] and features is not None:
            feats = _features(bb, splits, cfg, features, log)
        tr = train(bb.model, plugin, splits.train, tcfg, out_dir=cell_dir, pad_id=tok.pad_token_id, features=feats)
        t = time.perf_counter()
        metrics = score(bb.model, splits.eval, tok.pad_token_id, ev["batch_size"], reference=reference)
        metrics.update(plugin.extra_metrics(bb.model, splits.eval, tok.pad_token_id, ev["batch_size"]))
        samples = []
        qa = splits.kind == "qa"
        if gen_examples:
            gstats = {}
            texts = generate(bb.model, tok, gen_examples, ev["max_new_tokens"], ev["batch_size"], stats=gstats)
            if qa:
                metrics.update(answer_metrics(texts, [e.answer for e in gen_examples]))
                metrics["n_cut_off"] = gstats["n_cut_off"]
            metrics["sampling"] = []
            for k, sset in enumerate((ev.get("sampling") or []) if qa else []):  # accuracy needs answers
                torch.manual_seed(seed * 1000 + k)
                texts_s = generate(bb.model, tok, gen_examples, ev["max_new_tokens"], ev["batch_size"], do_sample=True,
                                   temperature=float(sset.get("temperature", 1.0)), top_k=sset.get("top_k"))
                acc = answer_metrics(texts_s, [e.answer for e in gen_examples])["accuracy"]
                metrics["sampling"].append({"temperature": float(sset.get("temperature", 1.0)),
                                            "top_k": sset.get("top_k"), "accuracy": acc})
            samples = [{"prompt": e.record.prompt if qa else tok.decode(e.input_ids[: e.prompt_len]),
                        "gold": e.answer, "output": x} for e, x in zip(gen_examples[:5], texts[:5])]
        eval_s = time.perf_counter() - t
        if n_trainable:
            plugin.save_pretrained(cell_dir / "plugin", base_name=bb.spec)
    finally:
        plugin.detach()
    cell = {"method": m["name"], "type": m["method"], "seed": seed, "spec": spec, "trainable_params": n_trainable,
            "train": {"steps": tr.steps, "tokens": tr.tokens, "seconds": round(tr.seconds, 2),
                      "from_feature_cache": feats is not None,
                      "tokens_per_s": round(tr.tokens_per_s, 1) if tr.tokens else None,
                      "resumed_from_step": tr.resumed_from,
                      "final_loss": tr.history[-1]["loss"] if tr.history else None},
            "loss_curve": [[h["step"], h["loss"]] for h in tr.history],
            "eval": metrics, "eval_seconds": round(eval_s, 2), "samples": samples}
    log(f"[attnlab] {m['name']} seed {seed}: ppl {metrics['perplexity']:.3f}"
        + (f", accuracy {metrics['accuracy']:.3f}" if "accuracy" in metrics else "")
        + f" (train {tr.seconds:.0f}s, eval {eval_s:.0f}s)")
    _atomic_json(done, cell)
    return cell


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
