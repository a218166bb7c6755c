"""Retrieval that generates: prompts with an answer hidden at a chosen depth of a long context, answered by
greedy decoding through the model's own cache and scored by exact match.

Perplexity averages over every token, and most tokens are predictable from the last few dozen; an answer
stated once, thousands of tokens back, is what a constant-size state most easily loses. The tasks:

- `passkey`: the classic format (Mohtashami and Jaggi 2023): a 5-digit number stated once inside repeated
  filler ("The grass is green. The sky is blue. ..."), asked for at the end.
- `multikey`: RULER's multi-key needle in a haystack: four "One of the special magic numbers for KEY is:
  VALUE." needles with different keys in the filler, the question names one; 7-digit values.
- `multivalue`: RULER's multi-value variant: four needles with the same key and different values, all
  four asked for (order free, all must be there).
- `quote`: real text, not filler: held-out documents as the context, a passage at the given depth quoted
  by its first tokens at the end, the model continues it (its next 8 tokens, on the same line, must be
  the document's, word for word).

Each needle task comes in variants (`VARIANTS`, reported apart), so that a recipe cannot pass by matching one
template: two fillers, the classic repeated sentences and real prose (held-out documents, needles between
its sentences), and two phrasings of needle and question ("a": the classic one; "b": other words for the
same request). The quote task has one form (its context is real text already).

Keys of one prompt differ in their last token, and so do values: the question's last tokens (what the
model reads when it starts answering) single out one needle, never two. Depth is where the (first)
needle sits, as a fraction of the context between the instruction and the question. Prompts are built in
token ids: a prompt of length L and its longest answer take between L minus one filler sentence and L
tokens, for any tokenizer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from linearize.data.blocks import start_tokens
from linearize.errors import LinearizeError
from linearize.generation import cache_bytes

TASKS = ("passkey", "multikey", "multivalue", "quote")
LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
NEEDLES = 4  # needles per multikey / multivalue prompt
QUOTE_PREFIX = 8  # tokens of the quoted passage shown in the question
QUOTE_ANSWER = 8  # tokens of it the model must continue with

FILLERS = ("repeated", "prose")
PHRASINGS = ("a", "b")
VARIANTS = tuple(f"{filler}/{phrasing}" for filler in FILLERS for phrasing in PHRASINGS)
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "mellow", "noble", "olive", "proud", "quiet", "rapid", "silent", "tidy", "upper", "vivid",
              "wild", "young")
NOUNS = ("anchor", "bridge", "candle", "desert", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pencil", "quarry", "river", "saddle", "tunnel",
         "valley", "window", "yacht", "zipper")


@dataclass
class Prompt:
    """One retrieval question: token ids [T] and what a correct answer holds."""

    task: str
    length: int  # the length asked for: `input_ids` and `max_new_tokens` together take at most this many tokens
    depth: float
    input_ids: torch.Tensor
    answers: tuple[str, ...]  # passkey/multikey: one number; multivalue: every number; quote: the passage's text
    max_new_tokens: int
    variant: str = "repeated/a"  # filler/phrasing (`VARIANTS`); the quote task's own: "text"


def check_settings(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
                   max_positions: int | None = None, where: str = "", variants: Sequence[str] = VARIANTS[:1]) -> None:
    """Raise a LinearizeError naming the bad value: unknown tasks or variants, lengths too short for a prompt or
    beyond the model's position embeddings, depths outside [0, 1]."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise LinearizeError(f"unknown retrieval task(s) {unknown}{where}: choose from {', '.join(TASKS)}")
    for length in lengths:
        if not isinstance(length, int) or length < 256:
            raise LinearizeError(f"retrieval length {length!r}{where} must be an integer >= 256 tokens")
        if max_positions is not None and length > max_positions:
            raise LinearizeError(
                f"retrieval length {length}{where} is beyond the model's maximum position embeddings "
                f"({max_positions}): ask for lengths up to {max_positions}"
            )
    bad = [d for d in depths if not isinstance(d, (int, float)) or not 0 <= d <= 1]
    if bad:
        raise LinearizeError(f"retrieval depths {bad}{where} must be fractions of the context in [0, 1]")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise LinearizeError(f"retrieval variants {unknown or '[]'}{where}: choose one or more of "
                             f"{', '.join(VARIANTS)} (filler/phrasing)")


class _Ids:
    """Text pieces as token ids, each tokenized on its own (no special tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def start(self) -> list[int]:
        """The tokenizer's own beginning of a sequence (a BOS token where it adds one)."""
        return start_tokens(self.tokenizer)


