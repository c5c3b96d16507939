"""Published numbers are rendered from committed results files, not typed.

    python -m attnlab.docs render     # rewrite every rendered block in README.md, docs/*.md and the
                                      # docs/results/*.md reports that have one (kept runs)
    python -m attnlab.docs check      # exit 1 naming each block that differs, and each results file
                                      # that does not say which command made it

A rendered block is delimited by two HTML comments (invisible in the rendered Markdown):

    <!-- render:NAME:ARG -->...<!-- /render -->

NAME picks a renderer in `attnlab.published` (a function of the repository root and ARG that reads
results files and returns Markdown); everything between the markers is replaced by its output. A
one-line output stays inline (a number in a sentence); a multi-line one (a table, an included
file) sits on its own lines between the markers. `check` renders into memory and compares, so a
test (tests/test_docs_render.py) fails when a published number no longer matches its results file.

`typed_rows` finds what `check` cannot see: a table row outside every rendered block that holds a
result-looking number (a percentage, a ×-ratio, a decimal with two places or more), typed by hand;
`typed_prose` the same in sentences, with a narrower net (a percentage with its interval, a ratio
with decimals, a number with three decimals or more), since prose also carries goals and config
values. tests/test_docs_render.py allows no typed row, and in prose only a short explicit list (the
proposal's own claims, goals).

Results files (`benchmarks/results/*.json`, `docs/results/*`) must carry the command that made
them: a JSON file a top-level `command` (or `meta.command`), a Markdown report a line
"Command: `...`".
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- render:(?P<expr>(?:(?!-->)[^\n])+?) -->"     # NAME:ARG on one line
                   r"(?P<body>(?:(?!<!-- render:).)*?)<!-- /render -->", re.S)   # no block inside a body
OPENER = "<!-- render:"
DOC_GLOBS = ("README.md", "docs/*.md")
RENDERING_RESULTS = "docs/results/*.md"   # a results report is also a document once it renders a block (kept cells)
RESULT_GLOBS = ("benchmarks/results/*.json", "docs/results/*.json", "docs/results/*.md")


def read(path: Path) -> str:
    """A document or results file's text; DataError (one line, naming the file) when it is not UTF-8."""
    from .errors import DataError

    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None


def documents(root: Path = ROOT) -> list[Path]:
    reports = [p for p in root.glob(RENDERING_RESULTS) if "<!-- render:" in read(p)]
    return sorted([p for g in DOC_GLOBS for p in root.glob(g)] + reports)


def results_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for g in RESULT_GLOBS for p in root.glob(g))


def command_of(path: Path) -> str | None:
    """The command recorded in a results file, or None when it records none."""
    if path.suffix == ".json":
        try:
            d = json.loads(read(path))      # DataError when it is not UTF-8 (stale() lists it as such)
        except json.JSONDecodeError:
            return None
        meta = d.get("meta") if isinstance(d, dict) else None
        cmd = d.get("command") or (meta.get("command") if isinstance(meta, dict) else None) if isinstance(
            d, dict) else None
        return cmd if isinstance(cmd, str) and cmd.strip() else None
    m = re.search(r"^Command: `([^`]+)`", read(path), re.M)
    return m.group(1) if m else None


# A result-looking number: a percentage, a ×-ratio, or a decimal with two or more places (a PPL, an
# accuracy, a ratio); goal thresholds (≤ 0.25, ≥ 75%) and versions (0.4.13) are not results.
RESULT_NUMBER = re.compile(r"\d%|\d×|(?<![\d.])\d+\.\d{2,}(?![\d.\w])")
THRESHOLD = re.compile(r"[≤≥<>]\s*[−+-]?\d[\d.,]*\s*[%×]?")


def typed_rows(text: str) -> list[str]:
    """The Markdown table rows outside rendered blocks and code fences that hold a result-looking
    number: results typed by hand, which `check` cannot compare with any results file."""
    text = BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    rows, fence = [], False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("```"):
            fence = not fence
        elif not fence and s.startswith("|") and not set(s) <= set("|-: ") and RESULT_NUMBER.search(THRESHOLD.sub("", s)):
            rows.append(s)
    return rows


# A result number in prose: a percentage with its interval ("+1.2% [+0.5, +1.9]"), a ratio with
# decimals ("1.34×"), or a number with three decimals or more (a perplexity, a loss, a cosine).
# Narrower than RESULT_NUMBER: prose also holds goals, config values and rounded words-with-numbers.
PROSE_NUMBER = re.compile(r"[−+-]?\d+(?:\.\d+)?%\s*\[[^\]]*\]|(?<![\d.])\d+\.\d+×|(?<![\d.\w])\d+\.\d{3,}(?![\d.])")
INLINE_CODE_OR_LINK = re.compile(r"`[^`]*`|\]\([^)]*\)")


