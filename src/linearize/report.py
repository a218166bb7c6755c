"""report.json (everything), report.md and a self-contained report.html (the tables and plots a person
reads: loss curves, per-layer error, ratio by position, sample generations), and runs compared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from linearize.checkpoint import atomic_write_text

ROW_NAMES = {
    "teacher": "teacher (softmax attention)",
    "untrained": "untrained swap",
    "transfer": "after stage 1 (attention transfer)",
    "finetune": "after stage 2 (LoRA)",
}


def _cell(entry: dict[str, Any]) -> list[str]:
    ratio = f"{entry['ppl_ratio']:.3f}" if "ppl_ratio" in entry else "1"
    agreement = f"{entry['agreement']:.3f}" if "agreement" in entry else "1"
    return [f"{entry['perplexity']:.3f}", ratio, agreement]


def recovery_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, dict]]]:
    method = report["method"]
    rows = [(f"{ROW_NAMES[key]}" + ("" if key == "teacher" else f", {method}"), value)
            for key, value in report["eval"].items()]
    for name, baseline in report.get("baselines", {}).items():
        for key, value in baseline["eval"].items():
            when = "untrained" if key == "untrained" else "after the same stage 2"
            rows.append((f"{name} (baseline), {when}", value))
    return rows


def softmax_keys_line(report: dict[str, Any]) -> str:
    """The most softmax keys a query of a converted layer sees, the student's beside each baseline's: what
    a comparison at equal cost holds equal."""
    baselines = [f"{name} {b['softmax_keys']}" for name, b in report.get("baselines", {}).items()
                 if "softmax_keys" in b]
    keys = report["model"].get("softmax_keys")
    if keys is None:
        return ""
    return f"Softmax keys per query in a converted layer, at most: {keys}" + (
        f" (baselines: {', '.join(baselines)})." if baselines else ".")


def time_by_step(report: dict[str, Any]) -> str:
    """" (stage 1 (teacher pass and training) 431 s, ...)": the steps that took 1% of the run or more, largest
    first."""
    total = report.get("seconds_total") or 0
    steps = sorted(((seconds, STEP_NAMES.get(name, name)) for name, seconds in report.get("seconds_by_step", {}).items()
                    if seconds >= total / 100), reverse=True)
    return f" ({', '.join(f'{name} {seconds:.{0 if seconds >= 10 else 1}f} s' for seconds, name in steps)})" \
        if steps else ""


STEP_NAMES = {
    "transfer": "stage 1 (teacher pass and training)",
    "load_teacher": "loading the teacher",
    "evaluate_teacher": "the teacher's evaluations and stage 2 targets",
    "convert": "converting and evaluating the untrained and stage-1 students",
    "finetune": "stage 2 and its evaluation",
    "evaluate_student": "the student's long-range, retrieval and ablation evaluations",
    "baselines": "baselines (stage 2 and evaluations)",
    "read_data": "reading the corpus",
}


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    attention = ", ".join(f"{k} {v}" for k, v in config["attention"].items() if k != "softmax_layers")
    lines = [
        f"# linearize report: {report['method']} on {report['teacher']}",
        "",
        f"Machine: {report['machine']}. Total wall time: {report['seconds_total']:.0f} s{time_by_step(report)}."
        + (f" The teacher's weights are under the {report['teacher_license']}." if report.get("teacher_license")
           else ""),
        f"Converted {report['model']['converted_layers']} of {report['model']['layers']} layers ({attention}); "
        f"held-out blocks of {config['data']['eval_seq_len']} tokens "
        f"({', '.join(f'{d}: {n} tokens' for d, n in report['data']['eval_tokens'].items())}).",
        softmax_keys_line(report),
        "",
        "## Held-out recovery",
        "",
        "ratio = student perplexity / teacher perplexity; agreement = top-1 next-token agreement with the teacher.",
        "",
        recovery_table(report),
    ]
    table = long_range_table(report)
    if table:
        lines += [
            "",
            "## Long range",
            "",
            f"Perplexity ratio to the teacher by position in {report['config']['data']['long_context']}-token held-out "
            "documents (ratio@N: over the first N positions), and top-1 accuracy on the second copy of a repeated "
            "random token sequence of length L (a window alone cannot copy beyond its length); copy gain: the "
            "loss on the first copy minus the loss on the second, in nats (recall that top-1 does not show yet).",
            "",
            table,
        ]
    lines += retrieval_section(report) + ablation_section(report)
    lines += [
        "",
        "## Training",
        "",
    ]
    stages = [(name, stage) for name, stage in report["stages"].items()]
    stages += [(f"{name} (baseline) {key}", value) for name, b in report.get("baselines", {}).items()
               for key, value in b.items() if key == "finetune"]
    if stages:
        lines += ["| stage | distinct tokens | tokens processed | seconds | tokens/s | trainable parameters | "
                  "final loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    else:
        lines.append("No stage trained (transfer.enabled and finetune.enabled are false): the untrained conversion.")
    for name, stage in stages:
        lines.append(
            f"| {name} | {stage['distinct_tokens']} | {stage['tokens']} | {stage['seconds']} | "
            f"{stage['tokens_per_second']} | {stage['trainable_parameters']:,} | {stage['final_loss']:.4g} |"
        )
    per_layer = report["stages"].get("transfer", {}).get("per_layer_loss")
    if per_layer:
        worst = sorted(per_layer.items(), key=lambda item: -item[1])[:5]
        lines += ["", "Stage 1 loss per layer (final epoch, x loss_weight): "
                  + ", ".join(f"{layer}: {loss:.3g}" for layer, loss in per_layer.items())
                  + f". Worst: {', '.join(f'layer {layer}' for layer, _ in worst)}."]
    lines += ["", f"Parameters after conversion (teacher + mixers): {report['model']['parameters']:,}.", ""]
    return "\n".join(lines)


SUMMARY_ROWS = {"untrained": "untrained", "transfer": "stage 1", "finetune": "student"}


def summary(report: dict[str, Any], out: Path) -> str:
    """The last screen of a run, read in ten seconds: the held-out ratio per domain, the passkey answers and
    the decode state per sequence of the teacher, the untrained, stage-1 and trained student and each
    baseline as it ends; the wall time; where the report and the model are."""
    domains = list(report["eval"]["teacher"])
    retrieval = report.get("retrieval") or {}
    teacher, student = retrieval.get("teacher"), retrieval.get(report["method"])
    rows = [("teacher", ["1"] * len(domains), teacher, teacher)]
    steps = list(report["eval"])[1:]
    for key in steps:
        # one architecture at every step: the untrained and stage-1 student keep the trained one's state
        rows.append((SUMMARY_ROWS[key] + (f" ({report['method']})" if key == "finetune" else ""),
                     ratio_cells(report["eval"][key], domains), student if key == steps[-1] else None, student))
    for name, baseline in report.get("baselines", {}).items():
        key = "finetune" if "finetune" in baseline["eval"] else "untrained"
        records = (baseline.get("retrieval") or {}).get(key)
        rows.append((name + ("" if key == "finetune" else ", untrained"), ratio_cells(baseline["eval"][key], domains),
                     records, records))
    passkey = [r for r in teacher or [] if r["task"] == "passkey"]
    measured = any("state_bytes" in r for _, _, _, records in rows for r in records or [])
    table = [["model", *domains, *(["passkey"] if passkey else []), *(["state MiB"] if measured else [])]]
    for name, cells, answered, states in rows:
        asked = [r for r in answered or [] if r["task"] == "passkey"]
        sizes = [r["state_bytes"] for r in states or [] if "state_bytes" in r]
        table.append([name, *cells, *([f"{sum(r['correct'] for r in asked)}/{len(asked)}" if asked else "-"]
                                      if passkey else []),
                      *([f"{max(sizes) / 2**20:.1f}" if sizes else "-"] if measured else [])])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [f"{report['method']} from {report['teacher']}: {report.get('seconds_total', 0):.0f} s "
             f"({report['machine']})", ""]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
              for row in table]
    lines += ["", f"held-out perplexity / the teacher's on {report['config']['data']['eval_seq_len']}-token blocks"]
    if passkey:
        lengths = ", ".join(str(n) for n in sorted({r["length"] for r in passkey}))
        lines.append(f"passkey: right answers of {len(passkey)} prompt(s) of {lengths} tokens")
    if measured:
        longest = max(r["length"] for _, _, _, records in rows for r in records or [] if "state_bytes" in r)
        lines.append(f"state: the decode cache of one sequence after a {longest}-token prompt (the teacher's grows "
                     "with the prompt)")
    lines += ["", f"report: {out / 'report.html'}", f"model:  {out / 'model'}"]
    return "\n".join(lines)


def ratio_cells(values: dict[str, dict], domains: list[str]) -> list[str]:
    return [f"{values[d]['ppl_ratio']:.3f}" if "ppl_ratio" in values.get(d, {}) else "-" for d in domains]


def moving_mean(values, window: int) -> list[float]:
    """Mean of each value and the (up to) window - 1 before it."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]


