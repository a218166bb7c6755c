"""The whole recipe on a tiny random Llama saved to disk: run, report, save, reload, resume, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_byte_tokenizer, make_tiny_model

from linearize import LinearizeError, load
from linearize.methods import build_config
from linearize.models import ADAPTER_FILE
from linearize.pipeline import run
from linearize.train.loop import run_steps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    make_tiny_model("llama", initializer_range=0.2).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


def tiny_settings(teacher_dir: Path, output_dir: Path, **extra) -> dict:
    settings = {
        "model": str(teacher_dir),
        "output_dir": str(output_dir),
        "checkpoint_every": 2,
        # a sparse cache of 4 keys (the default's 128 would hold a 64-token block whole), in the heads placed
        "attention": {"window_size": 8, "sink_tokens": 2, "sparse_keys": 4},
        "baselines": {},
        "data": {"source": "default", "seq_len": 64, "eval_seq_len": 64, "eval_blocks": 2, "long_context": 256,
                 "copy_lengths": [16, 64]},
        "transfer": {"tokens": 64 * 4, "epochs": 2, "warmup_steps": 1, "lr": 0.05},
        "finetune": {"tokens": 64 * 3, "lr": 1e-3, "warmup_steps": 1},
        # the tiny teacher has 512 positions; a byte per token leaves room for passkey and quote prompts
        "evaluate": {"retrieval": ["passkey", "quote"], "retrieval_lengths": [512], "retrieval_depths": [0.25, 0.75],
                     "ablation_blocks": 1},
    }
    for key, value in extra.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return settings


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linearize.cli", *args], capture_output=True, text=True, cwd=ROOT, **kwargs
    )


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The command line called in this process (where the test is about the command, not a fresh process):
    its exit code and what it printed, as `cli` returns them."""
    from linearize.cli import main

    capsys.readouterr()
    code = main(list(args))
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, printed.out, printed.err)


