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
            rows.append((f"{name} baseline, {'untrained' if key == 'untrained' else 'after stage 2 (LoRA)'}", value))
    return rows


def markdown(report: dict[str, Any]) -> str:
    domains = list(report["eval"]["teacher"])
    config = report["config"]
    attention = config["attention"]
    lines = [
        f"# linearize report: {report['method']} on {report['teacher']}",
        "",
        f"Machine: {report['machine']}. Total wall time: {report['seconds_total']:.0f} s.",
        f"Converted {report['model']['converted_layers']} of {report['model']['layers']} layers; "
        f"window {attention['window_size']}, feature map {attention['feature_map']}; "
        f"held-out blocks of {config['data']['eval_seq_len']} tokens "
        f"({', '.join(f'{d}: {n} tokens' for d, n in report['data']['eval_tokens'].items())}).",
        "",
        "## Held-out recovery",
        "",
        "ratio = student perplexity / teacher perplexity; agreement = top-1 next-token agreement with the teacher.",
        "",
        "| model | " + " | ".join(f"{d} ppl | {d} ratio | {d} agreement" for d in domains) + " |",
        "|---|" + "---:|" * (3 * len(domains)),
    ]
    for name, values in recovery_rows(report):
        lines.append(f"| {name} | " + " | ".join(" | ".join(_cell(values[d])) for d in domains) + " |")
    lines += [
        "",
        "## Training",
        "",
        "| stage | distinct tokens | tokens processed | seconds | tokens/s | trainable parameters | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    stages = [(name, stage) for name, stage in report["stages"].items()]
    stages += [(f"{name} baseline {key}", value) for name, b in report.get("baselines", {}).items()
               for key, value in b.items() if key != "eval"]
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
