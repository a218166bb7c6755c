"""What a run measures beyond held-out perplexity, for the teacher once and then for every model it makes:

- `LongRange`: perplexity ratio by position on long held-out documents, and the copy test;
- `Retrieval`: generation-based retrieval (`linearize.retrieval`): passkey, needles, quotes from real text;
- `Ablation`: the student's held-out ratios and retrieval with each branch of its state switched off.

The teacher's side of each is computed when the teacher is evaluated and kept in the run's progress
(`progress.once`), so a resumed run does not recompute it; given a `TeacherResults`, also across runs: a
later run of the same teacher on the same prompts reads it back (`remembered`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import linearize.evaluate as evaluate
import linearize.generation as generation
import linearize.retrieval as retrieval
from linearize.evaluate import Scores, bucket_ratios, copy_sequences, copy_test, position_profile, score
from linearize.layers.attention import branches_off, linearized_attentions
from linearize.retrieval import accuracy, build_prompts, run_retrieval
from linearize.teacher.results import TeacherResults


def _fingerprint(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


# read with the code they describe, at import: a file edited since is not this code
_CODE = _fingerprint([Path(module.__file__) for module in (evaluate, generation, retrieval)] + [Path(__file__)])
_PACKAGE = _fingerprint(sorted(Path(__file__).parent.rglob("*.py")))


def evaluation_code() -> str:
    """A fingerprint of the code that computes the teacher's results (this module and the ones it calls, as they
    were imported): kept results of other code are not read back."""
    return _CODE


def package_code() -> str:
    """A fingerprint of every module of the package (as at import): what keeps a baseline's results, which its
    training code computes too, from being read back by other code."""
    return _PACKAGE


def remembered(results: TeacherResults | None, kind: str, inputs: Sequence[torch.Tensor], compute: Callable[[], Any],
               settings: Any = None) -> Any:
    """`compute()`'s JSON value, or the same kept by an earlier run in `results` (None: nothing kept)."""
    return compute() if results is None else results.value(kind, inputs, compute, settings)


def teacher_held_out(model, blocks: torch.Tensor, domain: str, results: TeacherResults | None = None) -> Scores:
    """The teacher's `score` on one domain's held-out blocks [N, T], or the same kept by an earlier run."""
    if results is None:
        return score(model, blocks, desc=f"eval teacher ({domain})")

    def compute():
        scores = score(model, blocks, desc=f"eval teacher ({domain})")
        return ({"nll": scores.nll, "tokens": scores.tokens, "block_nll": scores.block_nll},
                {"predictions": scores.predictions})

    value, tensors = results.get("held-out", [blocks], compute)
    return Scores(nll=value["nll"], tokens=value["tokens"], predictions=tensors["predictions"],
                  block_nll=value["block_nll"])


class LongRange:
    """The long-range diagnostics of a run: per-position ratios on long held-out documents and the copy
    test, the teacher's side computed once (and kept in progress.json)."""

    def __init__(self, config, data, teacher_model, progress, evaluates: bool = True,
                 results: TeacherResults | None = None):
        self.documents = data.long
        lengths = config.data.copy_lengths
        self.sequences = copy_sequences(teacher_model.config.vocab_size, lengths, seed=config.seed) if lengths else {}
        self.enabled = bool(self.sequences) or any(len(docs) for docs in self.documents.values())
        saved = progress.get("long_range.teacher")
        if saved is None and self.enabled and evaluates:
            saved = progress.put("long_range.teacher", remembered(
                results, "long-range", [*self.documents.values(), *self.sequences.values()], lambda: {
                    "profiles": {d: position_profile(teacher_model, docs, f"positions teacher ({d})").tolist()
                                 for d, docs in self.documents.items()},
                    "copy": copy_test(teacher_model, self.sequences, "copy teacher"),
                }, {"domains": list(self.documents), "copy": list(self.sequences)}))
        self.teacher = saved

    def teacher_summary(self) -> dict[str, Any]:
        return {"copy": self.teacher["copy"], "documents": {d: len(x) for d, x in self.documents.items()}}

    def measure(self, model, label: str) -> dict[str, Any]:
        buckets = {}
        for domain, docs in self.documents.items():
            profile = position_profile(model, docs, f"positions {label} ({domain})")
            buckets[domain] = bucket_ratios(profile, torch.tensor(self.teacher["profiles"][domain]))
        return {"buckets": buckets, "copy": copy_test(model, self.sequences, f"copy {label}")}


