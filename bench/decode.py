"""Inference, student against teacher, side by side on this machine in one run.

    python bench/decode.py                                   # contexts 1k, 4k, 16k, 32k; the default run's student
    python bench/decode.py --dtype bfloat16 --contexts 1024 16384 --student runs/default
    python bench/decode.py --teacher gemma3-270m --student runs/gemma3-270m --contexts 4096 16384 --no-compile

For each model and context (each in its own process, so peak memory is its own): prefill tok/s of a
random-token prompt of that length through the model's own cache, then decode tok/s over `--steps`
greedy single-token steps, cache size, and the process's peak resident memory; unless `--no-compile`, the
student's step compiled (`compile_decoding`) and the teacher at its own best: its cache copied into a
StaticCache (written in place, not concatenated), stepped eager and compiled the same way, the student's
compiled speed divided by the fastest of the teacher's three. Then batched decoding at
each of `--batch-contexts` for batch sizes 1, 8, 32 and the largest in `--fit-gib` (the prompt's cache
repeated across the batch; batches over that budget not run), and the largest batch each model fits in
`--memory-gib` next to its weights: the student, the teacher, and the teacher with transformers'
QuantizedCache (int4 KV cache, optimum-quanto), what a user would try first instead of linearizing. Then the op-level
table (the hybrid's chunked window + linear op, the same with the default's recall memory, and plain
chunked linear attention against SDPA causal,
forward only, 9 heads / 3 KV heads / head dim 64 / 128 features, as SmolLM2 and Hedgehog), and decode as a
fraction of the machine's bandwidth limit: weight bytes read per token over a measured copy bandwidth, beside
the speed of a step that only streams the weights through one single-token matmul per linear layer.
Without a trained student directory the untrained hybrid is timed (speed does not depend on training).
Writes OUTPUT (default runs/default/decode.md, or decode-bfloat16.md; the run's report.html includes
decode.md when present).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(which: str, student_dir: str | None, dtype: str = "float32", teacher: str | None = None):
    """The teacher ("teacher", "teacher-int4"), or the student saved in `student_dir` (the untrained hybrid if
    there is none)."""
    from linearize import linearize
    from linearize.teacher import DEFAULT_TEACHER, load_teacher

    teacher = teacher or DEFAULT_TEACHER
    if which.startswith("teacher"):
        model = load_teacher(teacher)[0]
    elif student_dir and Path(student_dir).exists():
        from linearize import load

        model = load(student_dir, device="cpu")[0]
    else:
        model = linearize(load_teacher(teacher)[0], "hybrid")
    return model.to(DTYPES[dtype]).eval()


@torch.no_grad()
def weight_stream_tok_s(model) -> float:
    """Tokens/s if a decoding step did nothing but one single-token matmul per linear layer (every weight
    read once, as a step must): the floor set by this machine's GEMV speed, for any model."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {m.in_features: torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in linears}
    for m in linears:
        m(x[m.in_features])
    start = time.perf_counter()
    for _ in range(5):
        for m in linears:
            m(x[m.in_features])
    return 5 / (time.perf_counter() - start)


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor, or of the tensors inside a tensor subclass (a quanto packed tensor: codes, scales,
    shifts)."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes") and callable(layer.nbytes):
            total += layer.nbytes()
        else:  # softmax keys and values, plus a quantized cache's packed part
            parts = (layer.keys, layer.values, getattr(layer, "_quantized_keys", None),
                     getattr(layer, "_quantized_values", None))
            total += sum(tensor_bytes(t) for t in parts)
    return total


def quantized_cache(model, batch_of=None):
    """transformers' QuantizedCache (quanto backend, int4 per group of 64, the newest 128 tokens kept in full
    precision): what a user tries first instead of linearizing. `batch_of`: a prefilled DynamicCache whose
    keys and values it starts from, repeated to `batch_of[1]` rows."""
    from transformers import QuantizedCache

    cache = QuantizedCache(backend="quanto", config=model.config, nbits=KV_BITS)
    if batch_of is not None:
        base, batch = batch_of
        for index, layer in enumerate(base.layers):
            cache.update(layer.keys.repeat_interleave(batch, 0), layer.values.repeat_interleave(batch, 0), index)
    return cache


KV_BITS = 4
MODELS = ("student", "teacher", "teacher-int4")  # the teacher-int4 rows: its KV cache quantized (QuantizedCache)


