"""FactorizedAttention + LoRA against plain attention + LoRA: time and peak memory of one training
step (forward + backward) at 256, 512 and 1024 tokens, side by side in one run.

    python benchmarks/factorized_attention.py [--model smollm2-135m] [--lengths 256 512 1024]
    nice -n 10 python benchmarks/factorized_attention.py --threads 1   # on a machine shared with other jobs
    python benchmarks/factorized_attention.py --params --out benchmarks/results/factorized_attention_params.json
                                                           # trainable counts on GPT-2 small and SmolLM2-135M

All arms train LoRA r=8 on the attention projections; the others also train the factorized q/k
parameters of every layer (`recompute`: the q/k transform keeps only its input and recomputes the
rest in its hand-written backward; `no recompute`: plain autograd keeps every intermediate). The
arms alternate within each repeat so that drift in the machine's speed hits them alike. Time: the
median wall time of a step, and its process CPU time; with --threads 1 on a shared machine the CPU
time is the measure of the work (the wall time also counts the waits for a core). Peak memory:
tensors created during the step (CPU: an allocator-level dispatch mode; CUDA: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from memory import peak_bytes  # noqa: E402
from record import write_result  # noqa: E402

import attnlab  # noqa: E402

FA = {"lora_r": 8, "lora_alpha": 16, "factor_dim": 128}
ARMS = {"LoRA": ("lora", {"r": 8, "alpha": 16}),
        "LoRA + Factorized, no recompute": ("factorized", {**FA, "recompute": False}),
        "LoRA + Factorized, recompute": ("factorized", {**FA, "recompute": True}),
        "LoRA + Factorized pre_rope, recompute": ("factorized", {**FA, "recompute": True, "placement": "pre_rope"})}
DEFAULT_ARMS = list(ARMS)[:3]


def trainable_counts(m) -> dict:
    """Trainable parameters of LoRA and of LoRA + FactorizedAttention (every factorized arm has the
    same count) on the frozen model `m`."""
    m.requires_grad_(False)
    out = {}
    for name, (method, opts) in list(ARMS.items())[:2]:
        p = attnlab.attach(m, method, **opts)
        out[name] = p.num_trainable()
        p.detach()
    return out


def count_rows(model: str) -> list[dict]:
    """One row per arm on GPT-2 small (random weights: counts need no download) and on `model`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_positions=64))
    gpt2.config._attn_implementation = "sdpa"
    rows = []
    for label, m in (("GPT-2 small", gpt2), (model, attnlab.load_backbone(model).model)):
        layers = m.config.num_hidden_layers
        counts = trainable_counts(m)
        lora = counts["LoRA"]
        rows += [{"model": label, "layers": layers, "arm": arm.replace(", no recompute", ""), "trainable": n,
                  "added_per_layer": (n - lora) // layers} for arm, n in counts.items()]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS), metavar="ARM",
                    help=f"arms to run, among {list(ARMS)}; the first is the reference")
    ap.add_argument("--params", action="store_true", help="only count the trainable parameters (GPT-2 small, --model)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if a.params:
        rows = count_rows(a.model)
        for r in rows:
            print(f"{r['model']}, {r['arm']}: {r['trainable']:,} trainable parameters ({r['trainable'] / 1e6:.2f}M)")
        if a.out:
            write_result(a.out, {"factor_dim": FA["factor_dim"], "lora_r": FA["lora_r"], "rows": rows})
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bb = attnlab.load_backbone(a.model, device="cuda" if torch.cuda.is_available() else None)
    dev = next(bb.model.parameters()).device
    rows = []
    for T in a.lengths:
        ids = torch.randint(0, bb.model.config.vocab_size, (1, T), device=dev)
        wall, cpu = ({name: [] for name in a.arms} for _ in range(2))
        mem, n_params = {}, {}
        for rep in range(a.repeat + 1):  # the first round warms up
            for name in a.arms:
                method, opts = ARMS[name]
                torch.manual_seed(0)
                p = attnlab.attach(bb.model, method, **opts)
                n_params[name] = p.num_trainable()

                def step():
                    bb.model(input_ids=ids, labels=ids).loss.backward()
                    for q in p.trainable_parameters().values():
                        q.grad = None

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t, c = time.perf_counter(), time.process_time()
                step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if rep:
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
                if rep == 1:
                    mem[name] = peak_bytes(step)
                p.detach()
        ref = a.arms[0]
        for name in a.arms:
            t, c = statistics.median(wall[name]), statistics.median(cpu[name])
            rows.append({"tokens": T, "arm": name, "trainable": n_params[name], "step_s": t, "cpu_s": c,
                         "tokens_per_s": T / t, "peak_MiB": mem[name] / 2**20,
                         "time_x": t / statistics.median(wall[ref]), "cpu_x": c / statistics.median(cpu[ref]),
                         "mem_x": mem[name] / mem[ref], "wall_runs": wall[name], "cpu_runs": cpu[name]})
    print(f"model {a.model}, batch 1, {torch.get_num_threads()} threads, {dev.type}; median of {a.repeat}")
    print(f"| tokens | arm | trainable | step s (wall) | step × {ref} | CPU s | CPU × {ref} | peak MiB | memory × {ref} |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['arm']} | {r['trainable']:,} | {r['step_s']:.2f} | {r['time_x']:.3f} | "
              f"{r['cpu_s']:.2f} | {r['cpu_x']:.3f} | {r['peak_MiB']:.0f} | {r['mem_x']:.3f} |")
    if a.out:
        write_result(a.out, {"model": a.model, "repeat": a.repeat, "reference": ref, "rows": rows})


if __name__ == "__main__":
    main()