def _haystack(ids: _Ids, budget: int, needles: list[tuple[float, list[int]]], filler: str = "repeated",
              prose: Sequence[torch.Tensor] = ()) -> list[int]:
    """Filler of `budget` tokens (minus the needles) with each needle inserted at its depth, between sentences:
    the repeated sentences, or (`filler` "prose") held-out documents `prose`, cut after a sentence's end."""
    filler_tokens = budget - sum(len(n) for _, n in needles)
    if filler_tokens < 16:
        raise LinearizeError(f"a retrieval prompt of this length leaves {filler_tokens} tokens of context around its "
                             "needles with this tokenizer: ask for longer prompts (evaluate.retrieval_lengths, "
                             "--lengths)")
    sentences = _sentences(ids, filler_tokens) if filler == "repeated" else _prose_sentences(ids, filler_tokens, prose)
    slots = sorted(((round(depth * len(sentences)), i) for i, (depth, _) in enumerate(needles)))
    out: list[int] = []
    position = 0
    for slot, i in slots:
        for sentence in sentences[position:slot]:
            out += sentence
        position = max(position, slot)
        out += needles[i][1]
    for sentence in sentences[position:]:
        out += sentence
    return out


def _sentences(ids: _Ids, tokens: int) -> list[list[int]]:
    """The repeated filler sentences, as many as fit in `tokens`."""
    sentences: list[list[int]] = []
    total = index = 0
    while True:
        sentence = ids(" " + FILLER[index % len(FILLER)])
        if total + len(sentence) > tokens:
            return sentences
        sentences.append(sentence)
        total += len(sentence)
        index += 1


def _prose_sentences(ids: _Ids, tokens: int, documents: Sequence[torch.Tensor]) -> list[list[int]]:
    """The first `tokens` tokens of `documents` (read again from the first when they are shorter), in pieces
    that end where a token ends a sentence or a line (a needle goes between two pieces)."""
    if not any(len(d) for d in documents):
        raise LinearizeError("the prose filler needs held-out prose documents: give a corpus with a prose domain, "
                             "or ask for the repeated filler only (evaluate.retrieval_variants, --variants)")
    text: list[int] = []
    while len(text) < tokens:
        for document in documents:
            text += document.tolist()
    text = text[:tokens]
    ends = {token for token in set(text) if ids.tokenizer.decode([token]).rstrip(" ").endswith((".", "!", "?", "\n"))}
    pieces, start = [], 0
    for i, token in enumerate(text):
        if token in ends:
            pieces.append(text[start : i + 1])
            start = i + 1
    return pieces + ([text[start:]] if start < len(text) else [])


def _distinct_last(ids: _Ids, candidates: list[str], count: int, rng: random.Random, prefix: str = " ") -> list[str]:
    """`count` candidates whose last tokens (as they appear after `prefix`) are all different."""
    chosen, last = [], set()
    for candidate in rng.sample(candidates, len(candidates)):
        token = ids(prefix + candidate)[-1]
        if token not in last:
            chosen.append(candidate)
            last.add(token)
        if len(chosen) == count:
            return chosen
    raise LinearizeError(f"cannot draw {count} retrieval keys with distinct last tokens from {len(candidates)}")


def _numbers(digits: int, count: int, ids: _Ids, rng: random.Random) -> list[str]:
    pool = [str(rng.randrange(10 ** (digits - 1), 10**digits)) for _ in range(count * 20)]
    return _distinct_last(ids, list(dict.fromkeys(pool)), count, rng)


def _keys(count: int, ids: _Ids, rng: random.Random) -> list[str]:
    words = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]
    return _distinct_last(ids, words, count, rng)


# the words of each phrasing: instruction, needle and question; {key} and {value} filled in
WORDS = {
    ("passkey", "a"): ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                       "memorize it. I will quiz you about it.\n", " The pass key is {value}. Remember it. {value} is "
                       "the pass key.", "\nWhat is the pass key? The pass key is"),
    ("passkey", "b"): ("Somewhere in the text below a secret code is given. Read carefully and keep it in mind.\n",
                       " Note this down: the secret code is {value}.",
                       "\nQuestion: what was the secret code given in the text? Answer: the secret code is"),
    ("multikey", "a"): ("Some special magic numbers are hidden inside the following text. Make sure to memorize "
                        "them. I will quiz you about the numbers afterwards.\n", " One of the special magic numbers "
                        "for {key} is: {value}.", "\nWhat is the special magic number for {key} mentioned in the "
                        "provided text? The special magic number for {key} mentioned in the provided text is"),
    ("multikey", "b"): ("The text below registers a few items under numbers. Keep track of them.\n", " The {key} is "
                        "registered under the number {value}.", "\nUnder which number is the {key} registered? The "
                        "{key} is registered under the number"),
    ("multivalue", "a"): ("Some special magic numbers are hidden inside the following text. Make sure to memorize "
                          "them. I will quiz you about the numbers afterwards.\n", " One of the special magic numbers "
                          "for {key} is: {value}.", "\nWhat are all the special magic numbers for {key} mentioned in "
                          "the provided text? The special magic numbers for {key} mentioned in the provided text are"),
    ("multivalue", "b"): ("The text below registers a few items under numbers. Keep track of them.\n", " The {key} is "
                          "registered under the number {value}.", "\nUnder which numbers is the {key} registered? "
                          "The {key} is registered under the numbers"),
}


