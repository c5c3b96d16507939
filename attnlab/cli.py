"""The `attnlab` command: run, eval, generate, data preview, profile. Every command has --help."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _data_cfg(a) -> dict:
    cfg = {"dataset_name": a.dataset, "n_train": 0, "n_val": 0, "n_eval": a.n, "max_length": a.max_length}
    if a.path:
        cfg["path"] = a.path
    if getattr(a, "columns", None):
        from .errors import ConfigError

        cols = {}
        for kv in a.columns.split(","):
            field, sep, column = kv.partition("=")
            if not sep or not field.strip() or not column.strip():
                raise ConfigError(f"--columns: {kv!r} is not FIELD=COLUMN; write e.g. "
                                  f"--columns prompt=question,target=answer (or text=COLUMN)")
            cols[field.strip()] = column.strip()
        cfg["columns"] = cols
    return cfg


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not allowed; expected a number >= 1")
    return n


def _count(text: str) -> int:
    try:
        return _positive(text) if text.strip() != "0" else 0
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected a whole number >= 0") from None


OUTPUT_MARKER = ".attnlab-output"   # a folder `profile` / `lm-eval` wrote into: they may write there again


def _folder_arg(path: str, flag: str, claim: bool = False) -> None:
    """An output folder given on the command line must not be an existing file (checked first).
    With `claim`, the command writes fixed file names into it: it must be new, empty or marked as
    one attnlab wrote before (`_claim`), so that no file of the user's is replaced."""
    from pathlib import Path

    from .errors import ConfigError

    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag}: {path} is a file; give a folder (new or one attnlab wrote)")
    if not claim:
        return
    if folder.is_dir() and any(folder.iterdir()) and not (folder / OUTPUT_MARKER).is_file():
        raise ConfigError(f"{flag}: {path} already holds files attnlab did not write; give a new or empty folder "
                          f"(attnlab writes fixed names there and would replace yours)")


def _claim(path: str) -> None:
    """Create and mark the output folder `_folder_arg(..., claim=True)` accepted, just before writing."""
    from pathlib import Path

    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUTPUT_MARKER).write_text("attnlab profile / lm-eval write into this folder\n")


def cmd_run(a) -> int:
    from .experiment import run_experiment

    from .experiment import run_folder

    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods is not None else None
    _folder_arg(a.out, "--out")
    res = run_experiment(a.config, out_root=a.out, fresh=a.fresh, only_methods=methods, keep=a.keep)
    from .experiment import _process
    if _process().is_main_process:  # under `accelerate launch`, one report, not one per process
        print()
        print((run_folder(res["config"], a.out) / "report.md").read_text())
    return 0


def _load(a):
    from .backbone import check_length, load_backbone
    from .modules import load_plugin

    bb = load_backbone(a.model, trust_remote_code=a.trust_remote_code)
    if getattr(a, "max_length", None) is not None:
        check_length(bb.model, a.max_length, "--max-length")
    plugin = load_plugin(bb.model, a.plugin, allow_missing_body_hash=a.allow_missing_body_hash) if a.plugin else None
    return bb, plugin


def cmd_eval(a) -> int:
    from .compare import check_new_file, evaluate_against_base, write_per_example
    from .data import build_splits

    if a.per_example:
        check_new_file(a.per_example)
    bb, plugin = _load(a)
    splits = build_splits(_data_cfg(a), bb.tokenizer)
    r = evaluate_against_base(bb, plugin, splits.eval, a.batch_size, a.generate, a.max_new_tokens,
                              qa=splits.kind == "qa")
    if a.per_example:
        write_per_example(a.per_example, r["per_example"])
    out = {"model": a.model, "plugin": a.plugin, "data": splits.report, "metrics": r["metrics"]}
    if plugin is not None:
        out.update(base_metrics=r["base_metrics"], vs_base=r["vs_base"])
    print(json.dumps(out, indent=2))
    for v in r["vs_base"].values():
        print(v["text"], file=sys.stderr)
    return 0


