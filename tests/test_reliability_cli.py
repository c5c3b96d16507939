"""Issue 24 (reliability v2), the command line: every case of the table in tests/probe_cli.py is
refused with one line naming the flag or key, before anything is written. Each case was run
against the code before this issue (`PYTHONPATH=<old checkout> python tests/probe_cli.py`) and
failed there (a traceback, a library message, a hang, or no error at all)."""

import pytest

from attnlab.cli import main

from .probe_cli import CASES, check, prepare


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_bad_input_is_one_line_naming_the_flag_or_key(case, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    argv = prepare(case, tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses with status 2
        code = e.code
    why = check(case, code, capsys.readouterr().err, tmp_path)
    assert why is None, why


def test_generate_cuts_a_long_prompt_from_the_left_and_says_how_much(capsys):
    assert main(["generate", "--model", "tiny-gpt2", "--prompt", "x" * 600, "--max-new-tokens", "8", "--raw"]) == 0
    err = capsys.readouterr().err
    assert "the prompt is 600 tokens; cut 96 from the left" in err, err


def test_python_dash_m_attnlab_runs_the_cli():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "attnlab", "--help"], capture_output=True, text=True, cwd=root,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-300:]            # it was: No module named attnlab.__main__
    assert "run" in r.stdout and "eval" in r.stdout
