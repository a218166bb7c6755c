"""Many processes on this CPU: torchrun with the gloo backend, two ranks, against one process.

One tiny 4-layer Llama; stage 1 in 4 blocks of one layer (the ranks take two blocks each), stage 2 with a
global batch of 2 sequences (one per rank); the killed run with the defaults that follow the number of
processes instead. Each run is a whole `linearize run` in subprocesses, one thread per process, so the
numbers compare exactly as far as the arithmetic allows (tolerances below).
"""

from __future__ import annotations

import json
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
from safetensors.torch import load_file

from linearize.models import ADAPTER_FILE

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def settings(teacher: Path, out: Path, **changes) -> dict:
    run = {
        "model": str(teacher), "output_dir": str(out), "checkpoint_every": 1, "baselines": {},
        # float32 throughout: ranks must match one process to 1e-4, and bf16 MLP products differ with the batch
        "autocast": None,
        "attention": {"window_size": 8, "sink_tokens": 2, "memory_buckets": 16, "sparse_keys": 4},
        "data": {"seq_len": 48, "eval_seq_len": 48, "eval_blocks": 1, "long_context": 0, "copy_lengths": []},
        "evaluate": {"retrieval": [], "ablate": []},
        "transfer": {"tokens": 48 * 8, "epochs": 2, "lr": 0.05, "warmup_steps": 1, "layers_per_block": 1,
                     "store": "blocks"},
        "finetune": {"tokens": 48 * 8, "lr": 2e-3, "warmup_steps": 1, "batch_size": 2},
    }
    for key, value in changes.items():
        run[key] = {**run[key], **value} if isinstance(value, dict) else value
    return run


