"""The README's two figures, drawn from the measured numbers in docs/figures.yaml (each with its source):

    python bench/figures.py            # or: make figures

- docs/figure-decode.png: one sequence's decode state and decode tokens/s against the context length, teacher
  and student;
- docs/figure-methods.png: held-out perplexity ratio to the teacher (the mean over its four held-out sets)
  against one sequence's decode state, for every method (a state given per layer counts once per layer).

Nothing is measured here: a new number goes into docs/figures.yaml with where it came from, then this reruns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

ROOT = Path(__file__).resolve().parents[1]


def context_ticks(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks([1024, 4096, 16384, 32768], ["1K", "4K", "16K", "32K"])
    ax.set_xlabel("tokens of context")


def decode_figure(data: dict, path: Path) -> None:
    fig, (state, speed) = plt.subplots(1, 2, figsize=(10, 3.8))
    for series in data["state_mib"]:
        lengths, values = zip(*sorted(series["points"].items()))
        if series.get("constant"):  # no sequence dimension: the one measured value holds at every length
            state.axhline(values[0], color="tab:green", label=f"{series['label']}: {values[0]} MiB")
            state.plot(lengths, values, "o", color="tab:green")
        else:
            state.plot(lengths, values, "o-", color="tab:red", label=series["label"])
    state.set_yscale("log")
    state.set_ylabel("MiB per sequence (fp32)")
    state.set_title("decode state of one sequence")
    for series in data["tokens_per_second"]:
        lengths, values = zip(*sorted(series["points"].items()))
        color = "tab:green" if series["label"].startswith("student") else "tab:red"
        speed.plot(lengths, values, "o--" if series.get("previous") else "o-", color=color,
                   alpha=0.5 if series.get("previous") else 1.0, label=series["label"])
    speed.set_ylim(bottom=0)
    speed.set_ylabel("tokens / s")
    speed.set_title("decoding one sequence (2-core CPU)")
    for ax in (state, speed):
        context_ticks(ax)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def methods_figure(data: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = {"none": "*", "default run": "o", "200 s of training": "s"}
    for row in data["rows"]:
        state = row.get("state_mib") or row["state_kib_per_layer"] * data["layers"] / 1024
        ratio = sum(row["ratios"].values()) / len(row["ratios"])
        ax.scatter(state, ratio, marker=markers[row["budget"]], s=90 if row["budget"] == "none" else 50,
                   color="tab:green" if row["label"].startswith("hybrid") else "tab:gray" if
                   row["label"] == "teacher" else "tab:blue")
        below = row["budget"] == "200 s of training"  # the two window points lie close: one label above, one below
        ax.annotate(row["label"], (state, ratio), textcoords="offset points", xytext=(6, -12 if below else 4),
                    fontsize=8)
    for budget, marker in markers.items():
        if budget != "none":
            ax.scatter([], [], marker=marker, color="black", label=budget)
    ax.set_xscale("log")
    ax.set_xticks([2, 5, 10, 20, 50], ["2", "5", "10", "20", "50"])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("decode state of one sequence, MiB (fp32; the teacher's at 1K tokens)")
    ax.set_ylabel("held-out perplexity / the teacher's\n(mean of 4 held-out sets)")
    ax.set_title("quality against state, SmolLM2-135M")
    ax.legend(fontsize=8, title="budget", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "docs" / "figures.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    data = yaml.safe_load(args.data.read_text())
    decode_figure(data["decode"], args.out / "figure-decode.png")
    methods_figure(data["methods"], args.out / "figure-methods.png")
    print(f"wrote {args.out / 'figure-decode.png'} and {args.out / 'figure-methods.png'}")


if __name__ == "__main__":
    main()
