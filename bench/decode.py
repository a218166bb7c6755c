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
decode.md when present), and with `--json PATH` every number measured.

On a GPU (`--device cuda`; bench/gpu.py runs it so): the models and inputs live on it, every timing waits
for its work to finish, memory is the peak the GPU's allocator held, the bandwidth limit is the GPU's own
copy bandwidth, and the largest batch halves until its step fits when its activations do not (the batches
tried are kept). `--in-process` measures everything in this one process instead of one process per model
and context (a GPU's peak memory is reset for each; seconds of start-up saved per measurement; the CPU's
peak RSS is then the process's so far); `--compile-contexts` limits the compiled steps to some contexts.
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

from linearize.generation import cache_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(which: str, student_dir: str | None, dtype: str = "float32", teacher: str | None = None,
               device: str = "cpu"):
    """The teacher ("teacher", "teacher-int4"), or the student saved in `student_dir` (the untrained hybrid if
    there is none), on `device`."""
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
    return model.to(DTYPES[dtype]).to(device).eval()


def synchronize(device: torch.device | str) -> None:
    """Wait for a GPU's queued work, so that a clock read after it counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_ids(model, shape: tuple[int, ...], device) -> torch.Tensor:
    """Seeded random token ids of the model's vocabulary (the same ids on any device)."""
    high = min(40000, model.get_input_embeddings().num_embeddings)
    return torch.randint(min(100, high - 1), high, shape, generator=torch.Generator().manual_seed(0)).to(device)


@torch.no_grad()
def weight_stream_tok_s(model) -> float:
    """Tokens/s if a decoding step did nothing but one single-token matmul per linear layer (every weight
    read once, as a step must): the floor set by this machine's GEMV speed, for any model."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    device = linears[0].weight.device
    x = {m.in_features: torch.randn(1, m.in_features, dtype=m.weight.dtype, device=device) for m in linears}
    for m in linears:
        m(x[m.in_features])
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        for m in linears:
            m(x[m.in_features])
    synchronize(device)
    return 5 / (time.perf_counter() - start)


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
    synchronize(token.device)
    start = time.perf_counter()
    for _ in range(steps):
        token = step(token)
    synchronize(token.device)
    return token, steps / (time.perf_counter() - start)


@torch.no_grad()
def measure_one(which: str, context: int, steps: int, student_dir: str | None, dtype: str,
                compile_step: bool = False, teacher: str | None = None, device: str = "cpu") -> dict:
    """Prefill `context` random tokens, then `steps` greedy decode steps; in this process. `compile_step`:
    then three eager and three compiled blocks of `steps`, alternating, from the same cache (medians); for
    the teacher, the same from its cache copied into a StaticCache (`teacher_static`)."""
    from transformers import DynamicCache

    model = load_model(which, student_dir, dtype, teacher, device)
    ids = random_ids(model, (1, context), device)
    cache = quantized_cache(model) if which == "teacher-int4" else DynamicCache(config=model.config)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def greedy(token: torch.Tensor) -> tuple[torch.Tensor, float]:
        return timed_steps(lambda token: model(input_ids=token, past_key_values=cache, use_cache=True)
                           .logits[:, -1:].argmax(-1), token, steps)

    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    synchronize(device)
    prefill = time.perf_counter() - start
    token, decode_tok_s = greedy(out.logits[:, -1:].argmax(-1))
    result = {
        "prefill_tok_s": context / prefill,
        "decode_tok_s": decode_tok_s,
        "cache_mib": cache_bytes(cache) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cuda:
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
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
        if cuda:
            result["peak_cuda_compiled_mib"] = torch.cuda.max_memory_allocated() / 2**20
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
    device = token.device
    for index, layer in enumerate(dynamic.layers):
        cache.update(layer.keys, layer.values, index,
                     {"cache_position": torch.arange(layer.keys.shape[-2], device=device)})
    position = dynamic.get_seq_length()
    compiled = torch.compile(model.forward, dynamic=False)

    def greedy(forward, token: torch.Tensor) -> tuple[torch.Tensor, float]:
        def step(token):
            nonlocal position
            logits = forward(input_ids=token, past_key_values=cache, use_cache=True,
                             cache_position=torch.tensor([position], device=device)).logits
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
                    dtype: str, teacher: str | None = None, fit_gib: float = 2.0, device: str = "cpu") -> dict:
    """Decode throughput (sequences x steps / s) at each batch size, the prompt's cache repeated; batch 0
    stands for the largest batch whose caches fit in `fit_gib` beside the weights (on a GPU halved until its
    step fits: "largest_out_of_memory" lists the batches that did not)."""
    import copy

    from transformers import DynamicCache

    model = load_model(which, student_dir, dtype, teacher, device)
    ids = random_ids(model, (1, context), device)
    base = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=base, use_cache=True, logits_to_keep=1)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    per_sequence = cache_bytes(quantized_cache(model, (base, 1)) if which == "teacher-int4" else base) / 2**20
    result = {"cache_mib_per_sequence": per_sequence, "weights_mib": weights_mib}
    fitting = max(1, int((fit_gib * 1024 - weights_mib) // per_sequence))
    token_id = min(1000, model.get_input_embeddings().num_embeddings - 1)  # a tiny test vocabulary has fewer

    def throughput(batch: int) -> float:
        if which == "teacher-int4":
            cache = quantized_cache(model, (base, batch))
        else:
            cache = copy.deepcopy(base)
            cache.batch_repeat_interleave(batch)

        def step(token):  # the same token each step: the cache grows as in decoding
            model(input_ids=token, past_key_values=cache, use_cache=True)
            return token

        return batch * timed_steps(step, torch.full((batch, 1), token_id, device=device), steps)[1]

    for batch in batches:
        if batch == 0:
            batch, name = fitting, "largest"
        elif batch > fitting:
            continue
        else:
            name = f"batch {batch}"
        while name not in result:
            try:
                result[name] = throughput(batch)
            except torch.cuda.OutOfMemoryError:
                if name != "largest" or batch == 1:
                    raise
                # the caches fit the budget, the step's own activations did not
                result.setdefault("largest_out_of_memory", []).append(batch)
            if name not in result:  # outside the handler, which holds the failed step's tensors
                torch.cuda.empty_cache()
                batch //= 2
        if name == "largest":
            result["largest_fitting"] = batch
    return result


def op_table(lengths: list[int], dtype: str = "float32", device: str = "cpu") -> list[dict]:
    import torch.nn.functional as F

    from linearize.methods.hybrid import Settings
    from linearize.ops import linear_attention_chunked, window_attention_chunked

    hybrid_default = Settings()

    def timed(fn, *inputs, repeat=3, **kwargs):
        fn(*inputs, **kwargs)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeat):
            fn(*inputs, **kwargs)
        synchronize(device)
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
        q, k, v, fq, fk, gate = (x.to(device, DTYPES[dtype]) for x in (q, k, v, fq, fk, gate))
        with torch.no_grad():
            sdpa = timed(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
            hybrid = timed(window_attention_chunked, q, k, v, 64, sink_tokens=4, fq=fq, fk=fk, log_gate=gate)
            ids = torch.randint(0, 49152, (1, t), generator=g).to(device)  # the default window and recall memory
            memory = timed(window_attention_chunked, q, k, v, hybrid_default.window_size, sink_tokens=4, fq=fq, fk=fk,
                           log_gate=gate, token_ids=ids, memory_buckets=hybrid_default.memory_buckets,
                           memory_ngram=hybrid_default.memory_ngram)
            linear = timed(linear_attention_chunked, fq, fk, v, None)
        rows.append({"tokens": t, "sdpa_ms": sdpa * 1e3, "hybrid_ms": hybrid * 1e3, "memory_ms": memory * 1e3,
                     "linear_ms": linear * 1e3})
    return rows


def copy_bandwidth_gb_s(device: str = "cpu") -> float:
    a = torch.ones(64 * 2**20, dtype=torch.float32, device=device)  # 256 MiB, written first: untouched pages
    b = torch.zeros_like(a)  # read as zeros
    b.copy_(a)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    synchronize(device)
    seconds = (time.perf_counter() - start) / 5
    return 2 * a.numel() * 4 / seconds / 1e9  # read + write


def measure(args) -> dict:
    """One child's measurement (`--child`), in this process."""
    if args.child == "one":
        return measure_one(args.which, args.context, args.steps, args.student, args.dtype,
                           compile_step=not args.no_compile, teacher=args.teacher, device=args.device)
    return measure_batches(args.which, args.context, args.batches, args.steps, args.student, args.dtype,
                           args.teacher, args.fit_gib, args.device)


def single_sequence_table(args, teacher: str, measured: dict) -> list[str]:
    """Batch 1 at each of `--contexts`: prefill and decode, student against teacher (compiled at
    `--compile-contexts`), and decode against the bandwidth limit; the numbers go into `measured`."""
    cuda = torch.device(args.device).type == "cuda"
    results = {}
    for context in args.contexts:
        no_compile = args.no_compile or (args.compile_contexts is not None and context not in args.compile_contexts)
        for which in ("student", "teacher"):
            common = ["--which", which, "--context", str(context), "--steps", str(args.steps),
                      "--student", args.student, "--dtype", args.dtype, "--teacher", teacher,
                      "--device", args.device] + ["--no-compile"] * no_compile
            results[which, context] = run_child(args, "--child", "one", *common)
            print(which, context, results[which, context], flush=True)
    measured["contexts"] = {context: {"student": results["student", context], "teacher": results["teacher", context]}
                            for context in args.contexts}
    bandwidth = copy_bandwidth_gb_s(args.device)
    student = load_model("student", args.student, args.dtype, teacher, args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    limit = bandwidth * 1e9 / weight_bytes
    stream = weight_stream_tok_s(student)
    del student
    measured.update(copy_bandwidth_gb_s=bandwidth, weight_bytes=weight_bytes, bandwidth_limit_tok_s=limit,
                    weight_stream_tok_s=stream)
    peak, memory = ("peak_cuda_mib", "peak GPU memory") if cuda else ("peak_rss_mib", "peak RSS")
    lines = [
        "| context | student decode tok/s | teacher decode tok/s | decode speed-up | student prefill tok/s | "
        f"teacher prefill tok/s | prefill speed-up | cache MiB student / teacher | {memory} MiB student / teacher | "
        "student decode / bandwidth limit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    compiled_rows = []
    for context in args.contexts:
        s, t = results["student", context], results["teacher", context]
        if "decode_compiled_tok_s" in s:
            best = max(t["decode_tok_s"], t["static_eager_tok_s"], t["static_compiled_tok_s"])
            compiled_rows.append(
                f"| {context:,} | {s['decode_eager_rounds_tok_s']:.1f} | {s['decode_compiled_tok_s']:.1f} | "
                f"{t['decode_tok_s']:.1f} | {s['decode_compiled_tok_s'] / t['decode_tok_s']:.2f}x | "
                f"{t['static_eager_tok_s']:.1f} | {t['static_compiled_tok_s']:.1f} | "
                f"{s['decode_compiled_tok_s'] / best:.2f}x | {s['compile_s']:.0f} / {t['static_compile_s']:.0f} | "
                f"{s[peak.replace('_mib', '_compiled_mib')]:.0f} |")
        lines.append(
            f"| {context:,} | {s['decode_tok_s']:.1f} | {t['decode_tok_s']:.1f} | "
            f"{s['decode_tok_s'] / t['decode_tok_s']:.2f}x | {s['prefill_tok_s']:.0f} | {t['prefill_tok_s']:.0f} | "
            f"{s['prefill_tok_s'] / t['prefill_tok_s']:.2f}x | {s['cache_mib']:.1f} / {t['cache_mib']:.1f} | "
            f"{s[peak]:.0f} / {t[peak]:.0f} | {s['decode_tok_s'] / limit:.0%} |"
        )
    if compiled_rows:
        lines += ["", "The student's decoding step compiled (`model.compile_decoding()`: the whole step one "
                  "torch.compile graph, weights packed by inductor's freezing) against the teacher as above "
                  "(eager, its DynamicCache) and against the teacher at its own best: its cache copied into a "
                  "StaticCache (written in place), stepped eager and compiled the same way (torch.compile of its "
                  "forward, freezing). Each in the same process and from the same cache as above, three blocks of "
                  f"steps of each kind alternating after the first compilation, medians; {memory} of the student's "
                  "process after them:", "",
                  "| context | student eager tok/s | student compiled tok/s | teacher tok/s | compiled speed-up | "
                  "teacher static-cache tok/s | teacher static-cache compiled tok/s | speed-up over the teacher's "
                  f"best | compile s student / teacher | {memory} MiB compiled |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *compiled_rows]
    first, last = args.contexts[0], args.contexts[-1]
    flat = results["student", last]["decode_tok_s"] / results["student", first]["decode_tok_s"]
    lines += ["", f"Student decode at {last:,} is {flat:.0%} of its speed at {first:,}. Bandwidth limit: "
              f"{weight_bytes / 2**20:.0f} MiB of {args.dtype} weights per token at a measured {bandwidth:.1f} GB/s "
              f"copy bandwidth = {limit:.1f} tok/s. One single-token matmul per linear layer and nothing else "
              f"(this machine's GEMV floor for either model) runs at {stream:.1f} tok/s = {stream / limit:.0%} of "
              "that limit.", ""]
    return lines


def batch_table(args, teacher: str, measured: dict) -> list[str]:
    """Serving capacity: per context, decode throughput at each batch that fits `--fit-gib` and at the largest
    one, the cache per sequence and the largest batch in `--memory-gib`, for the student, the teacher and the
    teacher with an int4 KV cache; the numbers go into `measured`."""
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
            rows[which] = run_child(args, "--child", "batches", "--which", which, "--context", str(context),
                                    "--steps", str(max(4, args.steps // 4)), "--student", args.student,
                                    "--dtype", args.dtype, "--teacher", teacher, "--fit-gib", str(args.fit_gib),
                                    "--device", args.device, "--batches", *map(str, args.batches), "0")
            print(which, context, "batches", rows[which], flush=True)
        largest = {which: int((args.memory_gib * 1024 - row["weights_mib"]) // row["cache_mib_per_sequence"])
                   for which, row in rows.items()}
        measured.setdefault("batches", {})[context] = {
            which: {**row, f"largest_in_{args.memory_gib:g}_gib": largest[which]} for which, row in rows.items()}

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


def run_child(args, *extra: str) -> dict:
    """One measurement in a fresh process (its peak memory its own), or in this one with `--in-process`."""
    if args.in_process:
        import gc

        result = measure(parser().parse_args(extra))
        torch._dynamo.reset()  # the compiled graphs hold their models' weights
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result
    out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="runs/default")
    parser.add_argument("--teacher", default=None, help="the teacher to time (default: the embedded default); a "
                        "trained --student brings its own")
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 16384, 32768],
                        help="contexts of the batch-1 table (none: no table)")
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
    parser.add_argument("--compile-contexts", type=int, nargs="*", default=None,
                        help="the contexts whose steps are also compiled (default: every one of --contexts)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the models run")
    parser.add_argument("--in-process", action="store_true",
                        help="every measurement in this process (default: a fresh process for each)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--json", help="also write every number measured to this JSON file")
    parser.add_argument("--child", choices=["one", "batches"], help=argparse.SUPPRESS)
    parser.add_argument("--which", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    from linearize.checkpoint import CONFIG_FILE
    from linearize.teacher import DEFAULT_TEACHER

    student_name = args.student if Path(args.student).exists() else "untrained hybrid"
    run_config = Path(args.student) / CONFIG_FILE
    if args.teacher is None and run_config.is_file():  # a run's student: the teacher it was trained from
        import yaml

        args.teacher = yaml.safe_load(run_config.read_text()).get("model")
    teacher = args.teacher or DEFAULT_TEACHER
    cuda = torch.device(args.device).type == "cuda"
    machine = (f"{torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda})" if cuda
               else f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    lines = [f"Machine: {machine}, {args.dtype}, batch 1 unless said; teacher: {teacher}; student: {student_name}.",
             ""]
    measured = {"machine": machine, "device": args.device, "dtype": args.dtype, "teacher": teacher,
                "student": student_name}
    if args.contexts:
        lines += single_sequence_table(args, teacher, measured)
    lines += batch_table(args, teacher, measured)
    lines += ["", "Ops alone (forward, one sequence; ms, speed-up over SDPA causal):", "",
              "| tokens | SDPA causal | hybrid window+sinks+linear | x SDPA | the same + recall memory | x SDPA "
              "| chunked linear attention | x SDPA |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"] if args.op_lengths else []
    measured["ops"] = op_table(args.op_lengths, args.dtype, args.device)
    for row in measured["ops"]:
        lines.append(f"| {row['tokens']:,} | {row['sdpa_ms']:.1f} | {row['hybrid_ms']:.1f} | "
                     f"{row['sdpa_ms'] / row['hybrid_ms']:.2f}x | {row['memory_ms']:.1f} | "
                     f"{row['sdpa_ms'] / row['memory_ms']:.2f}x | {row['linear_ms']:.1f} | "
                     f"{row['sdpa_ms'] / row['linear_ms']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(measured, indent=1))
    text = "\n".join(lines) + "\n"
    print(text)
    name = "decode.md" if args.dtype == "float32" else f"decode-{args.dtype}.md"
    output = Path(args.output) if args.output else (Path(args.student) / name if Path(args.student).is_dir()
                                                     else Path(name))
    output.write_text(text)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
