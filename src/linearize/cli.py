"""The `linearize` command.

    linearize run [--config FILE|NAME] [--fresh] [--json] [key.sub=value ...]   (ends with a summary table)
    linearize eval MODEL_DIR [--data FILE] [--tasks T1,T2|PATH] [--long-range] [--retrieval] [--ablate] [--teacher]
    linearize generate MODEL_DIR --prompt TEXT [--max-new-tokens 64] [--compile]   (streams to stdout)
    linearize export MODEL_DIR OUT_DIR [--format fla]
    linearize chat MODEL_DIR [--compile]        (interactive, streaming, with the chat template)
    linearize report OUTPUT_DIR                 (regenerate report.md / report.html)
    linearize compare OUTPUT_DIR OUTPUT_DIR ... [--output DIR]
    linearize config [--config FILE|NAME] [key.sub=value ...]   (print the resolved config)
    linearize plan MODEL [--gpu KIND] [--devices N] [--per-node N] [--memory GIB] [--disk GIB] [key.sub=value ...]
                                                (memory, disk, the fastest layout and its hours; no weights)
    linearize methods                           (the methods, their stages and attention keys)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

from linearize.allocator import keep_freed_memory
from linearize.errors import LinearizeError


def shipped_configs() -> dict[str, Path]:
    root = resources.files("linearize") / "configs"
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def resolve_config_path(value: str | None) -> Path | None:
    """A file path, or the name of a config shipped with the package (e.g. `liger`)."""
    if value is None or Path(value).is_file():
        return Path(value) if value else None
    shipped = shipped_configs()
    if value in shipped:
        return shipped[value]
    raise LinearizeError(f"config '{value}' is neither a file nor a shipped config ({', '.join(sorted(shipped))})")


def cmd_run(args: argparse.Namespace) -> None:
    import linearize.distributed as distributed
    from linearize.api import load_config
    from linearize.pipeline import run
    from linearize.report import summary

    try:
        config = load_config(resolve_config_path(args.config), args.overrides)
    except LinearizeError as err:  # every process of a torchrun run reads the same settings
        raise LinearizeError(str(err), every_rank=True) from err
    try:
        report = run(config, fresh=args.fresh, log=lambda msg: print(f"[linearize] {msg}", file=sys.stderr))
        if distributed.is_main():
            print(json.dumps(report) if args.json else summary(report, Path(config.output_dir)))
    finally:
        distributed.shutdown()


def cmd_plan(args: argparse.Namespace) -> None:
    """What a run needs for a model, from its config alone, and the fastest layout on the hardware described."""
    from linearize.api import load_config
    from linearize.checkpoint import free_disk
    from linearize.methods import get_method
    from linearize.plan import (
        Plan,
        choose_store,
        count_costs,
        described_hardware,
        disk_budget,
        format_plan,
        format_suggestion,
        model_shape,
        stage1_plan,
        stage2_plan,
        suggest,
    )
    from linearize.teacher import load_teacher_config

    config = load_config(resolve_config_path(args.config), [*args.overrides, f"model={args.model}"])
    devices = args.devices if args.devices is not None else (args.per_node or 1)
    machine = described_hardware(args.gpu, devices, args.per_node, args.memory, args.disk, free_disk(config.output_dir),
                       config.dtype, args.tflops, args.bandwidth)
    text_config = load_teacher_config(args.model)
    shape = model_shape(text_config, config.method, config.attention, config.finetune.target_modules,
                        config.finetune.lora_r)
    kind = "cpu" if machine.kind == "cpu" else "cuda"
    stage1 = stage1_plan(shape, config, kind) if config.transfer.enabled else None
    if stage1 is not None and config.transfer.disk_budget is not None:
        stage1.budget = disk_budget(config)
        stage1.store = choose_store(stage1, config.transfer.store, stage1.budget)
    stage2 = stage2_plan(shape, config, kind) if config.finetune.enabled else None
    transfers = config.transfer.enabled and "transfer" in get_method(config.method).stages
    suggestion = suggest(shape, count_costs(text_config, config, machine.devices), config, machine, transfers)
    print(format_plan(Plan(shape, config.dtype, stage1, stage2, kind)))
    print()
    print(format_suggestion(suggestion, machine))


def cmd_config(args: argparse.Namespace) -> None:
    import yaml

    from linearize.api import load_config

    print(yaml.safe_dump(load_config(resolve_config_path(args.config), args.overrides).to_dict(), sort_keys=False))


def task_specs(tasks: str, score: str | None):
    from linearize.harness import task_specs as specs

    return specs(tasks, None if score is None else (["loglikelihood", "generate"] if score == "both" else [score]))


def cmd_eval(args: argparse.Namespace) -> None:
    """Whatever was asked for, student (and teacher) side by side: one JSON line, then tables. Every setting
    and task file is checked before a model loads."""
    from linearize.api import find_model_dir, load
    from linearize.config import parse_overrides
    from linearize.teacher import load_teacher

    if not (args.data or args.tasks or args.long_range or args.retrieval or args.ablate):
        raise LinearizeError("say what to evaluate: --data FILE, --tasks T1,T2|PATH, --long-range, --retrieval "
                             "and/or --ablate")
    specs = task_specs(args.tasks, args.score) if args.tasks else []
    retrieval = retrieval_settings(args, find_model_dir(args.model_dir)) if args.retrieval else None
    model, tokenizer = load(args.model_dir, device=args.device, attention=parse_overrides(args.attention))
    teacher = None
    if args.teacher or args.long_range or args.retrieval or args.ablate:
        if not model.config.teacher:
            raise LinearizeError(f"'{args.model_dir}' names no teacher (config.json 'teacher'): drop --teacher")
        teacher, _ = load_teacher(model.config.teacher, dtype=next(model.parameters()).dtype)
        teacher.to(next(model.parameters()).device)
    result: dict = {}
    if args.data:
        result["perplexity"] = perplexity_on_file(model, teacher, tokenizer, args)
    if args.long_range:
        result["long_range"] = long_range(model, teacher, tokenizer, args)
    if specs:
        from linearize.harness import run_tasks

        kwargs = {"batch_size": args.batch_size, "limit": args.limit, "include_path": args.include}
        result["tasks"] = {"student": run_tasks(model, tokenizer, specs, **kwargs)}
        if teacher is not None:
            result["tasks"]["teacher"] = run_tasks(teacher, tokenizer, specs, **kwargs)
    prompts, records = None, None
    if retrieval is not None:
        prompts = retrieval_prompts(tokenizer, retrieval, args)
        from linearize.retrieval import run_retrieval

        records = run_retrieval(model, tokenizer, prompts, "retrieval student")
    if args.ablate:
        result["ablation"] = ablation(model, teacher, tokenizer, prompts, records, args)
    if retrieval is not None:
        result["retrieval"] = retrieval_side_by_side(model, teacher, tokenizer, prompts, records,
                                                     retrieval["max_positions"])
    print(json.dumps(result))
    print(eval_tables(result), file=sys.stderr)


def retrieval_settings(args: argparse.Namespace, directory: Path) -> dict:
    """--retrieval-tasks, --lengths, --depths, --variants checked; lengths beyond the teacher's position
    embeddings are the student's alone (`max_positions`: the teacher is not asked there)."""
    from linearize.models import LinearizedConfig
    from linearize.retrieval import VARIANTS, check_settings

    settings = {"tasks": _items(args.retrieval_tasks), "lengths": [int(x) for x in _items(args.lengths)],
                "depths": [float(x) for x in _items(args.depths)],
                "variants": _items(args.variants) if args.variants else list(VARIANTS)}
    check_settings(settings["tasks"], settings["lengths"], settings["depths"], variants=settings["variants"])
    text_config = LinearizedConfig.from_pretrained(directory).text_config
    settings["max_positions"] = getattr(text_config, "max_position_embeddings", None)
    if args.samples < 1:
        raise LinearizeError(f"--samples must be >= 1, got {args.samples}")
    return settings