def quote_documents(data) -> list[torch.Tensor]:
    """Held-out text for the quote task: the long held-out documents, else the held-out blocks."""
    documents = [doc for docs in data.long.values() for doc in docs]
    return documents or [block for blocks in data.eval.values() for block in blocks]


def prose_documents(data) -> list[torch.Tensor]:
    """Held-out prose for the retrieval tasks' prose filler: the prose domain's long documents (else every
    long held-out document, else the held-out blocks)."""
    return list(data.long.get("prose", ())) or quote_documents(data)


class Retrieval:
    """The run's retrieval prompts (evaluate.retrieval*), the teacher's answers computed once."""

    def __init__(self, config, data, tokenizer, teacher_model, progress, evaluates: bool = True,
                 results: TeacherResults | None = None):
        settings = config.evaluate
        self.tokenizer = tokenizer
        prose = any(v.startswith("prose") for v in settings.retrieval_variants)
        self.prompts = build_prompts(
            tokenizer, settings.retrieval, settings.retrieval_lengths, settings.retrieval_depths,
            settings.retrieval_samples, config.seed, quote_documents(data) if "quote" in settings.retrieval else (),
            settings.retrieval_variants, prose_documents(data) if prose else (),
        ) if settings.retrieval else []
        self.enabled = bool(self.prompts)
        self.teacher = None
        if self.enabled and evaluates:
            asked = [[p.task, p.variant, p.length, p.depth, list(p.answers), p.max_new_tokens] for p in self.prompts]
            self.teacher = progress.once("retrieval.teacher", lambda: remembered(
                results, "retrieval", [p.input_ids for p in self.prompts],
                lambda: self.measure(teacher_model, "teacher"), asked))

    def measure(self, model, label: str, tasks: set[str] | None = None) -> list[dict]:
        """`model`'s answers to the run's prompts (of `tasks` only, when given)."""
        return run_retrieval(model, self.tokenizer, of_tasks(self.prompts, tasks), f"retrieval {label}")


def of_tasks(prompts: list, tasks: set[str] | None) -> list:
    """The prompts of `tasks` (all of them for None)."""
    return list(prompts) if tasks is None else [p for p in prompts if p.task in tasks]


def mean_nll(model, blocks: dict[str, torch.Tensor], label: str) -> dict[str, float]:
    """Mean next-token NLL per domain of held-out blocks {domain: [N, T]}: every domain's blocks scored together
    (one forward for the ablation's one block of each of four domains), each domain's mean from its blocks'
    sums, added in order (as `first_blocks` reads them)."""
    if not blocks:
        return {}
    if len({rows.shape[1] for rows in blocks.values()}) > 1:  # blocks of several lengths: a domain at a time
        return {d: first_blocks({d: score(model, rows, desc=f"ablation {label} ({d})").block_nll}, {d: rows})[d]
                for d, rows in blocks.items()}
    sums = iter(score(model, torch.cat(list(blocks.values())), desc=f"ablation {label}").block_nll)
    return first_blocks({d: [next(sums) for _ in range(len(rows))] for d, rows in blocks.items()}, blocks)


