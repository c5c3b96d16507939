"""Generation samples from the same prompts with dense attention, Quest and the distilled gate (issue 27,
item 4: the seed proposal shows such samples). Each prompt is the first --prompt tokens of a held-out
WikiText-2 sequence; every selector continues it greedily for --new tokens, every layer sparse, with the
KV cache (row-wise selection: a decoding step selects exactly what a full recomputation selects,
tests/test_sparse.py). Recorded: the continuations and how many of their tokens equal dense's (up to the
first difference, and in all), so the samples are read beside the perplexity numbers, not instead of them.

    OMP_NUM_THREADS=1 python benchmarks/sparse_samples.py --gate runs/sparse_quality_2048_b32/gate.safetensors \\
        --out benchmarks/results/sparse_samples.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnlab  # noqa: E402
from attnlab.kvcache import generation_cache  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default=str(ROOT.parent / "shared/data/wikitext-2/valid.txt"))
    ap.add_argument("--length", type=int, default=2048, help="the sequences the text is cut into")
    ap.add_argument("--sequences", type=int, nargs="+", default=[117, 124, 131], help="held-out sequence indices")
    ap.add_argument("--prompt", type=int, default=2000)
    ap.add_argument("--new", type=int, default=40)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=7)
    ap.add_argument("--gate", required=True, help="a distilled gate's safetensors (benchmarks/sparse_quality.py saves it)")
    ap.add_argument("--gate-dim", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not Path(args.gate).is_file():
        raise SystemExit(f"--gate {args.gate}: no such file (run the held-out command of docs/sparse_attention.md)")
    if not Path(args.text).is_file():
        raise SystemExit(f"--text {args.text}: no such file")
    from safetensors.torch import load_file
    gate = load_file(args.gate)
    bb = attnlab.load_backbone("smollm2-135m")
    model, tok = bb.model, bb.tokenizer
    ids = torch.tensor(tok(Path(args.text).read_text(), add_special_tokens=False)["input_ids"])
    common = {"block_size": args.block_size, "granularity": "row", "top_k": args.top_k}
    selectors = {"dense": None, "quest": {"variant": "quest", **common},
                 "learned": {"variant": "learned", "gate_dim": args.gate_dim, **common}}
    rows = []
    for si in args.sequences:
        prompt = ids[si * args.length:si * args.length + args.prompt][None]
        out = {"sequence": si, "prompt_tail": tok.decode(prompt[0, -60:])}
        for name, opts in selectors.items():
            plugin = attnlab.attach(model, "sparse", **opts) if opts else None
            try:
                if name == "learned":
                    plugin.load_state_dict(gate)
                with torch.no_grad():
                    gen = model.generate(prompt, max_new_tokens=args.new, do_sample=False,
                                         pad_token_id=tok.eos_token_id, past_key_values=generation_cache(model))
            finally:
                if plugin is not None:
                    plugin.detach()
            new = gen[0, prompt.shape[1]:]
            out[name] = {"text": tok.decode(new), "tokens": new.tolist()}
            print(f"[{name}] seq {si}: {out[name]['text']!r}", flush=True)
        for name in ("quest", "learned"):
            a, d = out[name]["tokens"], out["dense"]["tokens"]
            same = [x == y for x, y in zip(a, d)]
            out[name]["same_as_dense"] = sum(same)
            out[name]["same_prefix"] = same.index(False) if False in same else len(same)
        rows.append(out)
    result = {"command": " ".join(["benchmarks/sparse_samples.py"] + (argv if argv is not None else sys.argv[1:])),
              "model": "smollm2-135m", "text": args.text, "length": args.length, "prompt": args.prompt,
              "new": args.new, "selection": common, "gate": os.path.relpath(args.gate, ROOT), "samples": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
