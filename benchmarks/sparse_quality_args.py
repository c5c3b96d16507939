"""The command line of benchmarks/sparse_quality.py: its flags, their defaults, and every check that can
run before the model loads (one line naming the flag: a run that would read held-out text, keep every
causal pair, or fail an hour in is refused here, in seconds).

The checks are rerun by the tests on every command recorded in the committed results' meta.commands,
so a flag that a committed result used can never become invalid unnoticed."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnlab.modules.sparse import quality
from attnlab.modules.sparse.quality import budgets

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64
MODEL = "smollm2-135m"      # the model every run reads (its head dimension bounds --rank before it loads)
BUDGETS = budgets(BLOCK)
DEFAULT_SELECTORS = [s for s in BUDGETS if s in quality.DEFAULT_SELECTORS]   # oracle-qhead, lowrank only when named
HEADLINE = {"window": {"window": 256, "sinks": 4}, "quest": {"top_k": 2}, "learned": {"top_k": 2},
            "learned-mass": {"mass": 0.9}, "oracle": {"top_k": 2}, "oracle-qhead": {"top_k": 2}, "lowrank": {"top_k": 2}}


def parse(argv, doc: str) -> argparse.Namespace:
    """The flags, with --heldout and --selectors resolved to their defaults (SystemExit, one line, on a
    combination that cannot be right whatever the model says)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--train", type=int, default=8, help="sequences the gates are distilled from (the first)")
    ap.add_argument("--heldout", type=int, default=None,
                    help="sequences the metrics read (the last; default 4); with --split validation, required: "
                         "the held-out sequences the validation ones must stay before")
    ap.add_argument("--split", default="heldout", choices=["heldout", "validation"],
                    help="read the last --heldout sequences, or the --validation ones just before them "
                         "(where ablations are compared; the held-out ones are left unread)")
    ap.add_argument("--validation", type=int, default=8, help="with --split validation: how many sequences")
    ap.add_argument("--top-k", type=int, nargs="+", default=None,
                    help="the top_k budgets of quest, learned and oracle (default: 1 2 4 8)")
    ap.add_argument("--window", type=int, nargs="+", default=None,
                    help="the window selector's budgets in tokens, each with 4 sinks (default: 1 2 4 8 blocks)")
    ap.add_argument("--block-size", type=int, default=BLOCK, help="key block (and query block) size")
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"))
    ap.add_argument("--train-text", default=None,
                    help="distil the gate from another text (a .txt file, a GSM8K-style .jsonl of question/answer, "
                         "or python_docs: the prose of Python's documentation), cut into --length sequences; "
                         "default: the first --train sequences of --text")
    ap.add_argument("--selectors", nargs="+", default=None, choices=list(BUDGETS),
                    help="default: every selector but oracle-qhead and lowrank (DEFAULT_SELECTORS)")
    ap.add_argument("--kernel", default="masked", help="the kernels compute the same function (tested); "
                    "masked is the fastest on CPU for per-row selections; work is counted with gather")
    ap.add_argument("--granularity", default="row", choices=["row", "block"],
                    help="quest/learned selection per row (the committed v2 results) or per query block "
                         "(results go to ..._block.json unless --out)")
    ap.add_argument("--gate-rows", type=int, default=512, help="cached rows per sequence and layer")
    ap.add_argument("--gate-steps", type=int, default=2000)
    ap.add_argument("--gate-lr", type=float, default=3e-3)
    ap.add_argument("--gate-dim", type=int, default=64)
    ap.add_argument("--gate-target", default="peak", choices=["peak", "mass"],
                    help="what the gate learns: the max-pooled attention (SeerAttention-R) or the block mass "
                         "(what the oracle ranks by); teacher.py")
    ap.add_argument("--gate-quest", action="store_true",
                    help="the gate's score adds a learned multiple of Quest's bound (gate.py: it starts at Quest)")
    ap.add_argument("--gate-unit", default=None, choices=["row", "block"],
                    help="what one gate training example is: a query row (its own target) or a whole query "
                         "block (SeerAttention's 2-D max-pooled target, scored by the block's mean gate query); "
                         "default: the --granularity the gate serves")
    ap.add_argument("--rank", type=int, default=16, help="lowrank: the indexer's dimensions (lowrank.py)")
    ap.add_argument("--calibrate", type=int, default=None,
                    help="lowrank: the indexer is fitted from the first this many --train sequences (one dense pass "
                         "each; default: 16, or every --train sequence when fewer)")
    ap.add_argument("--teacher-cache", default=None,
                    help="a file for the dense teacher's cache: loaded when it holds the same training "
                         "sequences, rows and block size, else written, so that gate recipes share one teacher pass")
    ap.add_argument("--recover-steps", type=int, default=0,
                    help="recovery training (attnlab/modules/sparse/recovery.py): each (selector, budget) gets its "
                         "own LoRA adapter trained this many steps by token KL to dense on the --train sequences, "
                         "with its selection frozen, and is read with it (0: none)")
    ap.add_argument("--recover-lr", type=float, default=1e-3)
    ap.add_argument("--recover-r", type=int, default=8, help="the adapter's rank")
    ap.add_argument("--metric-sequences", type=int, default=0,
                    help="held-out sequences for attention MSE and gradient cosine (headline budgets; 0: skip)")
    ap.add_argument("--headline-top-k", type=int, default=None,
                    help="the top-k budget the metrics read for quest, learned and oracle (default: HEADLINE's, 2)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sparse_quality_<length>.json)")
    ap.add_argument("--report", action="store_true",
                    help="only print the tables and draw the curves from the JSON (the PNG goes next to --out)")
    ap.add_argument("--publish", action="store_true",
                    help="with --report: also write the curves to docs/img/sparse_quality_<length>.png, the figure "
                         "the docs show (never done otherwise: a run on other text must not replace it)")
    ap.add_argument("--metrics-only", action="store_true",
                    help="skip the curves: only attention MSE and gradient cosine (e.g. in a second process "
                         "with its own --out, once the main run has saved the gate)")
    args = ap.parse_args(argv)
    if args.heldout is None:
        if args.split == "validation" and not args.report:
            raise SystemExit("--split validation reads the --validation sequences just before the last --heldout "
                             "ones: name --heldout as the held-out runs do (16 at 2048 tokens, 7 at 4096), or "
                             "validation reads sequences that a held-out result reports")
        args.heldout = 4
    if args.calibrate is None:
        args.calibrate = min(16, args.train) if args.train > 0 else 16
    if args.selectors is None:
        args.selectors = list(DEFAULT_SELECTORS)
    elif args.granularity == "block" and "oracle-qhead" in args.selectors:
        raise SystemExit("--selectors oracle-qhead at --granularity block is the oracle itself (one choice per query "
                         "block and kv head): drop it, or use --granularity row")
    return args