def build_prompt(tokenizer, task: str, length: int, depth: float, seed: int = 0,
                 documents: Sequence[torch.Tensor] = (), variant: str = "repeated/a",
                 prose: Sequence[torch.Tensor] = ()) -> Prompt:
    """One prompt of `task` with `length` tokens at most, its (first) needle at `depth`, in `variant`
    (filler/phrasing; the prose filler reads `prose`, the quote task `documents`)."""
    ids = _Ids(tokenizer)
    if task == "quote":
        rng = random.Random(f"{task}/{length}/{depth}/{seed}")
        return _quote(ids, ids.start(), length, depth, rng, documents)
    if task not in TASKS:
        raise LinearizeError(f"unknown retrieval task '{task}': choose from {', '.join(TASKS)}")
    filler, phrasing = variant.split("/")
    # the classic variant draws what it always drew; another variant, other keys and values
    rng = random.Random(f"{task}/{length}/{depth}/{seed}" + ("" if variant == VARIANTS[0] else f"/{variant}"))
    start = ids.start()
    intro_text, needle_text, question_text = WORDS[(task, phrasing)]
    if task == "passkey":
        values, keys, depths, new_tokens = [str(rng.randrange(10000, 100000))], [""], [depth], 8
        answers = tuple(values)
    else:
        keys = _keys(NEEDLES if task == "multikey" else 1, ids, rng)
        values = _numbers(7, NEEDLES, ids, rng)
        if task == "multivalue":
            keys = keys * NEEDLES
        # the asked needle (the first) at `depth`, the others spread evenly around the context
        depths = [depth] + [(depth + (i + 1) / NEEDLES) % 1.0 for i in range(NEEDLES - 1)]
        answers, new_tokens = ((values[0],), 12) if task == "multikey" else (tuple(values), 12 * NEEDLES)
    needles = [(d, ids(needle_text.format(key=k, value=v))) for d, k, v in zip(depths, keys, values)]
    intro, question = ids(intro_text), ids(question_text.format(key=keys[0]))
    body = _haystack(ids, length - new_tokens - len(start) - len(intro) - len(question), needles, filler, prose)
    return Prompt(task, length, depth, torch.tensor(start + intro + body + question), answers, new_tokens, variant)
    if task == "quote":
        return _quote(ids, start, length, depth, rng, documents)
    raise LinearizeError(f"unknown retrieval task '{task}': choose from {', '.join(TASKS)}")


def _quote(ids: _Ids, start: list[int], length: int, depth: float, rng: random.Random,
           documents: Sequence[torch.Tensor]) -> Prompt:
    intro = ids("Read the following text. You will be asked to continue one of its passages, word for word.\n\n")
    question = ids("\n\nContinue the passage of the text above that begins with the words below, exactly as it "
                   "appears there.\n")
    budget = length - (QUOTE_ANSWER + 2) - len(start) - len(intro) - len(question) - QUOTE_PREFIX
    if not documents:
        raise LinearizeError("the quote task needs held-out documents to quote from")
    first_document = rng.randrange(len(documents))  # another passage for another sample
    text: list[int] = []
    for document in list(documents[first_document:]) + list(documents[:first_document]):
        text += document.tolist()
        if len(text) >= budget:
            break
    if len(text) < budget:
        raise LinearizeError(f"the quote task needs {budget} tokens of held-out documents for a {length}-token "
                             f"prompt, and has {len(text)}: ask for shorter lengths or give longer documents")
    text = text[:budget]
    # the passage nearest the depth whose first QUOTE_PREFIX tokens occur once in the text (one answer is
    # right) and whose answer stays on one line (where a line ends, what comes next is layout, not recall)
    grams: dict[tuple[int, ...], int] = {}
    for i in range(len(text) - QUOTE_PREFIX + 1):
        gram = tuple(text[i : i + QUOTE_PREFIX])
        grams[gram] = grams.get(gram, 0) + 1
    latest = len(text) - QUOTE_PREFIX - QUOTE_ANSWER
    first = min(max(0, round(depth * latest)), latest)
    for offset in range(latest + 1):  # looking forward first
        for at in (first + offset, first - offset):
            if not (0 <= at <= latest and grams[tuple(text[at : at + QUOTE_PREFIX])] == 1):
                continue
            answer = ids.tokenizer.decode(text[at + QUOTE_PREFIX : at + QUOTE_PREFIX + QUOTE_ANSWER])
            if "\n" in answer or not answer.strip():
                continue
            prefix = text[at : at + QUOTE_PREFIX]
            return Prompt("quote", length, depth, torch.tensor(start + intro + text + question + prefix),
                          (answer,), QUOTE_ANSWER + 2, "text")
    raise LinearizeError("no passage of the quote task's text occurs only once and stays on one line: give less "
                         "repetitive documents")


