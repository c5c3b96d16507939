"""Config schemas: one dataclass per section, validated in `__post_init__`, used wherever options
are read, so a new option cannot skip validation.

    data      DataConfig      what to read and how to split it (see attnlab/data)
    eval      EvalConfig      eval batch size, generation, decoding grid
    train     TrainConfig     (attnlab/train.py) optimizer, schedule, budget, early stopping
    method    the method's own Config (attnlab/modules), checked by `check_fields`

Every error is one line: the key (with its section), the value, and what is expected, e.g.
`data.n_train: 'ten' is not an integer`. YAML 1.1 reads `1e-3` (no dot) as a string; numbers
written that way are accepted as numbers.

`read_yaml` reads a config with yaml's safe loader that also refuses anchors and aliases (`&x`,
`*x`) while parsing, before any value is built: an alias can make a few lines expand to billions
of values ("billion laughs"), and no attnlab config needs one.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

# --- reading YAML ----------------------------------------------------------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses an anchor or alias as soon as the parser meets it."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise ConfigError(f"{self.name}: YAML anchors and aliases (&{event.anchor} / *{event.anchor}) are not "
                              f"allowed in attnlab configs (line {mark.line + 1}); write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # a key given twice would silently keep only the last value
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"{self.name}: the key {key!r} appears twice in one mapping (line "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen.add(key) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep)


def read_yaml(p) -> object:
    """The YAML document at `p` (plain data only: no tags, anchors or aliases), or ConfigError."""
    p = Path(p)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    loader = _NoAliasLoader(text)
    loader.name = str(p)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where} ({getattr(e, 'problem', None) or e}); "
                          f"check indentation and colons") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    finally:
        loader.dispose()

# --- small coercions: one place that knows what "an integer" or "a number" means -----------------


def as_int(where: str, v, *, min: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(f"{where}: {v!r} is not an integer")
    if isinstance(v, str):
        if not re.fullmatch(r"\s*-?\d+(\.0*)?([eE]\+?\d+)?\s*", v):
            raise ConfigError(f"{where}: {v!r} is not an integer")
        v = float(v)
    if isinstance(v, float):
        if not v.is_integer():
            raise ConfigError(f"{where}: {v!r} is not an integer")
        v = int(v)
    if min is not None and v < min:
        raise ConfigError(f"{where}: {v} is not allowed; expected an integer >= {min}")
    return v


def as_float(where: str, v, *, min: float | None = None, max: float | None = None,
             strict_min: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(f"{where}: {v!r} is not a number")
    try:
        x = float(v)
    except ValueError:
        raise ConfigError(f"{where}: {v!r} is not a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"{where}: {v!r} is not a finite number")
    if min is not None and (x <= min if strict_min else x < min):
        raise ConfigError(f"{where}: {v} is not allowed; expected a number {'>' if strict_min else '>='} {min}"
                          + (f" and <= {max}" if max is not None else ""))
    if max is not None and x > max:
        raise ConfigError(f"{where}: {v} is not allowed; expected a number <= {max}")
    return x


def as_bool(where: str, v) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: {v!r} is not true or false")
    return v


def as_str(where: str, v) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: {v!r} is not a non-empty string")
    return v


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def as_name(where: str, v) -> str:
    """A name that becomes one folder of the run: one path component, no separators, no '..'."""
    if not isinstance(v, str) or not _NAME.fullmatch(v) or ".." in v or len(v) > 100:
        raise ConfigError(f"{where}: {v!r} is not a valid name; use letters, digits and . _ - + = "
                          f"(one folder name, no '/' or '..')")
    return v


def as_mapping(where: str, v, *, allow_none: bool = True) -> dict:
    if v is None and allow_none:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: expected a mapping (key: value lines), got {type(v).__name__} {_short(v)}")
    return v


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def apply_rules(obj, where: str, rules: dict) -> None:
    """Coerce and check fields in place: rules = {field: (coercer, keyword arguments)}."""
    for name, (fn, kw) in rules.items():
        setattr(obj, name, fn(f"{where}.{name}", getattr(obj, name), **kw))


def reject_unknown(where: str, given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def check_fields(obj, where: str) -> None:
    """Check (and coerce in place) every field of a dataclass against its annotation: int, float,
    bool, str, X | None, tuple/list of those, Literal. For method configs, whose own `__post_init__`
    checks ranges; this catches `r: four` or `dropout: "0.1x"` before any model is built."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        new = _coerce(f"{where}.{f.name}", v, hints.get(f.name, typing.Any))
        if new is not v:
            object.__setattr__(obj, f.name, new)


