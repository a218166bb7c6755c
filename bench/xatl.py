"""XATL's claim, measured: the same GLA architecture trained twice on the same data and token budget, once
initialised from the teacher (cross-architecture transfer) and once from random init.

    python bench/xatl.py                          # 24,576 tokens per arm on the embedded default
    python bench/xatl.py --tokens 8192 --seq-len 512

Both arms run the `linearize run` pipeline with `method: xatl` (attention.init transfer | random), full
fine-tuning on the next-token loss alone (no distillation: the paper's setting), the same blocks in the
same order, the same learning-rate schedule. Printed (and written to OUTPUT_DIR/xatl.md, plot in
OUTPUT_DIR/loss_curves.png): the loss curve of each arm, held-out perplexity of each, the tokens each needs
to reach a set of loss levels (loss averaged over `--smooth` steps), and the ratio of tokens the random
arm spent to reach its final loss to the tokens the transferred arm needed for the same loss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from linearize.methods import build_config
from linearize.pipeline import run
from linearize.report import moving_mean

ARMS = ("transfer", "random")


def tokens_to_reach(curve: list[tuple[int, float]], level: float) -> int | None:
    """First token count at which the (smoothed) loss is at or below `level`; None if never."""
    return next((tokens for tokens, loss in curve if loss <= level), None)


def arm_config(args, arm: str) -> dict:
    return {
        "model": args.model,
        "method": "xatl",
        "output_dir": str(Path(args.output_dir) / arm),
        "seed": args.seed,
        "attention": {"mixer": args.mixer, "init": arm},
        "baselines": {},
        "data": {"seq_len": args.seq_len, "eval_seq_len": args.seq_len, "eval_blocks": args.eval_blocks,
                 "long_context": 0, "copy_lengths": []},
        "finetune": {"tokens": args.tokens, "lr": args.lr, "distill_weight": 0.0, "warmup_steps": args.warmup},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mixer", default="gla", choices=["gla", "retnet"])
    parser.add_argument("--tokens", type=int, default=24576)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-blocks", type=int, default=4)
    parser.add_argument("--smooth", type=int, default=4, help="steps averaged before reading a loss level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/bench-xatl")
    args = parser.parse_args()

    reports = {arm: run(build_config(arm_config(args, arm))) for arm in ARMS}
    curves = {}
    for arm, report in reports.items():
        steps = report["stages"]["finetune"]["loss_curve"]
        per_step = report["stages"]["finetune"]["tokens"] / max(1, len(steps))
        losses = moving_mean([loss for _, loss in steps], args.smooth)
        curves[arm] = [(int(round(step * per_step)), loss) for (step, _), loss in zip(steps, losses)]

    random_final = curves["random"][-1][1]
    transfer_final = curves["transfer"][-1][1]
    levels = sorted({round(random_final + d, 2) for d in (2.0, 1.0, 0.5, 0.0)} | {round(transfer_final, 2)},
                    reverse=True)
    domains = list(reports["transfer"]["eval"]["teacher"])
    lines = [
        f"# XATL vs random init: {args.mixer}, {args.tokens:,} tokens per arm, seq {args.seq_len}, lr {args.lr}",
        "",
        f"machine: {reports['transfer']['machine']}",
        "",
        "| arm | start loss | final loss (smoothed) | seconds | "
        + " | ".join(f"held-out ppl {d}" for d in domains) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(domains),
    ]
    for arm in ARMS:
        report = reports[arm]
        ppl = [f"{report['eval']['finetune'][d]['perplexity']:.2f}" for d in domains]
        start = report["stages"]["finetune"]["loss_curve"][0][1]
        lines.append(f"| {arm} | {start:.3f} | {curves[arm][-1][1]:.3f} | "
                     f"{report['stages']['finetune']['seconds']:.0f} | " + " | ".join(ppl) + " |")
    teacher_ppl = [f"{reports['transfer']['eval']['teacher'][d]['perplexity']:.2f}" for d in domains]
    lines.append("| (teacher) | | | | " + " | ".join(teacher_ppl) + " |")
    lines += ["", "| loss level | tokens, transferred | tokens, random | random / transferred |",
              "|---:|---:|---:|---:|"]
    for level in levels:
        t, r = tokens_to_reach(curves["transfer"], level), tokens_to_reach(curves["random"], level)
        ratio = f"{r / t:.1f}x" if (t and r) else ("not reached" if t else "-")
        lines.append(f"| {level:.2f} | {t if t is not None else 'not reached'} | "
                     f"{r if r is not None else 'not reached'} | {ratio} |")
    t_at_random_final = tokens_to_reach(curves["transfer"], random_final)
    spent = curves["random"][-1][0]
    summary = (f"tokens to reach the random-init run's final loss {random_final:.3f}: random {spent:,}, "
               f"transferred {t_at_random_final:,} -> {spent / t_at_random_final:.1f}x fewer"
               if t_at_random_final else "the transferred run never reached the random run's final loss")
    lines += ["", summary]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.output_dir)
    (out / "xatl.md").write_text(text)
    (out / "xatl.json").write_text(json.dumps({"curves": curves, "summary": summary}, indent=1))
    plot(curves, out / "loss_curves.png", args)


def plot(curves: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, curve in curves.items():
        ax.plot([t for t, _ in curve], [loss for _, loss in curve], label=f"{arm} init")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"next-token loss ({args.smooth}-step mean)")
    ax.set_title(f"XATL ({args.mixer}) vs random init")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
