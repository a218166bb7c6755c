"""lm-evaluation-harness's own Hugging Face model class (HFLM) runs a linearized student as it is, on
batched multiple-choice (right-padded loglikelihoods) and generation (left-padded) tasks written here as
local files: batch size 4 gives the same answers as one request at a time."""

from __future__ import annotations

import json

import pytest
from helpers import make_byte_tokenizer, make_tiny_model

import linearize

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the `eval` extra: pip install 'linearize[eval]'")

WORDS = ["apple", "river", "stone", "cloud", "ember", "maple", "orbit", "tiger", "lemon", "piano", "quartz", "sable"]


def write_tasks(directory) -> list[str]:
    """A multiple-choice and a generation task on local JSON files, prompts of different lengths."""
    rows = []
    for i, word in enumerate(WORDS):
        context = " ".join(WORDS[: 1 + i % 7])
        rows.append({"context": f"{context}: {word}", "choices": [word, WORDS[(i + 3) % len(WORDS)]], "label": 0,
                     "answer": word})
    (directory / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'rows.jsonl'}\ntest_split: test\n"
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


@pytest.mark.parametrize("method", ["hybrid", "liger"])
def test_hflm_batched_requests_equal_one_at_a_time(method, tmp_path):
    tasks = write_tasks(tmp_path)
    model = linearize.linearize(make_tiny_model("llama"), method, {"window_size": 4, "sink_tokens": 2})
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
