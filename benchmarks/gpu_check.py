"""One prepared check of every CUDA path, for the few minutes a GPU is available.

    python benchmarks/gpu_check.py                 # on a CUDA GPU (meant to fit in 10 min on an H200; not yet timed there)
    python benchmarks/gpu_check.py --dry-run       # on CPU: the same code, small and fp32, < 1 min

Sections, each timed and recorded on its own (one failing does not lose the others):
  train     one training step of every method on a random 1B-shaped base (random:llama-1b) in bf16:
            time of a warm step (the first one, compilation included, apart) and
            torch.cuda.max_memory_allocated; LoRA also with gradient_checkpointing.
  sparse    quest and learned (block-shared, density ~0.25) on the `flex` kernel against the base's dense SDPA, the body at
            8k and 32k tokens: forward, and forward + backward (gradient into the input
            embeddings, so every layer's attention backward runs); time, peak memory, density
            (kept fraction of the causal query-key pairs).
  rng       the CUDA RNG in checkpoints: a LoRA with dropout trained 4 steps straight, and 2 + resume
            2, must end bit-identical.
  run       `attnlab run configs/gpu_quickstart.yaml` end to end (random:llama-1b, bf16; dry run: tiny-llama).
  pytest    `pytest -m cuda`: the suite's CUDA-only tests.
--dry-run: random:smollm2-135m cut to 2 layers, fp32, 2 x 64-token batches, sparse at 256/512 tokens
with the CPU's `gather` kernel; every section runs, and its numbers mean nothing for a GPU.
Writes JSON (with this command) to benchmarks/results/gpu_check.json (--dry-run: gpu_check_dry_run.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab import attach, load_backbone  # noqa: E402
from attnlab.atomic import write_json_atomic  # noqa: E402
from attnlab.backbone import decoder, layers  # noqa: E402
from attnlab.data import IGNORE, Example  # noqa: E402
from attnlab.train import TrainConfig, train  # noqa: E402

# name -> (method, options, train options): every method that trains something
METHODS = {
    "lora": ("lora", {"r": 8}, {}),
    "lora+checkpointing": ("lora", {"r": 8}, {"gradient_checkpointing": True}),
    "factorized": ("factorized", {"lora_r": 8}, {}),
    "sparse": ("sparse", {"variant": "learned", "top_k": 4, "gate_dim": 32}, {}),   # gate_dim: as committed
    "head_ft": ("head_ft", {}, {}),
    "backward_head residual": ("backward_head", {"preset": "residual"}, {}),
    "backward_head paper": ("backward_head", {"preset": "paper", "attn_dim": 256}, {}),
}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib():
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def _examples(n: int, length: int, vocab: int, seed: int = 0) -> list[Example]:
    """Random token sequences; the second half of each is the target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[IGNORE] * (length // 2) + ids[length // 2:], prompt_len=length // 2))
    return out


def _base(a, device, dtype):
    bb = load_backbone(a.base, dtype=dtype, device=device)
    if a.layers:
        del layers(bb.model)[a.layers:]
        bb.model.config.num_hidden_layers = a.layers
    return bb


def section_train(a, device, dtype) -> dict:
    bb = _base(a, device, dtype)
    ex = _examples(a.batch * 2, a.seq, 256)  # byte-tokenizer ids: inside every vocabulary
    rows = {}
    for name, (method, opts, topts) in METHODS.items():
        torch.manual_seed(0)
        plugin = attach(bb.model, method, **opts)
        try:
            _reset_peak()
            t0 = time.perf_counter()
            r = train(bb.model, plugin, ex, TrainConfig(steps=2, batch_size=a.batch, warmup_steps=0, progress=False,
                                                        **topts), pad_id=bb.tokenizer.pad_token_id, log=lambda *_: None)
            _sync()
            el = [h["elapsed_s"] for h in r.history]
            rows[name] = {"first_step_s": el[0], "warm_step_s": round(el[1] - el[0], 3),
                          "total_s": round(time.perf_counter() - t0, 2), "peak_MiB": _peak_mib(),
                          "loss": [h["loss"] for h in r.history], "trainable": plugin.num_trainable(),
                          "weights_dtype": sorted({str(p.dtype) for p in plugin.trainable_parameters().values()})}
        except Exception as e:  # noqa: BLE001  (recorded, the other methods still run)
            rows[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
        finally:
            plugin.detach()
        print(f"[gpu_check] train {name}: {rows[name]}", flush=True)
    return {"base": a.base, "layers": bb.model.config.num_hidden_layers, "dtype": str(dtype),
            "batch": a.batch, "seq": a.seq, "n_params": bb.info["n_params"], "methods": rows}


def _body_run(model, ids, backward: bool):
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        h = decoder(model)(inputs_embeds=emb, use_cache=False).last_hidden_state
        if backward:
            h.float().square().mean().backward()


def _measure(fn, repeat: int) -> dict:
    _reset_peak()
    t = time.perf_counter()
    fn()  # warm-up: compilation (flex) and allocator
    _sync()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return {"first_s": round(first, 3), "median_s": round(statistics.median(times), 4), "peak_MiB": _peak_mib()}


def sparse_top_k(tokens: int, block: int = 64, density: float = 0.25) -> int:
    """top_k for a causal density near `density`: a query block sees on average half the key blocks,
    and about 3 more (block 0, its neighbour and itself) are always kept."""
    return max(1, round(density * tokens / block / 2) - 3)


def section_sparse(a, device, dtype) -> dict:
    bb = _base(a, device, dtype)
    rows = []
    for T in a.lengths:
        ids = torch.randint(3, 256, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
        for mode in ("forward", "train"):
            back = mode == "train"
            for variant in ("sdpa", "quest", "learned"):
                plugin = None
                try:
                    if variant != "sdpa":
                        plugin = attach(bb.model, "sparse", variant=variant, top_k=sparse_top_k(T), kernel=a.kernel,
                                        gate_dim=32)   # the width of the committed runs (default 64 since)
                    row = _measure(lambda: _body_run(bb.model, ids, back), a.repeat)
                    row["density"] = round(1 - float(plugin.sparsity()), 4) if plugin is not None else 1.0
                except Exception as e:  # noqa: BLE001
                    row = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
                finally:
                    if plugin is not None:
                        plugin.detach()
                kernel = "sdpa" if variant == "sdpa" else a.kernel
                rows.append({"tokens": T, "mode": mode, "variant": variant, "kernel": kernel, **row})
                print(f"[gpu_check] sparse {rows[-1]}", flush=True)
    return {"base": a.base, "layers": bb.model.config.num_hidden_layers, "dtype": str(dtype),
            "variant": "quest and learned (untrained gate), block-shared selection, 64-token blocks, "
                       "top_k for density ~0.25 (sparse_top_k)", "rows": rows}


class _Stop(Exception):
    pass


def rng_resume_check(device: str, steps: int = 4, stop_after: int = 2) -> dict:
    """A LoRA with dropout 0.5 (every step draws random masks on `device`) trained `steps` steps
    straight, and again stopped at the start of step stop_after + 1 then resumed from its checkpoint
    with the RNG moved on in between (as a new process would have it): both must end bit-identical."""
    bb = load_backbone("tiny-llama", device=device)
    ex = _examples(16, 48, 256)
    cfg = TrainConfig(steps=steps, batch_size=4, warmup_steps=0, checkpoint_every=1, progress=False)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run, stop in (("straight", 0), ("stopped", stop_after), ("resumed", 0)):
            torch.manual_seed(0 if run != "resumed" else 999)   # the resumed run must get its RNG from the checkpoint
            plugin = attach(bb.model, "lora", r=4, dropout=0.5)
            if stop:
                started = []

                def on_step_start(started=started, stop=stop):
                    if len(started) == stop:
                        raise _Stop()
                    started.append(1)
                plugin.on_step_start = on_step_start
            try:
                r = train(bb.model, plugin, ex, cfg, out_dir=f"{tmp}/{'straight' if run == 'straight' else 'cut'}",
                          pad_id=bb.tokenizer.pad_token_id, log=lambda *_: None)
                out[run] = (plugin.state_dict(), r.resumed_from)
            except _Stop:
                pass
            finally:
                plugin.detach()
    (a, _), (b, resumed_from) = out["straight"], out["resumed"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return {"device": device, "cuda_rng_in_checkpoint": torch.cuda.is_available() and device != "cpu",
            "resumed_from": resumed_from, "bit_identical": diff == 0.0, "max_abs_diff": diff}


def section_rng(a, device, dtype) -> dict:
    return rng_resume_check(device)


def section_run(a, device, dtype) -> dict:
    """`attnlab run configs/gpu_quickstart.yaml` end to end (dry run: tiny-llama, fp32, on the CPU)."""
    from attnlab.config import read_yaml
    from attnlab.experiment import run_experiment

    cfg = read_yaml(ROOT / "configs" / "gpu_quickstart.yaml")
    if a.dry_run:
        cfg.update(model="tiny-llama", model_dtype="fp32")
        cfg["train"]["mixed_precision"] = "no"
    _reset_peak()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_experiment(cfg, out_root=tmp, log=lambda *_: None)
    cells = {c["method"]: {"test_ppl": round(c["eval"]["perplexity"], 3), "trainable": c.get("trainable_params"),
                           "val_loss": c.get("val_loss")} for c in res["cells"]}
    return {"config": "configs/gpu_quickstart.yaml", "model": cfg["model"], "model_dtype": cfg["model_dtype"],
            "device": res["environment"]["device"], "seconds": round(time.perf_counter() - t, 1),
            "peak_MiB": _peak_mib(), "cells": cells}


def section_pytest(a, device, dtype) -> dict:
    # -p no:logging: torch's DEBUG trace would otherwise bury the failures; -rfEs names each one
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-rfEs", "--tb=line", "-p", "no:cacheprovider",
           "-p", "no:logging"]  # -q: pyproject
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.pytest_timeout)
    lines = p.stdout.strip().splitlines()
    summary = [line for line in lines if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR")) or re.match(r"^/?\S+\.py:\d+: ", line)]
    return {"command": " ".join(cmd[1:]), "returncode": p.returncode, "summary": summary[-1] if summary else "",
            "failures": failures[:40], "tail": lines[-15:]}


SECTIONS = {"train": section_train, "sparse": section_sparse, "rng": section_rng, "run": section_run,
            "pytest": section_pytest}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, a 2-layer random base, fp32, short lengths")
    ap.add_argument("--base", help="default: random:llama-1b (dry run: random:smollm2-135m)")
    ap.add_argument("--layers", type=int, help="keep the first N layers (dry run: 2)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--repeat", type=int)
    ap.add_argument("--kernel", help="sparse kernel against SDPA (default flex; dry run: gather)")
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--pytest-timeout", type=int, default=240)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: run with --dry-run (CPU) to check the script itself")
    defaults = dict(base="random:smollm2-135m", layers=2, batch=2, seq=64, lengths=[256, 512], repeat=1,
                    kernel="gather") if dry else dict(base="random:llama-1b", layers=None, batch=4, seq=512,
                                                      lengths=[8192, 32768], repeat=3, kernel="flex")
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.out = a.out or str(ROOT / "benchmarks" / "results" / ("gpu_check_dry_run.json" if dry else "gpu_check.json"))
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    env = {"device": torch.cuda.get_device_name() if not dry else f"cpu, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())}
    result = {"command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "dry_run": dry, "env": env, "sections": {}}
    t_all = time.perf_counter()
    for name in a.sections:
        t = time.perf_counter()
        try:
            res = SECTIONS[name](a, device, dtype)
        except Exception as e:  # noqa: BLE001  (a section that fails is a result; the others still run)
            res = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}",
                   "traceback": traceback.format_exc()[-2000:]}
        res["seconds"] = round(time.perf_counter() - t, 1)
        result["sections"][name] = res
        print(f"[gpu_check] {name}: done in {res['seconds']} s", flush=True)
        write_json_atomic(Path(a.out), {**result, "wall_s": round(time.perf_counter() - t_all, 1)})
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    write_json_atomic(Path(a.out), result)
    print(f"[gpu_check] wrote {a.out} ({result['wall_s']} s)")
    failed = [n for n, r in result["sections"].items() if "error" in r or r.get("returncode") not in (None, 0, 5)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