def check_flags(args, state_dir: Path | None = None) -> None:
    """The gate and selection flags, checked before the model loads (one line naming the flag);
    state_dir: where the run's distilled gate is kept (with --train 0 the learned selectors need it)."""
    from attnlab.modules.base import PluginError
    from attnlab.modules.sparse import SparseConfig
    from attnlab.modules.sparse.teacher import check_options, shortest

    try:
        SparseConfig(variant="learned", block_size=args.block_size, gate_dim=args.gate_dim,
                     granularity=args.granularity, gate_quest=args.gate_quest)
    except PluginError as e:
        raise SystemExit(f"{e} (--block-size, --gate-dim)") from None
    if args.window and min(args.window) < 1:
        raise SystemExit(f"--window {min(args.window)}: a window keeps at least 1 token (tokens, before the 4 sinks)")
    check_budgets(args)
    unit = args.gate_unit or args.granularity
    if any(s.startswith("learned") for s in args.selectors):
        try:
            check_options(unit, rows=args.gate_rows, steps=args.gate_steps, lr=args.gate_lr, target=args.gate_target)
        except PluginError as e:
            raise SystemExit(f"{e} (--gate-rows, --gate-steps, --gate-lr)") from None
        if not args.train and state_dir is not None and not (state_dir / "gate.safetensors").is_file():
            raise SystemExit(f"--train 0 leaves the learned gate no sequence to distil from, and {state_dir} holds "
                             f"no distilled gate: name --train N, or drop learned from --selectors")
    if "lowrank" in args.selectors:
        try:
            SparseConfig(variant="lowrank", block_size=args.block_size, granularity=args.granularity, rank=args.rank)
        except PluginError as e:
            raise SystemExit(f"{e} (--rank)") from None
        from attnlab.backbone import RANDOM
        head_dim = RANDOM[MODEL][1]["head_dim"]
        if args.rank > head_dim:
            raise SystemExit(f"--rank {args.rank} is above the head dimension {head_dim} of {MODEL}: use --rank "
                             f"{head_dim} or less")
        saved = state_dir is not None and (state_dir / "lowrank.safetensors").is_file()
        if not saved and not args.train:
            raise SystemExit(f"--train 0 leaves the lowrank indexer no sequence to fit from, and {state_dir} holds no "
                             f"fitted indexer: name --train N, or drop lowrank from --selectors")
        if not saved and args.calibrate > args.train:
            raise SystemExit(f"--calibrate {args.calibrate} fits the lowrank indexer from the first --calibrate of the "
                             f"--train {args.train} sequences: use --calibrate {args.train} or fewer (or --train more)")
    need, what = shortest(unit, args.block_size)
    if any(s.startswith("learned") for s in args.selectors) and args.train and args.length < need:
        raise SystemExit(f"--length {args.length} is too short for a gate per query {unit}: the teacher needs {what} "
                         f"({need} tokens at --block-size {args.block_size}); raise --length or lower --block-size")


