"""Side by side: LoLCATS, Liger (GLA / HGRN2 gates, with and without Liger Attention) and the sliding window
alone, on the embedded default teacher and corpus, at one token budget, in one run; prints one table.

    python bench/methods.py                                  # the default budget (about 40 minutes on 2 CPU cores)
    python bench/methods.py --only lolcats "window only"     # a subset

Budget: LoLCATS spends `--transfer-tokens` (distinct, `--transfer-epochs` passes) in stage 1 and
`--lora-tokens` in stage 2. Methods without a stage 1 (Liger, window) get `--lora-tokens` plus the
LoLCATS stage-1 distinct tokens as LoRA tokens, so every method sees the same number of distinct
training tokens; the table reports the seconds each spent, so the wall-time budget is visible too.
Decode state per layer is computed from the shapes the cache holds (batch 1, fp32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from linearize.config import build_config
from linearize.pipeline import run

VARIANTS = {
    "lolcats": {"method": "lolcats"},
    "liger-gla (Liger Attention)": {"method": "liger", "attention": {"gate": "gla"}},
    "liger-gla, no window": {"method": "liger", "attention": {"gate": "gla", "window_size": 0}},
    "liger-gla, unnormalised (reference)": {"method": "liger", "attention": {"gate": "gla", "normalize": False}},
    "liger-hgrn2 (Liger Attention)": {"method": "liger", "attention": {"gate": "hgrn2"}},
    "liger-hgrn2, no window": {"method": "liger", "attention": {"gate": "hgrn2", "window_size": 0}},
    "window only": {"method": "window"},
    # not the papers' conditions: the sequence's first 4 keys stay softmax keys (attention sinks)
    "lolcats + 4 sinks": {"method": "lolcats", "attention": {"sink_tokens": 4}},
    "window only + 4 sinks": {"method": "window", "attention": {"sink_tokens": 4}},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def state_bytes_per_layer(config, num_kv_heads: int = 3, head_dim: int = 64) -> int:
    """Bytes of decoding state one layer keeps, whatever the sequence length (fp32, batch 1)."""
    attention = config.attention
    window = max(attention.window_size - 1, 0) + attention.sink_tokens
    if config.method == "window":
        return 4 * num_kv_heads * window * 2 * head_dim
    if config.method == "lolcats":
        features = 2 * (attention.feature_dim or head_dim) if attention.feature_map == "hedgehog" else head_dim
        heads = num_kv_heads if attention.key_maps == "per_kv_head" else 3 * num_kv_heads
        return 4 * heads * (features * (head_dim + 1) + window * (2 * head_dim + features))
    return 4 * num_kv_heads * (head_dim * (head_dim + 1) + window * 2 * head_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfer-tokens", type=int, default=8192)
    parser.add_argument("--transfer-epochs", type=int, default=3)
    parser.add_argument("--lora-tokens", type=int, default=4096)
    parser.add_argument("--eval-blocks", type=int, default=4)
    parser.add_argument("--output-dir", default="runs/bench-methods")
    parser.add_argument("--only", nargs="*", help="run only these variants (names as in the table)")
    args = parser.parse_args()

    rows = []
    for name, settings in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        stage1 = settings["method"] == "lolcats"
        lora_tokens = args.lora_tokens + (0 if stage1 else args.transfer_tokens)
        settings = {
            **settings,
            "output_dir": str(Path(args.output_dir) / slug(name)),
            "baselines": [],
            "data": {"eval_blocks": args.eval_blocks},
            "finetune": {"tokens": lora_tokens, "distill_weight": 1.0, "lr": 1e-3},
        }
        if stage1:
            settings["transfer"] = {"tokens": args.transfer_tokens, "epochs": args.transfer_epochs}
        config = build_config(settings)
        report = run(config, log=lambda msg: None)
        final = report["eval"]["finetune"]
        stages = report["stages"]
        rows.append({
            "variant": name,
            "code ratio": final["code"]["ppl_ratio"],
            "prose ratio": final["prose"]["ppl_ratio"],
            "code agreement": final["code"]["agreement"],
            "prose agreement": final["prose"]["agreement"],
            "untrained code ratio": report["eval"]["untrained"]["code"]["ppl_ratio"],
            "untrained prose ratio": report["eval"]["untrained"]["prose"]["ppl_ratio"],
            "distinct tokens": sum(s["distinct_tokens"] for s in stages.values()),
            "seconds": sum(s["seconds"] for s in stages.values()),
            "trainable": max(s["trainable_parameters"] for s in stages.values()),
            "state KiB/layer": state_bytes_per_layer(config) / 1024,
        })
        print(json.dumps(rows[-1]), flush=True)

    print()
    print("| variant | code ratio | prose ratio | code agr. | prose agr. | untrained code / prose | "
          "distinct tokens | train s | trainable params | decode state KiB/layer |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['code ratio']:.3f} | {r['prose ratio']:.3f} | {r['code agreement']:.3f} | "
              f"{r['prose agreement']:.3f} | {r['untrained code ratio']:.3g} / {r['untrained prose ratio']:.3g} | "
              f"{r['distinct tokens']} | {r['seconds']:.0f} | {r['trainable']:,} | {r['state KiB/layer']:.0f} |")


if __name__ == "__main__":
    main()