def timed_steps(step, token: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """`step` (token -> next token) once untimed, then `steps` timed times: (last token, steps per second)."""
    token = step(token)
    start = time.perf_counter()
    for _ in range(steps):
        token = step(token)
    return token, steps / (time.perf_counter() - start)


@torch.no_grad()
def measure_one(which: str, context: int, steps: int, student_dir: str | None, dtype: str,
                compile_step: bool = False, teacher: str | None = None) -> dict:
    """Prefill `context` random tokens, then `steps` greedy decode steps; in this process. `compile_step`:
    then three eager and three compiled blocks of `steps`, alternating, from the same cache (medians); for
    the teacher, the same from its cache copied into a StaticCache (`teacher_static`)."""
    from transformers import DynamicCache

    model = load_model(which, student_dir, dtype, teacher)
    ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(0))
    cache = quantized_cache(model) if which == "teacher-int4" else DynamicCache(config=model.config)

    def greedy(token: torch.Tensor) -> tuple[torch.Tensor, float]:
        return timed_steps(lambda token: model(input_ids=token, past_key_values=cache, use_cache=True)
                           .logits[:, -1:].argmax(-1), token, steps)

    start = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    token, decode_tok_s = greedy(out.logits[:, -1:].argmax(-1))
    result = {
        "prefill_tok_s": context / prefill,
        "decode_tok_s": decode_tok_s,
        "cache_mib": cache_bytes(cache) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if compile_step and which == "student":
        model.compile_decoding()
        start = time.perf_counter()
        model(input_ids=token, past_key_values=cache, use_cache=True)  # compiles
        result["compile_s"] = time.perf_counter() - start
        # eager and compiled blocks alternate, so that drift of the machine hits both alike
        speeds = {False: [], True: []}
        for _ in range(3):
            for compiled in (False, True):
                model.compile_decoding(compiled)
                token, tok_s = greedy(token)
                speeds[compiled].append(tok_s)
        result["decode_eager_rounds_tok_s"] = statistics.median(speeds[False])
        result["decode_compiled_tok_s"] = statistics.median(speeds[True])
        result["peak_rss_compiled_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if compile_step and which == "teacher":
        result.update(teacher_static(model, cache, token, context, steps))
    return result


@torch.no_grad()
def teacher_static(model, dynamic, token: torch.Tensor, context: int, steps: int) -> dict:
    """The teacher at its own best: its prefilled cache copied into a transformers `StaticCache` (written in
    place; a DynamicCache concatenates, copying the whole cache at every step), stepped eager and compiled
    (`torch.compile` of its forward with inductor's freezing, as our compiled step): three blocks of each,
    alternating, medians."""
    import torch._inductor.config
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + 16 * (steps + 1))
    for index, layer in enumerate(dynamic.layers):
        cache.update(layer.keys, layer.values, index, {"cache_position": torch.arange(layer.keys.shape[-2])})
    position = dynamic.get_seq_length()
    compiled = torch.compile(model.forward, dynamic=False)

    def greedy(forward, token: torch.Tensor) -> tuple[torch.Tensor, float]:
        def step(token):
            nonlocal position
            logits = forward(input_ids=token, past_key_values=cache, use_cache=True,
                             cache_position=torch.tensor([position])).logits
            position += 1
            return logits[:, -1:].argmax(-1)

        return timed_steps(step, token, steps)

    with torch._inductor.config.patch(freezing=True):
        start = time.perf_counter()
        token, _ = greedy(compiled, token)
        compile_s = time.perf_counter() - start
        speeds = {model: [], compiled: []}
        for _ in range(3):
            for forward in speeds:
                token, tok_s = greedy(forward, token)
                speeds[forward].append(tok_s)
    return {"static_eager_tok_s": statistics.median(speeds[model]),
            "static_compiled_tok_s": statistics.median(speeds[compiled]), "static_compile_s": compile_s}


@torch.no_grad()
def measure_batches(which: str, context: int, batches: list[int], steps: int, student_dir: str | None,
                    dtype: str, teacher: str | None = None, fit_gib: float = 2.0) -> dict:
    """Decode throughput (sequences x steps / s) at each batch size, the prompt's cache repeated; batch 0
    stands for the largest batch whose caches fit in `fit_gib` beside the weights."""
    import copy

    from transformers import DynamicCache

    model = load_model(which, student_dir, dtype, teacher)
    ids = torch.randint(100, 40000, (1, context), generator=torch.Generator().manual_seed(0))
    base = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=base, use_cache=True, logits_to_keep=1)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    per_sequence = cache_bytes(quantized_cache(model, (base, 1)) if which == "teacher-int4" else base) / 2**20
    result = {"cache_mib_per_sequence": per_sequence, "weights_mib": weights_mib}
    fitting = max(1, int((fit_gib * 1024 - weights_mib) // per_sequence))
    for batch in batches:
        if batch == 0:
            batch = result["largest_fitting"] = fitting
            name = "largest"
        elif batch > fitting:
            continue
        else:
            name = f"batch {batch}"
        if which == "teacher-int4":
            cache = quantized_cache(model, (base, batch))
        else:
            cache = copy.deepcopy(base)
            cache.batch_repeat_interleave(batch)

        def step(token, cache=cache):  # the same token each step: the cache grows as in decoding
            model(input_ids=token, past_key_values=cache, use_cache=True)
            return token

        result[name] = batch * timed_steps(step, torch.full((batch, 1), 1000), steps)[1]
        del cache
    return result


def op_table(lengths: list[int], dtype: str = "float32") -> list[dict]:
    import torch.nn.functional as F

    from linearize.methods.hybrid import Settings
    from linearize.ops import linear_attention_chunked, window_attention_chunked

    hybrid_default = Settings()

    def timed(fn, *inputs, repeat=3, **kwargs):
        fn(*inputs, **kwargs)
        start = time.perf_counter()
        for _ in range(repeat):
            fn(*inputs, **kwargs)
        return (time.perf_counter() - start) / repeat

    rows = []
    heads, kv_heads, dim, features = 9, 3, 64, 128
    for t in lengths:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, t, dim, generator=g)
        k, v = torch.randn(1, kv_heads, t, dim, generator=g), torch.randn(1, kv_heads, t, dim, generator=g)
        fq = torch.rand(1, heads, t, features, generator=g)
        fk = torch.rand(1, kv_heads, t, features, generator=g)
        gate = torch.full((1, kv_heads, t), -0.001)
        q, k, v, fq, fk, gate = (x.to(DTYPES[dtype]) for x in (q, k, v, fq, fk, gate))
        with torch.no_grad():
            sdpa = timed(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
            hybrid = timed(window_attention_chunked, q, k, v, 64, sink_tokens=4, fq=fq, fk=fk, log_gate=gate)
            ids = torch.randint(0, 49152, (1, t), generator=g)  # the default window and recall memory
            memory = timed(window_attention_chunked, q, k, v, hybrid_default.window_size, sink_tokens=4, fq=fq, fk=fk,
                           log_gate=gate, token_ids=ids, memory_buckets=hybrid_default.memory_buckets,
                           memory_ngram=hybrid_default.memory_ngram)
            linear = timed(linear_attention_chunked, fq, fk, v, None)
        rows.append({"tokens": t, "sdpa_ms": sdpa * 1e3, "hybrid_ms": hybrid * 1e3, "memory_ms": memory * 1e3,
                     "linear_ms": linear * 1e3})
    return rows


def copy_bandwidth_gb_s() -> float:
    a = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, written first: untouched pages read as zeros
    b = torch.zeros_like(a)
    b.copy_(a)
    start = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    seconds = (time.perf_counter() - start) / 5
    return 2 * a.numel() * 4 / seconds / 1e9  # read + write


def child(args) -> None:
    if args.child == "one":
        result = measure_one(args.which, args.context, args.steps, args.student, args.dtype,
                             compile_step=not args.no_compile, teacher=args.teacher)
    else:
        result = measure_batches(args.which, args.context, args.batches, args.steps, args.student, args.dtype,
                                 args.teacher, args.fit_gib)
    print(json.dumps(result))


def batch_table(args, teacher: str) -> list[str]:
    """Serving capacity: per context, decode throughput at each batch that fits `--fit-gib` and at the largest
    one, the cache per sequence and the largest batch in `--memory-gib`, for the student, the teacher and the
    teacher with an int4 KV cache."""
    import importlib.util

    if not args.batch_contexts:
        return []
    models = list(MODELS)
    lines = []
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        models.remove("teacher-int4")
        lines += ["(The teacher with a quantized KV cache is left out: `pip install optimum-quanto` for those rows.)",
                  ""]
    for context in args.batch_contexts:
        rows = {}
        for which in models:
            rows[which] = run_child("--child", "batches", "--which", which, "--context", str(context),
                                    "--steps", str(max(4, args.steps // 4)), "--student", args.student,
                                    "--dtype", args.dtype, "--teacher", teacher, "--fit-gib", str(args.fit_gib),
                                    "--batches", *map(str, args.batches), "0")
            print(which, context, "batches", rows[which], flush=True)
        largest = {which: int((args.memory_gib * 1024 - row["weights_mib"]) // row["cache_mib_per_sequence"])
                   for which, row in rows.items()}

        lines += [f"Batched decoding at {context:,} tokens of context (sequences x tokens / s; a batch whose caches "
                  f"exceed {args.fit_gib:g} GiB is not run), the largest batch in {args.fit_gib:g} GiB decoded, and "
                  f"the largest batch whose caches fit in {args.memory_gib:g} GiB beside the weights. teacher-int4: "
                  f"the teacher with transformers' QuantizedCache (quanto, int{KV_BITS}, groups of 64, the newest 128 "
                  "tokens in full precision):", "",
                  "| model | " + " | ".join(f"batch {b}" for b in args.batches)
                  + f" | largest in {args.fit_gib:g} GiB | cache MiB / sequence | largest batch in "
                  f"{args.memory_gib:g} GiB | x the teacher's |",
                  "|---|" + "---:|" * (len(args.batches) + 4)]
        for which, row in rows.items():
            cells = [f"{row[f'batch {b}']:.1f}" if f"batch {b}" in row else "-" for b in args.batches]
            lines.append(f"| {which} | " + " | ".join(cells)
                         + f" | {row['largest']:.1f} (batch {row['largest_fitting']:,}) | "
                         f"{row['cache_mib_per_sequence']:.1f} | {largest[which]:,} | "
                         f"{largest[which] / max(largest['teacher'], 1):.1f}x |")
        lines.append("")
    return lines


def run_child(*extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="runs/default")
    parser.add_argument("--teacher", default=None, help="the teacher to time (default: the embedded default); a "
                        "trained --student brings its own")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights and activations")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-contexts", type=int, nargs="*", default=[4096, 16384],
                        help="contexts of the batched-decoding table (none: no table)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--memory-gib", type=float, default=16.0, help="memory budget for the largest-batch column")
    parser.add_argument("--fit-gib", type=float, default=2.0, help="the budget whose largest batch is decoded "
                        "(and batches whose caches exceed it are not)")
    parser.add_argument("--op-lengths", type=int, nargs="*", default=[4096, 8192, 16384, 32768],
                        help="lengths of the op-level table (none: no table)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled steps (student and teacher)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", choices=["one", "batches"], help=argparse.SUPPRESS)
    parser.add_argument("--which", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from linearize.checkpoint import CONFIG_FILE
    from linearize.teacher import DEFAULT_TEACHER

    student_name = args.student if Path(args.student).exists() else "untrained hybrid"
    run_config = Path(args.student) / CONFIG_FILE
    if args.teacher is None and run_config.is_file():  # a run's student: the teacher it was trained from
        import yaml

        args.teacher = yaml.safe_load(run_config.read_text()).get("model")
    teacher = args.teacher or DEFAULT_TEACHER
    lines = [f"Machine: {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}, "
             f"batch 1 unless said; teacher: {teacher}; student: {student_name}.", ""]
    results = {}
    for context in args.contexts:
        for which in ("student", "teacher"):
            common = ["--which", which, "--context", str(context), "--steps", str(args.steps),
                      "--student", args.student, "--dtype", args.dtype, "--teacher", teacher] + [
                          "--no-compile"] * args.no_compile
            results[which, context] = run_child("--child", "one", *common)
            print(which, context, results[which, context], flush=True)
    bandwidth = copy_bandwidth_gb_s()
    student = load_model("student", args.student, args.dtype, teacher)
    weight_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    limit = bandwidth * 1e9 / weight_bytes
    stream = weight_stream_tok_s(student)
    del student
    lines += [
        "| context | student decode tok/s | teacher decode tok/s | decode speed-up | student prefill tok/s | "
        "teacher prefill tok/s | prefill speed-up | cache MiB student / teacher | peak RSS MiB student / teacher | "
        "student decode / bandwidth limit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    compiled, compiled_rows = not args.no_compile, []
    for context in args.contexts:
        s, t = results["student", context], results["teacher", context]
        if compiled:
            best = max(t["decode_tok_s"], t["static_eager_tok_s"], t["static_compiled_tok_s"])
            compiled_rows.append(
                f"| {context:,} | {s['decode_eager_rounds_tok_s']:.1f} | {s['decode_compiled_tok_s']:.1f} | "
                f"{t['decode_tok_s']:.1f} | {s['decode_compiled_tok_s'] / t['decode_tok_s']:.2f}x | "
                f"{t['static_eager_tok_s']:.1f} | {t['static_compiled_tok_s']:.1f} | "
                f"{s['decode_compiled_tok_s'] / best:.2f}x | {s['compile_s']:.0f} / {t['static_compile_s']:.0f} | "
                f"{s['peak_rss_compiled_mib']:.0f} |")
        lines.append(
            f"| {context:,} | {s['decode_tok_s']:.1f} | {t['decode_tok_s']:.1f} | "
            f"{s['decode_tok_s'] / t['decode_tok_s']:.2f}x | {s['prefill_tok_s']:.0f} | {t['prefill_tok_s']:.0f} | "
            f"{s['prefill_tok_s'] / t['prefill_tok_s']:.2f}x | {s['cache_mib']:.1f} / {t['cache_mib']:.1f} | "
            f"{s['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} | {s['decode_tok_s'] / limit:.0%} |"
        )
    if compiled:
        lines += ["", "The student's decoding step compiled (`model.compile_decoding()`: the whole step one "
                  "torch.compile graph, weights packed by inductor's freezing) against the teacher as above "
                  "(eager, its DynamicCache) and against the teacher at its own best: its cache copied into a "
                  "StaticCache (written in place), stepped eager and compiled the same way (torch.compile of its "
                  "forward, freezing). Each in the same process and from the same cache as above, three blocks of "
                  "steps of each kind alternating after the first compilation, medians; peak RSS of the student's "
                  "process after them:", "",
                  "| context | student eager tok/s | student compiled tok/s | teacher tok/s | compiled speed-up | "
                  "teacher static-cache tok/s | teacher static-cache compiled tok/s | speed-up over the teacher's "
                  "best | compile s student / teacher | peak RSS MiB compiled |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *compiled_rows]
    first, last = args.contexts[0], args.contexts[-1]
    flat = results["student", last]["decode_tok_s"] / results["student", first]["decode_tok_s"]
    lines += ["", f"Student decode at {last:,} is {flat:.0%} of its speed at {first:,}. Bandwidth limit: "
              f"{weight_bytes / 2**20:.0f} MiB of {args.dtype} weights per token at a measured {bandwidth:.1f} GB/s "
              f"copy bandwidth = {limit:.1f} tok/s. One single-token matmul per linear layer and nothing else "
              f"(this machine's GEMV floor for either model) runs at {stream:.1f} tok/s = {stream / limit:.0%} of "
              "that limit.", ""]

    lines += batch_table(args, teacher)
    lines += ["", "Ops alone (forward, one sequence; ms, speed-up over SDPA causal):", "",
              "| tokens | SDPA causal | hybrid window+sinks+linear | x SDPA | the same + recall memory | x SDPA "
              "| chunked linear attention | x SDPA |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"] if args.op_lengths else []
    for row in op_table(args.op_lengths, args.dtype):
        lines.append(f"| {row['tokens']:,} | {row['sdpa_ms']:.1f} | {row['hybrid_ms']:.1f} | "
                     f"{row['sdpa_ms'] / row['hybrid_ms']:.2f}x | {row['memory_ms']:.1f} | "
                     f"{row['sdpa_ms'] / row['memory_ms']:.2f}x | {row['linear_ms']:.1f} | "
                     f"{row['sdpa_ms'] / row['linear_ms']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    name = "decode.md" if args.dtype == "float32" else f"decode-{args.dtype}.md"
    output = Path(args.output) if args.output else (Path(args.student) / name if Path(args.student).is_dir()
                                                     else Path(name))
    output.write_text(text)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