def typed_prose(text: str) -> list[str]:
    """The result-looking numbers typed in prose (outside rendered blocks, code fences, inline code,
    link targets and tables), a paragraph at a time so that an interval broken over two lines is
    still one number; goals after ≤ / ≥ / < / > are not results."""
    text = BLOCK.sub(lambda m: "\n" * m.group(0).count("\n") or " ", text)
    found, para, fence = [], [], False
    for line in text.splitlines() + [""]:
        s = line.strip()
        if s.startswith("```"):
            fence = not fence
        if fence or s.startswith("```") or s.startswith("|") or not s:
            found += PROSE_NUMBER.findall(THRESHOLD.sub("", INLINE_CODE_OR_LINK.sub(" ", " ".join(para))))
            para = []
        else:
            para.append(s)
    return found


def render_text(text: str, root: Path = ROOT) -> str:
    """`text` with every rendered block's body replaced by its renderer's output."""
    from .errors import DataError
    from .published import render_one

    closed = {m.start() for m in BLOCK.finditer(text)}
    for m in re.finditer(re.escape(OPENER), text):   # an opener whose block does not close: its text is kept as is
        if m.start() not in closed:
            line = text.count("\n", 0, m.start()) + 1
            raise DataError(f"line {line}: a rendered block opened here has no `<!-- /render -->` before the next "
                            f"block (or the end); close it, so that rendering replaces only its body")

    def sub(m: re.Match) -> str:
        out = render_one(m.group("expr").strip(), root)
        body = out if "\n" not in out else f"\n{out.rstrip()}\n"
        return f"<!-- render:{m.group('expr')} -->{body}<!-- /render -->"

    return BLOCK.sub(sub, text)


def stale(root: Path = ROOT) -> list[str]:
    """One line per problem: a document whose rendered blocks differ from their results files, a
    results file without its command."""
    from .errors import AttnlabError

    problems = []
    for doc in documents(root):
        text = read(doc)
        try:
            new = render_text(text, root)
        except AttnlabError as e:
            problems.append(f"{doc.relative_to(root)}: cannot render: {e}")
            continue
        if new != text:
            old_blocks, new_blocks = BLOCK.findall(text), BLOCK.findall(new)
            which = [e for (e, a), (_, b) in zip(old_blocks, new_blocks) if a != b]
            problems.append(f"{doc.relative_to(root)}: rendered blocks differ from their results files: "
                            f"{', '.join(which)} (run `python -m attnlab.docs render`)")
    named = {root / m.group("expr").replace("\\|", "|").partition(":")[2].split("|")[0]
            for doc in documents(root) for m in BLOCK.finditer(read(doc))}
    others = sorted(p for p in named if p.suffix in (".json", ".md") and p.is_file() and p not in results_files(root))
    for path in results_files(root) + others:   # a block may read a file outside the results folders too
        try:
            command = command_of(path)
        except AttnlabError as e:       # not UTF-8: say so, not that it records no command
            problems.append(str(e))
            continue
        if command is None:
            problems.append(f"{os.path.relpath(path, root)}: records no command (add a `command` field, or a "
                            f"'Command: `...`' line to a report)")
    return problems


def render(root: Path = ROOT) -> list[Path]:
    """Rewrite the rendered blocks of every document in place; returns the documents that changed."""
    from .atomic import write_text_atomic

    changed = []
    from .errors import DataError

    for doc in documents(root):
        text = read(doc)
        try:
            new = render_text(text, root)
        except DataError as e:
            raise DataError(f"{doc.relative_to(root)}: {e}") from None
        if new != text:
            write_text_atomic(doc, new)
            changed.append(doc)
    return changed


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["render"]:
        from .errors import AttnlabError

        try:
            changed = render()
        except AttnlabError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for p in changed:
            print(f"rendered {p.relative_to(ROOT)}")
        return 0
    if argv[:1] == ["check"]:
        from .errors import AttnlabError

        try:
            problems = stale()
        except AttnlabError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("\n".join(problems) if problems else "every rendered block matches its results file")
        return 1 if problems else 0
    print(__doc__.split("\n\n")[1])
    return 2


if __name__ == "__main__":
    sys.exit(main())