@pytest.fixture(scope="module")
def finished_run(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    settings = tiny_settings(teacher_dir, out)
    settings["baselines"] = {"window+sinks": {"method": "window", "attention": {"window_size": 8, "sink_tokens": 2}}}
    report = run(build_config(settings), log=lambda msg: None)
    return out, report


def test_report_holds_every_row_and_stage(finished_run):
    out, report = finished_run
    assert set(report["eval"]) == {"teacher", "untrained", "transfer", "finetune"}
    for row in ("untrained", "transfer", "finetune"):
        for domain in ("code", "prose"):
            entry = report["eval"][row][domain]
            assert entry["tokens"] == 2 * 63 and 0 <= entry["agreement"] <= 1 and entry["perplexity"] > 1
    assert report["baselines"]["window+sinks"]["eval"]["finetune"]["code"]["perplexity"] > 1
    # the trained baseline's long-range and retrieval probes, not the untrained one's (its held-out ratios only)
    assert set(report["baselines"]["window+sinks"]["long_range"]) == {"finetune"}
    for entry in (report["long_range"]["hybrid"], *report["baselines"]["window+sinks"]["long_range"].values()):
        assert set(entry["buckets"]) == {"code", "prose"}
        assert set(entry["buckets"]["code"]) == {"[0, 64)", "[64, 256)"}
        assert set(entry["copy"]) == {"L=16", "L=64", "gain L=16", "gain L=64"}
        assert all(0 <= entry["copy"][f"L={n}"] <= 1 and math.isfinite(entry["copy"][f"gain L={n}"]) for n in (16, 64))
    transfer, finetune = report["stages"]["transfer"], report["stages"]["finetune"]
    assert transfer["distinct_tokens"] == 256 and transfer["tokens"] == 512 and transfer["steps"] == 8
    # LoRA r=8 on q, o (64 -> 64) and k, v (64 -> 32) in 2 layers, plus the mixers (finetune.train_mixers)
    lora = 2 * (2 * 8 * (64 + 64) + 2 * 8 * (64 + 32))
    assert finetune["trainable_parameters"] == lora + transfer["trainable_parameters"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["eval"] == json.loads(json.dumps(report["eval"]))
    text = (out / "report.md").read_text()
    for row in ("teacher", "untrained swap", "after stage 1", "after stage 2", "window+sinks (baseline)", "Long range"):
        assert row in text
    # the tiny hybrid: window 8 + sinks 2 (+ a recalled key per n-gram order where it has a memory, + the sparse
    # cache's 4 keys and its pending group of 8) against the baseline's 8 + 2
    keys, attention = report["model"]["softmax_keys"], report["config"]["attention"]
    assert keys == attention["window_size"] + attention["sink_tokens"] + (
        len(attention["memory_ngram"]) if attention["memory_buckets"] else 0) + 4 + 8
    assert report["placement"]["heads"] == attention["sparse_heads"] and attention["sparse_heads"]
    assert f"at most: {keys} (baselines: window+sinks 10)." in text
    # where the time went: every step that ran, the training steps taking at least their stages' own time
    steps = report["seconds_by_step"]
    assert {"transfer", "convert", "finetune", "evaluate_student", "baselines"} <= set(steps)
    # the steps as measured; a stage's summary rounds its own time to 0.1 s (stage_summary)
    assert steps["transfer"] >= transfer["seconds"] - 0.05 and steps["finetune"] >= finetune["seconds"] - 0.05
    assert sum(steps.values()) <= report["seconds_total"] and "stage 2 and its evaluation" in text


def test_report_holds_retrieval_for_every_model_and_the_branch_ablation(finished_run):
    out, report = finished_run
    rows = [report["retrieval"]["teacher"], report["retrieval"]["hybrid"],
            *report["baselines"]["window+sinks"]["retrieval"].values()]
    assert len(rows) == 3
    for records in rows:
        assert [(r["task"], r["variant"], r["length"], r["depth"]) for r in records] == [
            (task, variant, 512, depth) for task, variant in (("passkey", "repeated/a"), ("passkey", "prose/b"),
                                                              ("quote", "text")) for depth in (0.25, 0.75)]
        assert all(isinstance(r["correct"], bool) and isinstance(r["generated"], str) for r in records)
    ablation = report["ablation"]
    assert list(ablation) == ["all", "without linear", "without memory", "without sparse", "without sinks"]
    for entry in ablation.values():
        assert set(entry["ratios"]) == set(report["eval"]["teacher"]) and all(r > 0 for r in entry["ratios"].values())
    # a branch switched off is asked only the tasks the whole student answered at least once
    solved = {r["task"] for r in report["retrieval"]["hybrid"] if r["correct"]}
    assert set(ablation["all"]["retrieval"]) == {"passkey", "quote"}
    branches = ("linear", "memory", "sparse", "sinks")
    assert all(set(ablation[f"without {b}"]["retrieval"]) == solved for b in branches)
    # switching a branch off changes the student's held-out ratio (the tiny student uses all four)
    assert all(ablation[f"without {b}"]["ratios"] != ablation["all"]["ratios"] for b in branches)
    text = (out / "report.md").read_text()
    assert "## Retrieval" in text and "| window+sinks (baseline), after the same stage 2 |" in text
    assert "## Branch ablation" in text and "| without memory |" in text
    assert (out / "retrieval.png").is_file()


def test_the_run_ends_with_a_summary_table_read_in_ten_seconds(finished_run):
    """Teacher, untrained, stage 1, student and the baseline: held-out ratios, passkey answers and decode state
    per sequence, the wall time, where the report and the model are; within 30 lines."""
    import re

    from linearize.report import summary

    out, report = finished_run
    lines = summary(report, out).splitlines()
    assert len(lines) <= 30 and f"{report['seconds_total']:.0f} s" in lines[0]
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in lines) if len(cells) > 2}
    domains = list(report["eval"]["teacher"])
    assert list(rows) == ["model", "teacher", "untrained", "stage 1", "student (hybrid)", "window+sinks"]
    assert rows["model"] == [*domains, "passkey", "state MiB"]
    baseline = report["baselines"]["window+sinks"]
    models = {"teacher": (None, report["retrieval"]["teacher"]),
              "untrained": (report["eval"]["untrained"], None), "stage 1": (report["eval"]["transfer"], None),
              "student (hybrid)": (report["eval"]["finetune"], report["retrieval"]["hybrid"]),
              "window+sinks": (baseline["eval"]["finetune"], baseline["retrieval"]["finetune"])}
    student_state = f"{max(r['state_bytes'] for r in report['retrieval']['hybrid']) / 2**20:.1f}"
    for name, (held_out, records) in models.items():
        ratios = [f"{held_out[d]['ppl_ratio']:.3f}" for d in domains] if held_out else ["1"] * len(domains)
        passkey = [r["correct"] for r in records or [] if r["task"] == "passkey"]
        assert rows[name][: len(domains) + 1] == [*ratios, f"{sum(passkey)}/{len(passkey)}" if records else "-"]
        # the untrained and stage-1 student have the trained student's architecture, so its state
        state = f"{max(r['state_bytes'] for r in records) / 2**20:.1f}" if records else student_state
        assert rows[name][-1] == state, name
    assert lines[-2:] == [f"report: {out / 'report.html'}", f"model:  {out / 'model'}"]
    assert (out / "report.html").is_file() and (out / "model").is_dir()