def build_prompts(tokenizer, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
                  samples: int = 1, seed: int = 0, documents: Sequence[torch.Tensor] = (),
                  variants: Sequence[str] = VARIANTS[:1], prose: Sequence[torch.Tensor] = ()) -> list[Prompt]:
    """`samples` prompts (different keys, values and passages) per (task, length, depth) and, for the needle
    tasks, per variant, in that order."""
    check_settings(tasks, lengths, depths, variants=variants)
    if not isinstance(samples, int) or samples < 1:
        raise LinearizeError(f"retrieval samples must be an integer >= 1, got {samples!r}")
    return [build_prompt(tokenizer, task, length, depth, seed + i, documents, variant, prose)
            for task in tasks for variant in (("text",) if task == "quote" else variants)
            for length in lengths for depth in depths for i in range(samples)]


_NUMBER = re.compile(r"\d+")


def is_correct(prompt: Prompt, generated: str) -> bool:
    """Exact match: the first number generated is the key (passkey, multikey); the first numbers generated
    are all the values, in any order (multivalue); the passage continues word for word (quote)."""
    if prompt.task == "quote":
        return " ".join(generated.split()).startswith(" ".join(prompt.answers[0].split()))
    numbers = _NUMBER.findall(generated)[: len(prompt.answers)]
    return sorted(numbers) == sorted(prompt.answers)


@torch.no_grad()
def _generate(model, prompt: Prompt, pad_token_id: int | None = None) -> tuple[list[int], int]:
    """(the new token ids of a greedy continuation of the prompt through the model's own cache (`generate()`),
    the bytes that cache holds at the end: the model's decode state for one sequence of this length)."""
    device = next(model.parameters()).device
    input_ids = prompt.input_ids[None].to(device)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=prompt.max_new_tokens, do_sample=False, temperature=None, top_p=None,
                            top_k=None, pad_token_id=pad_token_id, return_dict_in_generate=True)
    return output.sequences[0, input_ids.shape[1] :].tolist(), cache_bytes(output.past_key_values)


def answer(model, prompt: Prompt, pad_token_id: int | None = None) -> list[int]:
    """The new token ids of a greedy continuation of the prompt through the model's own cache (`generate()`)."""
    return _generate(model, prompt, pad_token_id)[0]


def run_retrieval(model, tokenizer, prompts: Sequence[Prompt], desc: str = "retrieval") -> list[dict]:
    """One record per prompt: {"task", "length", "depth", "correct", "generated", "expected", "state_bytes"}
    (state_bytes: the model's decode cache after answering, prompt and answer in it)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = []
    for prompt in tqdm(prompts, desc=desc, unit="prompt", leave=False, dynamic_ncols=True):
        ids, state = _generate(model, prompt, pad)
        generated = tokenizer.decode(ids, skip_special_tokens=True)
        records.append({"task": prompt.task, "variant": prompt.variant, "length": prompt.length, "depth": prompt.depth,
                        "correct": is_correct(prompt, generated), "generated": generated,
                        "expected": " ".join(prompt.answers), "state_bytes": state})
    return records


def accuracy(records: Sequence[dict], by_variant: bool = False) -> dict[str, dict[str, float]]:
    """{task: {length: fraction correct over depths and variants}} (lengths as strings, JSON keys); by_variant:
    {"task variant": {...}}, each variant apart."""
    cells: dict[str, dict[str, list[bool]]] = {}
    for r in records:
        row = f"{r['task']} {r.get('variant', VARIANTS[0])}" if by_variant else r["task"]
        cells.setdefault(row, {}).setdefault(str(r["length"]), []).append(r["correct"])
    return {task: {length: sum(v) / len(v) for length, v in by_length.items()} for task, by_length in cells.items()}


def heatmap(records: Sequence[dict], task: str) -> tuple[list[float], list[int], list[list[float]]]:
    """(depths, lengths, fraction correct [depth][length]) of one task."""
    rows = [r for r in records if r["task"] == task]
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    grid = []
    for depth in depths:
        line = []
        for length in lengths:
            hits = [r["correct"] for r in rows if r["depth"] == depth and r["length"] == length]
            line.append(sum(hits) / len(hits) if hits else float("nan"))
        grid.append(line)
    return depths, lengths, grid
