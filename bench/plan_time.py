"""The plan's time model against this machine: each piece of work timed on the real teacher beside what
`linearize.plan.costs` predicts from its ops counted on the meta device, and the fit of the CPU constants.

    python bench/plan_time.py                 # SmolLM2-135M, fp32, the default run's settings (about 2 minutes)
    python bench/plan_time.py --fit           # and the utilisations / per-op cost that fit them best

Pieces (one sequence of data.seq_len tokens each, as the stages run them): a teacher decoder layer's
forward (the stage-1 pass), a converted layer's transfer step with and without a recall memory (mix
forward + backward + AdamW), a student layer's stage-2 step with LoRA (forward + backward + AdamW), its
forward alone, the head's stage-2 losses forward + backward, and its forward with the teacher targets'
top-k. Every piece is timed as the median of `--repeats` runs after a warm-up, with torch's threads.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch

CLOCK = time.perf_counter  # --clock cpu: this process's CPU time, which other processes on the machine do not
# stretch (with one thread it is the wall time of a machine to itself)


def timed(work, repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        started = CLOCK()
        work()
        times.append(CLOCK() - started)
    return statistics.median(times)


def measure(config, repeats: int) -> dict[str, float]:
    """Seconds of each piece on the real teacher, on this CPU."""
    from linearize.layers.attention import TOKEN_IDS, LinearizedAttention, attention_mode
    from linearize.models import LinearizedForCausalLM
    from linearize.models.modeling import decoder_layers
    from linearize.teacher import load_teacher
    from linearize.train.finetune import with_lora
    from linearize.train.targets import top_k_kl
    from linearize.train.transfer import position_embeddings

    teacher, _ = load_teacher(config.model, dtype=torch.float32)
    student = LinearizedForCausalLM.from_teacher(teacher, config.method, config.attention)
    student.requires_grad_(False)
    layers = decoder_layers(student)
    seq_len, hidden_size = config.data.seq_len, student.config.text_config.hidden_size
    tokens = torch.randint(0, student.config.text_config.vocab_size, (1, seq_len))
    positions = torch.arange(seq_len)[None]
    x = torch.randn(1, seq_len, hidden_size)
    rotary = position_embeddings(student, x)
    memory = next(i for i, layer in enumerate(layers) if getattr(layer.self_attn.mixer, "memory_buckets", 0))
    plain = next(i for i, layer in enumerate(layers) if isinstance(layer.self_attn, LinearizedAttention)
                 and not layer.self_attn.mixer.memory_buckets)

    def call(index, inputs):
        return layers[index](inputs, position_ids=positions, position_embeddings=rotary[index], use_cache=False,
                             **{TOKEN_IDS: tokens})

    def teacher_pass():
        with torch.no_grad(), attention_mode(student, "softmax"):
            call(plain, x)

    def transfer(index):
        attention = layers[index].self_attn
        params = list(attention.mixer.parameters())
        for p in params:
            p.requires_grad_(True)
        attention.mix(x, rotary[index], tokens).float().pow(2).mean().backward()
        adam_step_real(params)

    def student_step(index):
        call(index, x.clone().requires_grad_(True)).float().sum().backward()
        adam_step_real([p for p in layers[index].parameters() if p.requires_grad])

    def student_forward(index):
        call(index, x.clone().requires_grad_(True))

    def head():
        logits = student.lm_head(student.model.norm(x.clone().requires_grad_(True)))
        k = config.finetune.distill_top_k
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss = loss + top_k_kl(logits, torch.randint(0, 100, (1, seq_len, k)), torch.randn(1, seq_len, k) - 5)
        loss.backward()

    def head_forward():
        with torch.no_grad():
            student.lm_head(student.model.norm(x)).float().log_softmax(-1).topk(config.finetune.distill_top_k, -1)

    seconds = {  # stage 1's pieces before stage 2's adapter exists, as they run
        "teacher": timed(teacher_pass, repeats),
        "transfer": timed(lambda: transfer(plain), repeats),
        "transfer_memory": timed(lambda: transfer(memory), repeats),
    }
    with_lora(student, config.finetune)
    return {
        **seconds,
        "student": timed(lambda: student_step(plain), repeats),
        "student_memory": timed(lambda: student_step(memory), repeats),
        "student_forward": timed(lambda: student_forward(plain), repeats),
        "head": timed(head, repeats),
        "head_forward": timed(head_forward, repeats),
    }, plain, memory


def adam_step_real(params) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch.optim.AdamW(params, lr=1e-6, foreach=False).step()
    for p in params:
        p.grad = None


def predicted(costs, plain: int, memory: int) -> dict:
    layers = costs.layers
    return {
        "teacher": layers[plain].teacher, "transfer": layers[plain].transfer,
        "transfer_memory": layers[memory].transfer, "student": layers[plain].student,
        "student_memory": layers[memory].student, "student_forward": layers[plain].student_forward,
        "head": costs.head, "head_forward": costs.head_forward,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time pieces by the wall clock or by this process's CPU time (with --threads 1)")
    parser.add_argument("--fit", action="store_true", help="search the CPU constants that fit these pieces best")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from linearize.api import load_config
    from linearize.plan.costs import Device, model_costs
    from linearize.plan.hardware import (
        CPU_BANDWIDTH_UTILISATION,
        CPU_FLOP_UTILISATION,
        CPU_OP_SECONDS,
        measure_cpu,
    )
    from linearize.teacher import load_teacher_config

    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    config = load_config(None, args.overrides)
    flops, bandwidth = measure_cpu()
    print(f"this CPU: {flops / 1e9:.1f} GFLOP/s (fp32 matmul), {bandwidth / 1e9:.1f} GB/s (copy), "
          f"{torch.get_num_threads()} threads, timed by {args.clock} clock; load {open('/proc/loadavg').read()}",
          flush=True)
    seconds, plain, memory = measure(config, args.repeats)
    costs = predicted(model_costs(load_teacher_config(config.model), config, 1), plain, memory)

    def device(flop_use, bandwidth_use, op_seconds):
        return Device(flops, flops, bandwidth, flop_use, bandwidth_use, op_seconds, False)

    def table(dev) -> float:
        print("| piece | ops | GFLOP | GB moved | measured s | predicted s | predicted / measured |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        errors = []
        for name, ops in costs.items():
            guess = ops.seconds(dev)
            errors.append(guess / seconds[name])
            print(f"| {name} | {len(ops.flops)} | {ops.total_flops / 1e9:.2f} | {sum(ops.bytes) / 1e9:.2f} | "
                  f"{seconds[name]:.4f} | {guess:.4f} | {guess / seconds[name]:.2f} |")
        return max(abs(e - 1) for e in errors)

    print(f"\nwith the constants in plan/hardware.py (flop {CPU_FLOP_UTILISATION}, bandwidth "
          f"{CPU_BANDWIDTH_UTILISATION}, {CPU_OP_SECONDS * 1e6:.0f} us per op):")
    table(device(CPU_FLOP_UTILISATION, CPU_BANDWIDTH_UTILISATION, CPU_OP_SECONDS))
    if args.fit:
        # the stages' own mix: stage 1 is mostly transfer steps, stage 2 student steps and the head
        grid = itertools.product([x / 20 for x in range(4, 21)], [x / 20 for x in range(2, 21)],
                                 [x * 1e-6 for x in range(0, 41, 2)])
        arrays = {n: (torch.tensor(c.flops, dtype=torch.float64), torch.tensor(c.bytes, dtype=torch.float64))
                  for n, c in costs.items()}

        def error(g) -> float:  # the summed relative error over the pieces (vectorised OpCounts.seconds)
            return sum(abs(float(torch.maximum(f / (flops * g[0]), b / (bandwidth * g[1])).sum() + len(f) * g[2])
                           / seconds[n] - 1) for n, (f, b) in arrays.items())

        best = min(grid, key=error)
        print(f"\nbest fit: flop utilisation {best[0]}, bandwidth utilisation {best[1]}, "
              f"{best[2] * 1e6:.0f} us per op")
        table(device(*best))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
