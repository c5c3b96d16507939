"""A table of bad inputs to the `attnlab` command, each with the one line it must answer.

Add a case by appending a `Case`: its argv (with `{tmp}` and any field its `setup` returns filled
in), and a piece of the expected stderr line. `tests/test_reliability_cli.py` runs every case:
exit status 2, no traceback, one line (argparse's usage lines aside: its last line names the flag),
and, where the case says so, nothing written. By hand, against any checkout:

    PYTHONPATH=. python tests/probe_cli.py          # one line per case: ok / FAIL and what it printed
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RUN = ("model: tiny-gpt2\ndata: {{dataset_name: arithmetic, n_train: 4, n_val: 2, n_eval: 2, max_length: {max_length}}}\n"
       "train: {{steps: 1, batch_size: 2, progress: false}}\neval: {{generate: false}}\n"
       "methods:\n  - {{method: lora, r: 2}}\n")


@dataclass
class Case:
    name: str
    argv: list[str]
    needle: str                                   # a piece of the one line printed
    setup: Callable[[Path], dict] | None = None   # tmp -> extra fields for argv
    argparse: bool = False                        # refused by argparse (usage lines, then one error line)
    writes_nothing: str | None = None             # a path (argv fields allowed) that must not exist afterwards


def _file(tmp: Path) -> dict:
    (tmp / "a_file").write_text("the user's")
    return {"file": str(tmp / "a_file")}


def _users_folder(tmp: Path) -> dict:
    (tmp / "mine").mkdir(exist_ok=True)
    (tmp / "mine" / "profile.md").write_text("the user's notes")
    (tmp / "mine" / "results.json").write_text("{}")
    return {"mine": str(tmp / "mine")}


def _config(text: str, name: str = "c.yaml"):
    def setup(tmp: Path) -> dict:
        (tmp / name).write_text(text)
        return {"config": str(tmp / name)}
    return setup


def _keep(kind: str):
    """A run config, and a keep folder that cannot take its results."""
    def setup(tmp: Path) -> dict:
        fields = {**_file(tmp), **_config(RUN.format(max_length=400))(tmp)}
        if kind == "dangling":
            (tmp / "gone").symlink_to(tmp / "nowhere")
        elif kind == "foreign":
            (tmp / "kept" / "lora" / "seed0").mkdir(parents=True)
            (tmp / "kept" / "lora" / "seed0" / "result.json").write_text('{"accuracy": 0.9}')
        return fields
    return setup


def _imports_raise(tmp: Path) -> dict:
    (tmp / "mods").mkdir(exist_ok=True)
    (tmp / "mods" / "boom_methods.py").write_text("1 / 0\n")
    (tmp / "c.yaml").write_text(RUN.format(max_length=400) + "imports: [boom_methods]\n")
    return {"config": str(tmp / "c.yaml")}


def _plugin(damage: str):
    """A LoRA plug-in saved on tiny-gpt2, then damaged."""
    def setup(tmp: Path) -> dict:
        from attnlab import attach, load_backbone

        folder = tmp / "plugin"
        bb = load_backbone("tiny-gpt2")
        attach(bb.model, "lora", r=2).save_pretrained(folder)
        m = folder / "manifest.json"
        if damage == "no_manifest":
            m.unlink()
        elif damage == "outside":
            entries = json.loads(m.read_text())
            entries["files"]["../../../../../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
            m.write_text(json.dumps(entries))
        elif damage == "wrong_shape":
            m.write_text(json.dumps({"files": []}))
        elif damage == "no_body_hash":
            meta = json.loads((folder / "attnlab_plugin.json").read_text())
            del meta["base"]["body_sha256"]
            (folder / "attnlab_plugin.json").write_text(json.dumps(meta))
            from attnlab.atomic import write_manifest
            write_manifest(folder)
        return {"plugin": str(folder)}
    return setup


def _laughs(indent: str) -> str:
    """A "billion laughs": nine lists of nine aliases of the list before, 9**9 values once expanded."""
    rows = [f"{indent}- &a [x, x, x, x, x, x, x, x, x]\n"]
    rows += [f"{indent}- &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")]
    return "".join(rows)


CASES: list[Case] = [
    # lengths past the model's positions (tiny-gpt2 reads 512)
    Case("run max_length past positions", ["run", "{config}", "--out", "{tmp}/runs"], "data.max_length: 600 is past "
         "the 512 positions", _config(RUN.format(max_length=600))),
    Case("eval --max-length past positions", ["eval", "--model", "tiny-gpt2", "--max-length", "600", "--n", "2"],
         "--max-length: 600 is past the 512 positions"),
    Case("generate --max-new-tokens past positions", ["generate", "--model", "tiny-gpt2", "--prompt", "hi",
         "--max-new-tokens", "5000"], "--max-new-tokens: 5000 leaves no room"),
    Case("profile --lengths past positions", ["profile", "--model", "tiny-gpt2", "--lengths", "2048", "--out",
         "{tmp}/prof"], "--lengths: 2048 is past the 512 positions", writes_nothing="{tmp}/prof"),
    # flags checked before the model loads
    Case("generate --prompt empty", ["generate", "--model", "tiny-gpt2", "--prompt", ""], "--prompt: the prompt is empty"),
    Case("generate --sample --temperature 0", ["generate", "--model", "tiny-gpt2", "--prompt", "hi", "--sample",
         "--temperature", "0"], "sampling needs a temperature > 0"),
    Case("generate --top-k -1", ["generate", "--model", "tiny-gpt2", "--prompt", "hi", "--top-k", "-1"],
         "a top-k >= 0"),
    Case("generate --max-new-tokens 0", ["generate", "--model", "tiny-gpt2", "--prompt", "hi", "--max-new-tokens",
         "0"], "--max-new-tokens", argparse=True),
    Case("profile decode at the last position", ["profile", "--model", "tiny-gpt2", "--modes", "decode", "--lengths",
         "512", "--out", "{tmp}/prof"], "use at most 511 with --modes decode",
         writes_nothing="{tmp}/prof/profile.json"),
    Case("profile --decode-cache without decode", ["profile", "--model", "tiny-gpt2", "--modes", "inference",
         "--lengths", "32", "--decode-cache", "growing", "--out", "{tmp}/prof"], "add decode to --modes",
         writes_nothing="{tmp}/prof"),
    Case("profile --layers 0", ["profile", "--layers", "0"], "--layers: 0 is not allowed"),
    Case("profile --lengths 0", ["profile", "--lengths", "0"], "--lengths", argparse=True),
    Case("profile --batch 0", ["profile", "--batch", "0"], "--batch: 0 is not allowed"),
    Case("profile --repeat 0", ["profile", "--repeat", "0"], "--repeat: 0 is not allowed"),
    Case("profile --out a file", ["profile", "--model", "tiny-gpt2", "--out", "{file}"], "--out: ", _file),
    Case("lm-eval --num-fewshot -1", ["lm-eval", "--tasks", "attnlab_wikitext", "--num-fewshot", "-1"],
         "--num-fewshot", argparse=True),
    Case("lm-eval --limit 0", ["lm-eval", "--model", "tiny-gpt2", "--tasks", "attnlab_wikitext", "--limit", "0",
         "--out", "{tmp}/lm"], "--limit: 0.0 is not allowed", writes_nothing="{tmp}/lm"),
    Case("lm-eval --out a file", ["lm-eval", "--model", "tiny-gpt2", "--tasks", "attnlab_wikitext", "--out",
         "{file}"], "--out: ", _file),
    Case("run --out a file", ["run", "{config}", "--out", "{file}"], "--out: ",
         lambda tmp: {**_file(tmp), **_config(RUN.format(max_length=400))(tmp)}),
    # configs
    Case("run n_eval 0", ["run", "{config}", "--out", "{tmp}/runs"], "data.n_eval: 0 leaves no test examples",
         _config(RUN.format(max_length=400).replace("n_eval: 2", "n_eval: 0")), writes_nothing="{tmp}/runs"),
    Case("yaml billion laughs in an unknown key", ["run", "{config}", "--out", "{tmp}/runs"], "anchors and aliases",
         _config(RUN.format(max_length=400) + "lol:\n" + _laughs("  ")), writes_nothing="{tmp}/runs"),
    Case("yaml billion laughs in data.families", ["run", "{config}", "--out", "{tmp}/runs"], "anchors and aliases",
         _config("model: tiny-gpt2\ndata:\n  dataset_name: arithmetic\n  families:\n" + _laughs("    ")),
         writes_nothing="{tmp}/runs"),
    Case("imports: a module that raises", ["run", "{config}", "--out", "{tmp}/runs"],
         "imports: importing 'boom_methods' raised ZeroDivisionError", _imports_raise, writes_nothing="{tmp}/runs"),
    Case("yaml key given twice", ["run", "{config}", "--out", "{tmp}/runs"], "the key 'train' appears twice",
         _config(RUN.format(max_length=400) + "train: {steps: 5}\n"), writes_nothing="{tmp}/runs"),
    # keep: folders (attnlab/keep.py) that cannot take the results: refused before the model loads
    Case("run --keep a file", ["run", "{config}", "--out", "{tmp}/runs", "--keep", "{file}"],
         "is a file, not a folder", _keep("file"), writes_nothing="{tmp}/runs"),
    Case("run --keep below a file", ["run", "{config}", "--out", "{tmp}/runs", "--keep", "{file}/kept"],
         "which is a file", _keep("file"), writes_nothing="{tmp}/runs"),
    Case("run --keep a dangling symlink", ["run", "{config}", "--out", "{tmp}/runs", "--keep", "{tmp}/gone"],
         "is a symlink to nothing", _keep("dangling"), writes_nothing="{tmp}/runs"),
    Case("run --keep inside the run folder", ["run", "{config}", "--out", "{tmp}/runs", "--keep", "{tmp}/runs/c/kept"],
         "lies inside the run folder", _keep("file"), writes_nothing="{tmp}/runs"),
    Case("run --keep holding a foreign result.json", ["run", "{config}", "--out", "{tmp}/runs", "--keep",
         "{tmp}/kept"], "is not a result attnlab wrote", _keep("foreign")),
    # data files
    Case("data path a device", ["data", "preview", "--dataset", "local", "--path", "/dev/zero"],
         "is not a regular file"),
    Case("csv field past the csv limit", ["data", "preview", "--dataset", "local", "--path", "{tmp}/big.csv"],
         "not readable as CSV", lambda tmp: (tmp / "big.csv").write_text('a,b\n"' + "x" * 200_000 + '",1\n') and {}),
    # plug-in folders
    Case("plug-in without manifest", ["eval", "--model", "tiny-gpt2", "--plugin", "{plugin}", "--n", "2"],
         "has no manifest.json", _plugin("no_manifest")),
    Case("manifest naming a file outside", ["eval", "--model", "tiny-gpt2", "--plugin", "{plugin}", "--n", "2"],
         "which is not a file inside", _plugin("outside")),
    Case("manifest of the wrong shape", ["eval", "--model", "tiny-gpt2", "--plugin", "{plugin}", "--n", "2"],
         "manifest.json is damaged", _plugin("wrong_shape")),
    Case("plug-in without body_sha256", ["eval", "--model", "tiny-gpt2", "--plugin", "{plugin}", "--n", "2"],
         "--allow-missing-body-hash", _plugin("no_body_hash")),
    # output folders of commands that write fixed names: a folder of the user's is never written into
    Case("profile --out a folder of the user's", ["profile", "--model", "tiny-gpt2", "--lengths", "32", "--out",
         "{mine}"], "already holds files attnlab did not write", _users_folder),
    Case("lm-eval --out a folder of the user's", ["lm-eval", "--model", "tiny-gpt2", "--tasks", "attnlab_wikitext",
         "--out", "{mine}"], "already holds files attnlab did not write", _users_folder),
]


def prepare(case: Case, tmp: Path) -> list[str]:
    fields = {"tmp": str(tmp), **(case.setup(tmp) if case.setup else {})}
    return [a.format(**fields) for a in case.argv]


def check(case: Case, code: int, err: str, tmp: Path) -> str | None:
    """None when the case answered as it should, else what went wrong."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    if code != 2:
        return f"exit status {code}, not 2"
    if "Traceback" in err or not lines:
        return "a traceback" if lines else "nothing on stderr"
    if not case.argparse and len(lines) != 1:
        return f"{len(lines)} lines"
    if case.needle not in lines[-1]:
        return f"{case.needle!r} not in {lines[-1]!r}"
    if case.writes_nothing and Path(case.writes_nothing.format(tmp=tmp)).exists():
        return f"{case.writes_nothing.format(tmp=tmp)} was written"
    return None


def main() -> int:
    bad = 0
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            argv = prepare(case, tmp)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "mods"), os.environ.get("PYTHONPATH", "")])}
            try:
                p = subprocess.run([sys.executable, "-m", "attnlab.cli", *argv], capture_output=True, text=True,
                                   env=env, timeout=float(os.environ.get("PROBE_TIMEOUT", 120)))
                why = check(case, p.returncode, p.stderr, tmp)
            except subprocess.TimeoutExpired:
                why = "no answer within PROBE_TIMEOUT seconds (a hang)"
            bad += why is not None
            print(f"{'ok  ' if why is None else 'FAIL'} {case.name}" + (f": {why}" if why else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