def first_blocks(block_nll: dict[str, list[float]] | None, blocks: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """`mean_nll` of a model on `blocks` {domain: [N, T]}, the first N of its held-out blocks, read from the held-out
    pass's per-block sums (`Scores.block_nll`) instead of computed again: the same sums, added in the same order.
    None where the sums were not kept."""
    if block_nll is None or any(len(block_nll.get(d, ())) < len(rows) for d, rows in blocks.items()):
        return None
    return {d: sum(block_nll[d][: len(rows)]) / (rows.shape[0] * (rows.shape[1] - 1)) for d, rows in blocks.items()}


def ablate(model, branches: list[str], blocks: dict[str, torch.Tensor], teacher_nll: dict[str, float],
           answer: Callable[[Any, str, set[str] | None], list[dict]] | None = None,
           records: list[dict] | None = None, whole: dict[str, float] | None = None) -> dict[str, Any]:
    """{"all": ..., "without BRANCH": ...}: held-out ratios to the teacher ({domain: ratio}) and, given
    `answer` (model, label, tasks: None for all) -> retrieval records, retrieval accuracy, with all branches
    and with each of `branches` switched off. `records`: the answers with all branches on, when already
    measured; `whole`: its `mean_nll` with all branches, when already known (`first_blocks`). A branch switched
    off answers only the tasks the whole student answered at least once: what a branch carries is what the
    student loses without it, and a task it never answers has nothing to lose (its cells are left out: not
    measured)."""
    out = {}
    solved: set[str] = set()
    for branch in [None, *branches]:
        label = f"without {branch}" if branch else "student"
        with branches_off(model, [branch] if branch else []):
            nll = whole if branch is None and whole is not None else mean_nll(model, blocks, label)
            entry: dict[str, Any] = {"ratios": {d: math.exp(nll[d] - teacher_nll[d]) for d in nll}}
            if answer is not None and branch is None:
                records = records if records is not None else answer(model, label, None)
                solved = {r["task"] for r in records if r["correct"]}
                entry["retrieval"] = accuracy(records)
            elif answer is not None:
                entry["retrieval"] = accuracy(answer(model, label, solved)) if solved else {}
        out["all" if branch is None else f"without {branch}"] = entry
    return out


def present_branches(model) -> set[str]:
    """The branches any converted layer of `model` can switch off."""
    return {branch for layer in linearized_attentions(model) for branch in layer.mixer.branches}


class Ablation:
    """The student's held-out ratios (on the first `evaluate.ablation_blocks` blocks of each domain) and
    retrieval accuracy with all its branches, then with each of `evaluate.ablate` switched off."""

    def __init__(self, config, data, teacher_model, progress, evaluates: bool = True,
                 results: TeacherResults | None = None, teacher_blocks: dict[str, list[float]] | None = None):
        self.branches = list(config.evaluate.ablate)
        count = config.evaluate.ablation_blocks
        self.blocks = {d: blocks[:count] for d, blocks in data.eval.items() if len(blocks)}
        self.enabled = bool(self.branches) and (bool(self.blocks) or config.evaluate.retrieval != [])
        self.teacher = None
        if self.enabled and evaluates:
            known = first_blocks(teacher_blocks, self.blocks)  # the teacher's held-out pass saw these blocks
            self.teacher = progress.once("ablation.teacher", lambda: known if known is not None else remembered(
                results, "mean-nll", list(self.blocks.values()),
                lambda: mean_nll(teacher_model, self.blocks, "teacher"), list(self.blocks)))

    def measure(self, model, retrieval: Retrieval, records: list[dict] | None,
                block_nll: dict[str, list[float]] | None = None) -> dict[str, Any] | None:
        """`ablate` over the configured branches the model has (None: it has none of them); `block_nll`: the
        model's own held-out pass, per block, where its whole row is read from."""
        present = present_branches(model)
        branches = [b for b in self.branches if b in present]
        if not branches:
            return None
        return ablate(model, branches, self.blocks, self.teacher, retrieval.measure if retrieval.enabled else None,
                      records, first_blocks(block_nll, self.blocks))
