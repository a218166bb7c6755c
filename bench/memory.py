"""The recall memory's and the sparse cache's size against their quality: a Pareto table on one trained
student, in one run.

    python bench/memory.py                         # the default run's student, every variant
    python bench/memory.py --run runs/x --gains    # first the measured gain of each layer's memory
    python bench/memory.py --retrieval 4           # and passkey accuracy at 4K (4 prompts a row)

The memory has no parameters: which layers carry one, its buckets per order, its orders and how its table
stores an entry (`attention.memory_format`: the model's dtype, bf16, int8 or int4 with a step and an offset
per row), and the sparse cache (exact keys kept beyond the window: `attention.sparse_keys` and the score that
keeps them, `sparse_score`; in the heads the run placed it, else every head) change when the trained student
is loaded, so every row is the same trained model at the same
training budget, served with a different memory. Rows that drop the memory from layers it was trained with
are a lower bound for a student trained that way (`linearize run` with the row's settings gives the other
side). Per row: the decode state of one sequence, measured on the model's own cache after a 1,024-token
prompt in float32 and in bfloat16 (the state has this size at any length); held-out perplexity ratios to the
teacher on the run's held-out blocks (the teacher's scores as the run stored them); the copy test at L = 256;
with `--long`, the ratio over positions [1024, 4096) of the run's long held-out documents (the teacher's
profile as the run stored it); with `--retrieval N`, passkey accuracy at 4,096 tokens over N prompts (depths
spread over the context, half in repeated filler and half in held-out prose, in other words).

`--gains`: the student served with a memory in every converted layer, then each layer's memory switched off
alone: the rise of held-out loss (nats per token, mean over the domains, on `--gain-blocks` blocks each) is
the layer's measured gain, and rows "top k" keep the k layers of largest gain (the spirit of KL-guided
layer selection: layers chosen by what they measurably carry, not by position).
Window + sinks (the run's own trained baseline, from its report) is the row every memory must beat.
Writes OUTPUT (default RUN/memory.md).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from linearize.generation import cache_bytes


def variants(gains: list[int] | None) -> dict[str, dict]:
    rows = {
        "as trained": {},
        "bf16 table": {"memory_format": "bfloat16"},
        "int8 table": {"memory_format": "int8"},
        "int4 table": {"memory_format": "int4"},
        "512 buckets": {"memory_buckets": 512},
        "256 buckets": {"memory_buckets": 256},
        "orders [1, 2]": {"memory_ngram": [1, 2]},
        "orders [2, 4]": {"memory_ngram": [2, 4]},
        "longest order's key only": {"memory_recall": "longest"},
        "no memory": {"memory_buckets": 0},
        "no sparse cache": {"sparse_keys": 0},
        "sparse 64, recall error": {"sparse_keys": 64, "sparse_score": "recall-error"},
        "sparse 128, recall error": {"sparse_keys": 128, "sparse_score": "recall-error"},
        "sparse 256, recall error": {"sparse_keys": 256, "sparse_score": "recall-error"},
        "sparse 128, recency": {"sparse_keys": 128, "sparse_score": "recency"},
        "sparse 128 in every head": {"sparse_keys": 128, "sparse_heads": "all"},
    }
    if gains:
        for k in (2, 4, 5, 6):
            chosen = sorted(gains[:k])
            rows[f"top {k} layers by gain {chosen}"] = {"memory_layers": chosen}
            rows[f"top {k} layers, int8"] = {"memory_layers": chosen, "memory_format": "int8"}
        rows["top 6 layers, 512 buckets, int4"] = {"memory_layers": sorted(gains[:6]), "memory_buckets": 512,
                                                   "memory_format": "int4"}
        chosen = sorted(gains[:4])
        rows["top 4 layers, int4"] = {"memory_layers": chosen, "memory_format": "int4"}
        rows["top 4 layers, 512 buckets, int8"] = {"memory_layers": chosen, "memory_buckets": 512,
                                                   "memory_format": "int8"}
    return rows


def load_with(model_dir: Path, changes: dict):
    from linearize.models import LinearizedConfig, LinearizedForCausalLM

    config = LinearizedConfig.from_pretrained(model_dir)
    config.attention = {**config.attention, **changes}
    return LinearizedForCausalLM.from_pretrained(model_dir, config=config).eval()


@torch.no_grad()
def state_mib(model, dtype: torch.dtype) -> float:
    from transformers import DynamicCache

    model = model.to(dtype)
    cache = DynamicCache(config=model.config)
    ids = torch.randint(100, 40000, (1, 1024), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    model.to(torch.float32)
    return cache_bytes(cache) / 2**20


def passkey_prompts(config, count: int) -> tuple[list, object]:
    """(`count` passkey prompts of 4,096 tokens: depths spread over the context, alternately in repeated filler
    with the classic words and in held-out prose with other words; the tokenizer)."""
    from linearize.data.blocks import build_blocks
    from linearize.probes import prose_documents
    from linearize.retrieval import build_prompt
    from linearize.teacher import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    data = build_blocks(tokenizer, config.data.source, seq_len=config.data.seq_len, train_tokens=0,
                        eval_tokens_per_domain=0, seed=config.seed, long_tokens=4096, long_documents_per_domain=2)
    prose = prose_documents(data)
    return [build_prompt(tokenizer, "passkey", 4096, (i + 0.5) / count, seed=i, variant=variant, prose=prose)
            for i in range(count) for variant in [("repeated/a", "prose/b")[i % 2]]], tokenizer


def passkey(model, prompts: list, tokenizer) -> float:
    from linearize.retrieval import run_retrieval

    records = run_retrieval(model, tokenizer, prompts, "passkey 4K")
    return sum(r["correct"] for r in records) / len(records)


def mean_nll(model, blocks: dict) -> float:
    from linearize.evaluate import score

    values = []
    for domain, b in blocks.items():
        s = score(model, b, desc=domain)
        values.append(s.nll / s.tokens)
    return sum(values) / len(values)


def layer_gains(model_dir: Path, blocks: dict) -> list[tuple[int, float]]:
    """(layer, gain) by decreasing gain: the rise of mean held-out loss with that layer's memory switched off,
    the student served with a memory in every converted layer."""
    from linearize.layers.attention import linearized_attentions

    model = load_with(model_dir, {"memory_layers": None})
    layers = linearized_attentions(model)
    base = mean_nll(model, blocks)
    gains = []
    for i, layer in enumerate(layers):
        if "memory" not in layer.mixer.branches:
            continue
        layer.mixer.off = frozenset({"memory"})
        gains.append((i, mean_nll(model, blocks) - base))
        layer.mixer.off = frozenset()
        print(f"layer {i}: gain {gains[-1][1]:+.4f} nats/token", flush=True)
    return sorted(gains, key=lambda g: -g[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/default", help="a finished run directory (its model/ and progress)")
    parser.add_argument("--gains", action="store_true", help="measure each layer's gain, add top-k rows")
    parser.add_argument("--gain-blocks", type=int, default=1, help="held-out blocks per domain for the gains")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument("--long", action="store_true", help="add the [1024, 4096) ratio on long documents")
    parser.add_argument("--retrieval", type=int, default=0, metavar="N",
                        help="add passkey accuracy at 4,096 tokens over N prompts a row")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from linearize.api import load_config
    from linearize.checkpoint import CONFIG_FILE
    from linearize.data.blocks import build_blocks
    from linearize.evaluate import bucket_ratios, copy_sequences, copy_test, position_profile, score
    from linearize.teacher import load_tokenizer

    run = Path(args.run)
    progress = json.loads((run / "progress.json").read_text())
    teacher = progress.get("eval.teacher_raw")
    if teacher is None or not (run / "model" / "config.json").is_file():
        raise SystemExit(f"{run} is not a finished run (no model/ or no teacher scores): `linearize run` it first")
    config = load_config(run / CONFIG_FILE)
    long_tokens, long_documents = (config.data.long_context, config.data.long_documents) if args.long else (0, 0)
    data = build_blocks(load_tokenizer(config.model), config.data.source, seq_len=config.data.seq_len, train_tokens=0,
                        eval_tokens_per_domain=config.data.eval_blocks * config.data.eval_seq_len, seed=config.seed,
                        eval_seq_len=config.data.eval_seq_len, text_field=config.data.text_field,
                        long_tokens=long_tokens, long_documents_per_domain=long_documents)
    long_docs = {d: docs for d, docs in data.long.items() if len(docs)} if args.long else {}
    teacher_profiles = (progress.get("long_range.teacher") or {}).get("profiles", {})
    blocks = {d: b for d, b in data.eval.items() if len(b)}
    torch.manual_seed(config.seed)
    gains = None
    lines = []
    if args.gains:
        ranked = layer_gains(run / "model", {d: b[: args.gain_blocks] for d, b in blocks.items()})
        gains = [i for i, _ in ranked]
        lines += ["Measured gain of each layer's memory (rise of mean held-out loss, nats per token, with that "
                  f"layer's memory off, the student served with a memory in every layer; {args.gain_blocks} "
                  "block(s) per domain), largest first:", "",
                  "| layer | " + " | ".join(str(i) for i, _ in ranked) + " |",
                  "|---|" + "---:|" * len(ranked),
                  "| gain | " + " | ".join(f"{g:+.4f}" for _, g in ranked) + " |", ""]
    from linearize.models import LinearizedConfig

    trained = LinearizedConfig.from_pretrained(run / "model")
    sequences = {256: copy_sequences(trained.vocab_size, config.data.copy_lengths, seed=config.seed)[256]}
    rows = variants(gains)
    if args.only:
        rows = {name: changes for name, changes in rows.items() if name in args.only}
    domains = list(blocks)
    copy_teacher = (progress.get("long_range.teacher") or {}).get("copy", {}).get("L=256")
    baseline = progress.get("baseline.window+sinks", {})
    header = ("| variant | memory layers | buckets x orders | format | sparse keys, score | state MiB fp32 | "
              "state MiB bf16 | " + " | ".join(f"{d} ratio" for d in domains)
              + "".join(f" | {d} [1024, 4096)" for d in long_docs) + " | copy L=256 |"
              + (" passkey 4K |" if args.retrieval else ""))
    prompts = passkey_prompts(config, args.retrieval) if args.retrieval else ()
    lines += [f"Student: {run} ({config.method} on {config.model}); teacher copy L=256: {copy_teacher}; "
              f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}.", "", header,
              "|---|---|---|---|---|" + "---:|" * (len(domains) + len(long_docs) + 3 + bool(args.retrieval))]
    print("\n".join(lines), flush=True)
    for name, changes in rows.items():
        settings = {"memory_format": "auto", **trained.attention, **changes}
        model = load_with(run / "model", changes)
        ratios = []
        for d in domains:
            s = score(model, blocks[d], desc=f"{name} ({d})")
            ratios.append(math.exp(s.nll / s.tokens - teacher[d]["nll"] / teacher[d]["tokens"]))
        for d, docs in long_docs.items():
            profile = position_profile(model, docs, f"{name} ({d}, long)")
            ratios.append(bucket_ratios(profile, torch.tensor(teacher_profiles[d]))["[1024, 4096)"])
        copy = copy_test(model, sequences)["L=256"]
        fp32, bf16 = state_mib(model, torch.float32), state_mib(model, torch.bfloat16)
        buckets, sparse = settings["memory_buckets"], settings.get("sparse_keys", 0)
        kept = f"{sparse}, {settings['sparse_score']}" if sparse else "-"
        line = (f"| {name} | {settings['memory_layers']} | {buckets} x {len(settings['memory_ngram'])} | "
                f"{settings['memory_format']} | {kept} | {fp32:.1f} | {bf16:.1f} | "
                + " | ".join(f"{r:.3f}" for r in ratios) + f" | {copy:.3f} |"
                + (f" {passkey(model, *prompts):.2f} |" if prompts else ""))
        lines.append(line)
        print(line, flush=True)
    if baseline:
        ratios = [baseline["eval"].get("finetune", {}).get(d, {}).get("ppl_ratio") for d in domains]
        buckets = [baseline.get("long_range", {}).get("finetune", {}).get("buckets", {}).get(d, {}).get("[1024, 4096)")
                   for d in long_docs]
        lines.append("| window + sinks (trained baseline, from the run) | - | - | - | - | - | - | "
                     + " | ".join("-" if r is None else f"{r:.3f}" for r in ratios + buckets)
                     + f" | {baseline.get('long_range', {}).get('finetune', {}).get('copy', {}).get('L=256', '-')} |")
    text = "\n".join(lines) + "\n"
    output = Path(args.output) if args.output else run / "memory.md"
    output.write_text(text)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
