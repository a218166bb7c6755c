"""Every documented "off" value and every method runs the whole recipe to a rendered report, on a tiny model.

Each case is one `linearize.run` with a tiny random Llama and a few steps per stage; a case fails if any
step raises, or if report.md / report.html / report.json are missing or lack what the run measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_byte_tokenizer, make_tiny_model

from linearize.errors import LinearizeError
from linearize.methods import build_config
from linearize.pipeline import run


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher")
    make_tiny_model("llama", initializer_range=0.2).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    paragraphs = [f"Paragraph {i}: the quick brown fox number {i} jumps over {i % 7} lazy dogs.\n" * 8
                  for i in range(60)]
    txt = root / "notes.txt"
    txt.write_text("\n\n".join(paragraphs))
    jsonl = root / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    return {"txt": txt, "jsonl": jsonl}


def settings(teacher: Path, out: Path, **changes) -> dict:
    run_settings = {
        "model": str(teacher), "output_dir": str(out), "checkpoint_every": 4,
        "attention": {"window_size": 8, "sink_tokens": 2},
        "baselines": {"window+sinks": {"method": "window", "attention": {"window_size": 8, "sink_tokens": 2}}},
        "data": {"seq_len": 32, "eval_seq_len": 32, "eval_blocks": 1, "long_context": 128, "long_documents": 1,
                 "copy_lengths": [8]},
        "transfer": {"tokens": 64, "epochs": 1, "warmup_steps": 1},
        "finetune": {"tokens": 64, "warmup_steps": 1},
        "evaluate": {"retrieval": ["passkey"], "retrieval_lengths": [512], "retrieval_depths": [0.5],
                     "ablation_blocks": 1},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(run_settings.get(key), dict) and key != "baselines":
            run_settings[key] = {**run_settings[key], **value}
        else:
            run_settings[key] = value
    return run_settings


def run_case(teacher: Path, tmp_path: Path, **changes) -> dict:
    out = tmp_path / "run"
    report = run(build_config(settings(teacher, out, **changes)), log=lambda msg: None)
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "<table" in html and "teacher" in html
    assert json.loads((out / "report.json").read_text())["method"] == report["method"]
    return report


CASES = {
    "no_long_context": {"data": {"long_context": 0}},
    "no_copy_test": {"data": {"copy_lengths": []}},
    "no_long_range_at_all": {"data": {"long_context": 0, "copy_lengths": []}},
    "no_baselines": {"baselines": {}},
    "no_stage_1": {"transfer": {"enabled": False}},
    "no_stage_2": {"finetune": {"enabled": False}},
    "no_stage_at_all": {"transfer": {"enabled": False}, "finetune": {"enabled": False}},
    "no_distillation": {"finetune": {"distill_weight": 0}},
    "no_recall_memory": {"attention": {"window_size": 8, "sink_tokens": 2, "memory_buckets": 0}},
    "no_held_out_blocks": {"data": {"eval_blocks": 0}},
    "no_stored_targets": {"finetune": {"distill_top_k": 0}},
    "no_decay": {"attention": {"window_size": 8, "sink_tokens": 2, "decay": None}},
    "sinks_at_their_true_distance": {"attention": {"window_size": 8, "sink_tokens": 2, "sink_distance": None}},
    "a_softmax_layer_kept": {"attention": {"window_size": 8, "sink_tokens": 2, "softmax_layers": [0]}},
    "blocks_of_one_layer": {"transfer": {"layers_per_block": 1, "store": "blocks"}},
    "no_retrieval": {"evaluate": {"retrieval": []}},
    "no_ablation": {"evaluate": {"ablate": []}},
    "ablation_without_retrieval": {"evaluate": {"retrieval": [], "ablate": ["memory"]}},
    "no_samples": {"evaluate": {"samples": False}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_off_value_runs_to_a_rendered_report(teacher, tmp_path, case):
    report = run_case(teacher, tmp_path, **CASES[case])
    changes = CASES[case]
    if changes.get("data", {}).get("long_context") == 0 and changes.get("data", {}).get("copy_lengths") == []:
        assert "long_range" not in report
    if "baselines" in changes:
        assert "baselines" not in report
    evaluate = changes.get("evaluate", {})
    assert ("retrieval" in report) == (evaluate.get("retrieval") != [])
    assert ("ablation" in report) == (evaluate.get("ablate") != [])
    assert ("samples" in report) == (evaluate.get("samples") is not False)
    for stage, key in (("transfer", "transfer"), ("finetune", "finetune")):
        if changes.get(stage, {}).get("enabled") is False:
            assert key not in report["stages"]


def test_a_measured_sparse_cache_goes_to_the_heads_the_budget_pays_for_and_the_saved_model_names_them(teacher,
                                                                                                      tmp_path):
    from linearize.api import load
    from linearize.placement import head_bytes

    budget = 2.5 * head_bytes(4, 8, 16) / 2**20  # two heads of this model's head_dim
    report = run_case(teacher, tmp_path, attention={"window_size": 8, "sink_tokens": 2, "sparse_keys": 4,
                                                     "sparse_budget": budget}, baselines={})
    heads = report["placement"]["heads"]
    assert len(heads) == 2 and report["placement"]["candidates"] > 2
    model, _ = load(tmp_path / "run")
    assert model.config.attention["sparse_heads"] == heads
    kept = {(layer, head) for layer, m in enumerate(model.model.layers) if m.self_attn.mixer.sparse_keys
            for head in (m.self_attn.mixer.sparse_heads or range(model.config.text_config.num_key_value_heads))}
    assert kept == {tuple(pair) for pair in heads}


def test_a_sparse_budget_that_pays_for_no_head_stops_the_run_while_it_plans(teacher, tmp_path, monkeypatch):
    import linearize.pipeline as pipeline

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the budget was checked")

    monkeypatch.setattr(pipeline, "load_teacher", no_teacher)
    out = tmp_path / "run"
    config = build_config(settings(teacher, out, attention={"window_size": 8, "sink_tokens": 2, "sparse_keys": 4,
                                                            "sparse_budget": 1e-6}))
    with pytest.raises(LinearizeError, match=r"attention.sparse_budget \(1e-06 MiB\) does not pay for one head"):
        run(config, log=lambda msg: None)
    assert not (out / "stage1").exists()


@pytest.mark.parametrize("method", ["hybrid", "lolcats", "lola", "liger", "window", "xatl"])
def test_every_method_runs_to_a_rendered_report(teacher, tmp_path, method):
    attention = {"window_size": 8, "sink_tokens": 2} if method != "liger" else {"window_size": 8}
    report = run_case(teacher, tmp_path, method=method, attention=attention, baselines={})
    assert report["method"] == method


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_a_corpus_of_ones_own_with_one_domain_runs_to_a_rendered_report(teacher, corpora, tmp_path, kind):
    report = run_case(teacher, tmp_path, data={"source": str(corpora[kind]), "long_context": 0})
    assert list(report["eval"]["teacher"]) == ["text"]


def test_a_report_that_fails_to_render_says_where_the_results_are_and_report_rebuilds_it(teacher, tmp_path,
                                                                                        monkeypatch):
    import linearize.report as report_module
    from linearize import LinearizeError
    from linearize.cli import main

    def broken(report, path):
        raise ValueError("a plot that cannot be drawn")

    monkeypatch.setattr(report_module, "plot_positions", broken)
    out = tmp_path / "run"
    with pytest.raises(LinearizeError, match=r"report could not be rendered \(ValueError: a plot that cannot be "
                                             r"drawn\)\. Every result is in .*report.json and the model in .*model"):
        run(build_config(settings(teacher, out)), log=lambda msg: None)
    assert (out / "report.json").is_file() and (out / "model" / "config.json").is_file()
    assert not (out / "report.html").exists()
    monkeypatch.undo()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file() and (out / "positions.png").is_file()
