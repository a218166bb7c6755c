"""lm-evaluation-harness's own Hugging Face model class (HFLM) runs a linearized student as it is, on
batched multiple-choice (right-padded loglikelihoods) and generation (left-padded) tasks written here as
local files: batch size 4 gives the same answers as one request at a time."""

from __future__ import annotations

import json

import pytest
from helpers import make_byte_tokenizer, make_tiny_model

import linearize
from linearize import LinearizeError

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the `eval` extra: pip install 'linearize[eval]'")

WORDS = ["apple", "river", "stone", "cloud", "ember", "maple", "orbit", "tiger"]


def write_tasks(directory) -> list[str]:
    """A multiple-choice and a generation task on local JSON files, prompts of different lengths."""
    rows = []
    for i, word in enumerate(WORDS):
        context = " ".join(WORDS[: 1 + i % 7])
        rows.append({"context": f"{context}: {word}", "choices": [word, WORDS[(i + 3) % len(WORDS)]], "label": 0,
                     "answer": word})
    (directory / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rows_file = directory / "rows.jsonl"
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows_file}\ntest_split: test\n"
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{context}} ='\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    (directory / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + data + "output_type: generate_until\ndoc_to_text: '{{context}} ='\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return ["tiny_mc", "tiny_gen"]


def evaluate(model, tokenizer, tasks, include_path, batch_size: int) -> dict:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=256)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(include_path)), log_samples=True,
        bootstrap_iters=0,
    )


def test_hflm_batched_requests_equal_one_at_a_time(tmp_path):
    tasks = write_tasks(tmp_path)
    model = linearize.linearize(make_tiny_model("llama"), "hybrid", {"window_size": 4, "sink_tokens": 2})
    tokenizer = make_byte_tokenizer()
    one = evaluate(model, tokenizer, tasks, tmp_path, batch_size=1)
    four = evaluate(model, tokenizer, tasks, tmp_path, batch_size=4)
    for task in tasks:
        for a, b in zip(one["samples"][task], four["samples"][task], strict=True):
            if task == "tiny_gen":
                assert a["filtered_resps"] == b["filtered_resps"]
            else:
                for resp_a, resp_b in zip(a["resps"], b["resps"], strict=True):  # [[(loglikelihood, greedy)]]
                    assert float(resp_a[0][0]) == pytest.approx(float(resp_b[0][0]), abs=1e-3)
    assert 0.0 <= four["results"]["tiny_mc"]["acc,none"] <= 1.0


FACTS = [
    ("The capital of France is", "Paris", "Madrid"),
    ("Water freezes at zero degrees", "Celsius", "Kelvin"),
    ("The largest planet in the solar system is", "Jupiter", "Mercury"),
    ("The opposite of hot is", "cold", "blue"),
    ("A week has seven", "days", "apples"),
    ("The sun rises in the", "east", "west"),
    ("Two plus two equals", "four", "nine"),
    ("The chemical symbol for gold is", "Au", "Ox"),
    ("Birds fly with their", "wings", "wheels"),
    ("The first month of the year is", "January", "October"),
]


def test_eval_command_runs_lm_eval_tasks_on_the_real_teacher_and_student(tmp_path, smollm2, capsys, monkeypatch):  # noqa: ARG001
    """`linearize eval DIR --tasks T --teacher` on SmolLM2: one JSON line with both models' scores. The
    teacher is well above chance; these prompts are shorter than the 64-token window, where the untrained
    hybrid computes exactly the teacher's attention, so the student matches it."""
    from linearize.cli import main
    from linearize.models.saving import save_adapter

    rows = [{"question": q, "choices": [f" {a}", f" {b}"], "label": 0} for q, a, b in FACTS]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tasks / "facts.yaml").write_text(  # its data file named relative to it: found beside it, from any directory
        "task: facts\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: facts.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "target_delimiter: ''\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    from linearize.teacher import DEFAULT_TEACHER, load_teacher

    # a fresh teacher (from the cache the session fixture built): conversion reuses its modules in place
    teacher, tokenizer = load_teacher(DEFAULT_TEACHER)
    student = linearize.linearize(teacher, "hybrid")
    save_adapter(student, tmp_path / "student", tokenizer=tokenizer)
    monkeypatch.chdir(tmp_path.parent)  # the task file's data is found beside it, from another directory
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "student"), "--tasks", str(tasks), "--score", "both", "--teacher",
                 "--batch-size", "5"])
    result = capsys.readouterr()
    assert code == 0, result.err[-2000:]
    printed = json.loads(result.out.strip().splitlines()[-1])["tasks"]
    teacher_acc, student_acc = printed["teacher"]["facts"]["acc"], printed["student"]["facts"]["acc"]
    assert teacher_acc >= 0.8
    assert abs(student_acc - teacher_acc) <= 0.1
    # the same questions answered by generation: the answer written out must be the right choice
    teacher_gen, student_gen = (printed[m]["facts_generate"]["exact_match"] for m in ("teacher", "student"))
    assert printed["student"]["facts_generate"]["scored_by"] == "generate"
    assert 0 <= teacher_gen <= teacher_acc and abs(student_gen - teacher_gen) <= 0.1
    assert "| facts | loglikelihood | acc |" in result.err and "| facts_generate | generate | exact_match |" in \
        result.err