def plot_losses(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    stages = report["stages"]
    if not stages:
        return False
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, (name, stage) in zip(axes[0], stages.items()):
        steps, losses = zip(*stage["loss_curve"])
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        window = max(1, len(losses) // 12)
        if window > 1:
            ax.plot(steps, moving_mean(losses, window), color="tab:blue", linewidth=2,
                    label=f"mean of {window} steps")
            ax.legend(fontsize=7)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.json (everything), report.md and report.html (the tables and plots a person reads)."""
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    render(report, out)


def recovery_table(report: dict[str, Any]) -> str:
    domains = list(report["eval"]["teacher"])
    if not domains:
        return "(no held-out evaluation: data.eval_blocks is 0)"
    lines = [
        "| model | " + " | ".join(f"{d} ppl | {d} ratio | {d} agreement" for d in domains) + " |",
        "|---|" + "---:|" * (3 * len(domains)),
    ]
    for name, values in recovery_rows(report):
        lines.append(f"| {name} | " + " | ".join(" | ".join(_cell(values[d])) for d in domains) + " |")
    return "\n".join(lines)


def long_range_rows(report: dict[str, Any]) -> list[tuple[str, dict]]:
    """(row name, {"buckets": {domain: {...}}, "copy": {...}}) for every model with diagnostics."""
    long_range = report.get("long_range") or {}
    rows = [(report["method"], long_range[report["method"]])] if report["method"] in long_range else []
    for name, baseline in report.get("baselines", {}).items():
        for key, value in (baseline.get("long_range") or {}).items():
            when = "untrained" if key == "untrained" else "after the same stage 2"
            rows.append((f"{name} (baseline), {when}", value))
    return rows


def long_range_table(report: dict[str, Any]) -> str:
    rows = long_range_rows(report)
    if not rows:
        return ""
    domains = list(rows[0][1]["buckets"])
    columns = [(d, key) for d in domains for key in rows[0][1]["buckets"][d]]
    copies = list(rows[0][1]["copy"])
    teacher_copy = report["long_range"]["teacher"]["copy"]
    lines = [
        "| model | " + " | ".join(f"{d} {key}" for d, key in columns) + " | "
        + " | ".join(f"copy {c}" for c in copies) + " |",
        "|---|" + "---:|" * (len(columns) + len(copies)),
        "| teacher | " + " | ".join("1" for _ in columns) + " | "
        + " | ".join(f"{teacher_copy[c]:.3f}" if c in teacher_copy else "" for c in copies) + " |",
    ]
    for name, values in rows:
        cells = [f"{values['buckets'][d][key]:.3f}" for d, key in columns]
        cells += [f"{values['copy'][c]:.3f}" for c in copies]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retrieval_rows(report: dict[str, Any]) -> list[tuple[str, list[dict]]]:
    """(row name, answer records) for the teacher, the student and every baseline with retrieval results."""
    retrieval = report.get("retrieval") or {}
    rows = [(name if name == "teacher" else f"{name} (student)", records) for name, records in retrieval.items()
            if records is not None]
    for name, baseline in report.get("baselines", {}).items():
        for key, records in (baseline.get("retrieval") or {}).items():
            when = "untrained" if key == "untrained" else "after the same stage 2"
            rows.append((f"{name} (baseline), {when}", records))
    return rows


def retrieval_section(report: dict[str, Any]) -> list[str]:
    from linearize.retrieval import accuracy

    rows = retrieval_rows(report)
    if not rows:
        return []
    cells = accuracy(rows[0][1])
    columns = [(task, length) for task, by_length in cells.items() for length in by_length]
    depths = sorted({r["depth"] for r in rows[0][1]})
    per_cell = len(rows[0][1]) // max(len(columns) * len(depths), 1)
    lines = [
        "", "## Retrieval", "",
        "Exact match of a greedy answer generated through each model's own cache (linearize.retrieval): "
        f"fraction correct over needle depths {', '.join(f'{d:g}' for d in depths)} ({per_cell} prompt(s) "
        "each), by task and prompt length in tokens.", "",
        *accuracy_table({name: accuracy(records) for name, records in rows}, columns),
    ]
    variants = {r.get("variant") for r in rows[0][1]}
    if len(variants) > 1:
        by_variant = {name: accuracy(records, by_variant=True) for name, records in rows}
        lines += ["", "The same answers by task and variant (filler/phrasing: repeated sentences or held-out prose, "
                  "the classic words or others; linearize.retrieval):", "",
                  *accuracy_table(by_variant, [(task, length) for task, by_length in by_variant[rows[0][0]].items()
                                               for length in by_length])]
    if report.get("placement"):
        from linearize.placement import describe

        lines += ["", f"The student's {describe(report['placement'])}."]
    student = next((records for name, records in rows if name.endswith("(student)")), [])
    misses = [r for r in student if not r["correct"]][:6]
    if misses:
        lines += ["", "Some of the student's misses (expected -> generated):", ""]
        lines += [f"- {r['task']} at {r['length']} tokens, depth {r['depth']:g}: `{r['expected']}` -> "
                  f"`{' '.join(r['generated'].split())[:80]}`" for r in misses]
    return lines


def ablation_section(report: dict[str, Any]) -> list[str]:
    ablation = report.get("ablation")
    if not ablation:
        return []
    with_retrieval = bool(next(iter(ablation.values())).get("retrieval"))
    blocks = report["config"].get("evaluate", {}).get("ablation_blocks", 1)
    return [
        "", "## Branch ablation", "",
        "The student with each branch of its state switched off at inference (the window always kept): held-out "
        f"perplexity ratio to the teacher on the first {blocks} block(s) of each domain"
        + (", and retrieval accuracy (–: not measured; with a branch off, the student answers only the tasks it "
           "answered at least once with all of them)." if with_retrieval else "."),
        "",
        *ablation_table(ablation),
    ]


def accuracy_table(scores: dict[str, dict[str, dict]], columns: list[tuple[str, int]] | None = None) -> list[str]:
    """Markdown rows of retrieval accuracy: model name -> {task: {length: fraction correct}}; columns (task,
    length) as given, else the first model's."""
    if columns is None:
        columns = [(t, n) for t, by_length in next(iter(scores.values())).items() for n in by_length]
    lines = ["| model | " + " | ".join(f"{task} {length}" for task, length in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, cells in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[t][n]:.2f}" if n in cells.get(t, {}) else "–"
                                                 for t, n in columns) + " |")
    return lines


def ablation_table(ablation: dict[str, dict]) -> list[str]:
    """Markdown rows of a branch ablation: name -> {"ratios": {domain: ratio}, "retrieval": {task: {length:
    accuracy}}} (retrieval optional)."""
    first = next(iter(ablation.values()))
    domains = list(first["ratios"])
    tasks = [(task, length) for task, by_length in first.get("retrieval", {}).items() for length in by_length]
    lines = ["| student | " + " | ".join(f"{d} ratio" for d in domains) + "".join(f" | {t} {n}" for t, n in tasks)
             + " |", "|---|" + "---:|" * (len(domains) + len(tasks))]
    for name, entry in ablation.items():
        cells = [f"{entry['ratios'][d]:.3f}" for d in domains]
        cells += [f"{entry['retrieval'][t][n]:.2f}" if n in entry.get("retrieval", {}).get(t, {}) else "–"
                  for t, n in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def model_card(report: dict[str, Any]) -> str:
    """README.md of a saved student: what it is, how to load it, and the run's results."""
    return f"""---
library_name: transformers
tags: [linearize, linear-attention, {report['method']}]
---

# {report['method']} linearization of {report['teacher']}

Every attention layer of the teacher swapped for a constant-memory mixer by
[linearize](https://pypi.org/project/linearize/) (method `{report['method']}`), then trained.
Decoding keeps a fixed-size state per layer whatever the context length.

```python
import linearize  # registers the "linearized" model type with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```

## Held-out recovery

Ratio = student perplexity / teacher perplexity; agreement = top-1 next-token agreement with the teacher.
Measured on {report['machine']}.

{recovery_table(report)}
"""


# --- plots and the HTML report ------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_positions(report: dict[str, Any], path: Path) -> bool:
    """Perplexity ratio to the teacher per position bucket, one panel per domain, every model with
    long-range diagnostics as a line."""
    rows = long_range_rows(report)
    if not rows:
        return False
    domains = list(rows[0][1]["buckets"])
    if not domains:  # the copy test alone (data.long_context: 0)
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 3.8), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        buckets = [b for b in rows[0][1]["buckets"][domain] if b.startswith("[")]
        for name, values in rows:
            ax.plot(range(len(buckets)), [values["buckets"][domain][b] for b in buckets], marker="o", label=name)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(buckets)), buckets)
        ax.set_title(f"{domain}: ratio to the teacher by position")
        ax.set_xlabel("tokens of context")
        ax.set_ylabel("perplexity ratio")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_layers(report: dict[str, Any], path: Path) -> bool:
    """Per converted layer: the final stage-1 loss and, when measured, the held-out attention-output error
    (MSE and cosine similarity against the teacher's softmax attention on the same inputs)."""
    per_layer = report["stages"].get("transfer", {}).get("per_layer_loss") or {}
    errors = report.get("layer_errors") or {}
    if not per_layer and not errors:
        return False
    plt = _pyplot()
    panels = [p for p in ("loss", "mse", "cosine") if (p == "loss" and per_layer) or (p != "loss" and errors)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "loss":
            layers, values = zip(*sorted((int(k), v) for k, v in per_layer.items()))
            ax.set_title("stage 1 loss per layer (final epoch)")
        else:
            layers, values = zip(*sorted((int(k), v[panel]) for k, v in errors.items()))
            ax.set_title(f"held-out attention output: {'MSE' if panel == 'mse' else 'cosine similarity'}")
        ax.bar(layers, values)
        ax.set_xlabel("layer")
        if panel != "cosine":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_retrieval(report: dict[str, Any], path: Path) -> bool:
    """Fraction correct by needle depth (rows) and prompt length (columns): one panel per model and task."""
    from linearize.retrieval import heatmap

    rows = retrieval_rows(report)
    if not rows:
        return False
    tasks = list(dict.fromkeys(r["task"] for r in rows[0][1]))
    if len({r["length"] for r in rows[0][1]}) * len({r["depth"] for r in rows[0][1]}) < 2:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), len(tasks), figsize=(2.6 * len(tasks) + 1, 2.2 * len(rows)), squeeze=False)
    for row, (name, records) in zip(axes, rows):
        for ax, task in zip(row, tasks):
            depths, lengths, grid = heatmap(records, task)
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title(f"{name}: {task}", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("prompt length (tokens)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("needle depth", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="fraction correct")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def samples_section(report: dict[str, Any]) -> list[str]:
    samples = report.get("samples") or []
    if not samples:
        return []
    lines = ["", "## Sample generations", "", "Greedy, the same prompts for teacher and student.", ""]
    for sample in samples:
        lines += [f"**Prompt:** {sample['prompt']}", ""]
        for who in ("teacher", "student"):
            text = sample[who].replace("\n", " ").replace("|", "\\|")
            lines += [f"- *{who}:* {text}"]
        lines.append("")
    return lines


def html_page(title: str, markdown_text: str, images: dict[str, Path]) -> str:
    """A self-contained HTML page from our Markdown: tables rendered, every image embedded as data."""
    import base64

    import markdown as md

    body = md.markdown(markdown_text, extensions=["tables"])
    for name, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode()
        body = body.replace(f'src="{name}"', f'src="data:image/png;base64,{data}"')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
        "td{text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}"
    )
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>"
            f"</head><body>{body}</body></html>")


