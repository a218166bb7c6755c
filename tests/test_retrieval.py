"""Generation-based retrieval (linearize.retrieval) and the branch ablation (layers.attention.branches_off):
prompts of the asked length with their needle at the asked depth, exact-match scoring, answers generated
through the model's own cache, and each branch of the hybrid switched off exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_decoding_matches_parallel, make_byte_tokenizer, make_tiny_model, tokens

from linearize import LinearizeError, linearize
from linearize.layers.attention import branches_off, linearized_attentions
from linearize.report import ablation_table
from linearize.retrieval import (
    VARIANTS,
    Prompt,
    accuracy,
    answer,
    build_prompt,
    build_prompts,
    check_settings,
    heatmap,
    is_correct,
    run_retrieval,
)

HYBRID = {"window_size": 8, "sink_tokens": 2, "decay": 0.95, "memory_buckets": 16, "memory_layers": None,
          "linear_scale_init": 0.5, "sparse_keys": 3}  # every head: no run measured where


def documents(count: int = 4, length: int = 600) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(32, 127, (length,), generator=generator) for _ in range(count)]


@pytest.mark.parametrize("task", ["passkey", "multikey", "multivalue", "quote"])
@pytest.mark.parametrize("length", [1024, 2048])
def test_a_prompt_has_the_asked_length_and_its_answer_in_the_context(task, length):
    tokenizer = make_byte_tokenizer()
    prompt = build_prompt(tokenizer, task, length, 0.5, documents=documents(4, 700))
    assert length - 40 <= len(prompt.input_ids) + prompt.max_new_tokens <= length
    text = tokenizer.decode(prompt.input_ids)
    if task == "quote":  # the passage continues, somewhere in the context, with the answer
        assert prompt.answers[0] in text[: -10]
    else:
        for value in prompt.answers:
            assert text.count(value) == (2 if task == "passkey" else 1)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_the_needle_sits_at_the_asked_depth(depth):
    tokenizer = make_byte_tokenizer()
    prompt = build_prompt(tokenizer, "passkey", 1024, depth)
    text = tokenizer.decode(prompt.input_ids)
    start = text.index("\n") + 1  # the context lies between the instruction and the question
    end = text.rindex("\nWhat is the pass key?")
    where = (text.index(f"The pass key is {prompt.answers[0]}") - start) / (end - start)
    assert abs(where - depth) < 0.1


def test_keys_and_values_of_one_prompt_differ_in_their_last_tokens():
    tokenizer = make_byte_tokenizer()
    for seed in range(5):
        prompt = build_prompt(tokenizer, "multikey", 1024, 0.3, seed=seed)
        text = tokenizer.decode(prompt.input_ids)
        needles = [line.split(" is: ") for line in text.split("special magic numbers for ")[1:]]
        keys = [key for key, _ in needles]
        values = [value.split(".")[0] for _, value in needles]
        assert len(needles) == 4 and len({k[-1] for k in keys}) == 4 and len({v[-1] for v in values}) == 4
        assert prompt.answers[0] in values


def test_prompts_cover_every_cell_and_samples_differ():
    tokenizer = make_byte_tokenizer()
    prompts = build_prompts(tokenizer, ["passkey", "multikey"], [1024, 2048], [0.2, 0.8], samples=2)
    assert [(p.task, p.length, p.depth) for p in prompts[:4]] == [("passkey", 1024, 0.2)] * 2 + [
        ("passkey", 1024, 0.8)] * 2
    assert len(prompts) == 16 and prompts[0].answers != prompts[1].answers


def test_each_variant_says_it_in_its_own_words_and_filler_and_the_answer_is_there():
    tokenizer = make_byte_tokenizer()
    sentences = "Call me Ishmael. Some years ago, never mind how long, I went to sea.\n" * 40
    prose = [torch.tensor(tokenizer(sentences, add_special_tokens=False)["input_ids"])]
    texts = {}
    for variant in VARIANTS:
        prompt = build_prompt(tokenizer, "passkey", 1024, 0.5, variant=variant, prose=prose)
        assert prompt.variant == variant and length_ok(prompt, 1024)
        texts[variant] = text = tokenizer.decode(prompt.input_ids)
        assert prompt.answers[0] in text
        assert ("The grass is green." in text) == variant.startswith("repeated")
        assert ("Ishmael" in text) == variant.startswith("prose")
        assert ("pass key" in text) == variant.endswith("/a") and ("secret code" in text) == variant.endswith("/b")
    needle = texts["prose/b"].index("Note this down")
    assert texts["prose/b"][needle - 2 : needle] in (". ", ".\n", "\n ")  # between two sentences
    multikey = build_prompt(tokenizer, "multikey", 2048, 0.5, variant="repeated/b")
    assert tokenizer.decode(multikey.input_ids).count("is registered under the number") == 5  # 4 needles + question
    with pytest.raises(LinearizeError, match="needs held-out prose documents"):
        build_prompt(tokenizer, "passkey", 1024, 0.5, variant="prose/a", prose=[])


def length_ok(prompt, length: int) -> bool:
    return length - 60 <= len(prompt.input_ids) + prompt.max_new_tokens <= length


def test_accuracy_is_kept_per_task_and_apart_per_variant():
    records = [{"task": "passkey", "variant": v, "length": 1024, "correct": c}
               for v, c in (("repeated/a", True), ("repeated/a", True), ("prose/b", False), ("prose/b", True))]
    assert accuracy(records) == {"passkey": {"1024": 0.75}}
    assert accuracy(records, by_variant=True) == {"passkey repeated/a": {"1024": 1.0}, "passkey prose/b": {"1024": 0.5}}


def test_exact_match_refuses_near_misses():
    passkey = Prompt("passkey", 512, 0.5, torch.zeros(1), ("52445",), 8)
    assert is_correct(passkey, " 52445. Remember it.")
    assert not is_correct(passkey, " 5244.") and not is_correct(passkey, " 524456") and not is_correct(passkey, "")
    values = Prompt("multivalue", 512, 0.5, torch.zeros(1), ("1234567", "7654321"), 24)
    assert is_correct(values, " 7654321, 1234567 and") and not is_correct(values, " 7654321, 1234560")
    quote = Prompt("quote", 512, 0.5, torch.zeros(1), (" def run(self):\n    return",), 10)
    assert is_correct(quote, "def run(self): return x") and not is_correct(quote, "def run(self): yield")


def test_bad_settings_are_named_before_any_work():
    with pytest.raises(LinearizeError, match="beyond the model's maximum position embeddings \\(512\\)"):
        check_settings(["passkey"], [1024], [0.5], max_positions=512)
    with pytest.raises(LinearizeError, match="unknown retrieval task"):
        check_settings(["needle"], [1024], [0.5])
    with pytest.raises(LinearizeError, match="depths \\[1.5\\]"):
        check_settings(["passkey"], [1024], [1.5])
    with pytest.raises(LinearizeError, match="retrieval variants \\['repeated/c'\\].*prose/b"):
        check_settings(["passkey"], [1024], [0.5], variants=["repeated/c"])
    with pytest.raises(LinearizeError, match="leaves -?[0-9]+ tokens of context around its needles"):
        build_prompt(make_byte_tokenizer(), "multikey", 512, 0.5)
    with pytest.raises(LinearizeError, match="needs held-out documents"):
        build_prompt(make_byte_tokenizer(), "quote", 512, 0.5)
    with pytest.raises(LinearizeError, match="needs .* tokens of held-out documents"):
        build_prompt(make_byte_tokenizer(), "quote", 1024, 0.5, documents=documents(1, 100))


def test_answers_are_generated_through_the_cache_and_scored_per_cell():
    tokenizer = make_byte_tokenizer()
    model = linearize(make_tiny_model("llama"), "hybrid", HYBRID)
    prompts = build_prompts(tokenizer, ["passkey", "quote"], [512], [0.2, 0.8], documents=documents())
    records = run_retrieval(model, tokenizer, prompts)
    assert [(r["task"], r["depth"]) for r in records] == [("passkey", 0.2), ("passkey", 0.8), ("quote", 0.2),
                                                         ("quote", 0.8)]
    for record, prompt in zip(records, prompts):
        assert record["correct"] == is_correct(prompt, record["generated"])
        # greedy through the cache = the argmax of one parallel forward over prompt + answer, token by token
        ids = answer(model, prompt)
        assert tokenizer.decode(ids) == record["generated"]
        full = torch.cat([prompt.input_ids, torch.tensor(ids, dtype=torch.long)])[None]
        with torch.no_grad():
            predicted = model(full).logits[0, len(prompt.input_ids) - 1 : -1].argmax(-1)
        assert predicted.tolist() == ids
    for record, correct in zip(records, (True, False, False, True)):
        record["correct"] = correct
    assert accuracy(records) == {"passkey": {"512": 0.5}, "quote": {"512": 0.5}}
    depths, lengths, grid = heatmap(records, "passkey")
    assert depths == [0.2, 0.8] and lengths == [512] and grid[0] == [1.0]


def test_a_record_holds_the_decode_state_constant_for_the_student_growing_with_the_prompt_for_the_teacher():
    tokenizer = make_byte_tokenizer()
    teacher = make_tiny_model("llama")
    prompts = build_prompts(tokenizer, ["passkey"], [256, 512], [0.5])
    # keys and values of every token fed (the last generated one is not): 2 layers x 2 KV heads x 16 dims, fp32
    fed = [len(p.input_ids) + len(answer(teacher, p)) - 1 for p in prompts]
    assert [r["state_bytes"] for r in run_retrieval(teacher, tokenizer, prompts)] == [n * 2 * 2 * 2 * 16 * 4
                                                                                      for n in fed]
    student = linearize(teacher, "hybrid", HYBRID)
    states = [r["state_bytes"] for r in run_retrieval(student, tokenizer, prompts)]
    assert states[0] == states[1] > 0


def forward(model, x, names=()):
    with torch.no_grad(), branches_off(model, list(names)):
        return model(x).logits


def test_each_branch_switched_off_changes_the_output_and_is_restored():
    model = linearize(make_tiny_model("llama"), "hybrid", HYBRID)
    x = tokens(length=64)
    full = forward(model, x)
    for name in ("linear", "memory", "sinks", "sparse"):
        assert not torch.allclose(forward(model, x, [name]), full, atol=1e-4), name
    torch.testing.assert_close(forward(model, x), full)
    with pytest.raises(LinearizeError, match="no window branch to switch off; its branches: linear, memory, sinks, "
                                             "sparse"):
        forward(model, x, ["window"])


def test_every_branch_off_leaves_exactly_the_window():
    teacher = make_tiny_model("llama")
    hybrid = linearize(make_tiny_model("llama"), "hybrid", HYBRID)
    window = linearize(teacher, "window", {"window_size": 8, "sink_tokens": 0})
    x = tokens(length=64)
    torch.testing.assert_close(forward(hybrid, x, ["linear", "memory", "sinks", "sparse"]), forward(window, x),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["linear", "memory", "sinks", "sparse"])
def test_a_branch_switched_off_stays_off_while_decoding(name):
    model = linearize(make_tiny_model("llama"), "hybrid", HYBRID)
    with branches_off(model, [name]):
        assert_decoding_matches_parallel(model, tokens(length=48), prefill=20)


def test_the_whole_students_ablation_row_read_from_its_held_out_pass_equals_its_own_pass():
    """first_blocks: the mean NLL of the first blocks of each domain, from the held-out pass's per-block sums,
    is exactly what the ablation computes on them (so the run skips that pass); None when sums are missing."""
    from linearize.evaluate import score
    from linearize.probes import first_blocks, mean_nll

    model = linearize(make_tiny_model("llama"), "hybrid", HYBRID)
    held_out = {"code": tokens(batch=3, length=48, seed=1), "prose": tokens(batch=3, length=48, seed=2)}
    sums = {d: score(model, blocks).block_nll for d, blocks in held_out.items()}
    for count in (1, 2):
        first = {d: blocks[:count] for d, blocks in held_out.items()}
        assert first_blocks(sums, first) == mean_nll(model, first, "whole")
    assert first_blocks({"code": sums["code"], "prose": sums["prose"][:1]}, {d: b[:2] for d, b in held_out.items()}) \
        is None and first_blocks(None, held_out) is None


def test_a_branch_switched_off_answers_only_the_tasks_the_whole_student_answered():
    from linearize.probes import ablate

    model = linearize(make_tiny_model("llama"), "hybrid", HYBRID)
    blocks = {"text": tokens(length=32)}
    asked = []

    def answer(m, label, tasks):  # the whole student answers passkey once, quote never
        asked.append((label, tasks, sorted(layer.mixer.off for layer in linearized_attentions(m))[0]))
        chosen = [t for t in ("passkey", "quote") if tasks is None or t in tasks]
        return [{"task": t, "length": 512, "correct": label == "student" and t == "passkey"} for t in chosen]

    out = ablate(model, ["memory", "sinks"], blocks, {"text": 0.0}, answer)
    assert asked == [("student", None, frozenset()), ("without memory", {"passkey"}, frozenset({"memory"})),
                     ("without sinks", {"passkey"}, frozenset({"sinks"}))]
    assert out["all"]["retrieval"] == {"passkey": {"512": 1.0}, "quote": {"512": 0.0}}
    assert out["without memory"]["retrieval"] == {"passkey": {"512": 0.0}}  # quote: not measured
    # a student that answers nothing: no branch is asked anything
    asked.clear()
    out = ablate(model, ["memory"], blocks, {"text": 0.0}, answer, records=[{"task": "quote", "length": 512,
                                                                              "correct": False}])
    assert asked == [] and out["without memory"]["retrieval"] == {}
    assert ablation_table(out)[-1].endswith("| – |")


def test_a_quote_is_unique_in_its_context_and_its_answer_stays_on_one_line():
    tokenizer = make_byte_tokenizer()
    lines = [f"line {i}: the value of item number {i} is {i * 7}\n" for i in range(200)]
    text = torch.tensor(tokenizer("".join(lines), add_special_tokens=False)["input_ids"])
    for depth in (0.1, 0.5, 0.9):
        prompt = build_prompt(tokenizer, "quote", 2048, depth, documents=[text])
        quoted = tokenizer.decode(prompt.input_ids[-8:])
        context = tokenizer.decode(prompt.input_ids[:-8])
        assert context.count(quoted) == 1  # once in the text (the question quotes it after the context)
        assert "\n" not in prompt.answers[0] and context.count(quoted + prompt.answers[0]) == 1