# appended to a copy of report.html: once the page has loaded, record what the browser shows
PROBE = """<script>window.addEventListener("load", () => {
  const sizes = [...document.images].map(i => i.naturalWidth + "x" + i.naturalHeight);
  document.body.setAttribute("data-images", sizes.join(","));
  document.body.setAttribute("data-tables", document.querySelectorAll("table").length);
});</script>"""


def test_report_html_embeds_its_plots_and_renders_in_a_browser(finished_run, tmp_path):
    import re
    import shutil

    out, report = finished_run
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and 'src="losses.png"' not in html  # self-contained
    assert len(report["layer_errors"]) == 2 and len(report["samples"]) == 3
    assert all(isinstance(s["teacher"], str) and isinstance(s["student"], str) for s in report["samples"])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("headless Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("headless Chromium is not installed here (apt-get install chromium); CI installs it")
    page = tmp_path / "page.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=180,
    ).stdout
    sizes = re.search(r'data-images="([^"]*)"', dom).group(1).split(",")
    assert len(sizes) >= 3
    assert all(int(w) > 100 and int(h) > 100 for w, h in (size.split("x") for size in sizes)), sizes
    assert int(re.search(r'data-tables="(\d+)"', dom).group(1)) >= 3
    assert "Held-out recovery" in dom and "Sample generations" in dom