def cmd_generate(a) -> int:
    import torch

    from .data import prompt_text

    from .backbone import max_positions
    from .errors import ConfigError

    if not a.prompt.strip():
        raise ConfigError("--prompt: the prompt is empty; give the text to continue")
    if a.sample and not a.temperature > 0 or a.top_k < 0:
        raise ConfigError(f"--temperature {a.temperature} / --top-k {a.top_k}: sampling needs a temperature > 0 and "
                          f"a top-k >= 0 (0: off)")
    bb, _ = _load(a)
    tok = bb.tokenizer
    text = prompt_text(tok, a.prompt) if not a.raw else a.prompt
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    limit, n = max_positions(bb.model), ids["input_ids"].shape[1]
    if limit is not None and a.max_new_tokens >= limit:
        raise ConfigError(f"--max-new-tokens: {a.max_new_tokens} leaves no room for the prompt in the {limit} "
                          f"positions {a.model} reads; use at most {limit - 1}")
    if limit is not None and n + a.max_new_tokens > limit:  # keep the end of the prompt: it is what is continued
        keep = limit - a.max_new_tokens
        ids = {k: v[:, n - keep:] for k, v in ids.items()}
        print(f"[attnlab] the prompt is {n} tokens; cut {n - keep} from the left so that it and --max-new-tokens "
              f"{a.max_new_tokens} fit the {limit} positions {a.model} reads", file=sys.stderr)
    if a.seed is not None:
        torch.manual_seed(a.seed)
    kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.sample, pad_token_id=tok.pad_token_id)
    kw.update(temperature=a.temperature, top_k=a.top_k or 0) if a.sample else kw.update(
        temperature=None, top_p=None, top_k=None)
    from .kvcache import generation_cache
    cache = generation_cache(bb.model)          # a sparse plug-in: appends in place (kvcache.py)
    with torch.no_grad():
        out = bb.model.generate(**ids, **kw, **({"past_key_values": cache} if cache is not None else {}))
    print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def cmd_data_preview(a) -> int:
    from .data import SOURCES, SkipLog, load_records

    if a.list:
        for name, s in SOURCES.items():
            print(f"{name:18s} {s.kind:3s}  {s.description}")
        return 0
    log = SkipLog()
    recs = load_records(_data_cfg(a), limit=a.n, log=log)
    for r in recs:  # each field cut to --width, so every line stays valid JSON
        print(json.dumps({k: v[: a.width] + "…" if isinstance(v, str) and len(v) > a.width else v
                          for k, v in r.to_dict().items()}, ensure_ascii=False))
    print(f"# {a.dataset}: {log.summary()}" + (f"; first problems: {log.examples}" if log.examples else ""),
          file=sys.stderr)
    if a.model:
        from .backbone import load_backbone
        from .data import build_splits
        bb = load_backbone(a.model)
        s = build_splits({**_data_cfg(a), "n_eval": min(a.n, len(recs)), "shuffle": False}, bb.tokenizer)
        print(json.dumps(s.report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description="Attach small trainable attention modules to a "
                                "frozen pretrained causal LM, train only them, and measure them honestly. "
                                "Add --debug anywhere for a traceback instead of a one-line error.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and evaluate every method x seed of a YAML config; write a report",
                       description="Train and evaluate every method and seed of CONFIG on a held-out split; "
                       "write runs/<name>/report.md, results.json and PNG plots. Finished cells are kept, "
                       "so a stopped run resumes.")
    r.add_argument("config", help="YAML experiment config, e.g. configs/quickstart.yaml")
    r.add_argument("--out", default="runs", help="root folder for runs (default: runs)")
    r.add_argument("--fresh", action="store_true", help="delete earlier results of this config first")
    r.add_argument("--methods", help="comma-separated method names to run (default: all in the config)")
    r.add_argument("--keep", metavar="DIR", help="also write every finished cell and sweep point (small JSON, no "
                   "weights) into DIR and read them back on a rerun, e.g. a folder committed to git, so a run "
                   "survives a fresh checkout (over the config's keep:)")
    r.set_defaults(func=cmd_run)

    def model_args(q):
        q.add_argument("--model", default="smollm2-135m",
                       help="smollm2-135m (embedded, default), tiny-gpt2, tiny-llama, a hub id or a local dir")
        q.add_argument("--plugin", "--head", dest="plugin",
                       help="folder of a saved plug-in or head (plugin.safetensors + attnlab_plugin.json)")
        q.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")

    def body_hash_arg(q):
        q.add_argument("--allow-missing-body-hash", action="store_true",
                       help="load a plug-in that does not record its base's body hash (checks sizes and embedding only)")

    def data_args(q, n):
        q.add_argument("--dataset", default="arithmetic", help="dataset_name (see `attnlab data preview --list`)")
        q.add_argument("--path", help="local data file for the dataset")
        q.add_argument("--columns", help="column mapping for local files, e.g. prompt=question,target=answer")
        q.add_argument("--n", type=_positive, default=n, help=f"number of examples (default {n})")
        q.add_argument("--max-length", type=_positive, default=256, help="max tokens per example (default 256)")

    e = sub.add_parser("eval", help="score a model (with or without a plug-in) on a dataset",
                       description="Cross-entropy, perplexity, next-token accuracy (and KL to the base when a "
                       "plug-in is given; then the frozen base is scored on the same examples too, and the change "
                       "is printed with a paired 95% bootstrap interval over examples) on N examples of the dataset's test split (the same hash split "
                       "`attnlab run` holds out, so never a training problem); with --generate K, answer accuracy, "
                       "precision/recall/F1, median error and RMSE.")
    model_args(e)
    body_hash_arg(e)
    data_args(e, 64)
    e.add_argument("--batch-size", type=_positive, default=8)
    e.add_argument("--generate", type=_count, default=0, metavar="K", help="also generate for the first K examples")
    e.add_argument("--max-new-tokens", type=_positive, default=128)
    e.add_argument("--per-example", metavar="PATH", default=None,
                   help="write one JSON line per example (NLL, tokens, KL; the base's NLL with --plugin; outputs and "
                        "correctness with --generate) to PATH, a new file")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="prompt in, text out, with or without a plug-in",
                       description="Generate a continuation. The prompt is wrapped in the model's chat template "
                       "when it has one (use --raw to send it as is). Greedy unless --sample.")
    model_args(g)
    body_hash_arg(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--max-new-tokens", type=_positive, default=128)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k filtering")
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("data", help="inspect datasets", description="Inspect datasets.")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("preview", help="print the first records of a dataset as the schema sees them",
                         description="Print the first N records (prompt, target, answer, source) and what was "
                         "skipped and why; with --model, also the tokenization report.")
    data_args(dp, 3)
    dp.add_argument("--model", help="also tokenize with this model and report truncation")
    dp.add_argument("--list", action="store_true", help="list the dataset names and exit")
    dp.add_argument("--width", type=int, default=400, help="characters shown per field")
    dp.set_defaults(func=cmd_data_preview)

    from .profile import DEFAULT_VARIANTS, LENGTHS
    pr = sub.add_parser("profile", help="time and peak memory of dense vs sparse attention across sequence length",
                        description="Inference (forward) and training (forward + backward) wall time and peak "
                        "memory of the model's transformer body at each length, for dense eager, dense SDPA and "
                        "each sparse attention variant; torch.profiler isolates the attention time. Writes "
                        "profile.md, profile.json and PNG plots to --out.")
    pr.add_argument("--model", default="smollm2-135m")
    pr.add_argument("--lengths", type=_positive, nargs="+", default=LENGTHS, help=f"default: {LENGTHS}")
    pr.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                    help="dense-eager, dense-sdpa, or VARIANT[:key=value,...] of the sparse attention "
                    f"(window, learned, quest, lowrank, performer, dense); default: {' '.join(DEFAULT_VARIANTS)}")
    pr.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training", "decode"],
                    help="decode: one generated token with a KV cache of each --lengths context")
    pr.add_argument("--decode-cache", default="generate", choices=["generate", "dynamic", "growing"],
                    help="the KV cache of decode: what `attnlab generate` uses (growing with a sparse plug-in, "
                    "transformers' DynamicCache otherwise; default), or one of those for every variant")
    pr.add_argument("--layers", type=int, help="profile only the first N transformer layers (default: all)")
    pr.add_argument("--batch", type=int, default=1)
    pr.add_argument("--repeat", type=int, default=3, help="timed calls per measurement, after one warm-up")
    pr.add_argument("--random-weights", action="store_true",
                    help="a model of the same shape with random weights (timings do not depend on weights)")
    pr.add_argument("--out", default="runs/profile", help="output folder (default: runs/profile)")
    pr.set_defaults(func=cmd_profile)

    le = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a model (with or without a plug-in)",
                        description="lm_eval.simple_evaluate on the model (+ plug-in) as lm-eval's `attnlab` model; "
                        "writes OUT/results.json. attnlab's offline tasks: attnlab_gsm8k (generative, from "
                        "../shared/data/gsm8k/train.jsonl) and attnlab_wikitext (perplexity, from "
                        "../shared/data/wikitext-2/valid.txt); lm-eval's own tasks by name. Needs the extra: "
                        "pip install -e \".[eval]\".")
    model_args(le)
    le.add_argument("--tasks", required=True, help="comma-separated task names, e.g. attnlab_gsm8k,attnlab_wikitext")
    le.add_argument("--limit", type=float, help="examples per task (< 1: a fraction); for quick checks")
    le.add_argument("--batch-size", type=_positive, default=1,
                    help="default 1 (sparse attention: keep 1 for generative tasks, they left-pad)")
    le.add_argument("--num-fewshot", type=_count, help="override the tasks' few-shot count")
    le.add_argument("--max-gen-toks", type=_positive, help="cap generated tokens (generative tasks)")
    le.add_argument("--include-path", action="append", default=[], help="another folder of lm-eval task yamls")
    le.add_argument("--data-file", action="append", default=[], metavar="TASK=PATH",
                    help="read TASK's data from PATH instead (e.g. attnlab_gsm8k=/data/gsm8k/test.jsonl)")
    le.add_argument("--device", help="cuda / cpu (default: cuda when there is one)")
    le.add_argument("--log-samples", action="store_true", help="also write every prompt and output to samples.json")
    le.add_argument("--seed", type=int, default=0)
    le.add_argument("--out", default="runs/lm_eval", help="output folder (default: runs/lm_eval)")
    le.set_defaults(func=cmd_lm_eval)
    return p