def _items(text: str) -> list[str]:
    try:
        return [item.strip() for item in text.split(",") if item.strip()]
    except AttributeError as err:
        raise LinearizeError(f"expected a comma-separated list, got {text!r}") from err


def retrieval_prompts(tokenizer, settings: dict, args: argparse.Namespace):
    from linearize.data import build_blocks
    from linearize.probes import prose_documents, quote_documents
    from linearize.retrieval import build_prompts

    documents, prose = [], []
    if "quote" in settings["tasks"] or any(v.startswith("prose") for v in settings["variants"]):
        longest = max(settings["lengths"])
        per_document = min(longest, args.long_context)
        data = build_blocks(tokenizer, "default", 1024, 0, 0, long_tokens=per_document,
                            long_documents_per_domain=-(-longest // per_document))
        documents, prose = quote_documents(data), prose_documents(data)
    return build_prompts(tokenizer, settings["tasks"], settings["lengths"], settings["depths"], args.samples,
                         documents=documents, variants=settings["variants"], prose=prose)


def retrieval_side_by_side(model, teacher, tokenizer, prompts, records, max_positions: int | None = None) -> dict:
    """Retrieval answers of the student, the teacher (within its `max_positions`: it is not asked beyond) and
    the untrained window + sinks baseline (the teacher converted last: the conversion reuses its modules);
    accuracy per task, and per task and variant."""
    from linearize.config import WINDOW_SINKS_BASELINE
    from linearize.models import LinearizedForCausalLM
    from linearize.retrieval import accuracy, run_retrieval

    within = [p for p in prompts if max_positions is None or p.length <= max_positions]
    answers = {"student": records, "teacher": run_retrieval(teacher, tokenizer, within, "retrieval teacher")}
    # the baseline reads its sinks from as far as the student does (the student's trained block length)
    attention = {**WINDOW_SINKS_BASELINE["attention"], "sink_distance": model.config.attention.get("sink_distance")}
    window = LinearizedForCausalLM.from_teacher(teacher, WINDOW_SINKS_BASELINE["method"], attention)
    answers["window+sinks (untrained)"] = run_retrieval(window, tokenizer, prompts, "retrieval window+sinks")
    return {"accuracy": {name: accuracy(r) for name, r in answers.items()},
            "accuracy_by_variant": {name: accuracy(r, by_variant=True) for name, r in answers.items()},
            "answers": answers, **({"teacher_positions": max_positions} if len(within) < len(prompts) else {})}


def ablation(model, teacher, tokenizer, prompts, records, args: argparse.Namespace) -> dict:
    """Held-out ratios (--data, else the default corpus's held-out blocks) and retrieval accuracy with each
    branch switched off (all the model has, unless --ablate names them)."""
    from linearize.data import build_blocks, file_blocks
    from linearize.layers.attention import BRANCHES
    from linearize.probes import ablate, mean_nll, of_tasks, present_branches
    from linearize.retrieval import run_retrieval

    if args.data:
        blocks = {"data": file_blocks(tokenizer, args.data, args.seq_len, max_blocks=args.ablation_blocks)}
    else:
        data = build_blocks(tokenizer, "default", args.seq_len, 0, args.ablation_blocks * args.seq_len,
                            eval_seq_len=args.seq_len)
        blocks = {d: b for d, b in data.eval.items() if len(b)}
    present = present_branches(model)  # in the order a run's evaluate.ablate names them
    branches = [b for b in BRANCHES if b in present] if args.ablate == "all" else _items(args.ablate)

    def answer(m, label, tasks):
        return run_retrieval(m, tokenizer, of_tasks(prompts, tasks), f"retrieval {label}")

    return ablate(model, branches, blocks, mean_nll(teacher, blocks, "teacher"),
                  answer if prompts is not None else None, records)


def perplexity_on_file(model, teacher, tokenizer, args) -> dict:
    """Perplexity; with the teacher also agreement, KL(teacher || student) per token and the per-layer
    attention-output error (MSE, cosine) of the converted layers."""
    from linearize.data import file_blocks
    from linearize.evaluate import layer_errors, score, score_with_teacher, summarize

    blocks = file_blocks(tokenizer, args.data, args.seq_len, max_blocks=args.max_blocks)
    if teacher is None:
        return {"student": summarize(score(model, blocks, desc="student"))}
    student, reference, kl = score_with_teacher(model, teacher, blocks, desc="student and teacher")
    summary = {**summarize(student, reference), "kl": kl}
    return {"student": summary, "teacher": summarize(reference), "layers": layer_errors(model, blocks)}


def long_range(model, teacher, tokenizer, args) -> dict:
    """Position buckets on held-out long documents of the default corpus, and the copy test."""
    from linearize.data import build_blocks
    from linearize.evaluate import bucket_ratios, copy_sequences, copy_test, position_profile

    data = build_blocks(tokenizer, "default", 1024, 0, 0, long_tokens=args.long_context,
                        long_documents_per_domain=args.long_documents)
    buckets = {
        domain: bucket_ratios(position_profile(model, docs, f"student ({domain})"),
                              position_profile(teacher, docs, f"teacher ({domain})"))
        for domain, docs in data.long.items()
    }
    sequences = copy_sequences(model.config.vocab_size)
    return {"buckets": buckets, "documents": data.long_documents,
            "copy": {"student": copy_test(model, sequences), "teacher": copy_test(teacher, sequences)}}


def eval_tables(result: dict) -> str:
    """Markdown tables of an eval result, for people (the JSON line is for programs)."""
    from linearize.report import ablation_table, accuracy_table

    lines = []
    if "perplexity" in result:
        lines += ["| model | perplexity | ratio | agreement | KL to teacher |", "|---|---:|---:|---:|---:|"]
        for name, entry in result["perplexity"].items():
            if name == "layers":
                continue
            lines.append(f"| {name} | {entry['perplexity']:.3f} | {entry.get('ppl_ratio', 1):.3f} | "
                         f"{entry.get('agreement', 1):.3f} | {entry.get('kl', 0):.4f} |")
        lines.append("")
        layers = result["perplexity"].get("layers")
        if layers:
            lines += ["| layer | attention-output MSE | cosine |", "|---:|---:|---:|"]
            lines += [f"| {i} | {e['mse']:.3g} | {e['cosine']:.4f} |" for i, e in layers.items()]
            lines.append("")
    if "long_range" in result:
        for domain, buckets in result["long_range"]["buckets"].items():
            lines += [f"| {domain} | " + " | ".join(buckets) + " |", "|---|" + "---:|" * len(buckets),
                      "| ratio to teacher | " + " | ".join(f"{v:.3f}" for v in buckets.values()) + " |", ""]
        copy = result["long_range"]["copy"]  # top-1 accuracy "L=..." and copy gain in nats "gain L=..."
        lines += ["| copy test | " + " | ".join(copy["student"]) + " |", "|---|" + "---:|" * len(copy["student"])]
        lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in accs.values()) + " |" for name, accs in copy.items()]
        lines.append("")
    if "tasks" in result:
        names = list(result["tasks"])
        lines += ["| task | scored by | metric | " + " | ".join(names) + " |", "|---|---|---|" + "---:|" * len(names)]
        for task, metrics in result["tasks"]["student"].items():
            scored_by = metrics.get("scored_by", "")
            for metric, value in metrics.items():
                if metric == "scored_by":
                    continue
                others = [result["tasks"][n].get(task, {}).get(metric, float("nan")) for n in names[1:]]
                lines.append(f"| {task} | {scored_by} | {metric} | {value:.4f} | "
                             + " | ".join(f"{o:.4f}" for o in others) + " |")
        lines.append("")
    if "retrieval" in result:
        lines += [*accuracy_table(result["retrieval"]["accuracy"]), ""]
        lines += [*accuracy_table(result["retrieval"]["accuracy_by_variant"]), ""]
        if "teacher_positions" in result["retrieval"]:
            lines += [f"(the teacher has {result['retrieval']['teacher_positions']} positions: it is not asked at "
                      "longer lengths, \"–\")", ""]
    if "ablation" in result:
        lines += ablation_table(result["ablation"])
    return "\n".join(lines)