def test_report_and_compare_commands(finished_run, tmp_path, capsys):
    import shutil

    out, _ = finished_run
    other = tmp_path / "other-run"
    other.mkdir()
    shutil.copy(out / "report.json", other / "report.json")
    (other / "report.html").unlink(missing_ok=True)
    result = cli_here(capsys, "report", str(other))
    assert result.returncode == 0, result.stderr
    assert (other / "report.html").is_file() and (other / "report.md").is_file()
    result = cli_here(capsys, "compare", str(out), str(other), "--output", str(tmp_path / "compared"))
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "compared" / "compare.md").read_text()
    assert table.count(f"| {out.name} | hybrid |") == table.count("| other-run | hybrid |") >= 3
    assert "data:image/png;base64," in (tmp_path / "compared" / "compare.html").read_text()
    missing = cli_here(capsys, "report", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "no report.json" in missing.stderr


def test_attention_transfer_lowers_its_loss(finished_run):
    curve = [loss for _, loss in finished_run[1]["stages"]["transfer"]["loss_curve"]]
    assert sum(curve[-2:]) < 0.8 * sum(curve[:2])


def test_saved_student_reloads_to_identical_logits_in_a_fresh_process(finished_run):
    out, _ = finished_run
    model, _ = load(out / "model")
    x = torch.arange(0, 120).view(2, 60) % 250
    with torch.no_grad():
        here = model(x).logits
    code = (
        "import sys, torch; from safetensors.torch import save_file; from linearize import load;"
        "m, _ = load(sys.argv[1]); x = torch.arange(0, 120).view(2, 60) % 250;"
        "save_file({'logits': m(x).logits.detach()}, sys.argv[2])"
    )
    target = out / "logits.safetensors"
    subprocess.run([sys.executable, "-c", code, str(out / "model"), str(target)], check=True, cwd=ROOT)
    from safetensors.torch import load_file

    assert torch.equal(here, load_file(str(target))["logits"])


def test_both_stages_train_only_new_parameters_and_leave_the_teachers_in_memory_bit_identical(tmp_path):
    """The student shares the teacher's tensors by reference: after stage 1 and stage 2 every one of them
    is bit-identical to a copy taken before, while the mixers and the LoRA adapter did change."""
    from linearize import linearize
    from linearize.config import FinetuneConfig, TransferConfig
    from linearize.train import attention_transfer, finetune

    teacher = make_tiny_model("llama", initializer_range=0.2)
    tensors = dict(teacher.named_parameters())  # the very tensors the student shares
    before = {name: tensor.detach().clone() for name, tensor in tensors.items()}
    model = linearize(teacher, "hybrid", {"window_size": 8, "sink_tokens": 2})
    mixers_before = {name: p.detach().clone() for name, p in model.mixer_state_dict().items()}
    blocks = torch.randint(0, 250, (4, 64), generator=torch.Generator().manual_seed(0))
    attention_transfer(model, blocks, TransferConfig(tokens=256, epochs=1, lr=0.05), tmp_path / "s1", 10)
    model.requires_grad_(False)
    peft_model, _ = finetune(model, blocks, FinetuneConfig(tokens=128, lr=1e-2), tmp_path / "s2", 10)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, before[name]), name
    changed = [not torch.equal(p, mixers_before[n]) for n, p in model.mixer_state_dict().items()]
    assert all(changed)
    lora = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora)  # lora_B starts at zero


def test_export_writes_a_standalone_model_with_the_same_logits(finished_run, tmp_path, capsys):
    out, _ = finished_run
    result = cli_here(capsys, "export", str(out / "model"), str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    merged, _ = load(tmp_path / "merged")
    student, _ = load(out / "model")
    x = torch.arange(0, 64).view(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, student(x).logits, rtol=1e-5, atol=1e-5)


def test_eval_cli_on_a_run_directory_prints_student_and_teacher_json(finished_run, tmp_path, capsys):
    out, _ = finished_run
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "src" / "linearize" / "pipeline.py").read_text())
    # the first 4 of its hundreds of 128-token blocks: every number checked below is there in 4 as in all
    result = cli_here(capsys, "eval", str(out), "--data", str(text), "--teacher", "--seq-len", "128",
                      "--max-blocks", "4")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])["perplexity"]
    assert set(printed) == {"student", "teacher", "layers"}
    assert printed["student"]["tokens"] == printed["teacher"]["tokens"] == 4 * 127
    assert 0 <= printed["student"]["agreement"] <= 1
    assert printed["student"]["kl"] > 0  # an 8-token window over 128 tokens differs from the teacher
    assert sorted(printed["layers"]) == ["0", "1"]
    assert all(e["mse"] > 0 and -1 <= e["cosine"] <= 1 for e in printed["layers"].values())
    assert "| student |" in result.stderr and "| layer | attention-output MSE |" in result.stderr