def cmd_profile(a) -> int:
    import platform

    import torch

    from .profile import build_model, profile, write

    from .backbone import check_length, max_positions

    from .errors import ConfigError

    for flag, n in (("--layers", a.layers), ("--batch", a.batch), ("--repeat", a.repeat)):
        if n is not None and n < 1:
            raise ConfigError(f"{flag}: {n} is not allowed; expected a number >= 1")
    if a.decode_cache != "generate" and "decode" not in a.modes:
        raise ConfigError(f"--decode-cache {a.decode_cache}: only decode has a KV cache; add decode to --modes, or "
                          f"drop --decode-cache")
    _folder_arg(a.out, "--out", claim=True)
    dev = "cuda" if torch.cuda.is_available() else None
    model = build_model(a.model, random_weights=a.random_weights, layers=a.layers, device=dev)
    for n in a.lengths:
        check_length(model, n, "--lengths")
    limit = max_positions(model)
    if "decode" in a.modes and limit is not None and max(a.lengths) >= limit:   # the decoded token is one more
        raise ConfigError(f"--lengths: decode generates one token after a context of {max(a.lengths)}, past the "
                          f"{limit} positions {a.model} reads; use at most {limit - 1} with --modes decode")
    rows = profile(model, a.variants, a.lengths, tuple(a.modes), repeat=a.repeat, batch=a.batch,
                   decode_cache=a.decode_cache)
    where = torch.cuda.get_device_name() if dev else f"cpu, {torch.get_num_threads()} threads"
    title = (f"attnlab profile: {a.model}{' (random weights)' if a.random_weights else ''}, "
             f"{model.config.num_hidden_layers} layers, batch {a.batch}, {where}")
    meta = {"model": a.model, "random_weights": a.random_weights, "layers": model.config.num_hidden_layers,
            "batch": a.batch, "device": where, "torch": torch.__version__, "python": platform.python_version()}
    _claim(a.out)
    path = write(rows, a.out, title, meta)
    print(path.read_text())
    return 0


