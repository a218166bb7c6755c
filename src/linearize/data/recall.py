"""Recall-shaped training blocks: real text with a few facts stated in it and asked for at its end.

A constant-size state keeps what it was trained to keep. Perplexity on natural text rewards the last few
dozen tokens far more than a fact stated once, hundreds of tokens back; a student trained on it alone
learns to answer a question by copying the question (LoLCATS needed passkey samples in training to pass
needle tests). A recall block is a training block of the corpus with 2-5 facts ("The code of Tovimak is
48213.") inserted at random depths of its first three quarters, and, at its end, each fact asked for and
answered ("What is the code of Tovimak? The code of Tovimak is 48213."), in one of several phrasings. The
teacher, which sees the whole block, answers from the fact; distilling it teaches the student to prefer the
distant fact over the question in its window.

The phrasings, the made-up names and the haystack (the corpus itself) are not those of the retrieval
evaluation (`linearize.retrieval`: a "pass key" in repeated filler sentences, "special magic numbers" for
adjective-noun keys), so its scores measure recall, not the memorized format.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

# (statement, question and answer): {k} the name, {v} the value
PHRASINGS = (
    ("The code of {k} is {v}.", "What is the code of {k}? The code of {k} is {v}."),
    ("{k}'s number: {v}.", "Which number belongs to {k}? {k}'s number: {v}."),
    ("Remember that {k} stands for {v}.", "Recall what {k} stands for. {k} stands for {v}."),
    ("Note: the value for {k} is {v}. Keep {v} in mind.", "Q: what is the value for {k}? A: the value for {k} is {v}."),
    ("The account of {k} was opened with the id {v}.", "Which id was the account of {k} opened with? "
     "The account of {k} was opened with the id {v}."),
)
SYLLABLES = ("ka", "to", "vi", "mak", "ru", "len", "sor", "bi", "del", "qua", "fen", "tu", "ro", "zan", "mi",
             "pel", "dra", "go", "nix", "ha", "lo", "ver", "shi", "tam")
FACTS = (2, 5)  # facts per block, at least and at most
DEPTHS = (0.02, 0.75)  # where statements go, as fractions of the block's text
MIN_TEXT = 0.5  # at least this fraction of a recall block stays corpus text


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _value(rng: random.Random) -> str:
    digits = rng.randint(3, 8)
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def recall_block(text: list[int], seq_len: int, start: list[int], tokenize: Callable[[str], list[int]],
                 rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of `seq_len` tokens: `start`, then `text` (corpus token ids, at least what is needed) with
    2-5 facts inserted and asked for at the end -> (the block, [seq_len] bool: its answers' tokens, the
    value after each question)."""
    count = rng.randint(*FACTS)
    names: list[str] = []
    while len(names) < count:
        name = _name(rng)
        if name not in names:
            names.append(name)
    facts = []
    for name in names:
        statement, question = rng.choice(PHRASINGS)
        value = _value(rng)
        asked = question[: question.rindex(" {v}")].format(k=name, v=value)  # every question ends " {v}."
        facts.append((tokenize(" " + statement.format(k=name, v=value)),
                      (tokenize("\n" + asked), tokenize(" " + value) + tokenize("."))))
    while True:
        budget = seq_len - len(start) - sum(len(s) + len(q) + len(a) for s, (q, a) in facts)
        if budget >= MIN_TEXT * seq_len or len(facts) == 1:
            break
        facts.pop()
    body = list(text[: max(budget, 0)])
    places = sorted((round(rng.uniform(*DEPTHS) * len(body)), i) for i in range(len(facts)))
    out: list[int] = list(start)
    at = 0
    for place, i in places:
        out += body[at:place] + facts[i][0]
        at = place
    out += body[at:]
    answers = [False] * len(out)
    for i in rng.sample(range(len(facts)), len(facts)):
        asked, answer = facts[i][1]
        out += asked + answer
        answers += [False] * len(asked) + [True] * (len(answer) - 1) + [False]  # the value, not its period
    return torch.tensor(out[:seq_len], dtype=torch.long), torch.tensor(answers[:seq_len])


def with_recall(train: torch.Tensor, fraction: float, start: list[int], tokenize: Callable[[str], list[int]],
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`train` [N, seq_len] with round(fraction * N) of its blocks, spread by `seed`, made recall blocks (from
    their own text) -> (blocks, [N, seq_len] bool: the answers' tokens, none outside recall blocks)."""
    answers = torch.zeros(train.shape, dtype=torch.bool)
    count = round(fraction * len(train))
    if count == 0:
        return train, answers
    rng = random.Random(f"recall/{seed}")
    rows = sorted(rng.sample(range(len(train)), count))
    train = train.clone()
    seq_len = train.shape[1]
    for row in rows:
        text = train[row, len(start):].tolist()
        train[row], answers[row] = recall_block(text, seq_len, start, tokenize, rng)
    return train, answers
