"""Training-step peak memory of the model body: dense SDPA, the sparse gather kernel, and the floor.

    python benchmarks/sparse_memory.py --layers 4 --lengths 1024 2048 4096

Same step as `attnlab profile` (forward + backward of the first --layers layers of SmolLM2-135M's
shape, random weights, batch 1, fp32, gradients flowing through the input embeddings), peak measured
with attnlab.memory (tensors created during the step). The floor is the same body whose attention
returns its value input and keeps nothing for the backward: no attention kernel can train the body
with less, so it shows how much of dense SDPA's peak any attention can remove.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnlab.memory import peak_bytes  # noqa: E402
from attnlab.modules import attach  # noqa: E402
from attnlab.modules.attention import register  # noqa: E402
from attnlab.profile import build_model  # noqa: E402


def nothing_kept(module, query, key, value, attention_mask, **kwargs):
    """An 'attention' that keeps nothing for its backward: each query head reads its kv head's values."""
    g = query.shape[1] // value.shape[1]
    return value.repeat_interleave(g, 1)[:, :, -query.shape[2]:].transpose(1, 2).contiguous() * 1.0, None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_memory.json"))
    args = ap.parse_args(argv)
    model = build_model("smollm2-135m", random_weights=True, layers=args.layers)
    register({"sdpa": "attnlab_nothing_kept"}, nothing_kept)
    body, emb = model.model, model.get_input_embeddings()
    variants = {"dense-sdpa": None, "window 256 + 4 sinks": dict(variant="window", window=256, sinks=4),
                "quest top-4": dict(variant="quest", top_k=4), "learned top-4": dict(variant="learned", top_k=4, gate_dim=32),
                "floor (attention keeps nothing)": "floor"}
    rows = []
    for T in args.lengths:
        ids = torch.randint(0, emb.weight.shape[0], (1, T), generator=torch.Generator().manual_seed(T))

        def step():
            x = emb(ids).detach().requires_grad_(True)
            body(inputs_embeds=x, use_cache=False).last_hidden_state.float().pow(2).mean().backward()

        for name, opts in variants.items():
            plugin = None
            if opts == "floor":
                model.config._attn_implementation = "attnlab_nothing_kept"
            elif opts is not None:
                plugin = attach(model, "sparse", block_size=64, kernel="gather", **opts)
            try:
                mib = peak_bytes(step) / 2**20
            finally:
                model.config._attn_implementation = "sdpa" if opts == "floor" else model.config._attn_implementation
                if plugin is not None:
                    plugin.detach()
            rows.append({"variant": name, "tokens": T, "peak_MiB": mib})
            print(f"T={T} {name}: {mib:.1f} MiB", flush=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "layers": args.layers, "rows": rows}, indent=1))
    ref = {r["tokens"]: r["peak_MiB"] for r in rows if r["variant"] == "dense-sdpa"}
    print("\n| variant | " + " | ".join(f"{T} tokens" for T in args.lengths) + " |")
    print("|---|" + "---:|" * len(args.lengths))
    for name in variants:
        cells = [next(r for r in rows if r["variant"] == name and r["tokens"] == T) for T in args.lengths]
        print(f"| {name} | " + " | ".join(f"{c['peak_MiB']:.0f} MiB ({c['peak_MiB'] / ref[c['tokens']]:.2f}×)"
                                           for c in cells) + " |")


if __name__ == "__main__":
    main()