def cmd_lm_eval(a) -> int:
    from .errors import ConfigError
    from .lm_eval_adapter import evaluate

    files = {}
    for kv in a.data_file:
        task, sep, path = kv.partition("=")
        if not sep or not task.strip() or not path.strip():
            raise ConfigError(f"--data-file: {kv!r} is not TASK=PATH; write e.g. --data-file attnlab_gsm8k=test.jsonl")
        files[task.strip()] = path.strip()
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    _folder_arg(a.out, "--out", claim=True)
    if a.limit is not None and not a.limit > 0:
        raise ConfigError(f"--limit: {a.limit} is not allowed; expected a number > 0 (< 1: a fraction of each task)")
    _claim(a.out)
    res = evaluate(a.model, a.plugin, tasks, a.out, limit=a.limit, batch_size=a.batch_size,
                   num_fewshot=a.num_fewshot, include_path=a.include_path, data_files=files, device=a.device,
                   max_gen_toks=a.max_gen_toks, log_samples=a.log_samples, seed=a.seed,
                   trust_remote_code=a.trust_remote_code, command=shlex.join(["attnlab", *a.argv]))
    from lm_eval.utils import make_table

    print(make_table(res))
    print(f"results: {a.out}/results.json")
    return 0


def main(argv=None) -> int:
    import os

    from .errors import AttnlabError
    from .precision import flush_subnormals

    if argv is None:                      # the command itself, not an in-process call (tests): process-wide
        flush_subnormals()                # subnormals cost ~100x per op on a CPU (attnlab/precision.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("ATTNLAB_DEBUG"))
    argv = [x for x in argv if x != "--debug"]
    args = build_parser().parse_args(argv)
    args.argv = argv                      # what was typed: results files record it as their command
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except (AttnlabError, ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if debug:
            raise
        kind = "" if isinstance(e, AttnlabError) else f"{type(e).__name__}: "
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"attnlab: error: {kind}{text} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