COMPILE_HELP = ("compile the whole decoding step into one graph (torch.compile: about a minute before the first "
                "generated token for a 135M model on 2 CPU cores, faster steps after)")


def compile_if_asked(model, enable: bool) -> None:
    if enable:
        print("--compile: the first generated token waits for torch.compile (about a minute for a 135M model on 2 "
              "CPU cores); the steps after it are faster", file=sys.stderr, flush=True)
    model.compile_decoding(enable)


def cmd_generate(args: argparse.Namespace) -> None:
    from linearize.api import load
    from linearize.generation import generate_text

    model, tokenizer = load(args.model_dir, device=args.device)
    compile_if_asked(model, args.compile)
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed,
                         raw=args.raw, stream=not args.no_stream)
    if args.no_stream:
        print(text)


def cmd_methods(args: argparse.Namespace) -> None:
    import dataclasses

    from linearize.methods import METHODS

    for name, method in METHODS.items():
        print(f"{name}: {method.summary}")
        keys = ", ".join(f"{f.name}" for f in dataclasses.fields(method.Settings))
        print(f"    stages: {', '.join(method.stages)}; attention keys: {keys}")


def cmd_chat(args: argparse.Namespace) -> None:
    """Interactive chat in the terminal: the chat template, the whole conversation as context, replies
    streamed as they are generated. An empty line or Ctrl-D ends it."""
    from linearize.api import load
    from linearize.generation import continue_text

    model, tokenizer = load(args.model_dir, device=args.device)
    compile_if_asked(model, args.compile)
    if not tokenizer.chat_template:
        raise LinearizeError(f"the tokenizer of '{args.model_dir}' has no chat template: use `linearize generate`")
    messages: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        print("model> ", end="", flush=True)
        reply = continue_text(model, tokenizer, text, args.max_new_tokens, args.temperature, stream=True)
        messages.append({"role": "assistant", "content": reply})


