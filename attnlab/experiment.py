"""`attnlab run CONFIG`: every method x every seed, trained, chosen on validation, read once on test
and on every transfer set.

The config (YAML) names the model, the data, the transfer sets (`eval_sets:`), the methods, the
seeds and the budgets; see configs/quickstart.yaml. Per (method, seed):

  1. train each point of the method's sweep (`train: {lr: [a, b, c]}` and/or `steps: [...]`),
     with optional early stopping on the validation loss;
  2. keep the point with the lowest validation loss (the report shows the whole sweep);
  3. score it once on the held-out test split and on each eval set (perplexity, KL to the base,
     answers from generation), keeping per-example numbers for paired confidence intervals.

Each (method, seed) writes its result.json atomically and each training run checkpoints, so a
stopped run resumes where it was. Everything is written inside the run folder, which carries a
marker naming the config and is locked while a run uses it; `--fresh` cleans only what attnlab
wrote there (attnlab/runfolder.py). `keep:` (or `--keep DIR`) also mirrors every finished cell and
sweep point into a folder that survives the run folder, e.g. one committed to git, and reads them
back (attnlab/keep.py); `order:` runs the cells in another order than arm by arm (attnlab/run_order.py).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import itertools
import json
import math
import platform
import random
import time
from pathlib import Path

import torch

from . import __version__, sparse_distill
from .atomic import write_json_atomic
from .backbone import check_length, fingerprint_hash, load_backbone
from .config import (as_bool, as_int, as_mapping, as_name, as_str, data_config, eval_config, read_yaml,
                     reject_unknown)
from .data import build_splits
from .data.arithmetic import check_options as check_arithmetic
from .data.sources import SourceUnavailable
from .errors import AttnlabError, ConfigError
from .evaluate import answer_metrics, base_reference, generate, score
from .keep import Keep, Reached, check_folder, fresh_check, read_result, stop_at, train_result
from .run_order import arm_seeds, cell_order
from .runfolder import MARKER, inside, lexical, prepare_run_folder, unlock  # noqa: F401  (MARKER: re-exported)
from .modules import METHODS, make_config
from .precision import DTYPES, in_base_precision, resolve_model_dtype
from .train import CKPT, NEUTRAL, NonFiniteLoss, TrainConfig, train

DEFAULTS = {
    "name": None,
    "model": "smollm2-135m",
    "seeds": [0],
    "data": {},
    "eval_sets": {},         # name -> data options: transfer sets, each read on its test split
    "train": {"steps": 50, "batch_size": 8, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 5},
    "eval": {},
    "methods": [{"name": "frozen", "method": "frozen"}, {"name": "lora", "method": "lora"}],
    "feature_cache": True,   # head-only methods train from the base's cached hidden states
    "paired_baseline": None, # a method name: the report adds changes against it, paired by seed
    "compare_against": None, # method names: a table of paired-bootstrap changes against each (default: first LoRA)
    "datasets": None,        # label -> data options (over `data`): the whole run once per dataset
    "sweep_seeds": "all",    # "first": sweep on the first seed only; later seeds reuse the value it chose
    "imports": [],           # modules to import first: they register a user's own methods (register_method)
    "model_dtype": "auto",   # the frozen base's dtype: auto (bf16 on a GPU, fp32 on CPU) | bf16 | fp16 | fp32
}
TOP_KEYS = set(DEFAULTS) | {"description", "out_dir", "keep",   # keep: a folder of finished results (attnlab/keep.py)
                             "order"}                             # order: the cells' run order (attnlab/run_order.py)
SWEEP_KEYS = ("lr", "steps", "weight_decay")   # a list here: each value is trained, validation chooses
CARD_METRICS = ("cross_entropy", "perplexity", "next_token_accuracy", "kl_base_model", "top1_agreement", "accuracy",
                "f1")                          # the numbers a saved plug-in's model card shows, per set


class NonFiniteResult(AttnlabError, ValueError):
    """A trained plug-in whose evaluation is NaN/inf: it is not saved and the run stops."""


# --- the config --------------------------------------------------------------------------------

_read_yaml = read_yaml   # refuses anchors and aliases before anything is built (attnlab/config.py)


def _check_data(opts: dict, where: str) -> None:
    """Every data block's schema, and the generator's own options where it is the source."""
    full = data_config(opts, where)
    if full["n_eval"] < 1:  # found here, not after the model has loaded
        raise ConfigError(f"{where}.n_eval: {full['n_eval']} leaves no test examples to score; expected >= 1")
    for d in (full, {**full, **(full.get("fallback") or {})}):
        if d.get("dataset_name") == "arithmetic":
            try:
                check_arithmetic(d.get("level"), d.get("families", "train"))
            except ConfigError as e:
                raise ConfigError(str(e).replace("data.", f"{where}.", 1)) from None


def train_points(d: dict, where: str) -> list[dict]:
    """The sweep of one method: every combination of the list-valued SWEEP_KEYS, each checked."""
    d = as_mapping(where, d)
    lists = {k: v for k, v in d.items() if isinstance(v, list)}
    bad = set(lists) - set(SWEEP_KEYS)
    if bad:
        raise ConfigError(f"{where}: {sorted(bad)} cannot be a list; only {list(SWEEP_KEYS)} can be swept")
    for k, v in lists.items():
        if not v:
            raise ConfigError(f"{where}.{k}: an empty list; give at least one value")
    points = []
    for combo in itertools.product(*lists.values()) if lists else [()]:
        point = {**d, **dict(zip(lists, combo))}
        points.append(dataclasses.asdict(TrainConfig.from_dict(point, where=where)))
    return points


def load_config(path_or_dict) -> dict:
    """Read a YAML config, fill defaults, and check every section before any model is loaded."""
    if isinstance(path_or_dict, dict):
        raw, where = copy.deepcopy(path_or_dict), "config"
    else:
        p = Path(path_or_dict)
        raw, where = _read_yaml(p), str(p)
        if isinstance(raw, dict):
            raw.setdefault("name", p.stem)
    if raw is None:
        raise ConfigError(f"{where}: the config is empty; see configs/quickstart.yaml for a complete one")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping (key: value lines) at top level, got a {type(raw).__name__}")
    reject_unknown(where, raw, TOP_KEYS)
    cfg = {**copy.deepcopy(DEFAULTS), **raw}
    _check_imports(cfg["imports"])
    cfg["name"] = as_name("name", cfg["name"] if cfg["name"] is not None else "experiment")
    cfg["model"] = as_str("model", cfg["model"])
    if cfg["model_dtype"] not in ("auto", *DTYPES):
        raise ConfigError(f"model_dtype: {cfg['model_dtype']!r} is not one of {['auto', *DTYPES]}")
    for key in ("out_dir", "keep"):
        if cfg.get(key) is not None:
            as_str(key, cfg[key])
    if cfg.get("description") is not None and not isinstance(cfg["description"], str):
        raise ConfigError(f"description: {cfg['description']!r} is not text")
    cfg["feature_cache"] = as_bool("feature_cache", cfg["feature_cache"])
    if cfg["sweep_seeds"] not in ("all", "first"):
        raise ConfigError(f"sweep_seeds: {cfg['sweep_seeds']!r} is not 'all' (every seed sweeps) or 'first' "
                          f"(the first seed sweeps, later seeds reuse its choice)")
    seeds = cfg["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    cfg["seeds"] = [as_int(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
    if len(set(cfg["seeds"])) != len(cfg["seeds"]):
        raise ConfigError(f"seeds: {cfg['seeds']} repeats a seed (one result would count twice); list each once")
    cfg["data"] = as_mapping("data", cfg["data"])
    _check_data(cfg["data"], "data")
    if cfg["datasets"] is not None:
        if not isinstance(cfg["datasets"], dict) or not cfg["datasets"] or not all(
                isinstance(v, dict) for v in cfg["datasets"].values()):
            raise ConfigError(f"datasets is a mapping label -> data options, e.g. "
                              f"{{math: {{dataset_name: arithmetic}}, code: {{dataset_name: python_stdlib}}}}")
        for label, opts in cfg["datasets"].items():
            as_name(f"datasets label", label)
            _check_data({**cfg["data"], **opts}, f"datasets.{label}")
    cfg["eval_sets"] = as_mapping("eval_sets", cfg["eval_sets"])
    for label, opts in cfg["eval_sets"].items():
        as_name("eval_sets name", label)
        if label == "test":
            raise ConfigError("eval_sets: 'test' is the in-distribution test split's name; call the set otherwise")
        opts = as_mapping(f"eval_sets.{label}", opts, allow_none=False)
        _check_data({k: v for k, v in opts.items() if k != "eval"}, f"eval_sets.{label}")
        eval_config(opts.get("eval"), f"eval_sets.{label}.eval", base=cfg.get("eval") if isinstance(
            cfg.get("eval"), dict) else None)
    cfg["train"] = {**DEFAULTS["train"], **as_mapping("train", raw.get("train"))}
    train_points(cfg["train"], "train")
    cfg["eval"] = eval_config(raw.get("eval"), "eval")
    _import_methods(cfg["imports"])  # user code: runs only once everything above is valid
    methods = cfg["methods"]
    if not isinstance(methods, list) or not methods:
        raise ConfigError(f"methods: expected a non-empty list of {{name: ..., method: ...}} entries; "
                          f"available methods: {', '.join(METHODS)}")
    names = set()
    for i, m in enumerate(methods):
        if not isinstance(m, dict) or "method" not in m:
            raise ConfigError(f"methods[{i}]: each entry needs `method:` (one of {', '.join(METHODS)})")
        if m["method"] not in METHODS:
            raise ConfigError(f"methods[{i}].method: unknown method {m['method']!r}; available: {', '.join(METHODS)} "
                              f"(a method of your own: list the module that registers it under imports:)")
        m.setdefault("name", m["method"])
        as_name(f"methods[{i}].name", m["name"])
        if m["name"] in names:
            raise ConfigError(f"methods: two methods are named '{m['name']}'; give each a unique name")
        names.add(m["name"])
        if "seeds" in m:
            own = m["seeds"]
            if (not isinstance(own, list) or not own or any(isinstance(x, bool) or not isinstance(x, int) for x in own)
                    or not set(own) <= set(cfg["seeds"]) or len(set(own)) != len(own)):
                raise ConfigError(f"methods.{m['name']}.seeds: {own!r} must be a non-empty list drawn from the "
                                  f"experiment's seeds {cfg['seeds']} (an arm runs a subset, so pairs stay paired)")
        make_config(m["method"], where=f"methods.{m['name']}", **_options(m))
        sparse_distill.distill_options(m, f"methods.{m['name']}")
        train_points({**cfg["train"], **as_mapping(f"methods.{m['name']}.train", m.get("train"))},
                     f"methods.{m['name']}.train")
        eval_config(m.get("eval"), f"methods.{m['name']}.eval", base=cfg["eval"])
    if cfg["paired_baseline"] is not None and cfg["paired_baseline"] not in names:
        raise ConfigError(f"paired_baseline: '{cfg['paired_baseline']}' is not one of the methods {sorted(names)}")
    refs = cfg["compare_against"]
    if refs is not None:
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs) or len(set(refs)) < len(refs):
            raise ConfigError(f"compare_against: expected a non-empty list of distinct method names, got {refs!r}")
        for r in refs:
            if r not in names:
                raise ConfigError(f"compare_against: '{r}' is not one of the methods {sorted(names)}")
    cell_order(cfg)
    return cfg


def _check_imports(modules) -> None:
    if not isinstance(modules, list) or not all(isinstance(x, str) and x for x in modules):
        raise ConfigError(f"imports: expected a list of module names, e.g. [my_methods.logit_bias], got {modules!r}")


def _import_methods(modules) -> None:
    """Import the `imports:` modules (installed or on the path), which register their methods.
    This runs their code, like trust_remote_code: load_config calls it only after every other
    section is valid, and any exception it raises is one line naming the module."""
    _check_imports(modules)
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports: cannot import '{name}' ({type(e).__name__}: {e}); install the package that "
                              f"defines it, or fix the name") from None
        except (Exception, SystemExit) as e:  # the module's own code failed: one line naming it
            text = " ".join(str(e).split())[:200]
            raise ConfigError(f"imports: importing '{name}' raised {type(e).__name__}"
                              f"{': ' + text if text else ''}; fix that module (imports: runs its code)") from None


def _options(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("name", "method", "train", "eval", "seeds", "_chosen_on_seed",
                                                    "distill")}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- the run folder: everything is written inside it ----------------------------------------------

def run_folder(cfg: dict, out_root, resolve: bool = True) -> Path:
    p = lexical(cfg["out_dir"] if cfg.get("out_dir") else Path(out_root).expanduser() / cfg["name"])
    return p.resolve() if resolve else p


# --- running --------------------------------------------------------------------------------------

def run_experiment(config, out_root="runs", fresh: bool = False, only_methods: list[str] | None = None,
                   log=print, keep: str | None = None) -> dict:
    """Run the config (see `_run_experiment`), holding the run folder's lock until it returns.
    `keep`: a folder that finished cells and sweep points are mirrored into and read back from
    (over the config's `keep:`; attnlab/keep.py)."""
    held = len(_LOCKS)
    try:
        return _run_experiment(config, out_root, fresh, only_methods, log, keep)
    finally:
        while len(_LOCKS) > held:
            unlock(_LOCKS.pop())


_LOCKS: list[int] = []   # run-folder locks this process holds (attnlab.runfolder)


def _run_experiment(config, out_root="runs", fresh: bool = False, only_methods: list[str] | None = None,
                    log=print, keep: str | None = None) -> dict:
    """Run the config; returns the results dict also written to <run folder>/results.json.

    With `datasets:` the whole run happens once per dataset, in <run folder>/<label>/, and
    <run folder>/report.md puts the datasets side by side.

    Under `accelerate launch` with N processes, training is data-parallel (attnlab.train); every
    process evaluates (the same numbers), and only the main one logs and writes files."""
    from .report import write_multi_report, write_report

    proc = _process()
    if not proc.is_main_process:
        log = lambda *a, **k: None  # noqa: E731
    cfg = load_config(config)
    if keep is not None:
        cfg["keep"] = as_str("--keep", keep)
    if fresh:
        fresh_check(cfg.get("keep"))
    names = [m["name"] for m in cfg["methods"]]
    if only_methods is not None:
        unknown = [m for m in only_methods if m not in names]
        if unknown or not only_methods:
            raise ConfigError(f"--methods: {unknown or only_methods} not in this config; its methods are: "
                              f"{', '.join(names)}")
    out = run_folder(cfg, out_root)
    check_folder(cfg.get("keep"), out)
    if proc.is_main_process:
        _LOCKS.append(prepare_run_folder(out, fresh, cfg["name"], link=run_folder(cfg, out_root, resolve=False),
                                         log=log))
    proc.wait_for_everyone()
    t_start = time.perf_counter()
    labels = list(cfg["datasets"]) if cfg["datasets"] else [None]
    log(f"[attnlab] {cfg['name']}: model {cfg['model']}, data "
        f"{labels if labels != [None] else cfg['data'].get('dataset_name', 'arithmetic')}, eval sets "
        f"{list(cfg['eval_sets']) or 'none'}, methods {names}, seeds {cfg['seeds']} -> {out}")
    t = time.perf_counter()
    bb = load_backbone(cfg["model"], device=str(proc.device) if torch.cuda.is_available() else None,
                       dtype=resolve_model_dtype(cfg["model_dtype"], proc.device))
    log(f"[attnlab] loaded {cfg['model']} ({bb.info['n_params'] / 1e6:.1f}M params) in {time.perf_counter() - t:.1f}s")
    _check_lengths(cfg, bb.model)
    per = {}
    for label in labels:
        one = copy.deepcopy(cfg)
        d_out = out
        if label is not None:
            one["data"] = {**cfg["data"], **cfg["datasets"][label]}
            one["name"] = f"{cfg['name']}/{label}"
            one["keep"] = str(Path(cfg["keep"]) / label) if cfg.get("keep") else None
            d_out = inside(out, label)
            log(f"[attnlab] dataset {label}: {one['data'].get('dataset_name', 'arithmetic')}")
        d_out.mkdir(parents=True, exist_ok=True)
        per[label] = _run_one(bb, one, d_out, only_methods, log, time.perf_counter(), _command(config, only_methods))
        if label is not None and proc.is_main_process:
            write_report(d_out, per[label])
    if labels == [None]:
        results = per[None]
        results["wall_time_s"] = round(time.perf_counter() - t_start, 1)
        if proc.is_main_process:
            write_json_atomic(out / "results.json", results)
            write_report(out, results)
    else:
        results = {"name": cfg["name"], "config": cfg, "datasets": per,
                   "wall_time_s": round(time.perf_counter() - t_start, 1)}
        if proc.is_main_process:
            write_json_atomic(out / "results.json", results)
            write_multi_report(out, results)
    log(f"[attnlab] wrote {out / 'report.md'} in {results['wall_time_s']:.0f}s total")
    proc.wait_for_everyone()  # the others return once the report is on disk
    return results


def _check_lengths(cfg: dict, model) -> None:
    """Every max_length of the config fits the model's positions (one line naming the key)."""
    blocks = [("data", cfg["data"])] + [(f"datasets.{k}", v) for k, v in (cfg["datasets"] or {}).items()] \
        + [(f"eval_sets.{k}", v) for k, v in cfg["eval_sets"].items()]
    for where, opts in blocks:
        n = opts.get("max_length", cfg["data"].get("max_length", 256))
        check_length(model, as_int(f"{where}.max_length", n), f"{where}.max_length")


def _process():
    """This process (accelerate's PartialState): its rank and device under `accelerate launch`,
    the only one otherwise."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@dataclasses.dataclass
class EvalSet:
    """One held-out set: its examples, the prompts to generate from, and the base's reference."""

    name: str
    kind: str
    examples: list
    gen_examples: list
    reference: object
    report: dict
    eval: dict = dataclasses.field(default_factory=dict)   # this set's overrides of the eval options


def _eval_set(bb, name, examples, kind, report, ev, log, overrides=None) -> EvalSet:
    ev = {**ev, **(overrides or {})}
    gen = examples[: ev["n_generate"]] if ev["generate"] else []
    if kind == "qa" and gen and not any(e.answer is not None and str(e.answer).strip() for e in examples):
        gen = []  # nothing to score generations against: teacher-forced metrics only, said in the report
        report.setdefault("notes", []).append(f"`{name}`: the data has no answers, so answer metrics (accuracy, "
                                              f"F1, errors) are skipped; perplexity and KL are scored")
        log(f"[attnlab] {name}: {report['notes'][-1]}")
    if kind == "lm":  # continue the opening of each held-out text
        gen = [dataclasses.replace(e, prompt_len=min(ev["prompt_tokens"], len(e.input_ids) - 1)) for e in gen]
    t = time.perf_counter()
    reference = base_reference(bb.model, examples, bb.tokenizer.pad_token_id, ev["batch_size"])
    log(f"[attnlab] {name}: base reference over {reference.hidden.shape[0]} target tokens in "
        f"{time.perf_counter() - t:.1f}s")
    return EvalSet(name, kind, examples, gen, reference, report, dict(overrides or {}))


def _load_eval_sets(bb, cfg, log) -> tuple[list[EvalSet], dict]:
    """The transfer sets, each its test split; unreachable ones without a fallback are skipped and
    said so in the report, never silently."""
    sets, skipped = [], {}
    for name, opts in cfg["eval_sets"].items():
        overrides = opts.get("eval") or {}
        opts = {"max_length": cfg["data"].get("max_length", 256), **{k: v for k, v in opts.items() if k != "eval"},
                "n_train": 0, "n_val": 0}
        try:
            s = build_splits(opts, bb.tokenizer)
        except SourceUnavailable as e:
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log(f"[attnlab] eval set {name}: skipped ({skipped[name]})")
            continue
        r = s.report
        log(f"[attnlab] eval set {name}: {r['n_eval']} examples of {r['dataset_name']}"
            + (f" (fallback for {r['fallback_from']['dataset_name']})" if r.get("fallback_from") else ""))
        sets.append(_eval_set(bb, name, s.eval, s.kind, r, cfg["eval"], log, overrides))
    return sets, skipped


def _command(config, only_methods) -> str | None:
    """The command line that runs this config (for the saved plug-ins' model cards)."""
    if isinstance(config, dict):
        return None
    return f"attnlab run {config}" + (f" --methods {','.join(only_methods)}" if only_methods else "")


def _run_one(bb, cfg, out, only_methods, log, t_start, command=None) -> dict:
    """Every method x seed of `cfg` on its one dataset; results.json in `out`."""
    tok = bb.tokenizer
    splits = build_splits(cfg["data"], tok)
    dr = splits.report
    log(f"[attnlab] data: {dr['n_train']} train / {dr['n_val']} validation / {dr['n_eval']} test examples "
        f"(disjoint by problem hash; {dr['split']['duplicates_removed']} duplicates removed), "
        f"{dr['train_target_tokens']} / {dr['val_target_tokens']} / {dr['eval_target_tokens']} target tokens; "
        f"{dr['tokenization']['truncated']} truncated, {dr['tokenization']['skipped']} dropped at tokenization")
    test = _eval_set(bb, "test", splits.eval, splits.kind, dr, cfg["eval"], log)
    transfer, skipped = _load_eval_sets(bb, cfg, log)
    base_fp = fingerprint_hash(bb.fingerprint)
    cells = []
    methods = [m for m in cfg["methods"] if not only_methods or m["name"] in only_methods]
    features = {}  # built on first use by a head-only method, shared by all of them
    reuse = {}   # arm -> the arm with the value its first seed chose (sweep_seeds: first)
    for m, seed in cell_order(cfg, methods):
        cell = _run_cell(bb, splits, [test] + transfer, cfg, reuse.get(m["name"], m), seed, out, log, features,
                         base_fp, command)
        cells.append(cell)
        chosen = cell["train"].get("chosen")
        if seed == arm_seeds(cfg, m)[0] and chosen and cfg["sweep_seeds"] == "first":
            # validation chose on the first seed; the others train that value only (cheaper, still blind to test)
            reuse[m["name"]] = {**m, "train": {**(m.get("train") or {}), **chosen}, "_chosen_on_seed": seed}
    rank = {m["name"]: i for i, m in enumerate(cfg["methods"])}   # reported in the config's order, however run
    cells.sort(key=lambda c: (rank[c["method"]], cfg["seeds"].index(c["seed"])))
    results = {
        "name": cfg["name"], "config": cfg, "data": dr, "model": bb.info,
        "fingerprint": bb.fingerprint, "cells": cells,
        "eval_sets": {s.name: s.report for s in transfer}, "eval_sets_skipped": skipped,
        "environment": {"attnlab": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "device": "cuda" if torch.cuda.is_available() else "cpu",
                        "threads": torch.get_num_threads(), "platform": platform.platform()},
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    if _process().is_main_process:
        write_json_atomic(out / "results.json", results)
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


def _point_label(point: dict, swept: list[str]) -> str:
    return ",".join(f"{k}={point[k]:g}" if isinstance(point[k], float) else f"{k}={point[k]}" for k in swept)


def _body_frozen(plugin) -> bool:
    """The plug-in leaves the transformer body as it is: scoring needs only the output head."""
    return plugin.head_only or plugin.method == "frozen"


@in_base_precision  # a bf16 base with fp32 plug-in weights: under autocast
def _val_loss(bb, splits, ev, plugin, refs: dict) -> float | None:
    """Cross-entropy on the validation split (head-only plug-ins: from the base's cached states)."""
    if not splits.val:
        return None
    if _body_frozen(plugin) and "val" not in refs:
        refs["val"] = base_reference(bb.model, splits.val, bb.tokenizer.pad_token_id, ev["batch_size"])
    return score(bb.model, splits.val, bb.tokenizer.pad_token_id, ev["batch_size"], reference=refs.get("val"),
                 body_frozen=_body_frozen(plugin))["cross_entropy"]


@in_base_precision  # a bf16 base with fp32 plug-in weights: under autocast
def _evaluate(bb, plugin, sets: list[EvalSet], ev: dict, seed: int) -> tuple[dict, dict, list]:
    """Metrics of the model as it is now on every held-out set; per-example numbers apart.

    Greedy generation runs once over the prompts of all sets together: on a CPU a decoding step
    costs about the same for 24 or 48 sequences (it is bound by reading the weights)."""
    tok = bb.tokenizer
    metrics, per_example, samples = {}, {}, []
    for es in sets:
        m = score(bb.model, es.examples, tok.pad_token_id, ev["batch_size"], reference=es.reference,
                  body_frozen=_body_frozen(plugin))
        per_example[es.name] = m.pop("per_example", {})
        m.update(plugin.extra_metrics(bb.model, es.examples, tok.pad_token_id, ev["batch_size"]))
        metrics[es.name] = m
    by_len = {}  # one generation per max_new_tokens
    for es in sets:
        if es.gen_examples:
            by_len.setdefault(int({**ev, **es.eval}["max_new_tokens"]), []).append(es)
    for max_new, group in by_len.items():
        prompts = [e for es in group for e in es.gen_examples]
        gstats = {}
        texts = generate(bb.model, tok, prompts, max_new, max(ev["batch_size"], len(prompts)), stats=gstats)
        i = 0
        for es in group:
            n = len(es.gen_examples)
            t, fin = texts[i: i + n], gstats["finished"][i: i + n]
            i += n
            m = metrics[es.name]
            m["n_cut_off"] = n - sum(fin)
            if es.kind == "qa":
                am = answer_metrics(t, [e.answer for e in es.gen_examples], finished=fin)
                per_example[es.name].update(am.pop("per_example", {}))
                m.update(am)
            if es.name == "test":
                qa = es.kind == "qa"
                samples = [{"prompt": e.record.prompt if qa else tok.decode(e.input_ids[: e.prompt_len]),
                            "gold": e.answer, "output": x} for e, x in zip(es.gen_examples[:5], t[:5])]
    for es in sets:  # the decoding grid, where a set asks for one (accuracy needs answers)
        sampling = {**ev, **es.eval}.get("sampling") or []
        metrics[es.name]["sampling"] = []
        for k, sset in enumerate(sampling if es.kind == "qa" and es.gen_examples else []):
            torch.manual_seed(seed * 1000 + k)
            st = {}
            texts_s = generate(bb.model, tok, es.gen_examples, {**ev, **es.eval}["max_new_tokens"], ev["batch_size"],
                               do_sample=True, temperature=float(sset.get("temperature", 1.0)),
                               top_k=sset.get("top_k"), stats=st)
            am = answer_metrics(texts_s, [e.answer for e in es.gen_examples], finished=st.get("finished"))
            metrics[es.name]["sampling"].append({"temperature": float(sset.get("temperature", 1.0)),
                                                 "top_k": sset.get("top_k"), "accuracy": am["accuracy"],
                                                 "correct": am["per_example"]["correct"]})
    return metrics, per_example, samples


@dataclasses.dataclass
class _Trained:
    plugin: object
    tr: object                    # TrainResult; None when stopped at a kept best step (keep.stop_at)
    feats: object
    n_trainable: int
    val: float | None = None      # the validation loss at that kept best step
    gate_record: object = None    # a distilled gate's record (sparse_distill)


def _train_point(bb, splits, cfg, m, point, p_dir, ev, features, run_fp, distill, log, stop=None) -> _Trained:
    """A fresh plug-in, seeded, trained at one point of the sweep; it stays attached (detached on
    error). `stop`: end at that step with its weights (the chosen point of a kept sweep, trained
    again from step 0; a checkpoint in p_dir is resumed as usual instead)."""
    seed_everything(point["seed"])
    tcfg = TrainConfig.from_dict(point)
    plugin = METHODS[m["method"]](make_config(m["method"], **_options(m))).attach(bb.model)
    try:
        n_trainable = plugin.num_trainable()
        feats = None
        if plugin.head_only and n_trainable and cfg["feature_cache"]:
            feats = _features(bb, splits, cfg, features, log)
        val_fn = (lambda: _val_loss(bb, splits, ev, plugin, features)) if splits.val and n_trainable else None
        if distill:
            tr, gate_record = sparse_distill.distil(plugin, splits, distill, log)
            return _Trained(plugin, tr, feats, n_trainable, gate_record=gate_record)
        if stop and val_fn and tcfg.eval_every and not (p_dir / CKPT).exists():
            val_fn = stop_at(val_fn, plugin, stop, tcfg.eval_every, tcfg.steps)
        try:
            tr = train(bb.model, plugin, splits.train, tcfg, out_dir=p_dir, pad_id=bb.tokenizer.pad_token_id,
                       features=feats, val_fn=val_fn, run_fingerprint=run_fp, log=log)
        except Reached as r:
            plugin.load_state_dict(r.state)
            return _Trained(plugin, None, feats, n_trainable, val=r.val)
        return _Trained(plugin, tr, feats, n_trainable)
    except BaseException:
        plugin.detach()
        raise


def _run_cell(bb, splits, sets: list[EvalSet], cfg, m, seed, out, log, features, base_fp, command=None) -> dict:
    cell_dir = inside(out, m["name"], f"seed{seed}")
    done = cell_dir / "result.json"
    ev = eval_config(m.get("eval"), base=cfg["eval"])
    points = train_points({**cfg["train"], **(m.get("train") or {})}, f"methods.{m['name']}.train")
    points = [{**p, "seed": seed} for p in points]
    distill = sparse_distill.distill_options(m, f"methods.{m['name']}")
    if distill:   # the gate distils once from the teacher: nothing of train: to sweep
        points = points[:1]
    swept = [k for k in SWEEP_KEYS if len({json.dumps(p[k]) for p in points}) > 1]
    # everything the cell's numbers depend on: a finished cell is reused only if it all matches
    spec = json.loads(json.dumps({
        "method": {k: v for k, v in m.items() if k != "seeds"}, "train": [{k: v for k, v in p.items()
                                if k not in NEUTRAL and (k, v) != ("mixed_precision", None)}
                               for p in points],
        "eval": ev, "data": splits.report["fingerprint"],
        "eval_sets": {s.name: [s.report.get("fingerprint"), s.eval] for s in sets[1:]},
        "base": base_fp}, default=str))
    world = _process().num_processes
    if world > 1 and m["method"] != "frozen":  # another global batch (batch_size x grad_accum x processes)
        spec["processes"] = world
    kept = Keep(cfg.get("keep"), main=_process().is_main_process)
    cell = read_result(done, spec, "rerun with --fresh, or give the config another name (or out_dir) to keep both",
                       log)
    if cell is not None:
        log(f"[attnlab] {m['name']} seed {seed}: done earlier, read from {done}")
        kept.save_result(m["name"], seed, cell)   # mirrored if not kept yet (a no-op without keep:)
        return cell
    cell = kept.result(m["name"], seed, spec, log)
    if cell is not None:
        return cell
    plugin_cls = METHODS[m["method"]]
    options = make_config(m["method"], **_options(m))
    run_fp = {"base": base_fp, "data": splits.report["fingerprint"], "plugin": json.loads(json.dumps(
        {"method": m["method"], "options": dataclasses.asdict(options)}, default=str))}

    if len(points) > 1:  # nothing to tune without trainable parameters (the frozen base, a fixed pattern)
        probe = plugin_cls(make_config(m["method"], **_options(m))).attach(bb.model)
        n0 = probe.num_trainable()
        probe.detach()
        if n0 == 0:
            points, swept = points[:1], []
    sweep, best = [], None
    for point in points:
        label = _point_label(point, swept)
        p_dir = cell_dir if len(points) == 1 else inside(cell_dir, "sweep", label)
        diverged = p_dir / "diverged.json"
        mark = {"run": run_fp, "point": json.loads(json.dumps(point, default=str))}
        if len(points) > 1 and diverged.is_file() and json.loads(diverged.read_text()).get("mark") == mark:
            sweep.append({**{k: point[k] for k in swept}, "val_loss": None, "diverged": True})
            log(f"[attnlab] {m['name']} seed {seed} {label}: diverged earlier, skipped")
            continue
        done_point = kept.point(m["name"], seed, label, mark) if len(points) > 1 else None
        if done_point is not None:   # finished in an earlier session: its summary, no weights
            sweep.append(done_point["row"])
            val = done_point["row"]["val_loss"]
            log(f"[attnlab] {m['name']} seed {seed} {label}: read from the kept sweep "
                + ("(diverged)" if done_point["row"].get("diverged") else f"(validation loss {val:.4f})"))
            if not done_point["row"].get("diverged") and (best is None or (val is not None and (
                    best[0] is None or val < best[0]))):
                best = (val, point, train_result(done_point), None, None, done_point["n_trainable"])
            continue
        try:
            t_ = _train_point(bb, splits, cfg, m, point, p_dir, ev, features, run_fp, distill, log)
            plugin, tr, feats, n_trainable, gate_record = t_.plugin, t_.tr, t_.feats, t_.n_trainable, t_.gate_record
        except NonFiniteLoss as e:
            if len(points) == 1:
                raise
            # one point of a sweep diverging is a result (that value is too large), not a failed run
            row = {**{k: point[k] for k in swept}, "val_loss": None, "diverged": True}
            if _process().is_main_process:
                write_json_atomic(diverged, {"mark": mark, "error": str(e)})
            kept.save_point(m["name"], seed, label, mark, row)
            sweep.append(row)
            log(f"[attnlab] {m['name']} seed {seed} {label}: diverged ({e}); the sweep goes on without it")
            continue
        try:
            val = _val_loss(bb, splits, ev, plugin, features)
            if val is not None and not math.isfinite(val):
                val = math.inf
            row = {**{k: point[k] for k in swept}, "val_loss": val, "steps": tr.steps, "tokens": tr.tokens,
                   "best_step": tr.best_step, "stopped_early": tr.stopped_early}
            sweep.append(row)
            if len(points) > 1:
                kept.save_point(m["name"], seed, label, mark, row, n_trainable, tr)
                log(f"[attnlab] {m['name']} seed {seed} {label}: validation loss {val:.4f}")
            if best is None or (val is not None and (best[0] is None or val < best[0])):
                best = (val, point, tr, {k: v.clone() for k, v in plugin.state_dict().items()} if len(points) > 1
                        else None, feats, n_trainable)
        except BaseException:
            plugin.detach()
            raise
        if len(points) > 1:
            plugin.detach()
    if best is None:
        raise NonFiniteLoss(f"{m['name']} seed {seed}: every value of the sweep diverged "
                            f"({', '.join(_point_label(p, swept) for p in points)}); try smaller learning rates")
    val, point, tr, state, feats, n_trainable = best
    retrained = None
    if len(points) > 1 and state is None:  # chosen from the kept sweep: its weights are trained again
        label = _point_label(point, swept)
        log(f"[attnlab] {m['name']} seed {seed} {label}: chosen from the kept sweep; training it again to its best "
            f"step {tr.best_step} for the test evaluation")
        t = time.perf_counter()
        t_ = _train_point(bb, splits, cfg, m, point, inside(cell_dir, "sweep", label), ev, features, run_fp,
                          distill, log, stop=tr.best_step)
        plugin, feats, n_trainable = t_.plugin, t_.feats, t_.n_trainable
        val2 = t_.val if t_.val is not None else _val_loss(bb, splits, ev, plugin, features)
        retrained = {"val_loss": val2, "kept_val_loss": val, "seconds": round(time.perf_counter() - t, 2)}
        log(f"[attnlab] {m['name']} seed {seed} {label}: retrained, validation loss {val2:.4f} (kept {val:.4f})")
    elif len(points) > 1:  # the chosen point, re-attached
        seed_everything(seed)
        plugin = plugin_cls(make_config(m["method"], **_options(m))).attach(bb.model)
        plugin.load_state_dict(state)
    try:
        log(f"[attnlab] {m['name']} seed {seed}: {n_trainable:,} trainable parameters"
            + (f"; chosen on validation: {_point_label(point, swept)}" if swept else ""))
        t = time.perf_counter()
        results, per_example, samples = _evaluate(bb, plugin, sets, ev, seed)
        for name, metrics in results.items():
            bad = [k for k in ("cross_entropy", "perplexity") if not math.isfinite(metrics.get(k, 0.0))]
            if bad:
                raise NonFiniteResult(f"{m['name']} seed {seed}: {', '.join(bad)} on {name} is not finite "
                                      f"({metrics.get('cross_entropy')}); the plug-in is not saved. Lower the "
                                      f"learning rate or check the data")
        eval_s = time.perf_counter() - t
        if n_trainable and _process().is_main_process:
            dr = splits.report
            card = {"data": {"options": cfg["data"], "fingerprint": dr["fingerprint"], "n_train": dr["n_train"],
                             "n_val": dr["n_val"], "n_test": dr["n_eval"], "train_target_tokens": dr["train_target_tokens"]},
                    "training": {**{k: point[k] for k in ("steps", "batch_size", "grad_accum", "lr", "weight_decay",
                                                          "warmup_steps", "seed")},
                                 "steps_done": tr.steps, "tokens": tr.tokens, "validation_loss": val,
                                 "chosen_on_validation": {k: point[k] for k in swept} or None},
                    "metrics": {name: {k: r[k] for k in CARD_METRICS if isinstance(r.get(k), (int, float))}
                                for name, r in results.items()},
                    "command": command}
            if distill:   # the gate's own training: train: was not used
                card["training"] = {"distill": distill, "steps_done": tr.steps, "teacher_tokens": tr.tokens,
                                    "seed": seed}
            plugin.save_pretrained(inside(cell_dir, "plugin"), base_name=bb.spec, card=card)
        gate_state = {k: v.clone() for k, v in plugin.state_dict().items()} if distill else None
    finally:
        plugin.detach()
    quality = (sparse_distill.heldout_sweep(bb.model, splits, options, distill, gate_state, gate_record, log)
               if distill else None)
    cell = {"method": m["name"], "type": m["method"], "seed": seed, "spec": spec, "trainable_params": n_trainable,
            "train": {"steps": tr.steps, "tokens": tr.tokens, "seconds": round(tr.seconds, 2),
                      "from_feature_cache": feats is not None,
                      "tokens_per_s": round(tr.tokens_per_s, 1) if tr.tokens else None,
                      "resumed_from_step": tr.resumed_from,
                      "final_loss": tr.history[-1]["loss"] if tr.history else None,
                      "best_step": tr.best_step, "stopped_early": tr.stopped_early,
                      "chosen": {k: point[k] for k in swept} if swept else None,
                      "chosen_on_seed": m.get("_chosen_on_seed"), **({"retrained": retrained} if retrained else {})},
            "sweep": sweep, "val_loss": val,
            "loss_curve": [[h["step"], h["loss"]] for h in tr.history],
            "val_curve": [list(x) for x in tr.val_history],
            "eval": results["test"], "eval_sets": {k: v for k, v in results.items() if k != "test"},
            "per_example": per_example, "eval_seconds": round(eval_s, 2), "samples": samples}
    if quality:
        cell["sparse_quality"] = quality
    log(f"[attnlab] {m['name']} seed {seed}: test ppl {results['test']['perplexity']:.3f}"
        + (f", accuracy {results['test']['accuracy']:.3f}" if results["test"].get("accuracy") is not None else "")
        + "".join(f"; {k} ppl {v['perplexity']:.3f}" for k, v in results.items() if k != "test")
        + f" (train {tr.seconds:.0f}s, eval {eval_s:.0f}s)")
    if _process().is_main_process:
        write_json_atomic(done, cell)
    kept.save_result(m["name"], seed, cell)
    return cell