def test_eval_cli_retrieval_and_ablation_side_by_side(finished_run, capsys):
    out, _ = finished_run
    result = cli_here(capsys, "eval", str(out), "--retrieval", "--retrieval-tasks", "passkey,quote", "--lengths",
                      "512", "--depths", "0.5", "--ablate", "--ablation-blocks", "1", "--seq-len", "64",
                      "--long-context", "256")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    accuracy = printed["retrieval"]["accuracy"]
    assert list(accuracy) == ["student", "teacher", "window+sinks (untrained)"]
    assert all(set(a) == {"passkey", "quote"} and set(a["passkey"]) == {"512"} for a in accuracy.values())
    assert list(printed["ablation"]) == ["all", "without linear", "without memory", "without sparse", "without sinks"]
    assert printed["ablation"]["all"]["retrieval"] == accuracy["student"]
    assert "| model | passkey 512 | quote 512 |" in result.stderr
    assert "| student | code ratio | prose ratio |" in result.stderr
    by_variant = printed["retrieval"]["accuracy_by_variant"]["student"]
    assert set(by_variant) == {"passkey repeated/a", "passkey repeated/b", "passkey prose/a", "passkey prose/b",
                               "quote text"}
    # lengths beyond the teacher's positions (512): the student's alone, the teacher not asked there
    result = cli_here(capsys, "eval", str(out), "--retrieval", "--retrieval-tasks", "passkey", "--lengths",
                      "512,1024", "--depths", "0.5", "--variants", "repeated/a", "--long-context", "256")
    assert result.returncode == 0, result.stderr
    accuracy = json.loads(result.stdout.strip().splitlines()[-1])["retrieval"]["accuracy"]
    assert set(accuracy["student"]["passkey"]) == {"512", "1024"} and set(accuracy["teacher"]["passkey"]) == {"512"}
    assert "the teacher has 512 positions" in result.stderr
    result = cli_here(capsys, "eval", str(out), "--retrieval", "--variants", "prose/c")
    assert result.returncode == 2 and "retrieval variants ['prose/c']" in result.stderr


