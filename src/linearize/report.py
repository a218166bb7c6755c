"""report.json (everything) and report.md (the tables a person reads), plus a loss plot."""

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


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    attention = ", ".join(f"{k} {v}" for k, v in config["attention"].items() if k != "softmax_layers")
    lines = [
        f"# linearize report: {report['method']} on {report['teacher']}",
        "",
        f"Machine: {report['machine']}. Total wall time: {report['seconds_total']:.0f} s.",
        f"Converted {report['model']['converted_layers']} of {report['model']['layers']} layers ({attention}); "
        f"held-out blocks of {config['data']['eval_seq_len']} tokens "
        f"({', '.join(f'{d}: {n} tokens' for d, n in report['data']['eval_tokens'].items())}).",
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
            "random token sequence of length L (a window alone cannot copy beyond its length).",
            "",
            table,
        ]
    lines += [
        "",
        "## Training",
        "",
        "| stage | distinct tokens | tokens processed | seconds | tokens/s | trainable parameters | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    stages = [(name, stage) for name, stage in report["stages"].items()]
    stages += [(f"{name} (baseline) {key}", value) for name, b in report.get("baselines", {}).items()
               for key, value in b.items() if key == "finetune"]
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
        ax.plot(steps, losses)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: Path) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    text = markdown(report)
    if plot_losses(report, out / "losses.png"):
        text += "\n![losses](losses.png)\n"
    atomic_write_text(out / "report.md", text)


def recovery_table(report: dict[str, Any]) -> str:
    domains = list(report["eval"]["teacher"])
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
        + " | ".join(f"{teacher_copy[c]:.3f}" for c in copies) + " |",
    ]
    for name, values in rows:
        cells = [f"{values['buckets'][d][key]:.3f}" for d, key in columns]
        cells += [f"{values['copy'][c]:.3f}" for c in copies]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