def cmd_report(args: argparse.Namespace) -> None:
    from linearize.report import load_report, render

    out = Path(args.output_dir)
    render(load_report(out), out)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'}", file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> None:
    from linearize.report import compare

    destination = compare([Path(o) for o in args.output_dirs], Path(args.output))
    print(f"wrote {destination / 'compare.md'} and {destination / 'compare.html'}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    from linearize.api import export

    export(args.model_dir, args.out_dir, format=args.format)
    what = "flash-linear-attention's GLA model" if args.format == "fla" else "full weights"
    print(f"exported {what} to {args.out_dir}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="linearize", description="Linearize a pretrained softmax-attention LLM.")
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="convert, train, evaluate, save and report (the whole recipe)")
    run.add_argument("--config", help="YAML file or shipped config name (default: the built-in defaults)")
    run.add_argument("--fresh", action="store_true", help="discard a previous run in output_dir instead of resuming")
    run.add_argument("--json", action="store_true",
                     help="print the whole report (report.json) to stdout instead of the summary table")
    run.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. transfer.tokens=8192")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="the memory, disk, layout and hours a run needs, from the model's config "
                          "alone")
    plan.add_argument("model", help="a config.json, a model directory, a .gguf file, a hub id or the default")
    plan.add_argument("--config", help="YAML file or shipped config name whose settings to plan")
    plan.add_argument("--gpu", help="the device kind: h100 (default), h200, a100-40, a100-80, l40s, mi300x, or cpu "
                      "(this machine, measured now)")
    plan.add_argument("--devices", type=int, help="devices (processes) the run gets (default: --per-node, else 1)")
    plan.add_argument("--per-node", type=int, help="devices per node (default: --devices, at most 8)")
    plan.add_argument("--memory", type=float, help="GiB of memory per device (default: the kind's)")
    plan.add_argument("--disk", type=float, help="GiB of disk free where the run writes (default: what output_dir's "
                      "file system has)")
    plan.add_argument("--tflops", type=float, help="peak TFLOP/s per device at the run's dtype (another device)")
    plan.add_argument("--bandwidth", type=float, help="memory bandwidth per device in GB/s (another device)")
    plan.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. transfer.tokens=20000000")
    plan.set_defaults(func=cmd_plan)

    methods = sub.add_parser("methods", help="list the methods, their stages and their attention keys")
    methods.set_defaults(func=cmd_methods)

    config = sub.add_parser("config", help="print the resolved config")
    config.add_argument("--config")
    config.add_argument("overrides", nargs="*")
    config.set_defaults(func=cmd_config)

    ev = sub.add_parser("eval", help="evaluate a saved model (a run directory or a model directory)")
    ev.add_argument("model_dir")
    ev.add_argument("--data", help="perplexity on a .txt / .jsonl file or a directory of .txt files")
    ev.add_argument("--tasks", help="lm-evaluation-harness tasks: names, comma-separated, or a task YAML file or a "
                    "directory of them with their data files beside them (needs linearize[eval])")
    ev.add_argument("--score", choices=["loglikelihood", "generate", "both"],
                    help="score local multiple-choice tasks by log-likelihood, by generated answers (exact match), or "
                    "both (default: each task as written)")
    ev.add_argument("--retrieval", action="store_true",
                    help="generation-based retrieval (passkey, multi-key and multi-value needles, quotes from real "
                    "text): student, teacher and untrained window + sinks side by side")
    ev.add_argument("--retrieval-tasks", default="passkey,multikey,multivalue,quote")
    ev.add_argument("--lengths", default="1024,2048,4096,8192",
                    help="retrieval prompt lengths in tokens (beyond the teacher's positions: the student's alone)")
    ev.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="where the needle sits, fractions of the context")
    ev.add_argument("--samples", type=int, default=1, help="retrieval prompts per task, length and depth")
    ev.add_argument("--variants", default=None,
                    help="retrieval fillers and phrasings, filler/phrasing, comma-separated (reported apart; default: "
                         "all)")
    ev.add_argument("--ablate", nargs="?", const="all",
                    help="switch off each branch of the student in turn (all it has, or the ones named: linear, "
                    "memory, sparse, sinks): held-out ratios, and retrieval with --retrieval")
    ev.add_argument("--ablation-blocks", type=int, default=2, help="held-out blocks per domain for --ablate")
    ev.add_argument("--long-range", action="store_true",
                    help="ratio by position on long held-out documents, and the copy test (with the teacher)")
    ev.add_argument("--teacher", action="store_true", help="also evaluate the teacher, side by side")
    ev.add_argument("--seq-len", type=int, default=1024)
    ev.add_argument("--max-blocks", type=int, default=None)
    ev.add_argument("--long-context", type=int, default=4096)
    ev.add_argument("--long-documents", type=int, default=3, help="long documents per domain (ratios pooled)")
    ev.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    ev.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many examples per task")
    ev.add_argument("--include", help="lm-eval: a directory of extra task YAML files")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--attention", action="append", default=[], metavar="KEY=VALUE",
                    help="an attention setting that needs no training, on the saved student (repeatable), e.g. "
                         "sparse_keys=64: a sparse cache of exact keys beyond the window, as LoLA adds one")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="generate text with a saved model")
    gen.add_argument("model_dir")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--no-stream", action="store_true", help="print the whole text at the end instead of streaming")
    gen.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive streaming chat with a saved model (its chat template)")
    chat.add_argument("model_dir")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--device", default="auto")
    chat.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    chat.set_defaults(func=cmd_chat)

    rep = sub.add_parser("report", help="regenerate OUTPUT_DIR/report.md and report.html from report.json")
    rep.add_argument("output_dir")
    rep.set_defaults(func=cmd_report)

    cmp = sub.add_parser("compare", help="several runs side by side: compare.md and compare.html")
    cmp.add_argument("output_dirs", nargs="+")
    cmp.add_argument("--output", default="runs/compare", help="where compare.md / compare.html go")
    cmp.set_defaults(func=cmd_compare)

    exp = sub.add_parser("export", help="write a standalone merged model directory")
    exp.add_argument("model_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--format", choices=["linearize", "fla"], default="linearize",
                     help="fla: flash-linear-attention's GLAForCausalLM (XATL GLA students, for its GPU kernels)")
    exp.set_defaults(func=cmd_export)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    keep_freed_memory()
    try:
        args.func(args)
    except LinearizeError as err:
        if not err.every_rank or os.environ.get("RANK", "0") == "0":  # under torchrun, said once
            print(f"linearize: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linearize: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