COUNTS = (("length", 1), ("train", 0), ("heldout", 1), ("validation", 1), ("metric_sequences", 0),
          ("recover_steps", 0), ("rank", 1), ("calibrate", 1))        # (flag, its least value)


def check_budgets(args) -> None:
    """The sequence counts and budgets, checked before the model loads (one line naming the flag): no
    negative count (--train -1 would distil from every sequence but the last, held-out ones included),
    no budget named twice or given to no selector that reads it, and none that keeps every causal pair
    (dense, not sparse): a window of W tokens plus 4 sinks keeps them all once W >= --length - 4, and
    top-k once k reaches the candidates of the last query block (blocks 1..i-2 of i = ceil(T / bs) - 1)."""
    for name, low in COUNTS:
        value = getattr(args, name, low)
        if value is not None and value < low:
            raise SystemExit(f"--{name.replace('_', '-')} {value}: expected an integer >= {low}")
    selectors = args.selectors or []
    top_k_selectors = [s for s in selectors if "top_k" in HEADLINE.get(s, {})]
    candidates = max(-(-args.length // args.block_size) - 3, 0)
    for flag, values, readers in (("--window", args.window, "window" in selectors),
                                  ("--top-k", getattr(args, "top_k", None), top_k_selectors)):
        if not values:
            continue
        if len(set(values)) < len(values):
            raise SystemExit(f"{flag} {' '.join(map(str, values))}: a budget is named twice (each is read once)")
        if not readers:
            raise SystemExit(f"{flag} sets the budgets of {'the window' if flag == '--window' else 'quest, learned and oracle'}"
                             f", and --selectors names none of them: add one, or drop {flag}")
    if args.window and max(args.window) >= args.length - 4:
        raise SystemExit(f"--window {max(args.window)} keeps every causal pair of a --length {args.length} sequence "
                         f"(with the 4 sinks: dense): use a window below {args.length - 4}")
    for flag, k in [("--top-k", k) for k in getattr(args, "top_k", None) or []] + [
            ("--headline-top-k", getattr(args, "headline_top_k", None))]:
        if k is not None and k < 0:
            raise SystemExit(f"{flag} {k}: a top-k budget is a number of extra blocks, >= 0")
        if k is not None and top_k_selectors and k >= max(candidates, 1):
            raise SystemExit(f"{flag} {k} keeps every causal pair at --length {args.length} (the last query block has "
                             f"{candidates} candidate blocks of {args.block_size}: dense): use a top-k below {max(candidates, 1)}")
    metric_sequences = getattr(args, "metric_sequences", 0)
    split = "validation" if getattr(args, "split", "heldout") == "validation" else "heldout"
    if metric_sequences and metric_sequences > getattr(args, split):
        raise SystemExit(f"--metric-sequences {metric_sequences} reads more sequences than the --{split} "
                         f"{getattr(args, split)} the run reads: use --metric-sequences {getattr(args, split)} or fewer")
    if getattr(args, "headline_top_k", None) is not None and not (metric_sequences and top_k_selectors):
        raise SystemExit("--headline-top-k sets the top-k budget the metrics read: name --metric-sequences N and a "
                         "top-k selector (quest, learned, oracle), or drop it")
    if getattr(args, "recover_steps", 0) and not args.train:
        raise SystemExit("--recover-steps trains each adapter on the --train sequences: name --train N (or drop "
                         "--recover-steps)")
    if getattr(args, "metrics_only", False) and not metric_sequences:
        raise SystemExit("--metrics-only reads only the metrics (attention MSE, gradient cosine): name "
                         "--metric-sequences N, or drop --metrics-only")