def config_section(report: dict[str, Any]) -> list[str]:
    import yaml

    return ["", "## Config", "", "```yaml", yaml.safe_dump(report["config"], sort_keys=False).strip(), "```"]


def render(report: dict[str, Any], out: Path) -> None:
    """report.md and the self-contained report.html, with their plots, from a report dict."""
    text = markdown(report)
    images = {}
    for name, plot in (("losses.png", plot_losses), ("layers.png", plot_layers), ("positions.png", plot_positions),
                        ("retrieval.png", plot_retrieval)):
        if plot(report, out / name):
            images[name] = out / name
            text += f"\n![{name[:-4]}]({name})\n"
    text += "\n".join(samples_section(report))
    decode = out / "decode.md"
    if decode.is_file():
        text += "\n## Decoding speed\n\n" + decode.read_text()
    text += "\n".join(config_section(report)) + "\n"
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", html_page(f"linearize report: {report['method']}", text, images))


def load_report(out: Path) -> dict[str, Any]:
    from linearize.errors import LinearizeError

    path = Path(out) / "report.json"
    if not path.is_file():
        raise LinearizeError(f"{out} has no report.json: pass the output directory of a finished `linearize run`")
    return json.loads(path.read_text())


def compare(outs: list[Path], destination: Path) -> Path:
    """Several runs side by side: one recovery table (every run's rows, prefixed by the run), overlaid loss
    curves per stage, as compare.md and a self-contained compare.html in `destination`."""
    reports = {Path(o).name or str(o): load_report(Path(o)) for o in outs}
    destination.mkdir(parents=True, exist_ok=True)
    first = next(iter(reports.values()))
    domains = list(first["eval"]["teacher"])
    lines = ["# linearize: runs compared", "",
             "ratio = perplexity / the run's teacher perplexity on its own held-out blocks.", "",
             "| run | method | model | " + " | ".join(f"{d} ratio" for d in domains) + " | seconds |",
             "|---|---|---|" + "---:|" * (len(domains) + 1)]
    for run_name, report in reports.items():
        for row, values in recovery_rows(report):
            if row.startswith("teacher"):
                continue
            cells = [f"{values[d]['ppl_ratio']:.3f}" if "ppl_ratio" in values.get(d, {}) else "" for d in domains]
            lines.append(f"| {run_name} | {report['method']} | {row} | " + " | ".join(cells)
                         + f" | {report.get('seconds_total', 0):.0f} |")
    plt = _pyplot()
    stages = sorted({s for r in reports.values() for s in r["stages"]})
    images = {}
    if stages:
        fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            for run_name, report in reports.items():
                if stage in report["stages"]:
                    steps, losses = zip(*report["stages"][stage]["loss_curve"])
                    ax.plot(steps, losses, label=run_name)
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(destination / "compare_losses.png", dpi=100)
        plt.close(fig)
        images["compare_losses.png"] = destination / "compare_losses.png"
        lines += ["", "![losses](compare_losses.png)"]
    text = "\n".join(lines) + "\n"
    atomic_write_text(destination / "compare.md", text)
    atomic_write_text(destination / "compare.html", html_page("linearize: runs compared", text, images))
    return destination
