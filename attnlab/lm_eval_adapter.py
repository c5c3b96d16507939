"""attnlab in EleutherAI's lm-evaluation-harness (lm-eval, the optional extra `pip install -e ".[eval]"`).

    attnlab lm-eval --tasks attnlab_gsm8k,attnlab_wikitext --plugin runs/x/lora --limit 8
    python -m attnlab.lm_eval_adapter run --model attnlab --model_args base=smollm2-135m,plugin=runs/x/lora \
        --tasks attnlab_wikitext --include_path attnlab/lm_eval_tasks --limit 4     # lm-eval's own CLI

`AttnlabLM` is lm-eval's Hugging Face model class (HFLM) over a base loaded by
`attnlab.load_backbone(base)`, with an optional plug-in loaded by `attnlab.load_plugin(model,
plugin)`. HFLM then scores it like any HF causal LM: `loglikelihood` runs context + continuation
in one forward (right padding), `loglikelihood_rolling` sums the log-probs of a text over windows
of `max_length` tokens, `generate_until` calls model.generate (left padding). It is registered
with lm-eval as `attnlab` when this module is imported; lm-eval has no discovery of models in
other packages, so its own CLI finds it only through `python -m attnlab.lm_eval_adapter`, which is
lm-eval's CLI with this module imported.

The plug-in is attached after HFLM's constructor, because that constructor calls
`model.tie_weights()`: on a tied base (SmolLM2, GPT-2) it would make the input embedding the
output head again, silently replacing head_ft's trained copy.

Offline tasks ship in attnlab/lm_eval_tasks (TASKS_DIR; lm-eval's `--include_path`):
`attnlab_gsm8k` (generative, from a GSM8K JSONL file) and `attnlab_wikitext` (perplexity, from a
raw WikiText file). lm-eval is imported only here, so attnlab works without it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import AttnlabError

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
LM_EVAL_VERSION = "0.4.13"   # the version the extra pins and the tests ran with


class LmEvalMissing(AttnlabError, ImportError):
    """lm-eval is not installed."""


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise LmEvalMissing(f"lm-eval is not installed; install the extra: pip install -e \".[eval]\" "
                            f"(or pip install lm_eval=={LM_EVAL_VERSION})") from None
    return lm_eval


require_lm_eval()

import torch  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models import MODEL_MAPPING  # noqa: E402,F401  (registers lm-eval's own models first)
from lm_eval.models.huggingface import HFLM  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("attnlab")
class AttnlabLM(HFLM):
    """lm-eval model: `--model attnlab --model_args base=SPEC[,plugin=PATH][,dtype=float32]`.

    base: an attnlab.load_backbone spec (smollm2-135m, tiny-llama, a hub id or a local dir).
    plugin: a saved plug-in folder (plugin.safetensors + config.json); it must be of this base.
    Every other argument (batch_size, max_length, device, ...) is HFLM's."""

    def __init__(self, base: str = "smollm2-135m", plugin: str | None = None, dtype: str = "float32",
                 device: str | None = None, trust_remote_code: bool = False, pretrained=None, **kwargs):
        from .backbone import load_backbone
        from .modules import load_plugin

        if pretrained is not None:
            raise AttnlabError("the attnlab model takes base=SPEC, not pretrained=...; "
                               "write --model_args base=smollm2-135m[,plugin=PATH]")
        if dtype not in _DTYPES:
            raise AttnlabError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"   # lm-eval's CLI asks for cuda by default
        bb = load_backbone(str(base), dtype=_DTYPES[dtype], trust_remote_code=bool(trust_remote_code),
                           device=device)
        super().__init__(pretrained=bb.model, tokenizer=bb.tokenizer, backend="causal", **kwargs)
        self.base_spec = str(base)
        self.plugin = load_plugin(self.model, plugin) if plugin else None  # after HFLM's tie_weights()
        if self.plugin is not None and self.plugin.method == "sparse" and self.batch_size_per_gpu != 1:
            from lm_eval.utils import eval_logger

            eval_logger.warning("sparse attention defines its blocks on key positions; generate_until left-pads "
                                "batches, which shifts them: use batch_size=1 for generative tasks")