def _coerce(where: str, v, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return v
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(where, v, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {v!r} does not fit {tp}")
    if origin is typing.Literal:
        if v not in args:
            raise ConfigError(f"{where}: {v!r} is not one of {list(args)}")
        return v
    if tp is int:
        return v if isinstance(v, int) and not isinstance(v, bool) else as_int(where, v)
    if tp is float:
        return v if isinstance(v, float) else as_float(where, v)
    if tp is bool:
        return as_bool(where, v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: {v!r} is not a string")
        return v
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: {v!r} is not a list")
        inner = args[0] if args else typing.Any
        out = [_coerce(f"{where}[{i}]", x, inner) for i, x in enumerate(v)]
        return v if all(a is b for a, b in zip(out, v)) else type(v)(out)
    return v


# --- data ----------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """What to read (`dataset_name` and its options) and how to split it.

    Splits are disjoint by construction: each record goes to test, validation or train by a hash
    of its normalised problem text (the prompt; the text itself for plain corpora), with
    `test_fraction` and `val_fraction` of the hash space. Which split a problem lands in never
    depends on n_train, n_eval or the seed, so growing the training set cannot move a test problem
    into it. Exact duplicates are removed and counted."""

    dataset_name: str = "arithmetic"
    n_train: int = 256
    n_val: int = 32                   # validation: chooses learning rates, steps, early stopping
    n_eval: int = 64                  # test: read once per run
    max_length: int = 256
    seed: int = 0
    shuffle: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    kind: str | None = None           # "qa" or "lm" (default: the source's own kind)
    path: str | None = None
    columns: dict | None = None
    fallback: dict | None = None      # data options used when this source cannot be reached
    # source-specific options
    split: str | None = None
    config: str | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    data_files: typing.Any = None
    streaming: bool | None = None
    max_documents: int = 20000
    doc_chars: int = 1000
    level: typing.Any = None          # arithmetic: 1..5 or a list of them (None: a mix)
    families: typing.Any = "train"    # arithmetic: train | transfer | all | a list of family names

    def __post_init__(self):
        w = "data"
        apply_rules(self, w, {
            "dataset_name": (as_str, {}), "n_train": (as_int, {"min": 0}), "n_val": (as_int, {"min": 0}),
            "n_eval": (as_int, {"min": 0}), "max_length": (as_int, {"min": 8}), "seed": (as_int, {}),
            "shuffle": (as_bool, {}), "val_fraction": (as_float, {"min": 0, "max": 0.5}),
            "test_fraction": (as_float, {"min": 0, "max": 0.5}), "max_documents": (as_int, {"min": 1}),
            "doc_chars": (as_int, {"min": 1})})
        if self.n_val and not self.val_fraction or self.n_eval and not self.test_fraction:
            raise ConfigError(f"{w}: n_val / n_eval > 0 need val_fraction / test_fraction > 0")
        if self.kind is not None and self.kind not in ("qa", "lm"):
            raise ConfigError(f"{w}.kind: {self.kind!r} is not one of ['qa', 'lm']")
        for k in ("path", "split", "config", "hf_name", "hf_config"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"{w}.{k}: {v!r} is not a string")
        if self.columns is not None:
            if not isinstance(self.columns, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items()):
                raise ConfigError(f"{w}.columns: {_short(self.columns)} is not a mapping; write it as "
                                  f"{{prompt: question, target: answer}} (or {{text: column}} for plain text)")
            bad = set(self.columns) - {"prompt", "target", "answer", "text"}
            if bad:
                raise ConfigError(f"{w}.columns: unknown field(s) {sorted(bad)}; map prompt, target, answer or text")
        if self.fallback is not None:
            as_mapping(f"{w}.fallback", self.fallback, allow_none=False)
            data_config(self.fallback, where=f"{w}.fallback", partial=True)
        if self.streaming is not None:
            as_bool(f"{w}.streaming", self.streaming)


DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))


def data_config(d, where: str = "data", partial: bool = False) -> dict:
    """Validate data options; returns them with defaults filled (partial: only the given keys)."""
    d = as_mapping(where, d)
    reject_unknown(where, d, DATA_KEYS)
    try:
        full = dataclasses.asdict(DataConfig(**d))
    except ConfigError as e:
        raise ConfigError(str(e).replace("data.", f"{where}.", 1)) from None
    return {k: full[k] for k in d} if partial else full


# --- eval ----------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    batch_size: int = 8
    generate: bool = True
    n_generate: int = 32
    max_new_tokens: int = 128
    prompt_tokens: int = 32           # text data: generation continues the first prompt_tokens of eval texts
    sampling: list = field(default_factory=list)   # [{temperature: T, top_k: K}, ...]
    bootstrap: int = 2000             # bootstrap resamples for confidence intervals

    def __post_init__(self):
        w = "eval"
        apply_rules(self, w, {
            "batch_size": (as_int, {"min": 1}), "generate": (as_bool, {}), "n_generate": (as_int, {"min": 0}),
            "max_new_tokens": (as_int, {"min": 1}), "prompt_tokens": (as_int, {"min": 1}),
            "bootstrap": (as_int, {"min": 100})})
        if self.sampling is None:
            self.sampling = []
        if not isinstance(self.sampling, list):
            raise ConfigError(f"{w}.sampling: expected a list of {{temperature: T, top_k: K}}, got {_short(self.sampling)}")
        for i, s in enumerate(self.sampling):
            if not isinstance(s, dict) or set(s) - {"temperature", "top_k"}:
                raise ConfigError(f"{w}.sampling[{i}]: each entry is {{temperature: T, top_k: K}}, got {_short(s)}")
            if "temperature" in s:
                s["temperature"] = as_float(f"{w}.sampling[{i}].temperature", s["temperature"], min=0, strict_min=True)
            if s.get("top_k") is not None:
                s["top_k"] = as_int(f"{w}.sampling[{i}].top_k", s["top_k"], min=0)


EVAL_KEYS = tuple(f.name for f in dataclasses.fields(EvalConfig))


def eval_config(d, where: str = "eval", base: dict | None = None) -> dict:
    d = as_mapping(where, d)
    reject_unknown(where, d, EVAL_KEYS)
    try:
        return dataclasses.asdict(EvalConfig(**{**(base or {}), **d}))
    except ConfigError as e:
        raise ConfigError(str(e).replace("eval.", f"{where}.", 1)) from None