def test_generate_cli_generates(finished_run, capsys):
    from linearize.cli import main

    out, _ = finished_run
    command = ["generate", str(out / "model"), "--prompt", "def main(", "--max-new-tokens", "8"]
    assert main(command) == 0, capsys.readouterr().err
    eager = capsys.readouterr().out
    assert eager.strip() != ""
    assert main([*command, "--compile"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == eager  # greedy: the compiled step decodes the same tokens


def test_chat_streams_replies_with_the_chat_template_and_the_conversation_so_far(finished_run, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    out, _ = finished_run
    no_template = cli("chat", str(out / "model"), input="hi\n")
    assert no_template.returncode != 0 and "no chat template" in no_template.stderr
    model_dir = tmp_path / "model"
    shutil.copytree(out / "model", model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    tokenizer.save_pretrained(model_dir)
    result = cli("chat", str(model_dir), "--max-new-tokens", "6", input="hello\nagain\n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model> ") == 2 and result.stdout.count("you> ") == 3


def test_a_killed_run_resumes_to_the_same_result(teacher_dir, tmp_path, capsys):
    from linearize.cli import main

    # what resumes here is training: of the evaluation, the held-out blocks only (the summary's table)
    settings = tiny_settings(teacher_dir, tmp_path / "once", transfer={"tokens": 64 * 8, "epochs": 3},
                             checkpoint_every=1, data={"long_context": 0, "copy_lengths": []},
                             evaluate={"retrieval": [], "ablate": []})
    run(build_config(settings), log=lambda msg: None)

    killed = tmp_path / "killed"
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump({**settings, "output_dir": str(killed)}))
    process = subprocess.Popen([sys.executable, "-m", "linearize.cli", "run", "--config", str(config_file)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "stage1" / "blocks" / "block_00" / "state" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["progress"]["step"] >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed; give it more steps"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists()
    step_at_kill = json.loads(state.read_text())["progress"]["step"]
    assert 3 <= step_at_kill < 24

    result = cli("run", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    # the last screen is the summary table, not JSON; --json prints the report (here: the run, resumed once more)
    assert result.stdout.splitlines()[2].startswith("model ") and len(result.stdout.splitlines()) <= 30
    capsys.readouterr()
    assert main(["run", "--config", str(config_file), "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out) == json.loads((killed / "report.json").read_text())
    from safetensors.torch import load_file

    resumed = load_file(str(killed / "model" / ADAPTER_FILE))
    uninterrupted = load_file(str(tmp_path / "once" / "model" / ADAPTER_FILE))
    assert resumed.keys() == uninterrupted.keys() and any(".mixer." in key for key in resumed)
    assert any("lora" in key for key in resumed)
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


def kept_results_computed(monkeypatch, cache: Path) -> list[str]:
    """Results kept across runs go to `cache`; the returned list gets the kind of each one computed (not read
    back), in order."""
    from linearize.teacher.results import TeacherResults

    monkeypatch.setenv("LINEARIZE_CACHE", str(cache))
    computed = []
    get = TeacherResults.get

    def counted(self, kind, inputs, compute, settings=None):
        return get(self, kind, inputs, lambda: computed.append(kind) or compute(), settings)

    monkeypatch.setattr(TeacherResults, "get", counted)
    return computed


def test_a_second_run_of_the_same_teacher_reads_its_results_back_and_reports_the_same(teacher_dir, tmp_path,
                                                                                        monkeypatch):
    """The teacher's held-out scores, long-range profiles, retrieval answers and samples, computed
    by one run and kept; the next run of the same teacher on the same inputs computes none of them and reports
    the very same numbers."""
    computed = kept_results_computed(monkeypatch, tmp_path / "cache")
    off = {"enabled": False}  # the untrained student: its agreement, ratios and ablation read the teacher's
    reports = []
    for name in ("first", "second"):
        report = run(build_config(tiny_settings(teacher_dir, tmp_path / name, transfer=off, finetune=off)),
                     log=lambda msg: None)
        reports.append({k: v for k, v in json.loads(json.dumps(report)).items()
                        if k not in ("config", "seconds_total", "seconds_by_step", "plan")})  # measured each time
        if name == "first":
            # (the ablation's teacher NLL is read from the held-out pass's per-block sums)
            assert sorted(computed) == sorted(["held-out"] * 4 + ["long-range", "retrieval", "samples"])
    assert len(computed) == 7  # none by the second run
    assert reports[0] == reports[1] and reports[0]["retrieval"]["teacher"] and reports[0]["samples"]


def test_a_baseline_trained_once_is_read_back_by_a_run_that_changes_only_the_student(teacher_dir, tmp_path,
                                                                                   monkeypatch):
    """window + sinks after stage 2, with its held-out ratios, probes and retrieval: kept by the first run; a
    second run with another student (its window) on the same teacher, data and stage 2 trains no baseline and
    reports the same numbers for it; a changed stage 2 trains it again."""
    computed = kept_results_computed(monkeypatch, tmp_path / "cache")
    baselines = {"window+sinks": {"method": "window", "attention": {"window_size": 8, "sink_tokens": 2}}}
    reports = {}
    for name, extra in (("first", {}), ("other-student", {"attention": {"window_size": 6}}),
                        ("other-stage-2", {"finetune": {"lr": 2e-3}})):
        settings = tiny_settings(teacher_dir, tmp_path / name, baselines=baselines, transfer={"enabled": False},
                                 evaluate={"ablate": [], "retrieval": ["passkey"], "retrieval_depths": [0.5]},
                                 **extra)
        reports[name] = json.loads(json.dumps(run(build_config(settings), log=lambda msg: None)))
    assert computed.count("baseline-window-sinks") == 2  # the first run's and the changed stage 2's
    assert not (tmp_path / "other-student" / "baselines").exists()  # read back: nothing trained
    assert (tmp_path / "other-stage-2" / "baselines" / "window-sinks").is_dir()
    first, again = (reports[n]["baselines"]["window+sinks"] for n in ("first", "other-student"))
    assert first == again and first["finetune"]["steps"] > 0 and first["retrieval"]["finetune"]
    assert reports["other-student"]["eval"]["finetune"] != reports["first"]["eval"]["finetune"]  # its own student
    assert reports["other-stage-2"]["baselines"]["window+sinks"]["eval"] != first["eval"]


def test_rerun_with_another_config_in_the_same_dir_is_refused(finished_run, teacher_dir):
    out, _ = finished_run
    with pytest.raises(LinearizeError, match=r"different config \(seed, baselines\): pass --fresh"):
        run(build_config(tiny_settings(teacher_dir, out, seed=1)), log=lambda msg: None)


def test_a_run_saved_before_a_section_existed_resumes_and_measures_only_what_is_new(teacher_dir, tmp_path):
    """A finished run whose saved config predates the `evaluate` section: run again, it keeps every result and
    trained weight, and adds the retrieval rows (the baseline's too) and the ablation."""
    off = {"retrieval": [], "ablate": []}
    settings = tiny_settings(teacher_dir, tmp_path, evaluate=off, baselines={
        "window+sinks": {"method": "window", "attention": {"window_size": 8, "sink_tokens": 2}}})
    before = run(build_config(settings), log=lambda msg: None)
    assert "retrieval" not in before and "ablation" not in before
    saved = yaml.safe_load((tmp_path / "linearize.yaml").read_text())
    del saved["evaluate"]
    (tmp_path / "linearize.yaml").write_text(yaml.safe_dump(saved))
    adapter = (tmp_path / "model" / ADAPTER_FILE).read_bytes()
    after = run(build_config(tiny_settings(teacher_dir, tmp_path, baselines=settings["baselines"])),
                log=lambda msg: None)
    before = json.loads(json.dumps(before))  # as saved: tuples become lists
    assert after["eval"] == before["eval"] and after["stages"] == before["stages"]
    assert after["baselines"]["window+sinks"]["eval"] == before["baselines"]["window+sinks"]["eval"]
    assert set(after["baselines"]["window+sinks"]["retrieval"]) == {"finetune"}
    assert len(after["retrieval"]["hybrid"]) == 6 and "without memory" in after["ablation"]  # 2 x 2 passkeys, 2 quotes
    assert (tmp_path / "model" / ADAPTER_FILE).read_bytes() == adapter


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))

    def step_fn(step):
        loss = (param * (float("nan") if step == 3 else 1.0)).sum()
        loss.backward()
        return {"loss": loss.item(), "tokens": 1}

    with pytest.raises(LinearizeError, match="loss is nan at step 4.*Lower the learning rate"):
        run_steps(name="test", params={"p": param}, step_fn=step_fn, total_steps=6, lr=0.1, min_lr_ratio=0.1,
                  warmup_steps=0, state_dir=tmp_path / "state", checkpoint_every=1)
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert saved["progress"]["step"] == 3


def test_missing_or_corrupt_checkpoint_is_a_clear_error(finished_run, tmp_path):
    out, _ = finished_run
    with pytest.raises(LinearizeError, match="not a linearized model directory"):
        load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in (out / "model").iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / ADAPTER_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(LinearizeError, match="corrupt"):
        load(broken)


def test_retrieval_lengths_beyond_the_teachers_positions_are_refused_before_any_work(teacher_dir, tmp_path):
    settings = tiny_settings(teacher_dir, tmp_path / "run", evaluate={"retrieval_lengths": [1024]})
    with pytest.raises(LinearizeError, match=r"retrieval length 1024 \(evaluate.retrieval_lengths\) is beyond the "
                                             r"model's maximum position embeddings \(512\)"):
        run(build_config(settings), log=lambda msg: None)
    assert not (tmp_path / "run" / "stage1").exists()
    # with no retrieval tasks, the lengths are not the model's business
    off = tiny_settings(teacher_dir, tmp_path / "off", evaluate={"retrieval": [], "retrieval_lengths": [1024]},
                        transfer={"enabled": False}, finetune={"enabled": False})
    assert "retrieval" not in run(build_config(off), log=lambda msg: None)