def write_facts(directory, data: str = "facts.jsonl") -> None:
    rows = [{"question": q, "choices": [f" {a}", f" {b}"], "label": 0} for q, a, b in FACTS[:4]]
    (directory / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (directory / "facts.yaml").write_text(
        f"task: facts\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "target_delimiter: ''\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )


def test_a_local_task_runs_both_ways_on_a_tiny_student(tmp_path):
    from linearize.harness import run_tasks, task_specs

    write_facts(tmp_path)
    specs = task_specs(str(tmp_path / "facts.yaml"), ["loglikelihood", "generate"])
    assert [(t.name, t.scoring) for t in specs] == [("facts", "loglikelihood"), ("facts_generate", "generate")]
    assert specs[0].spec["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "facts.jsonl")
    model = linearize.linearize(make_tiny_model("llama"), "hybrid", {"window_size": 4, "sink_tokens": 2})
    results = run_tasks(model, make_byte_tokenizer(), specs, batch_size=2)
    assert 0 <= results["facts"]["acc"] <= 1 and results["facts"]["scored_by"] == "loglikelihood"
    assert 0 <= results["facts_generate"]["exact_match"] <= 1 and results["facts_generate"]["scored_by"] == "generate"


@pytest.mark.parametrize("problem", ["empty", "malformed", "no_task", "missing_data", "empty_data", "empty_dir"])
def test_a_bad_task_file_is_named_before_any_model_loads(tmp_path, problem):
    from linearize.cli import main

    write_facts(tmp_path)
    task = tmp_path / "facts.yaml"
    expected = {
        "empty": "task file .*facts.yaml' is empty",
        "malformed": "facts.yaml' cannot be read as an lm-eval task",
        "no_task": "facts.yaml' has no 'task' name",
        "missing_data": "names data file 'gone.jsonl', which is missing",
        "empty_data": "data file .*facts.jsonl' is empty",
        "empty_dir": "holds no .yaml task file",
    }
    if problem == "empty":
        task.write_text("")
    elif problem == "malformed":
        task.write_text("task: facts\n  bad: [indent\n")
    elif problem == "no_task":
        task.write_text("dataset_path: json\n")
    elif problem == "missing_data":
        write_facts(tmp_path, data="gone.jsonl")
    elif problem == "empty_data":
        (tmp_path / "facts.jsonl").write_text("")
    else:
        task.unlink()
    target = tmp_path if problem == "empty_dir" else task
    with pytest.raises(LinearizeError, match=expected[problem]):
        from linearize.harness import task_specs

        task_specs(str(target))
    # the command says so before it looks for the model
    assert main(["eval", str(tmp_path / "no-such-model"), "--tasks", str(target)]) == 2


def test_generation_scoring_needs_a_task_config_with_choices(tmp_path):
    from linearize.harness import task_specs

    with pytest.raises(LinearizeError, match="--score generate needs the task's config"):
        task_specs("hellaswag", ["generate"])
    (tmp_path / "gen.yaml").write_text("task: gen\noutput_type: generate_until\ndoc_to_text: x\n")
    with pytest.raises(LinearizeError, match="cannot be scored by loglikelihood"):
        task_specs(str(tmp_path / "gen.yaml"), ["loglikelihood"])