def launch(config: dict, ranks: int, tmp: Path, wait: bool = True):
    path = tmp / f"{Path(config['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = (TORCHRUN if ranks == 2 else [sys.executable]) + ["-m", "linearize", "run", "--config", str(path)]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    make_tiny_model("llama", initializer_range=0.2, num_hidden_layers=4).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(teacher, tmp_path_factory) -> dict[str, Path]:
    """The same run in one process, on two ranks with DDP, and on two ranks with FSDP2."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name, ranks, parallel in (("one", 1, "auto"), ("ddp", 2, "ddp"), ("fsdp", 2, "fsdp")):
        config = settings(teacher, tmp / name, finetune={"parallel": parallel})
        result = launch(config, ranks, tmp)
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = tmp / name
    return out


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / ADAPTER_FILE))


def test_stage1_blocks_spread_over_two_ranks_give_the_same_mixers_as_one_process(runs):
    one = load_file(str(runs["one"] / "stage1" / "mixers.safetensors"))
    two = load_file(str(runs["ddp"] / "stage1" / "mixers.safetensors"))
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    progress = json.loads((runs["ddp"] / "progress.json").read_text())
    assert progress["stage.transfer"]["processes"] == 2 and progress["stage.transfer"]["blocks"] == 4
    ranks = [json.loads((runs["ddp"] / "stage1" / "blocks" / f"block_{b:02d}" / "result.json").read_text())["rank"]
             for b in range(4)]
    # by estimated cost, the costliest first: the two blocks with a recall memory (layers 2 and 3, the upper half)
    # on different ranks, and each rank two blocks
    assert ranks[2] != ranks[3] and sorted(ranks) == [0, 0, 1, 1]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_stage2_on_two_ranks_matches_one_process_with_the_same_global_batch(runs, engine):
    """DDP (a whole model per rank) and FSDP2 (sharded) over 2 ranks x 1 sequence = 1 process x 2 sequences."""
    one, two = adapter(runs["one"]), adapter(runs[engine])
    assert one.keys() == two.keys() and any("lora" in k for k in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    curves = [json.loads((runs[r] / "report.json").read_text())["stages"]["finetune"]["loss_curve"]
              for r in ("one", engine)]
    for (step, loss), (step2, loss2) in zip(*curves):
        assert step == step2 and loss2 == pytest.approx(loss, rel=1e-5)
    report = json.loads((runs[engine] / "report.json").read_text())
    expected = json.loads((runs["one"] / "report.json").read_text())
    assert report["stages"]["finetune"]["tokens"] == expected["stages"]["finetune"]["tokens"]  # all ranks' tokens
    for row in ("teacher", "untrained", "transfer", "finetune"):  # evaluated on rank 0 (all ranks when sharded)
        for domain, entry in expected["eval"][row].items():
            assert report["eval"][row][domain]["perplexity"] == pytest.approx(entry["perplexity"], rel=1e-4)


def test_every_run_keeps_the_plans_time_estimate_beside_the_measured_seconds(runs):
    """report.json holds the plan step's estimate per stage (on this CPU, measured on the spot) next to what the
    stages took; plan.md shows it as a table. A 4-layer model's seconds are mostly fixed costs the estimate
    does not model, so only their presence and order of magnitude are checked here (bench/plan_time.py and
    docs/scale.md compare them on the default run)."""
    for run in ("one", "ddp", "fsdp"):
        report = json.loads((runs[run] / "report.json").read_text())
        estimate = report["plan"]["estimate_seconds"]
        assert set(estimate) == {"transfer", "finetune"} and "CPU" in report["plan"]["hardware"]
        for stage in ("transfer", "finetune"):
            measured = report["stages"][stage]["seconds"]
            assert 0 < estimate[stage] < 100 * max(measured, 0.1)
        assert "| in all |" in (runs[run] / "plan.md").read_text()


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_before_any_work(teacher, tmp_path):
    config = settings(teacher, tmp_path / "odd", finetune={"batch_size": 3})
    result = launch(config, 2, tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("finetune.batch_size is the global batch") == 1  # said once, by rank 0
    assert "multiple of 2" in result.stderr
    assert not (tmp_path / "odd" / "stage1").exists()


def test_a_rank_killed_mid_stage_resumes_to_the_same_result_even_on_another_number_of_ranks(teacher, runs, tmp_path):
    """SIGKILL one rank while blocks train: torchrun stops the other; the same command on one process
    (a different number of ranks) picks up every finished block and shard, and each block at its checkpoint.
    Started with every default that follows the number of processes (2 blocks, a global batch of 2): resumed on
    one process, it keeps them."""
    config = settings(teacher, tmp_path / "killed", transfer={"epochs": 6})
    del config["transfer"]["layers_per_block"], config["finetune"]["batch_size"]
    process = launch(config, 2, tmp_path, wait=False)
    state = tmp_path / "killed" / "stage1" / "blocks" / "block_01" / "state" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text())["progress"]["step"] >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before a rank could be killed: give stage 1 more steps"
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank, the other keeps running until torchrun stops it
    process.wait(timeout=120)
    assert process.returncode != 0
    assert not (tmp_path / "killed" / "model").exists()

    resumed = launch(config, 1, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert report["stages"]["transfer"]["blocks"] == 2 and report["config"]["finetune"]["batch_size"] == 2
    whole = settings(teacher, tmp_path / "whole", transfer={"epochs": 6, "layers_per_block": 2})
    uninterrupted = launch(whole, 1, tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    got, expected = adapter(tmp_path / "killed"), adapter(tmp_path / "whole")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sharded_loading_reads_each_ranks_rows_so_no_process_holds_the_whole_teacher(tmp_path):
    """FSDP2 on 2 ranks with a 0.7 GB teacher: each rank builds the student without weights and reads only its
    own rows of every tensor from the safetensors files. Each rank's resident memory grows by its half of
    the teacher and at most one tensor's worth besides, never by the whole teacher."""
    from safetensors import safe_open

    path = tmp_path / "teacher"
    make_tiny_model("llama", vocab_size=16384, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=16, head_dim=64).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        sizes = [handle.get_slice(n).get_shape() for n in handle.keys()]
    tensors = [torch.Size(s).numel() * 4 for s in sizes]
    whole = sum(tensors)
    assert whole > 600 << 20
    config = settings(path, tmp_path / "out", finetune={"parallel": "fsdp"})
    config_path = tmp_path / "sharded.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = TORCHRUN + [str(ROOT / "tests" / "sharded_load_worker.py"), str(config_path), str(tmp_path / "rss")]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rss.rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        grown = rank["peak"] - rank["before"]
        assert rank["local_bytes"] == pytest.approx(whole / 2, rel=0.02)  # its half of every tensor (+ adapter)
        assert grown <= whole / 2 + max(tensors) + (64 << 20), (grown >> 20, whole >> 20)
        assert grown < 0.75 * whole
