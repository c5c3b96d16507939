"""report.md: in-distribution and transfer results side by side, every difference with a 95%
confidence interval, the validation sweep, and PNG plots.

Intervals: a paired bootstrap over eval examples (every method is scored on the same examples),
with the statistic averaged over seeds when there are several (examples resampled jointly across
seeds); with two or more seeds, a t-interval over the per-seed changes is shown as well, and a
difference is called "within noise" when either interval covers zero. Every number comes from
results.json, written by the same run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import sparse_distill
from .report_intervals import _fmt_change, _set_names, acc_change, decoding_lines, ppl_change

# (key, label, lower is better?, format)
METRICS = [
    ("cross_entropy", "CE", True, "{:.4f}"),
    ("perplexity", "PPL", True, "{:.3f}"),
    ("next_token_accuracy", "next-tok acc", False, "{:.4f}"),
    ("kl_base_model", "KL(base‖m)", True, "{:.4f}"),
    ("top1_agreement", "top-1 = base", False, "{:.4f}"),
    ("sparsity", "sparsity", False, "{:.3f}"),
    ("attention_mse", "attn MSE", True, "{:.2e}"),
    ("grad_cosine", "grad cos", False, "{:.4f}"),
    ("accuracy", "answer acc", False, "{:.3f}"),
    ("f1", "F1", False, "{:.3f}"),
    ("precision", "P", False, "{:.3f}"),
    ("recall", "R", False, "{:.3f}"),
    ("rmse", "RMSE", True, "{:.3g}"),
    ("mse", "MSE", True, "{:.3g}"),
    ("median_abs_error", "MedAE", True, "{:.3g}"),
]


def mean_std(xs: list) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _metrics(c: dict, set_name: str = "test") -> dict:
    return c["eval"] if set_name == "test" else c.get("eval_sets", {}).get(set_name, {})


def summarize(cells: list[dict], set_name: str = "test") -> dict:
    """method -> {metric: (mean, std)} on one eval set, plus cost columns."""
    by = {}
    for c in cells:
        by.setdefault(c["method"], []).append(c)
    out = {}
    for name, cs in by.items():
        row = {"type": cs[0]["type"], "seeds": [c["seed"] for c in cs],
               "trainable_params": cs[0]["trainable_params"]}
        for key, *_ in METRICS + [("n_parsed", None, None, None), ("n_cut_off", None, None, None),
                                  ("n_generated", None, None, None)]:
            row[key] = mean_std([_metrics(c, set_name).get(key) for c in cs])
        row["train_seconds"] = mean_std([c["train"]["seconds"] for c in cs])
        row["tokens_per_s"] = mean_std([c["train"]["tokens_per_s"] for c in cs])
        row["train_tokens"] = mean_std([c["train"]["tokens"] for c in cs])
        out[name] = row
    return out


def _fmt(ms, fmt):
    m, s = ms
    if m is None:
        return "–"
    return fmt.format(m) + (f" ± {fmt.format(s)}" if s else "")


RATES = {"next_token_accuracy", "accuracy", "f1", "precision", "recall", "top1_agreement", "sparsity", "grad_cosine"}


def _change(key, a, b):
    """Rates change in percentage points; losses and errors relative to the reference, in %."""
    if a is None or b is None:
        return "–"
    if key in RATES:
        return f"{100 * (a - b):+.1f} pp"
    if not b:
        return "–"
    rel = (a - b) / abs(b)
    return f"{100 * rel:+.2f}%" if abs(rel) < 10 else f"×{a / b:.3g}"  # huge changes read better as ratios


def paired_changes(cells: list[dict], baseline: str, key: str = "perplexity") -> dict:
    """method -> per-seed % change of `key` against `baseline` trained with the same seed (the same
    data order and token budget), with mean ± std over those seeds and how many seeds it won."""
    base = {c["seed"]: c["eval"].get(key) for c in cells if c["method"] == baseline}
    out = {}
    for name in dict.fromkeys(c["method"] for c in cells):
        if name == baseline or any(c.get("type") == "frozen" for c in cells if c["method"] == name):
            continue  # the frozen base is evaluated once, not trained per seed: nothing to pair
        pairs = [(c["seed"], c["eval"].get(key), base.get(c["seed"])) for c in cells if c["method"] == name]
        pairs = [(s, a, b) for s, a, b in pairs if a is not None and b]
        if not pairs:
            continue
        ch = [100 * (a - b) / b for _, a, b in pairs]
        lower = dict((m[0], m[2]) for m in METRICS).get(key, True)
        out[name] = {"seeds": [s for s, *_ in pairs], "changes": ch, "mean_std": mean_std(ch),
                     "wins": sum((c < 0) == lower and c != 0 for c in ch)}
    return out


def _pct_change(p: dict) -> str:
    """Mean paired change, with its std over seeds only where there are several (one seed has none)."""
    m, sd = p["mean_std"]
    return f"{m:+.2f}%" + (f" ± {sd:.2f}%" if len(p["changes"]) > 1 else " (one seed)")


def _paired_lines(cells, baseline, summ) -> list[str]:
    pc = paired_changes(cells, baseline)
    if not pc:
        return []
    b = summ[baseline]
    lines = ["", f"Paired by seed against **{baseline}** (each seed: the same data order and token budget; "
             f"change = (PPL − PPL_{baseline}) / PPL_{baseline}, then mean ± std over seeds):", "",
             f"| method | PPL | PPL {baseline} | change (paired) | seeds better | trainable | {baseline} trainable |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, p in pc.items():
        r = summ[name]
        lines.append(f"| {name} | {_fmt(r['perplexity'], '{:.3f}')} | {_fmt(b['perplexity'], '{:.3f}')} | "
                     f"{_pct_change(p)} | {p['wins']}/{len(p['changes'])} | {r['trainable_params']:,} | "
                     f"{b['trainable_params']:,} |")
    return lines


def _set_title(results: dict, name: str) -> str:
    if name == "test":
        return "test (in-distribution)"
    r = results["eval_sets"][name]
    opts = r.get("options", {}) if r.get("dataset_name") == "arithmetic" else {}
    extra = ", ".join(f"{k} {v}" for k, v in opts.items() if k in ("families", "level") and v is not None)
    fb = f", fallback for `{r['fallback_from']['dataset_name']}`" if r.get("fallback_from") else ""
    return f"{name} (`{r['dataset_name']}`{', ' + extra if extra else ''}{fb})"


def _change_table(summ: dict, sets: list, ref: str, label: str, value, change) -> list[str]:
    """One row per method: for each set, its value and its change against `ref`."""
    lines = ["| method | " + " | ".join(f"{s} {label} | Δ vs {ref} [95% CI]" for s in sets) + " |",
             "|---|" + "---:|---:|" * len(sets)]
    for name in summ["test"]:
        row = [name]
        for s in sets:
            r = summ[s].get(name)
            row += [value(r) if r else "–", "–" if name == ref else change(name, s)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def transfer_lines(results: dict, ref: str = "frozen") -> list[str]:
    """The compact table up front: every method on every set, changes against `ref` with CIs."""
    cells = results["cells"]
    summ = {s: summarize(cells, s) for s in _set_names(results)}
    n_boot = results["config"].get("eval", {}).get("bootstrap", 2000)
    sets = [s for s in _set_names(results) if summ[s]]
    multi = len(results["config"]["seeds"]) > 1
    lines = ["## In-distribution vs transfer", "",
             f"Perplexity on each held-out set and its change against **{ref}**, with a 95% confidence interval "
             f"(paired bootstrap over the set's examples"
             f"{', averaged over seeds; the seeds interval is a t-interval over per-seed changes' if multi else ''}). "
             f"*within noise*: the interval covers 0.", ""]
    lines += _change_table(summ, sets, ref, "PPL", lambda r: _fmt(r["perplexity"], "{:.3f}"),
                           lambda name, s: _fmt_change(ppl_change(cells, name, ref, s, n_boot), pct=True))
    acc_sets = [s for s in sets if any(r["accuracy"][0] is not None for r in summ[s].values())]
    if acc_sets:
        lines += ["", f"Answer accuracy (greedy; an answer counts only from a finished generation or an explicit "
                  f"final-answer marker) and its change against **{ref}** in percentage points:", ""]
        lines += _change_table(summ, acc_sets, ref, "acc", lambda r: _fmt(r["accuracy"], "{:.3f}") + (
            f" (n={r['n_generated'][0]:.0f})" if r["n_generated"][0] else ""),
            lambda name, s: _fmt_change(acc_change(cells, name, ref, s, n_boot), pct=False))
    return lines


def sweep_lines(results: dict) -> list[str]:
    rows = [(c["method"], c["seed"], x, c["train"].get("chosen")) for c in results["cells"] for x in c.get("sweep", [])]
    swept = [r for r in rows if r[3]]
    early = [c for c in results["cells"] if c["train"].get("best_step") is not None]
    lines = []
    if any(r[3] for r in rows):
        keys = [k for k in ("lr", "steps", "weight_decay") if any(k in r[2] for r in swept)]
        sizes = {}
        for name, seed, x, _ in swept:  # the seeds that swept (later seeds may reuse one value)
            sizes.setdefault(name, set()).add(json.dumps({k: x.get(k) for k in keys}))
        keys = [k for k in keys if any(r[3] and k in r[3] for r in swept)]
        lines += ["", "## Validation chooses", "",
                  "Each value was trained; the lowest validation loss (CE on the validation split, disjoint from "
                  "test) was kept. Test was read once, for the chosen value only.", "",
                  "| method | seed | " + " | ".join(keys) + " | steps trained | val loss | chosen |",
                  "|---|---:|" + "---:|" * len(keys) + "---:|---:|:---:|"]
        edge = set()
        for name, seed, x, chosen in rows:
            if chosen is None:
                continue
            pick = all(x.get(k) == chosen.get(k) for k in chosen)
            for k in chosen:
                values = sorted(r[2][k] for r in rows if r[0] == name and r[1] == seed and not r[2].get("diverged"))
                if pick and len(values) > 1 and x[k] in (values[0], values[-1]):
                    edge.add(f"{name} ({k} = {x[k]:g})" if isinstance(x[k], float) else f"{name} ({k} = {x[k]})")
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{x.get(k):g}" if isinstance(x.get(k), float) else str(x.get(k))
                                                            for k in keys)
                         + f" | {x.get('steps', '–')} | "
                         + ("diverged" if x.get("diverged") else f"{x['val_loss']:.4f}") + f" | {'✓' if pick else ''} |")
        reused = sorted({(c["method"], c["train"]["chosen_on_seed"]) for c in results["cells"]
                         if c["train"].get("chosen_on_seed") is not None})
        if reused:
            lines += ["", "Later seeds were not swept (`sweep_seeds: first`): they train the value validation chose "
                      "on the first seed (" + ", ".join(f"{n}: seed {s}" for n, s in reused) + ")."]
        if edge:
            lines += ["", "At the edge of its sweep: " + ", ".join(sorted(edge)) + ". The best value may lie "
                      "beyond the range tried; widen the sweep before reading much into this method's numbers."]
        n = {name: len(v) for name, v in sizes.items() if name != "frozen"}
        if len(set(n.values())) > 1:
            lines += ["", f"**Unequal tuning**: the methods' sweeps differ in size ({n}); a comparison between them "
                      f"favours the one tuned more."]
    if early:
        lines += ["", "Early stopping on validation: " + "; ".join(
            f"{c['method']} seed {c['seed']}: best at step {c['train']['best_step']}"
            + (" (stopped early)" if c["train"].get("stopped_early") else "") for c in early) + "."]
    return lines


STILL_FALLING = 0.005  # a relative fall of validation loss over the last interval that says "not flat yet"


def curve_lines(results: dict) -> list[str]:
    """The validation loss of every trained cell at each evaluation step, and whether it was still
    falling at the end: a last interval that lowered it by >= 0.5% says a longer budget may help
    that arm, so a comparison at this budget is not yet one between converged arms. (With cosine
    decay the learning rate is near zero at the end, so a flat end alone does not prove convergence:
    only a longer run does.)"""
    cells = [c for c in results["cells"] if len(c.get("val_curve") or []) >= 2]
    if not cells:
        return []
    steps = sorted({s for c in cells for s, _ in c["val_curve"]})
    lines = ["", "## Validation curves", "",
             "Validation loss (CE on the validation split) at each evaluation step of the trainings whose "
             f"weights were kept; *last Δ* is the relative change over the last interval. Criterion: *still "
             f"falling* when last Δ ≤ −{100 * STILL_FALLING:.1f}%, *falling slowly* when it is between that and 0 "
             f"(the last step is still the best), *rising* when ≥ +{100 * STILL_FALLING:.1f}%, *flat* otherwise "
             f"(no gain over the last interval; under cosine decay even that does not prove convergence).", "",
             "| method | seed | " + " | ".join(f"step {s}" for s in steps) + " | last Δ | |",
             "|---|---:|" + "---:|" * len(steps) + "---:|---|"]
    falling = []
    for c in cells:
        at = dict(c["val_curve"])
        (_, a), (_, b) = c["val_curve"][-2:]
        change = b / a - 1 if a > 0 else 0.0
        still = change <= -STILL_FALLING
        if still:
            falling.append(f"{c['method']} seed {c['seed']}")
        shape = ("still falling" if still else "rising" if change >= STILL_FALLING
                 else "falling slowly" if change < 0 else "flat")
        lines.append(f"| {c['method']} | {c['seed']} | " + " | ".join(f"{at[s]:.4f}" if s in at else "–" for s in steps)
                     + f" | {100 * change:+.2f}% | {shape} |")
    if falling:
        lines += ["", f"**Still falling at the end** (≥ {100 * STILL_FALLING:.1f}% over the last interval): "
                  + ", ".join(falling) + ". These arms had not converged at this budget; a longer run may change "
                  "the comparison."]
    return lines


def _metric_table(summ: dict, present: list) -> list[str]:
    lines = ["| method | trainable | " + " | ".join(m[1] for m in present) + " | train s | train tok/s |",
             "|---|---:|" + "---:|" * len(present) + "---:|---:|"]
    for name, r in summ.items():
        cells = [_fmt(r[k], f) for k, _, _, f in present]
        lines.append(f"| {name} | {r['trainable_params']:,} | " + " | ".join(cells)
                     + f" | {_fmt(r['train_seconds'], '{:.0f}')} | {_fmt(r['tokens_per_s'], '{:.0f}')} |")
    return lines


def markdown(results: dict) -> str:
    cfg, data, env = results["config"], results["data"], results["environment"]
    cells = results["cells"]
    n_boot = cfg.get("eval", {}).get("bootstrap", 2000)
    sets = _set_names(results)
    sp = data.get("split", {})
    lines = [f"# {results['name']}", "",
             f"Model `{cfg['model']}` ({results['model']['n_params'] / 1e6:.1f}M parameters, frozen). Trained on "
             f"`{data['dataset_name']}`"
             + (f" (families {data['options']['families']})" if data.get("options", {}).get("families") and
                data["dataset_name"] == "arithmetic" else "")
             + f": {data['n_train']} train / {data.get('n_val', 0)} validation / {data['n_eval']} test "
             + ("blocks, packed after splitting the documents by a hash of each document's text"
                if data.get("kind") == "lm" else "examples, disjoint by a hash of the normalised problem text")
             + f" ({sp.get('duplicates_removed', 0)} exact duplicates "
             f"removed). Seeds {cfg['seeds']}; mean ± std over seeds where several ran (the frozen base is "
             f"deterministic and evaluated once)."]
    if results.get("eval_sets"):
        lines[-1] += " Transfer sets, each never trained on: " + "; ".join(
            f"{_set_title(results, s)}: {results['eval_sets'][s]['n_eval']} examples" for s in results["eval_sets"]) + "."
    subset = {n: sorted(r["seeds"]) for n, r in summarize(cells).items()
              if r["type"] != "frozen" and sorted(r["seeds"]) != sorted(cfg["seeds"])}
    if subset:
        lines[-1] += (" Arms run on a subset of the seeds (with one seed, an interval is over examples only): "
                      + "; ".join(f"{n} (seeds {ss})" for n, ss in subset.items()) + ".")
    for name, why in (results.get("eval_sets_skipped") or {}).items():
        lines += ["", f"**Eval set `{name}` skipped**: {why}"]
    for note in data.get("notes", []) + [n for r in (results.get("eval_sets") or {}).values() for n in r.get("notes", [])]:
        lines += ["", f"**Note**: {note}"]
    lines.append("")
    ref = next((n for n in dict.fromkeys(c["method"] for c in cells) if
                next(c for c in cells if c["method"] == n)["type"] == "frozen"), None)
    if ref:
        lines += transfer_lines(results, ref)
    lines += sweep_lines(results)
    lines += curve_lines(results)
    lines += decoding_lines(results)
    lines += sparse_distill.report_lines(results)
    for s in sets:
        summ = summarize(cells, s)
        present = [m for m in METRICS if any(r[m[0]][0] is not None for r in summ.values())]
        if not summ or not present:
            continue
        lines += ["", f"## {_set_title(results, s)}", ""] + _metric_table(summ, present)
        refs = cfg.get("compare_against")
        refs = [n for n in summ if summ[n]["type"] == "lora"][:1] if refs is None else [n for n in refs if n in summ]
        for ref_name in refs:
            lines += ["", f"Change against **{ref_name}** (paired by seed, 95% CI over examples"
                      f"{' and seeds' if len(cfg['seeds']) > 1 else ''}):", "",
                      f"| method | PPL vs {ref_name} | answer acc vs {ref_name} |", "|---|---:|---:|"]
            for name in summ:
                if name not in (ref_name, ref):
                    lines.append(f"| {name} | {_fmt_change(ppl_change(cells, name, ref_name, s, n_boot), True)} | "
                                 f"{_fmt_change(acc_change(cells, name, ref_name, s, n_boot), False)} |")
        gen = [(n, r) for n, r in summ.items() if r["n_generated"][0]]
        if gen:
            lines += ["", "Generations: " + "; ".join(
                f"{n}: {r['n_parsed'][0]:.0f}/{r['n_generated'][0]:.0f} answers parsed, "
                f"{r['n_cut_off'][0]:.0f} cut off at max_new_tokens" for n, r in gen) + " (means over seeds)."]
    if cfg.get("paired_baseline") in summarize(cells):
        lines += _paired_lines(cells, cfg["paired_baseline"], summarize(cells))
    sampled = [c for c in cells if c["eval"].get("sampling")]
    if sampled:
        summ = summarize(cells)
        lines += ["", "Answer accuracy on test by decoding (greedy, and sampling at temperature T with top-k; "
                  "mean ± std over seeds):", "", "| method | decoding | answer acc |", "|---|---|---:|"]
        for name, r in summ.items():
            if r["accuracy"][0] is not None:
                lines.append(f"| {name} | greedy | {_fmt(r['accuracy'], '{:.3f}')} |")
            groups = {}
            for c in cells:
                if c["method"] == name:
                    for x in c["eval"].get("sampling", []):
                        groups.setdefault((x["temperature"], x["top_k"]), []).append(x["accuracy"])
            for (t, k), accs in groups.items():
                lines.append(f"| {name} | T={t:g}, top-k={k or 'off'} | {_fmt(mean_std(accs), '{:.3f}')} |")
    if data.get("fallback_from"):
        fb = data["fallback_from"]
        lines += ["", f"Data: `{fb['dataset_name']}`{' at ' + str(fb['path']) if fb.get('path') else ''} could not "
                  f"be read ({fb['reason']}); this run used the fallback `{data['dataset_name']}`."]
    lines += ["", "Lower is better for CE, PPL, KL and the errors; higher for accuracies. Answer precision = right "
              "answers / answers given; recall = right answers / problems (= accuracy).", "",
              f"Data: records {data['records']['kept']}/{data['records']['seen']} used "
              f"({data['records']['skipped']} skipped: {data['records']['reasons'] or 'none'}); "
              f"{data['tokenization']['truncated']} targets truncated to max_length, "
              f"{data['tokenization']['skipped']} examples dropped at tokenization "
              f"({data['tokenization']['reasons'] or 'none'}).", "",
              f"Environment: attnlab {env['attnlab']}, torch {env['torch']}, {env['device']} "
              f"({env['threads']} threads), Python {env['python']}. Whole run: {results['wall_time_s']:.0f}s.", "",
              "![loss curves](loss_curves.png)", "", "![metrics](metrics.png)", ""]
    samples = next((c["samples"] for c in cells if c.get("samples")), [])
    if samples:
        lines += ["## Sample generations (the same test prompts for every method, greedy, first seed)", ""]
        firsts = {}
        for c in cells:
            firsts.setdefault(c["method"], c)
        for i, s0 in enumerate(samples[:2]):
            prompt = s0["prompt"].strip().replace("\n", " ⏎ ")
            prompt = "…" + prompt[-200:] if len(prompt) > 200 else prompt
            gold = f" (gold {s0['gold']})" if s0.get("gold") is not None else ""
            lines.append(f"**Prompt {i + 1}**{gold}: {prompt}")
            lines.append("")
            for name, c in firsts.items():
                if len(c.get("samples", [])) > i:
                    out = c["samples"][i]["output"].strip().replace("\n", " ⏎ ")[:300]
                    lines.append(f"- **{name}**: {out}")
            lines.append("")
    return "\n".join(lines)


def plots(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for c in results["cells"]:
        if c["loss_curve"]:
            steps, losses = zip(*c["loss_curve"])
            line, = ax.plot(steps, losses, label=f"{c['method']} s{c['seed']}", alpha=0.8)
            if c.get("val_curve"):
                vs, vl = zip(*c["val_curve"])
                ax.plot(vs, vl, "o--", color=line.get_color(), alpha=0.8, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (line), validation loss (dots)")
    ax.set_title(results["name"])
    if ax.has_data():
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    sets = _set_names(results)
    summs = {st: summarize(results["cells"], st) for st in sets}
    keys = [k for k in ("perplexity", "next_token_accuracy", "accuracy")
            if any(r[k][0] is not None for sm in summs.values() for r in sm.values())]
    fig, axes = plt.subplots(len(sets), len(keys), figsize=(3.2 * len(keys), 3.0 * len(sets)), squeeze=False)
    for row, st in zip(axes, sets):
        summ = summs[st]
        for ax, key in zip(row, keys):
            names = list(summ)
            means = [summ[n][key][0] or 0 for n in names]
            stds = [summ[n][key][1] or 0 for n in names]
            ax.bar(names, means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(names))])
            ax.set_title(f"{st}: {dict((m[0], m[1]) for m in METRICS)[key]}", fontsize=9)
            ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)


def multi_markdown(results: dict) -> str:
    """The datasets of one run side by side; each dataset's full report is in its own folder."""
    cfg = results["config"]
    per = results["datasets"]
    baseline = cfg.get("paired_baseline")
    lines = [f"# {results['name']}", "",
             f"Model `{cfg['model']}` (frozen), seeds {cfg['seeds']}, datasets {', '.join(per)}. "
             f"Mean ± std over seeds; the full report of each dataset is in its folder.", ""]
    if baseline:
        lines += [f"Perplexity on the held-out split; change against **{baseline}** paired by seed "
                  f"(the same data order and token budget within each seed):", "",
                  f"| dataset | data | method | PPL | PPL {baseline} | change (paired) | seeds better | "
                  f"trainable | {baseline} trainable |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for label, res in per.items():
            summ = summarize(res["cells"])
            for name, p in paired_changes(res["cells"], baseline).items():
                fb = res["data"].get("fallback_from")
                data_name = f"`{res['data']['dataset_name']}`" + (f" (fallback for `{fb['dataset_name']}`)" if fb else "")
                lines.append(f"| {label} | {data_name} | {name} | "
                             f"{_fmt(summ[name]['perplexity'], '{:.3f}')} | "
                             f"{_fmt(summ[baseline]['perplexity'], '{:.3f}')} | {_pct_change(p)} | "
                             f"{p['wins']}/{len(p['changes'])} | {summ[name]['trainable_params']:,} | "
                             f"{summ[baseline]['trainable_params']:,} |")
        lines.append("")
    extra = list(dict.fromkeys(s for res in per.values() for s in res.get("eval_sets", {})))
    lines += ["Test perplexity (in-distribution) and perplexity on each eval set (never trained on); the change "
              "against frozen with its 95% interval is in each dataset's report.", "",
              "| dataset | method | PPL | CE | next-tok acc | " + " | ".join(f"{s} PPL" for s in extra)
              + (" | " if extra else "") + "train tok/s |", "|---|---|---:|---:|---:|" + "---:|" * len(extra) + "---:|"]
    for label, res in per.items():
        others = {s: summarize(res["cells"], s) for s in extra}
        for name, r in summarize(res["cells"]).items():
            lines.append(f"| {label} | {name} | {_fmt(r['perplexity'], '{:.3f}')} | "
                         f"{_fmt(r['cross_entropy'], '{:.4f}')} | {_fmt(r['next_token_accuracy'], '{:.4f}')} | "
                         + "".join(f"{_fmt(others[s].get(name, {}).get('perplexity', (None, None)), '{:.3f}')} | "
                                   for s in extra)
                         + f"{_fmt(r['tokens_per_s'], '{:.0f}')} |")
    lines += ["", "Reports: " + ", ".join(f"[{label}]({label}/report.md)" for label in per),
              "", f"Whole run: {results['wall_time_s']:.0f}s.", ""]
    return "\n".join(lines)


def write_multi_report(out: Path, results: dict) -> Path:
    out = Path(out)
    tmp = out / ".report.md.tmp"
    tmp.write_text(multi_markdown(results))
    tmp.replace(out / "report.md")
    return out / "report.md"


def write_report(out: Path, results: dict) -> Path:
    out = Path(out)
    plots(results, out)
    text = markdown(results)
    tmp = out / ".report.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "report.md")
    return out / "report.md"
