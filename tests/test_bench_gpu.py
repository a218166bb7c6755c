"""bench/gpu.sh, the script a GPU runs: its dry run end to end on this CPU (every step at a tiny size), a step
stopped at its share of the time with its children, and the held-out table against the CPU reference's."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402


def test_the_dry_run_writes_each_steps_results_and_a_summary(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["sh", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--output", str(out), "--work",
                           str(tmp_path / "work")], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{name}.json" for name in gpu.STEPS]
                                                           + ["summary.json", "gpu.log"])  # 8: what a GPU returns
    steps = {name: json.loads((out / f"{name}.json").read_text()) for name in gpu.STEPS}
    for name, entry in steps.items():
        assert {"step", "status", "seconds", "share_s"} <= set(entry), name
        assert entry["status"] == ("skipped" if name in ("tests", "nccl") else "ok"), (name, entry.get("reason"))
    assert steps["tests"]["reason"] == "no CUDA: skipped"
    selected = steps["tests"]["results"]["selected"]  # every test marked cuda, selected by -m cuda
    assert len(selected) >= (17 if importlib.util.find_spec("fla") else 4)  # fla's 13 skip their module without it
    assert "tests/test_cuda.py::test_the_hybrid_ops_three_forms_agree_on_cuda[bf16]" in selected
    assert "no CUDA" in steps["nccl"]["reason"]

    decode = steps["decode"]["results"]
    assert set(decode["contexts"]) == {"64", "128"}
    for row in decode["contexts"].values():
        for model in ("student", "teacher"):
            assert row[model]["prefill_tok_s"] > 0 and row[model]["decode_tok_s"] > 0 and row[model]["cache_mib"] > 0
    assert [row["tokens"] for row in decode["ops"]] == [64] and "| 64 |" in decode["tables"]
    assert set(steps["decode-compiled"]["results"]["contexts"]) == {"64"}
    batches = steps["decode-batch"]["results"]["batches"]["64"]
    for model in ("student", "teacher"):
        assert batches[model]["largest_fitting"] >= 1 and batches[model]["largest"] > 0
        assert batches[model]["cache_mib_per_sequence"] > 0
    assert batches["largest_throughput_over_teachers"] > 0

    recipe = steps["recipe"]["results"]
    assert set(recipe["stages"]) == {"transfer", "finetune"}
    assert all(stage["tokens_per_second"] > 0 for stage in recipe["stages"].values())
    assert set(recipe["held_out"]) == {"teacher", "untrained", "transfer", "finetune"}
    assert all("ppl_ratio" in entry for entry in recipe["held_out"]["finetune"].values())
    assert recipe["stage1_over_teacher_forward"] > 0

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["steps"]) == ["setup", *gpu.STEPS] and summary["machine"]["gpus"] == []
    assert summary["total_seconds"] >= sum(entry["seconds"] for entry in summary["steps"].values()) - 1
    assert "| recipe | ok |" in done.stdout and (out / "gpu.log").read_text().count("=== ") == 1 + len(gpu.STEPS)


def test_a_command_past_its_share_is_stopped_with_its_children(tmp_path):
    run = gpu.Run(argparse.Namespace(dry_run=True, output=tmp_path / "out", work=tmp_path / "work"))
    run.deadline = time.monotonic() + 1
    alive = tmp_path / "alive"
    started = time.monotonic()
    with pytest.raises(gpu.Stopped) as stop:
        run.command(["sh", "-c", f"(sleep 2; touch {alive}) & echo measured 42; sleep 30"],
                    partial=lambda output: {"seen": "measured 42" in output})
    assert stop.value.status == "timed out" and stop.value.partial == {"seen": True}
    assert time.monotonic() - started < 5
    time.sleep(2.5)
    assert not alive.exists()  # the command's background child went with it
    run.deadline = time.monotonic() + 30
    with pytest.raises(gpu.Stopped) as stop:
        run.command(["sh", "-c", "echo the last words; exit 3"])
    assert stop.value.status == "failed" and stop.value.reason == "exit code 3: the last words"


def test_held_out_ratios_are_compared_with_the_cpu_references():
    reference = {"finetune": {"code": {"ppl_ratio": 1.09}, "prose": {"ppl_ratio": 1.26}},
                 "teacher": {"code": {"perplexity": 5.0}}}
    run = {"finetune": {"code": {"ppl_ratio": 1.10}, "prose": {"ppl_ratio": 1.20}},
           "teacher": {"code": {"perplexity": 5.1}}}
    compared = gpu.compare_with_reference(run, reference)
    assert set(compared["ratios"]) == {"finetune / code", "finetune / prose"}
    assert compared["ratios"]["finetune / code"]["difference"] == pytest.approx(1.10 / 1.09 - 1)
    assert compared["largest_difference"] == pytest.approx(1 - 1.20 / 1.26)
    assert not compared["within_2_percent"]
    assert gpu.compare_with_reference({"finetune": {"code": {"ppl_ratio": 1.10}}}, reference)["within_2_percent"]
    assert gpu.compare_with_reference(run, {})["largest_difference"] is None
