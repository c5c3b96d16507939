"""report.md (mean ± std over seeds, change against the frozen base and LoRA), PNG plots.

Every number comes from results.json, written by the same run.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

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


def summarize(cells: list[dict]) -> dict:
    """method -> {metric: (mean, std, n)} plus cost columns."""
    by = {}
    for c in cells:
        by.setdefault(c["method"], []).append(c)
    out = {}
    for name, cs in by.items():
        row = {"type": cs[0]["type"], "seeds": [c["seed"] for c in cs],
               "trainable_params": cs[0]["trainable_params"]}
        for key, *_ in METRICS + [("n_parsed", None, None, None), ("n_cut_off", None, None, None),
                                  ("n_generated", None, None, None)]:
            row[key] = mean_std([c["eval"].get(key) for c in cs])
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
        if name == baseline:
            continue
        pairs = [(c["seed"], c["eval"].get(key), base.get(c["seed"])) for c in cells if c["method"] == name]
        pairs = [(s, a, b) for s, a, b in pairs if a is not None and b]
        if not pairs:
            continue
        ch = [100 * (a - b) / b for _, a, b in pairs]
        lower = dict((m[0], m[2]) for m in METRICS).get(key, True)
        out[name] = {"seeds": [s for s, *_ in pairs], "changes": ch, "mean_std": mean_std(ch),
                     "wins": sum((c < 0) == lower and c != 0 for c in ch)}
    return out


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
        m, sd = p["mean_std"]
        lines.append(f"| {name} | {_fmt(r['perplexity'], '{:.3f}')} | {_fmt(b['perplexity'], '{:.3f}')} | "
                     f"{m:+.2f}% ± {sd:.2f}% | {p['wins']}/{len(p['changes'])} | {r['trainable_params']:,} | "
                     f"{b['trainable_params']:,} |")
    return lines


def markdown(results: dict) -> str:
    summ = summarize(results["cells"])
    present = [m for m in METRICS if any(r[m[0]][0] is not None for r in summ.values())]
    cfg, data, env = results["config"], results["data"], results["environment"]
    lines = [f"# {results['name']}", "",
             f"Model `{cfg['model']}` ({results['model']['n_params'] / 1e6:.1f}M parameters, frozen); data "
             f"`{data['dataset_name']}` ({data['n_train']} train / {data['n_eval']} held-out eval examples, "
             f"{data['eval_target_tokens']} eval target tokens); seeds {cfg['seeds']}. "
             f"Mean ± std over seeds (std shown when more than one seed ran; the frozen base is "
             f"deterministic and evaluated once)."
             + (f" Generation metrics use greedy decoding on the first {cfg['eval']['n_generate']} eval examples."
                if any(c["eval"].get("n_generated") for c in results["cells"]) else ""), "",
             "| method | trainable | " + " | ".join(m[1] for m in present) + " | train s | train tok/s |",
             "|---|---:|" + "---:|" * len(present) + "---:|---:|"]
    for name, r in summ.items():
        cells = [_fmt(r[k], f) for k, _, _, f in present]
        lines.append(f"| {name} | {r['trainable_params']:,} | " + " | ".join(cells)
                     + f" | {_fmt(r['train_seconds'], '{:.0f}')} | {_fmt(r['tokens_per_s'], '{:.0f}')} |")
    refs = [(n, summ[n]) for n in summ if summ[n]["type"] in ("frozen", "lora")]
    for ref_name, ref in refs:
        keys = [m for m in present if m[0] in ("cross_entropy", "perplexity", "next_token_accuracy", "accuracy",
                                                "f1", "rmse")]
        lines += ["", f"Change against **{ref_name}** (of the means; losses and errors in % of {ref_name}, "
                  f"rates in percentage points):", "",
                  "| method | " + " | ".join(m[1] for m in keys) + " |", "|---|" + "---:|" * len(keys)]
        for name, r in summ.items():
            if name != ref_name:
                lines.append(f"| {name} | " + " | ".join(_change(k, r[k][0], ref[k][0]) for k, *_ in keys) + " |")
    if cfg.get("paired_baseline") in summ:
        lines += _paired_lines(results["cells"], cfg["paired_baseline"], summ)
    gen = [(n, r) for n, r in summ.items() if r["n_generated"][0]]
    if gen:
        lines += ["", "Generations: " + "; ".join(
            f"{n}: {r['n_parsed'][0]:.0f}/{r['n_generated'][0]:.0f} answers parsed as numbers, "
            f"{r['n_cut_off'][0]:.0f} cut off at max_new_tokens" for n, r in gen) + " (means over seeds)."]
    sampled = [c for c in results["cells"] if c["eval"].get("sampling")]
    if sampled:
        lines += ["", "Answer accuracy by decoding (greedy, and sampling at temperature T with top-k; "
                  "mean ± std over seeds):", "", "| method | decoding | answer acc |", "|---|---|---:|"]
        for name, r in summ.items():
            if r["accuracy"][0] is not None:
                lines.append(f"| {name} | greedy | {_fmt(r['accuracy'], '{:.3f}')} |")
            groups = {}
            for c in results["cells"]:
                if c["method"] == name:
                    for x in c["eval"].get("sampling", []):
                        groups.setdefault((x["temperature"], x["top_k"]), []).append(x["accuracy"])
            for (t, k), accs in groups.items():
                lines.append(f"| {name} | T={t:g}, top-k={k or 'off'} | {_fmt(mean_std(accs), '{:.3f}')} |")
    if data.get("fallback_from"):
        fb = data["fallback_from"]
        lines += ["", f"Data: `{fb['dataset_name']}`{' at ' + str(fb['path']) if fb.get('path') else ''} could not "
                  f"be read ({fb['reason']}); this run used the fallback `{data['dataset_name']}`."]
    lines += ["", "Lower is better for CE, PPL, KL and the errors; higher for accuracies, P/R/F1.", "",
              f"Data: records {data['records']['kept']}/{data['records']['seen']} kept "
              f"({data['records']['skipped']} skipped: {data['records']['reasons'] or 'none'}); "
              f"{data['tokenization']['truncated']} targets truncated to max_length, "
              f"{data['tokenization']['skipped']} examples dropped at tokenization "
              f"({data['tokenization']['reasons'] or 'none'}).", "",
              f"Environment: attnlab {env['attnlab']}, torch {env['torch']}, {env['device']} "
              f"({env['threads']} threads), Python {env['python']}. Whole run: {results['wall_time_s']:.0f}s.", "",
              "![loss curves](loss_curves.png)", "", "![metrics](metrics.png)", ""]
    samples = next((c["samples"] for c in results["cells"] if c.get("samples")), [])
    if samples:
        lines += ["## Sample generations (the same eval prompts for every method, greedy, first seed)", ""]
        firsts = {}
        for c in results["cells"]:
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
            ax.plot(steps, losses, label=f"{c['method']} s{c['seed']}", alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (CE over target tokens)")
    ax.set_title(results["name"])
    if ax.has_data():
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    summ = summarize(results["cells"])
    keys = [k for k in ("perplexity", "next_token_accuracy", "accuracy", "f1")
            if any(r[k][0] is not None for r in summ.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        names = list(summ)
        means = [summ[n][key][0] or 0 for n in names]
        stds = [summ[n][key][1] or 0 for n in names]
        ax.bar(names, means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(dict((m[0], m[1]) for m in METRICS)[key])
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
                m, sd = p["mean_std"]
                fb = res["data"].get("fallback_from")
                data_name = f"`{res['data']['dataset_name']}`" + (f" (fallback for `{fb['dataset_name']}`)" if fb else "")
                lines.append(f"| {label} | {data_name} | {name} | "
                             f"{_fmt(summ[name]['perplexity'], '{:.3f}')} | "
                             f"{_fmt(summ[baseline]['perplexity'], '{:.3f}')} | {m:+.2f}% ± {sd:.2f}% | "
                             f"{p['wins']}/{len(p['changes'])} | {summ[name]['trainable_params']:,} | "
                             f"{summ[baseline]['trainable_params']:,} |")
        lines.append("")
    lines += ["| dataset | method | PPL | CE | next-tok acc | train tok/s |", "|---|---|---:|---:|---:|---:|"]
    for label, res in per.items():
        for name, r in summarize(res["cells"]).items():
            lines.append(f"| {label} | {name} | {_fmt(r['perplexity'], '{:.3f}')} | "
                         f"{_fmt(r['cross_entropy'], '{:.4f}')} | {_fmt(r['next_token_accuracy'], '{:.4f}')} | "
                         f"{_fmt(r['tokens_per_s'], '{:.0f}')} |")
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
