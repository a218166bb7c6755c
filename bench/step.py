"""A saved student's two costliest CPU pieces, timed: one stage-1 step (every converted layer's mixer on one
sequence, forward and backward, as attention transfer runs it) and one held-out forward (4 sequences, no
gradient, as evaluation batches them), best of a few runs each, with the C allocator as the command line
sets it (where the code has that setting). The held-out forward is timed twice, alternating, without and with
a bf16 autocast (the run's `autocast`, where the code has it): their ratio is what autocast buys on this CPU.
To compare code versions, run it from each checkout in turn, a few times, alternating: timings on a shared
machine move by 10% and more from one minute to the next.

    python bench/step.py runs/default/model           # the default run's student (about a minute)
    python bench/step.py runs/default/model --json    # one JSON line

Prints the seconds and the code it ran (the package's path and git commit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch


def seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def best(work, repeats: int) -> float:
    work()  # warm-up: first-call allocations and lazy inits
    return min(seconds(work) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved student directory (a run's model/)")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import linearize
    from linearize.layers.attention import linearized_attentions
    from linearize.train.transfer import position_embeddings

    try:
        from linearize.allocator import keep_freed_memory
    except ImportError:  # code from before the command line set the allocator
        kept = False
    else:
        kept = keep_freed_memory()
    model, _ = linearize.load(args.model, device="cpu")
    layers = linearized_attentions(model)
    model.requires_grad_(False)
    for layer in layers:  # stage 1 trains the mixers' own parameters
        layer.mixer.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, args.length, model.config.hidden_size, generator=generator) * 0.5
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.length), generator=generator)
    held_out = torch.randint(0, vocab, (4, args.length), generator=generator)
    rotary = position_embeddings(model, hidden)

    def stage1_step():
        for layer in layers:  # one backward per layer, as `linearize.train.transfer` does
            layer.mix(hidden, rotary[layer.layer_idx], ids).float().pow(2).mean().backward()

    def held_out_forward():
        with torch.no_grad():
            model(input_ids=held_out, use_cache=False, logits_to_keep=1)

    def held_out_forward_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            held_out_forward()

    try:
        from linearize.layers.attention import under_autocast  # noqa: F401 (code whose layers run outside it)
    except ImportError:
        held_out_forward_autocast = None  # bf16 everywhere would not be what the run does

    package = Path(linearize.__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    result = {"code": str(package), "commit": commit, "threads": torch.get_num_threads(), "length": args.length,
              "allocator_keeps_freed_memory": kept,
              "stage1_step_s": round(best(stage1_step, args.repeats), 3),
              "held_out_forward_s": round(best(held_out_forward, args.repeats), 3)}
    if held_out_forward_autocast is not None:
        held_out_forward_autocast()  # warm-up (the float32 one is warm already)
        plain, mixed = [], []
        for _ in range(args.repeats):  # alternating: both see the same spells of the machine
            plain.append(seconds(held_out_forward))
            mixed.append(seconds(held_out_forward_autocast))
        result.update(held_out_forward_float32_s=round(min(plain), 3), held_out_forward_autocast_s=round(min(mixed), 3),
                      autocast_speedup=round(min(plain) / min(mixed), 2))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['code']} ({result['commit']}, {result['threads']} threads, freed memory kept: {kept}): "
              f"one stage-1 step "
              f"(1 x {args.length}) {result['stage1_step_s']} s; one held-out forward (4 x {args.length}) "
              f"{result['held_out_forward_s']} s (best of {args.repeats})")
        if "autocast_speedup" in result:
            print(f"held-out forward, alternating: float32 {result['held_out_forward_float32_s']} s, bf16 autocast "
                  f"(MLPs) {result['held_out_forward_autocast_s']} s: {result['autocast_speedup']}x")


if __name__ == "__main__":
    main()
