"""Run by tests/test_multiprocess.py under `accelerate launch --multi_gpu --num_processes 2` (on a
machine without GPUs: two CPU processes, gloo): LoRA on tiny-gpt2 with attnlab's trainer.

    distributed_train.py OUT            # OUT/full: trained to the end; then OUT/cut: stopped after step 4
    distributed_train.py OUT --resume   # OUT/cut again: resumes from its last checkpoint (step 3)

Each run trains into <dir>/run (checkpoints, metrics) and writes <dir>/final{rank}.safetensors and
<dir>/history{rank}.json. The stop raises in every process at the start of step 5, as a kill
between two checkpoints (every 3 steps) would stop them. Two runs in one launch: the second builds
a new DDP wrapper in the same process group, as a sweep in `attnlab run` does.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

import attnlab
from attnlab.data import build_splits
from attnlab.train import TrainConfig, train

DATA = {"dataset_name": "arithmetic", "n_train": 12, "n_val": 0, "n_eval": 2, "max_length": 400}
# per process: 2 examples a step; with 2 processes the global batch is 4, as batch 2 x grad_accum 2 in one
TRAIN = {"steps": 6, "batch_size": 2, "lr": 1e-2, "warmup_steps": 2, "checkpoint_every": 3, "progress": False}


class Stop(Exception):
    pass


def run(out: Path, train_cfg: dict, stop_after: int = 0, log=print):
    bb = attnlab.load_backbone("tiny-gpt2")
    splits = build_splits(DATA, bb.tokenizer)
    torch.manual_seed(0)  # the same LoRA initialisation in every run and process
    lora = attnlab.attach(bb.model, "lora", r=2)
    if stop_after:
        started = []

        def on_step_start():
            if len(started) == stop_after:
                raise Stop(f"stopped at the start of step {stop_after + 1}")
            started.append(1)
        lora.on_step_start = on_step_start
    try:
        result = train(bb.model, lora, splits.train, TrainConfig(**train_cfg), out_dir=out / "run",
                       pad_id=bb.tokenizer.pad_token_id, log=log)
    except Stop as e:
        log(str(e))
        return None, lora
    return result, lora


def _save(out: Path, result, lora) -> None:
    rank = int(os.environ.get("RANK", "0"))
    save_file(lora.state_dict(), str(out / f"final{rank}.safetensors"))
    (out / f"history{rank}.json").write_text(json.dumps(result.history))
    print(f"rank {rank} of {os.environ.get('WORLD_SIZE', '1')}: {out.name}: {result.steps} steps, resumed from "
          f"{result.resumed_from}, final loss {result.history[-1]['loss']:.6f}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    if not a.resume:
        _save(a.out / "full", *run(a.out / "full", TRAIN))
        result, _ = run(a.out / "cut", TRAIN, stop_after=4)
        assert result is None
    else:
        _save(a.out / "cut", *run(a.out / "cut", TRAIN))