def task_specs(tasks: list[str], include_path: list[str], data_files: dict[str, str], cache_dir=None):
    """A TaskManager over attnlab's tasks (+ `include_path`; lm-eval's built-in tasks only when a
    requested name is not found there: indexing them takes seconds) and the task list for
    simple_evaluate. A task that reads local files becomes its config, with `data_files` replaced
    where `data_files` names it and the Arrow copy that `datasets` makes kept in `cache_dir`."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    paths = [str(TASKS_DIR)] + [str(p) for p in include_path]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if any(t not in tm.all_tasks for t in tasks):
        tm = TaskManager(include_path=paths, include_defaults=True)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise AttnlabError(f"lm-eval knows no task {', '.join(unknown)}; attnlab's are "
                           f"{', '.join(sorted(p.stem for p in TASKS_DIR.glob('*.yaml')))} "
                           f"(`lm_eval ls tasks` lists lm-eval's own)")
    extra = set(data_files) - set(tasks)
    if extra:
        raise AttnlabError(f"--data-file names {', '.join(sorted(extra))}, which is not in --tasks")
    specs = []
    for t in tasks:
        entry = tm.task_index[t]
        cfg = load_yaml(entry.yaml_path, resolve_func=True) if entry.yaml_path is not None else {}
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        files = kwargs.get("data_files")
        if files is None:                      # a hub dataset or a group: lm-eval loads it as usual
            if t in data_files:
                raise AttnlabError(f"task {t} does not read a local data file; --data-file cannot replace it")
            specs.append(t)
            continue
        if t in data_files:
            if not isinstance(files, dict) or len(files) != 1:
                raise AttnlabError(f"task {t} reads several data files; --data-file replaces exactly one")
            files = {split: data_files[t] for split in files}
        for f in files.values() if isinstance(files, dict) else [files]:
            if isinstance(f, str) and not Path(f).is_file():
                raise AttnlabError(f"task {t} reads {f}, which is not a file here ({Path.cwd()}); "
                                   f"pass --data-file {t}=PATH")
        kwargs["data_files"] = files
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        specs.append({**cfg, "dataset_kwargs": kwargs})
    return tm, specs


def evaluate(model: str, plugin: str | None, tasks: list[str], out, limit: float | None = None,
             batch_size: int = 1, num_fewshot: int | None = None, include_path: tuple = (),
             data_files: dict | None = None, device: str | None = None, max_gen_toks: int | None = None,
             log_samples: bool = False, seed: int = 0, trust_remote_code: bool = False,
             command: str | None = None) -> dict:
    """lm_eval.simple_evaluate on the attnlab model; writes out/results.json (atomically; with
    `log_samples`, out/samples.json too; `command`, the command line that ran it, as its top-level
    `command`) and returns the results dict. The Arrow copies `datasets`
    makes of local data files stay in out/.datasets_cache, so nothing is written outside `out`."""
    import json

    from lm_eval import simple_evaluate

    from .atomic import write_json_atomic

    tm, specs = task_specs(tasks, list(include_path), dict(data_files or {}), Path(out) / ".datasets_cache")
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float below 1 as a fraction of the examples
    model_args = {"base": model, "trust_remote_code": trust_remote_code}
    if plugin:
        model_args["plugin"] = str(plugin)
    res = simple_evaluate(model="attnlab", model_args=model_args, tasks=specs, task_manager=tm,
                          num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
                          gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                          log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed)
    samples = res.pop("samples", None)
    res["attnlab"] = {"base": model, "plugin": str(plugin) if plugin else None}
    if command:
        res = {"command": command, **res}
    res = json.loads(json.dumps(res, default=str))   # dtypes, functions in configs -> strings
    write_json_atomic(Path(out) / "results.json", res)
    if samples is not None:
        write_json_atomic(Path(out) / "samples.json", samples)
    return res


def main() -> None:
    """lm-eval's own command line, with the `attnlab` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
