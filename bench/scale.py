"""Scale on one machine: stage 1 and stage 2 on 1 and 2 processes, the streamed teacher's memory, the disk
each stage-1 store takes per token, and `linearize plan`'s predictions beside what was measured.

    python bench/scale.py                       # SmolLM2-135M, fp32, on this machine's CPU (about 15 minutes)
    python bench/scale.py --device cuda         # the same on a GPU (several processes need as many GPUs)

Every case runs in a fresh process (peak RSS is its own: `ru_maxrss`), through the recipe's own steps
(`linearize.pipeline.Recipe`): the stage-1 cases run prepare, plan, read data and attention transfer; the
stage-2 cases load the teacher, convert it and run stage 2 on DDP. Several processes are started with
torchrun (gloo on a CPU); each process gets `--threads` threads. Throughput is tokens processed (all ranks)
over the wall time of the stage; memory is the largest peak RSS of any rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def worker(args) -> None:
    """One case, in this process (one rank of it under torchrun): write its measurements as JSON."""
    import torch

    from linearize import distributed
    from linearize.api import load_config
    from linearize.pipeline import Recipe, count_parameters
    from linearize.plan import stage1_plan

    torch.set_num_threads(args.threads)
    config = load_config(None, args.overrides)
    device = distributed.device_of_rank(torch.device(config.device if config.device != "auto" else "cpu"))
    distributed.init(device)
    recipe = Recipe(config, device, log=lambda msg: None, fresh=True)
    recipe.prepare()
    recipe.plan()
    config = recipe.config  # its defaults that follow the number of processes resolved
    recipe.read_data()
    out: dict = {"rank": distributed.rank(), "world": distributed.world(), "threads": args.threads}
    estimate = (recipe.progress.get("plan.estimate") or {}).get("estimate_seconds", {})  # the plan's, this CPU
    out["estimate_seconds"] = estimate.get("transfer" if args.worker == "stage1" else "finetune")
    if args.worker == "floor":  # the process with its libraries and data, no weight loaded
        out.update(seconds=1.0, tokens=0)
    elif args.worker == "stage1":
        stage = recipe.stage1()
        started = time.perf_counter()
        stage.collect()
        out["collect_seconds"] = time.perf_counter() - started
        stored = [p for d in ("inputs", "activations") for p in (recipe.out / "stage1" / d).rglob("*.safetensors")]
        out["stored_bytes"] = sum(p.stat().st_size for p in stored)
        targets = recipe.out / "teacher_targets"
        out["targets_bytes"] = sum(p.stat().st_size for p in targets.glob("*.safetensors")) if targets.exists() else 0
        result = stage.run()
        out["seconds"] = time.perf_counter() - started
        out["tokens"] = result.tokens
        out["peak_teacher_weight_bytes"] = stage.weights.peak_bytes
        from linearize.models.modeling import decoder_layers
        from linearize.plan import model_shape

        shape = model_shape(recipe.text_config, config.method, config.attention, config.finetune.target_modules,
                            config.finetune.lora_r)
        plan = stage1_plan(shape, config, device.type)
        out["plan_memory_bytes"] = plan.memory[recipe.store]
        out["plan_disk_bytes"] = plan.disk[recipe.store]
        out["plan_targets_bytes"] = plan.targets_disk
        out["layers"] = len(decoder_layers(stage.model))
    else:
        from linearize.train import finetune

        recipe.load_teacher()
        from linearize.models import LinearizedForCausalLM

        model = LinearizedForCausalLM.from_teacher(recipe.teacher_model, config.method, config.attention)
        started = time.perf_counter()
        peft_model, result = finetune(model, recipe.data.train, config.finetune, recipe.out / "stage2",
                                      config.checkpoint_every, config.seed, recipe.targets, engine=recipe.engine)
        out["seconds"] = time.perf_counter() - started
        out["tokens"] = result.tokens
        out["trainable"] = count_parameters(peft_model)["trainable"]
        from linearize.plan import model_shape, stage2_plan

        shape = model_shape(recipe.text_config, config.method, config.attention, config.finetune.target_modules,
                            config.finetune.lora_r)
        per_process = config.finetune.batch_size // distributed.world()
        out["plan_memory_bytes"] = stage2_plan(shape, config, device.type, per_process_batch=per_process).ddp
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    path = Path(args.result).with_suffix(f".rank{distributed.rank()}.json")
    path.write_text(json.dumps(out))
    distributed.shutdown()


def case(name: str, kind: str, processes: int, threads: int, overrides: list[str], work: Path) -> dict:
    """Run one case in fresh processes; its ranks' measurements merged."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    result = work / f"{name}.json"
    for old in work.glob(f"{name}.rank*.json"):
        old.unlink()
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(threads),
               "--result", str(result), f"output_dir={out}", *overrides]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes)] + command[1:]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"case {name} failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(f"{name}.rank*.json"))]
    merged = dict(ranks[0])
    merged["seconds"] = max(r["seconds"] for r in ranks)
    merged["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ranks)
    merged["tokens_per_second"] = merged["tokens"] / merged["seconds"]
    merged["process_seconds"] = wall
    estimate = f"; the plan estimated {merged['estimate_seconds']:.1f} s" if merged.get("estimate_seconds") else ""
    print(f"  {name}: {merged['tokens']} tokens in {merged['seconds']:.1f} s = {merged['tokens_per_second']:.1f} "
          f"tokens/s; peak RSS {merged['peak_rss_bytes'] / MiB:.0f} MiB (whole process {wall:.0f} s){estimate}",
          flush=True)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["floor", "stage1", "stage2"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--transfer-tokens", type=int, default=16384)
    parser.add_argument("--finetune-tokens", type=int, default=4096)
    parser.add_argument("--work", default="runs/bench-scale")
    parser.add_argument("--cases", help="run only these cases (comma-separated), the others read from the last "
                        "results.json in --work")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [f"device={args.device}", "baselines={}", f"transfer.tokens={args.transfer_tokens}",
              "transfer.epochs=1", f"finetune.tokens={args.finetune_tokens}", "finetune.batch_size=2",
              *args.overrides]
    stage1 = common + ["transfer.store=blocks"]
    cores = os.cpu_count() or 2
    print(f"bench/scale.py: SmolLM2-135M, {args.device}, {cores} cores; stage 1 {args.transfer_tokens} tokens x 1 "
          f"epoch, stage 2 {args.finetune_tokens} tokens", flush=True)
    stage2 = common + ["transfer.enabled=false"]
    disk = {f"disk_{store}": ("stage1", 1, 2, common + [f"transfer.store={store}", "transfer.layers_per_block=6",
                                                       "finetune.distill_weight=0"])
            for store in ("layers", "blocks", "none")}
    cases = {  # name: (kind, processes, threads per process, settings)
        "s1_1x1": ("stage1", 1, 1, stage1 + ["transfer.layers_per_block=5"]),
        "s1_1x2": ("stage1", 1, 2, stage1 + ["transfer.layers_per_block=5"]),
        "s1_2x1": ("stage1", 2, 1, stage1 + ["transfer.layers_per_block=5"]),
        "floor": ("floor", 1, 2, stage1),
        "s1_stream4": ("stage1", 1, 2, stage1 + ["transfer.layers_per_block=4"]),
        "s1_whole": ("stage1", 1, 2, stage1),
        **disk,
        "s2_1x1": ("stage2", 1, 1, stage2),
        "s2_1x2": ("stage2", 1, 2, stage2),
        "s2_2x1": ("stage2", 2, 1, stage2),
    }
    saved = work / "results.json"
    results = json.loads(saved.read_text()) if args.cases and saved.is_file() else {}
    chosen = args.cases.split(",") if args.cases else list(cases)
    for name in chosen:
        results[name] = case(name, *cases[name], work)
    saved.write_text(json.dumps(results, indent=1))
    print(tables(results))


def tables(r: dict) -> str:
    tokens = {k: v["tokens_per_second"] for k, v in r.items() if v["tokens"]}
    lines = ["", "| stage | 1 process x 1 thread | 1 process x 2 threads | 2 processes x 1 thread | 2 processes / "
             "1 x 1 | 2 processes / 1 x 2 |", "|---|---:|---:|---:|---:|---:|"]
    for stage, key in (("stage 1 (tokens/s)", "s1"), ("stage 2 (tokens/s)", "s2")):
        one, two_threads, two = tokens[f"{key}_1x1"], tokens[f"{key}_1x2"], tokens[f"{key}_2x1"]
        lines.append(f"| {stage} | {one:.1f} | {two_threads:.1f} | {two:.1f} | {two / one:.2f}x | "
                     f"{two / two_threads:.2f}x |")
    timed = [k for k in ("s1_1x1", "s1_1x2", "s1_2x1", "s2_1x1", "s2_1x2", "s2_2x1")
             if r.get(k, {}).get("estimate_seconds")]
    if timed:
        lines += ["", "| case | measured s | plan's estimate s | estimate / measured |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {r[k]['seconds']:.1f} | {r[k]['estimate_seconds']:.1f} | "
                  f"{r[k]['estimate_seconds'] / r[k]['seconds']:.2f} |" for k in timed]
    lines += ["", "| stage 2, DDP | peak RSS per process | plan's estimate | plan / measured |", "|---|---:|---:|---:|"]
    for name, key in (("1 process (batch 2)", "s2_1x2"), ("2 processes (batch 1 each)", "s2_2x1")):
        entry = r[key]
        lines.append(f"| {name} | {entry['peak_rss_bytes'] / MiB:.0f} MiB | {entry['plan_memory_bytes'] / MiB:.0f} "
                     f"MiB | {entry['plan_memory_bytes'] / entry['peak_rss_bytes']:.2f} |")
    stream, whole = r["s1_stream4"], r["s1_whole"]
    lines += ["", "| stage 1 | peak RSS | plan's estimate | plan / measured | teacher weights resident at most |",
              "|---|---:|---:|---:|---:|"]
    for name, entry in (("teacher streamed, 4 layers per block", stream), ("teacher whole (one block)", whole)):
        lines.append(f"| {name} | {entry['peak_rss_bytes'] / MiB:.0f} MiB | {entry['plan_memory_bytes'] / MiB:.0f} "
                     f"MiB | {entry['plan_memory_bytes'] / entry['peak_rss_bytes']:.2f} | "
                     f"{entry['peak_teacher_weight_bytes'] / MiB:.0f} MiB |")
    floor = r["floor"]["peak_rss_bytes"]
    lines.append(f"streamed / whole peak RSS: {stream['peak_rss_bytes'] / whole['peak_rss_bytes']:.2f}; the same "
                 f"above the process's own {floor / MiB:.0f} MiB (libraries and data, no weights loaded): "
                 f"{(stream['peak_rss_bytes'] - floor) / (whole['peak_rss_bytes'] - floor):.2f}")
    lines += ["", "| store (6 layers per block) | stored per token | plan's estimate | plan / measured |",
              "|---|---:|---:|---:|"]
    for store in ("layers", "blocks", "none"):
        entry = r[f"disk_{store}"]
        measured, planned = entry["stored_bytes"] / entry["tokens"], entry["plan_disk_bytes"] / entry["tokens"]
        ratio = f"{planned / measured:.3f}" if measured else "-"
        lines.append(f"| {store} | {measured:,.0f} B | {planned:,.0f} B | {ratio} |")
    layers, blocks = r["disk_layers"]["stored_bytes"], r["disk_blocks"]["stored_bytes"]
    lines.append(f"blocks / layers: {blocks / layers:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
