"""The trainer under the real `accelerate launch` with two processes (CPU, gloo): it trains the same
plug-in as one process with the same global batch, and a run stopped between two checkpoints
resumes to the same weights as an uninterrupted one.

Tolerance. Both runs see the same micro-batches (batch_order depends on the seed and the step
only): one process does batch 2 x grad_accum 2, two processes one batch of 2 each. The step's
gradient is then g0 + g1 summed by autograd in one process, and (2 g0 + 2 g1) / 2 through DDP's
all-reduce (each process scales by the world size, DDP averages) in two: in fp32 a sum of two
terms does not depend on their order and scaling by 2 is exact, so the weights should agree bit
for bit; we allow 1e-6 (absolute, on weights of size ~0.1) for an all-reduce that sums in another
order on another platform. Resume restores weights, AdamW moments and RNG state exactly, so a
resumed run must equal the uninterrupted one bit for bit.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnlab.train import ResumeMismatch

from . import distributed_train as dt

TIMING = ("elapsed_s", "tokens_per_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, *args) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
           dt.__file__, str(tmp_path), *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, f"accelerate launch failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _strip(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_two_processes_train_like_one_with_the_same_global_batch_and_resume_exactly(tmp_path):
    out = _launch(tmp_path)
    assert "rank 0 of 2: full: 6 steps" in out and "rank 1 of 2: full: 6 steps" in out, out
    full = [load_file(str(tmp_path / "full" / f"final{r}.safetensors")) for r in (0, 1)]
    assert full[0].keys() == full[1].keys() and all(torch.equal(full[0][k], full[1][k]) for k in full[0])

    # one process, batch 2 x grad_accum 2: the same 4 examples per step
    result, lora = dt.run(tmp_path / "one", {**dt.TRAIN, "grad_accum": 2}, log=lambda *_: None)
    one = lora.state_dict()
    assert one.keys() == full[0].keys()
    for k in one:
        torch.testing.assert_close(full[0][k], one[k], rtol=0, atol=1e-6)
    assert max(v.abs().max() for k, v in one.items() if "lora_B" in k) > 1e-3, "LoRA B never left zero"
    mp_history = json.loads((tmp_path / "full" / "history0.json").read_text())
    assert [h["step"] for h in mp_history] == [h["step"] for h in result.history]
    assert [h["tokens"] for h in mp_history] == [h["tokens"] for h in result.history]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in mp_history]),
                               torch.tensor([h["loss"] for h in result.history]), rtol=0, atol=1e-6)

    # the stopped run: checkpoint of step 3 (written by the main process only), metrics up to step 4
    cut = tmp_path / "cut" / "run"
    assert json.loads((cut / "checkpoint" / "state.json").read_text())["step"] == 3
    assert [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not list((tmp_path / "cut").glob("final*"))
    out = _launch(tmp_path, "--resume")
    assert out.count("resumed from step 3") == 1, out  # said once, by the main process
    assert "rank 1 of 2: cut: 6 steps, resumed from 3" in out
    for r in (0, 1):
        resumed = load_file(str(tmp_path / "cut" / f"final{r}.safetensors"))
        assert all(torch.equal(resumed[k], full[0][k]) for k in full[0]), "the resumed run differs"
    with pytest.raises(ResumeMismatch, match="2 process"):  # one process would continue with another batch
        dt.run(tmp_path / "full", {**dt.TRAIN, "steps": 8}, log=lambda *_: None)
    metrics = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(x) for x in (tmp_path / "full" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert _strip(metrics) == _strip(whole)
