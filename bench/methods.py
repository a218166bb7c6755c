"""Methods side by side on the embedded default teacher and corpus, at one training budget, in one run.

    python bench/methods.py                                   # every variant (about an hour on 2 CPU cores)
    python bench/methods.py --only hybrid "window + 4 sinks"  # a subset
    python bench/methods.py --budget seconds                  # the same wall time for every method

Budget `tokens` (default): methods with attention transfer (hybrid, lolcats) spend `--transfer-tokens`
distinct tokens (`--transfer-epochs` passes) in stage 1 and `--lora-tokens` in stage 2; methods without a
stage 1 get `--lora-tokens` plus the stage-1 distinct tokens as stage-2 tokens, so every method sees the
same number of distinct training tokens. Budget `seconds`: methods with a stage 1 keep that budget, the
first of them sets the wall time (its training seconds), and every method without a stage 1 gets as many
stage-2 tokens as it trains in that time, from its throughput measured on a few steps first. The table
reports the seconds each actually spent.
Every row is trained and evaluated by the same pipeline as `linearize run` (its report.json is kept in
`--output-dir`); decode state per layer is measured on the model's own cache after 2,048 tokens (batch 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from linearize.methods import build_config
from linearize.pipeline import run

VARIANTS = {
    "hybrid (ours, the default)": {"method": "hybrid"},
    "lolcats": {"method": "lolcats"},
    "lolcats + 4 sinks": {"method": "lolcats", "attention": {"sink_tokens": 4}},
    "liger-gla (Liger Attention)": {"method": "liger", "attention": {"gate": "gla"}},
    "liger-gla, unnormalised recurrence (the reference)": {"method": "liger", "attention": {"normalize": False}},
    "liger-hgrn2 (Liger Attention)": {"method": "liger", "attention": {"gate": "hgrn2"}},
    "xatl (GLA, full fine-tuning)": {"method": "xatl"},
    "xatl (GLA + window 64 + 4 sinks)": {
        "method": "xatl", "attention": {"window_size": 64, "sink_tokens": 4, "output_norm_init": 0.0}},
    "window only": {"method": "window", "attention": {"sink_tokens": 0}},
    "window + 4 sinks": {"method": "window", "attention": {"sink_tokens": 4}},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def state_kib_per_layer(output_dir: Path) -> float:
    """Decode state one layer keeps, measured on the saved model's cache after a 2,048-token prompt."""
    from transformers import DynamicCache

    from linearize import load

    model, _ = load(output_dir / "model", device="cpu")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 2048)), past_key_values=cache, use_cache=True)
    return max(layer.nbytes() for layer in cache.layers) / 1024


def probe_tokens_per_second(settings: dict, seq_len: int = 1024, steps: int = 3) -> float:
    """Stage-2 training throughput of a variant, measured on a few steps of random tokens."""
    import tempfile

    from linearize.models import LinearizedForCausalLM
    from linearize.teacher import load_teacher
    from linearize.train import finetune

    config = build_config({**settings, "finetune": {"distill_weight": 0.0, "warmup_steps": 0,
                                                    "tokens": (steps + 1) * seq_len}})
    teacher, _ = load_teacher(config.model)
    model = LinearizedForCausalLM.from_teacher(teacher, config.method, config.attention)
    blocks = torch.randint(100, 40000, (steps + 1, seq_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as work:
        _, result = finetune(model, blocks, config.finetune, Path(work), checkpoint_every=10**6)
    return result.tokens / result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfer-tokens", type=int, default=32768)
    parser.add_argument("--transfer-epochs", type=int, default=2)
    parser.add_argument("--lora-tokens", type=int, default=12288)
    parser.add_argument("--eval-blocks", type=int, default=4)
    parser.add_argument("--output-dir", default="runs/bench-methods")
    parser.add_argument("--only", nargs="*", help="run only these variants (names as in the table)")
    parser.add_argument("--budget", choices=["tokens", "seconds"], default="tokens")
    args = parser.parse_args()
    seconds_budget = None

    rows = []
    for name, settings in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        output_dir = Path(args.output_dir) / slug(name)
        stage1 = settings["method"] in ("hybrid", "lolcats")
        tokens = args.lora_tokens + (0 if stage1 else args.transfer_tokens)
        if args.budget == "seconds" and not stage1:
            if seconds_budget is None:
                raise SystemExit("--budget seconds: list a variant with a stage 1 (hybrid, lolcats) first")
            tokens = max(1024, int(seconds_budget * probe_tokens_per_second(settings) / 1024) * 1024)
        config = build_config({
            **settings,
            "output_dir": str(output_dir),
            "baselines": {},
            "data": {"eval_blocks": args.eval_blocks, "long_context": 0, "copy_lengths": []},
            "transfer": {"enabled": stage1, "tokens": args.transfer_tokens, "epochs": args.transfer_epochs},
            "finetune": {**settings.get("finetune", {}), "tokens": tokens},
        })
        report = run(config)
        if stage1 and seconds_budget is None:
            seconds_budget = sum(s["seconds"] for s in report["stages"].values())
        final, untrained, stages = report["eval"]["finetune"], report["eval"]["untrained"], report["stages"]
        rows.append({
            "variant": name,
            "ratio": {d: v["ppl_ratio"] for d, v in final.items()},
            "agreement": {d: v["agreement"] for d, v in final.items()},
            "untrained": {d: v["ppl_ratio"] for d, v in untrained.items()},
            "distinct tokens": sum(s["distinct_tokens"] for s in stages.values()),
            "seconds": sum(s["seconds"] for s in stages.values()),
            "trainable": max(s["trainable_parameters"] for s in stages.values()),
            "state KiB/layer": state_kib_per_layer(output_dir),
        })
        print(json.dumps(rows[-1]), flush=True)

    domains = list(rows[0]["ratio"])
    print()
    print("| variant | " + " | ".join(f"{d} ratio" for d in domains) + " | untrained "
          + " / ".join(domains) + " | distinct tokens | train s | trainable params | decode state KiB/layer |")
    print("|---|" + "---:|" * (len(domains) + 5))
    for r in rows:
        ratios = " | ".join(f"{r['ratio'][d]:.3f}" for d in domains)
        untrained = " / ".join(f"{r['untrained'][d]:.3g}" for d in domains)
        print(f"| {r['variant']} | {ratios} | {untrained} | {r['distinct tokens']} | {r['seconds']:.0f} | "
              f"{r['trainable']:,} | {r['state KiB/layer']:.0f} |")


if __name__ == "__main__":
    main()
