"""Dataset adapters: each turns raw rows of one dataset into Records (see records.py).

A data config names one adapter with `dataset_name` (as the research proposals' config.yaml does):

  arithmetic         offline: seeded multi-step word problems, 30 families x 5 levels (`families:`
                     train | transfer | all, `level:` 1..5); see data/arithmetic.py
  python_docs        offline: the English prose of Python's own documentation (pydoc_data.topics)
  python_stdlib      offline: Python standard-library sources, as a code corpus
  gsm8k              `path:` a GSM8K-format JSONL (question, answer ending '#### N'); else HF openai/gsm8k
  openmathinstruct2  HF nvidia/OpenMathInstruct-2, streamed (or `path:` a local copy)
  metamathqa         HF meta-math/MetaMathQA (query, response), or `path:`
  wikitext           `path:` a WikiText-style text file; else HF wikitext / wikitext-2-raw-v1
  codeparrot         HF codeparrot/codeparrot-clean (`content`), streamed, or `path:`
  code_contests      HF deepmind/code_contests: description -> first Python solution, or `path:`
  local              `path:` JSONL / JSON / CSV / Parquet / text, with `columns:` {prompt, target, answer}
                     (or {text} for a plain LM corpus)
  hf                 any Hugging Face dataset: `hf_name:`, optional `hf_config:`, `split:`, `data_files:`,
                     with `columns:` as for local (set `kind: lm` and `columns: {text: ...}` for text)

`kind` is "qa" (prompt -> target, loss on the target) or "lm" (plain text, packed into blocks).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import AttnlabError, ConfigError, DataError
from .arithmetic import iter_problems
from .records import BadRecord, Record, require_text

_CALC = re.compile(r"<<[^>]*>>")
_HASHES = re.compile(r"####\s*(.+?)\s*$", re.S)


@dataclass(frozen=True)
class Source:
    kind: str                                # "qa" or "lm"
    rows: Callable[[dict], Iterable]         # cfg -> raw rows (any objects)
    to_record: Callable[[object, dict], Record]
    description: str


# --- readers -------------------------------------------------------------------------------------

class SourceUnavailable(AttnlabError, FileNotFoundError):
    """A dataset that cannot be reached here (no network, no such file): `fallback:` may replace it."""


def read_local(path: str | os.PathLike) -> Iterator:
    """Rows of a local file, by extension: .jsonl, .json (a list), .csv, .parquet, .txt (one row).
    A JSONL line that is not UTF-8 or not JSON becomes a counted skip naming the file and line."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"data path {p} is a folder; give a file (.jsonl, .json, .csv, .parquet or .txt)")
    if not p.exists():
        raise SourceUnavailable(f"data file not found: {p} (check `path:` in the data config)")
    if not p.is_file():
        raise DataError(f"data path {p} is not a regular file (a device or pipe); give a .jsonl, .json, .csv, "
                        f".parquet or .txt file")
    ext = p.suffix.lower()
    if ext == ".jsonl":
        with open(p, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a byte-order mark is not data
                except UnicodeDecodeError as e:
                    yield _Unparsable(f"{p.name} line {i}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    yield _Unparsable(f"{p.name} line {i}: invalid JSON ({e.msg})")
                except RecursionError:
                    yield _Unparsable(f"{p.name} line {i}: JSON nested too deeply")
        return
    try:
        if ext == ".json":
            data = json.loads(p.read_text(encoding="utf-8-sig"))
            if not isinstance(data, list):
                raise DataError(f"{p}: expected a JSON list of objects, got {type(data).__name__}")
            yield from data
        elif ext == ".csv":
            with open(p, encoding="utf-8-sig", newline="") as f:
                yield from csv.DictReader(f)
        elif ext == ".parquet":
            import pyarrow.parquet as pq
            yield from pq.read_table(p).to_pylist()
        elif ext in TEXT_EXTENSIONS:
            yield {"text": p.read_text(encoding="utf-8-sig")}
        else:
            raise DataError(f"{p}: unsupported extension '{ext}'; use .jsonl, .json, .csv, .parquet or .txt")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        f"convert it to UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: invalid JSON at line {e.lineno} ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{p}: JSON nested too deeply to be data") from None
    except csv.Error as e:
        raise DataError(f"{p}: not readable as CSV ({e}); check the file's quoting") from None


TEXT_EXTENSIONS = (".txt", ".md", ".text", ".raw", "")


def is_text_file(cfg: dict) -> bool:
    """`path:` is a plain-text file (read as one document stream, packed into blocks)."""
    return bool(cfg.get("path")) and Path(cfg["path"]).suffix.lower() in TEXT_EXTENSIONS


class _Unparsable:
    """A raw row that could not even be parsed; its adapter turns it into a counted skip."""

    def __init__(self, reason: str):
        self.reason = reason


def _check_parsed(raw) -> dict:
    if isinstance(raw, _Unparsable):
        raise BadRecord(raw.reason)
    if not isinstance(raw, dict):
        raise BadRecord(f"record is a {type(raw).__name__}, not an object")
    return raw


def hf_rows(name: str, config: str | None = None, split: str = "train", streaming: bool = True):
    """Rows of a Hugging Face dataset (needs network unless it is in the local HF cache)."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types for "not reachable"
        raise SourceUnavailable(
            f"Could not load the Hugging Face dataset '{name}'"
            f"{f' ({config})' if config else ''}, split '{split}': {type(e).__name__}: {str(e).splitlines()[0]}\n"
            f"Offline, give a local copy with `path:` in the data config, or use an offline dataset_name "
            f"(arithmetic, python_docs, python_stdlib).") from e


def _rows_from(cfg: dict, hub: tuple) -> Iterable:
    if cfg.get("path"):
        return read_local(cfg["path"])
    name, config, split = hub
    return hf_rows(name, config, cfg.get("split", split), streaming=cfg.get("streaming", True))


# --- math ----------------------------------------------------------------------------------------

def gsm8k_record(raw, cfg) -> Record:
    raw = _check_parsed(raw)
    question = require_text(raw, "question")
    answer = require_text(raw, "answer")
    m = _HASHES.search(answer)
    if not m:
        raise BadRecord("answer has no final '#### N' line")
    solution = _CALC.sub("", answer).strip()
    final = m.group(1).strip().replace(",", "")
    return Record(prompt=question, target=solution, answer=final, source="gsm8k")


def openmath_record(raw, cfg) -> Record:
    raw = _check_parsed(raw)
    problem = require_text(raw, "problem")
    solution = require_text(raw, "generated_solution")
    expected = require_text(raw, "expected_answer")
    # The proposal's target: solution + expected answer; most solutions already end in \boxed{answer}.
    target = solution.strip()
    if "\\boxed" not in target:
        target += f"\nThe answer is \\boxed{{{expected.strip()}}}."
    src = raw.get("problem_source") or "openmathinstruct2"
    return Record(prompt=problem, target=target, answer=expected.strip(), source=str(src))


def metamath_record(raw, cfg) -> Record:
    raw = _check_parsed(raw)
    query = require_text(raw, "query")
    response = require_text(raw, "response")
    m = re.search(r"The answer is:?\s*(.+?)\s*$", response)
    return Record(prompt=query, target=response.strip(), answer=m.group(1) if m else None,
                  source=str(raw.get("type") or "metamathqa"))


def _arithmetic_rows(cfg):
    # endless: the splitter reads until each split (by hash) has what it needs
    return iter_problems(seed=int(cfg.get("seed", 0)), level=cfg.get("level"), families=cfg.get("families", "train"))


# --- plain text and code -------------------------------------------------------------------------

def text_record(raw, cfg) -> Record:
    if isinstance(raw, str):
        raw = {"text": raw}
    raw = _check_parsed(raw)
    text = require_text(raw, cfg.get("columns", {}).get("text", "text"))
    return Record(prompt="", target=text, answer=None, source=cfg.get("dataset_name", "text"))


def _paragraphs(text: str, min_chars: int = 200) -> Iterator[str]:
    """Split a long text into documents of whole paragraphs, so held-out splits are real text."""
    buf = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        buf.append(para)
        size += len(para)
        if size >= min_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)


def _text_file_rows(cfg):
    # a text file (WikiText: articles separated by ' = Title = ' heading lines): documents of whole paragraphs
    for row in read_local(cfg["path"]):
        yield from ({"text": d} for d in _paragraphs(row["text"], cfg.get("doc_chars", 1000)))


def _wikitext_rows(cfg):
    if cfg.get("path"):
        yield from _text_file_rows(cfg)
        return
    yield from hf_rows("wikitext", cfg.get("config", "wikitext-2-raw-v1"), cfg.get("split", "validation"),
                       streaming=False)


def _python_docs_rows(cfg):
    from pydoc_data import topics

    for key in sorted(topics.topics):
        yield from ({"text": d} for d in _paragraphs(topics.topics[key], cfg.get("doc_chars", 1000)))


def _python_stdlib_rows(cfg):
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):  # top-level modules only: stable across installs, no tests
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield {"text": text, "path": path.name}


def _hf_generic_rows(cfg):
    if not cfg.get("hf_name"):
        raise ConfigError("dataset_name 'hf' needs `hf_name:` (a hub id, or a builder such as json/csv/parquet/text "
                         "with `data_files:`)")
    import datasets

    kwargs = {"data_files": cfg["data_files"]} if cfg.get("data_files") else {}
    try:
        return datasets.load_dataset(cfg["hf_name"], cfg.get("hf_config"), split=cfg.get("split", "train"),
                                     streaming=cfg.get("streaming", False), **kwargs)
    except Exception as e:
        raise SourceUnavailable(f"Could not load the Hugging Face dataset '{cfg['hf_name']}': {type(e).__name__}: "
                           f"{str(e).splitlines()[0]}\nOffline, point `data_files:` at local files or use "
                           f"dataset_name 'local' with `path:`.") from e


def _local_rows(cfg):
    if not cfg.get("path"):
        raise ConfigError("dataset_name 'local' needs `path:` (a .jsonl, .json, .csv, .parquet or .txt file)")
    return _text_file_rows(cfg) if is_text_file(cfg) else read_local(cfg["path"])


def local_record(raw, cfg) -> Record:
    raw = _check_parsed(raw)
    cols = {"prompt": "prompt", "target": "target", "answer": "answer", **cfg.get("columns", {})}
    if "text" in cfg.get("columns", {}) or cfg.get("kind") == "lm" or is_text_file(cfg):
        return text_record(raw, cfg)
    prompt = require_text(raw, cols["prompt"], allow_empty=True)
    target = require_text(raw, cols["target"])
    answer = raw.get(cols["answer"])
    return Record(prompt=prompt, target=target, answer=None if answer is None else str(answer),
                  source=str(raw.get("source") or cfg.get("path")))


def code_contests_record(raw, cfg) -> Record:
    raw = _check_parsed(raw)
    desc = require_text(raw, "description")
    sols = raw.get("solutions") or {}
    langs, codes = sols.get("language", []), sols.get("solution", [])
    # Language 3 is PYTHON3 in code_contests' enum; fall back to the first solution of any language.
    pick = next((c for l, c in zip(langs, codes) if l == 3), codes[0] if codes else None)
    if not pick:
        raise BadRecord("no solutions")
    return Record(prompt=desc, target=pick, answer=None, source="code_contests")


SOURCES: dict[str, Source] = {
    "arithmetic": Source("qa", _arithmetic_rows, lambda r, c: r, "offline multi-step arithmetic word problems"),
    "gsm8k": Source("qa", lambda c: _rows_from(c, ("openai/gsm8k", "main", "train")), gsm8k_record,
                    "GSM8K-format JSONL (question, answer with '#### N')"),
    "openmathinstruct2": Source("qa", lambda c: _rows_from(c, ("nvidia/OpenMathInstruct-2", None, "train_1M")),
                                openmath_record, "nvidia/OpenMathInstruct-2 (streamed)"),
    "metamathqa": Source("qa", lambda c: _rows_from(c, ("meta-math/MetaMathQA", None, "train")), metamath_record,
                         "meta-math/MetaMathQA (query, response)"),
    "code_contests": Source("qa", lambda c: _rows_from(c, ("deepmind/code_contests", None, "train")),
                            code_contests_record, "deepmind/code_contests (description -> solution)"),
    "wikitext": Source("lm", _wikitext_rows, text_record, "WikiText-2 (local file or HF wikitext-2-raw-v1)"),
    "codeparrot": Source("lm", lambda c: _rows_from(c, ("codeparrot/codeparrot-clean", None, "train")),
                         lambda r, c: text_record(r, {**c, "columns": {"text": "content"}}),
                         "codeparrot/codeparrot-clean (content)"),
    "python_docs": Source("lm", _python_docs_rows, text_record, "offline: English prose of Python's docs"),
    "python_stdlib": Source("lm", _python_stdlib_rows, text_record, "offline: Python standard-library sources"),
    "local": Source("qa", _local_rows, local_record, "a local file with a column mapping"),
    "hf": Source("qa", _hf_generic_rows, local_record, "any HF dataset (hf_name, hf_config, split) with a column mapping"),
}


def source_kind(cfg: dict) -> str:
    """"qa" or "lm": the config's `kind:`, else the source's (a local text file is "lm")."""
    if cfg.get("kind"):
        return cfg["kind"]
    return "lm" if cfg.get("dataset_name") == "local" and is_text_file(cfg) else get_source(cfg["dataset_name"]).kind


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ConfigError(f"unknown dataset_name '{name}'; choose one of: {', '.join(SOURCES)}")
    return SOURCES[name]
