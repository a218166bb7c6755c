"""Documents -> packed token blocks for training, plus held-out blocks for evaluation.

Documents, not blocks, are split between training and evaluation: a stable hash of each document's id
puts about `HELD_OUT_FRACTION` of them in the held-out set, whatever the seed, so evaluation text never
appears in training and stays the same across runs. The seed only orders the training documents.
Documents are read and tokenized lazily, in that order, until enough tokens are collected.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from linearize.data.recall import with_recall
from linearize.data.sources import Document, load_texts
from linearize.errors import LinearizeError

logger = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1
DEFAULT_MIX = {"code": 0.5, "prose": 0.5}
TOKENIZE_BATCH_CHARS = 1_000_000  # most text tokenized in one call; bounds what is read beyond the need
CHARS_PER_TOKEN_GUESS = 5  # a slight overestimate for English and code, so one call usually suffices
SPREAD_CHARS_PER_TOKEN = 12  # text read for one block of a long document: a block's worth even for bytes


@dataclass
class Blocks:
    """Packed token blocks.

    train: [N, seq_len] training blocks, shuffled across domains.
    eval: domain -> [M, eval_seq_len] blocks from held-out documents only; "unseen <domain>" from the
        sources training never draws from.
    train_tokens: domain -> number of training tokens taken from that domain.
    train_documents / eval_documents: domain -> ids of the documents read for those blocks, in order
        (the last one may be used only in part).
    """

    train: torch.Tensor
    eval: dict[str, torch.Tensor]
    train_tokens: dict[str, int]
    train_documents: dict[str, list[str]]
    eval_documents: dict[str, list[str]]
    long: dict[str, torch.Tensor] = field(default_factory=dict)
    long_documents: dict[str, list[str]] = field(default_factory=dict)
    answers: torch.Tensor | None = None  # [N, seq_len] bool: the answers' tokens in recall blocks (data.recall)

    @property
    def recall_blocks(self) -> int:
        """Training blocks made recall blocks (facts stated and asked for)."""
        return 0 if self.answers is None else int(self.answers.any(-1).sum())


# --- splitting and packing -----------------------------------------------------------------------------


def is_held_out(document_id: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether a document belongs to the held-out split: a stable hash of its id, not the seed, decides."""
    return _hash_unit(document_id) < fraction


def split_documents(documents: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """(train, held_out) by `is_held_out`, in input order.

    A corpus of two or more documents keeps at least one on each side (the document with the smallest
    hash is the one held out); a single document is all training.
    """
    if len(documents) < 2:
        return list(documents), []
    held_out_ids = {d.id for d in documents if is_held_out(d.id)}
    if not held_out_ids or len(held_out_ids) == len(documents):
        held_out_ids = {min((d.id for d in documents), key=_hash_unit)}
    train = [d for d in documents if d.id not in held_out_ids]
    held_out = [d for d in documents if d.id in held_out_ids]
    return train, held_out


def build_blocks(
    tokenizer: Any,
    source: str,
    seq_len: int,
    train_tokens: int,
    eval_tokens_per_domain: int,
    seed: int = 0,
    *,
    eval_seq_len: int | None = None,
    text_field: str = "text",
    long_tokens: int = 0,
    long_documents_per_domain: int = 1,
    recall_fraction: float = 0.0,
) -> Blocks:
    """Tokenize `source` and pack it into fixed-length blocks.

    Documents are tokenized without special tokens, joined with the tokenizer's EOS token and cut into
    blocks, each of which starts as the tokenizer starts a sequence (`start_tokens`: Gemma's BOS; nothing for
    SmolLM2); the last partial block is dropped. Training takes ceil(train_tokens / seq_len) blocks, shared
    between domains as `DEFAULT_MIX` says for the default source (a domain that runs out leaves its share
    to the others). Each domain gets ceil(eval_tokens_per_domain / eval_seq_len) held-out blocks.

    tokenizer: a Hugging Face tokenizer with an EOS token.
    seed: orders the training documents and shuffles the training blocks; the split does not depend on it.
    eval_seq_len: length of evaluation blocks; default `seq_len`. For the embedded corpora every long
        document gives one block (short ones are packed), in training and evaluation alike, so a small
        budget spreads over many documents.
    long_tokens: if > 0, `long_documents_per_domain` held-out documents per domain of at least that many
        tokens, cut to it (`Blocks.long`), for the long-range diagnostics.
    """
    eval_seq_len = eval_seq_len or seq_len
    if seq_len <= 0 or eval_seq_len <= 0:
        raise LinearizeError(
            f"sequence lengths must be positive, got seq_len={seq_len}, eval_seq_len={eval_seq_len}"
        )
    if train_tokens < 0 or eval_tokens_per_domain < 0:
        raise LinearizeError("token counts must not be negative")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise LinearizeError(
            "the tokenizer has no EOS token, which separates packed documents: set tokenizer.eos_token"
        )

    documents = load_texts(source, text_field)
    by_domain: dict[str, list[Document]] = {}
    unseen: dict[str, list[Document]] = {}
    for document in documents:
        (unseen if document.unseen else by_domain).setdefault(document.domain, []).append(document)
    weights = DEFAULT_MIX if source == "default" else {domain: 1.0 for domain in by_domain}
    domains = [domain for domain in weights if domain in by_domain]

    start = start_tokens(tokenizer)
    rng = random.Random(seed)
    # the embedded corpora have thousands of documents: one block from each spreads a small budget
    spread = source in ("default", "code", "prose")
    train_streams, eval_streams, held_out = {}, {}, {}
    for domain in domains:
        train_docs, held_out[domain] = split_documents(by_domain[domain])
        rng.shuffle(train_docs)
        held_out[domain].sort(key=lambda d: _hash_unit(d.id))
        train_streams[domain] = _BlockStream(tokenizer, train_docs, seq_len, eos, spread, start)
        eval_streams[domain] = _BlockStream(tokenizer, held_out[domain], eval_seq_len, eos, spread, start)
    for domain, docs in unseen.items():
        docs = sorted(docs, key=lambda d: _hash_unit(d.id))
        eval_streams[f"unseen {domain}"] = _BlockStream(tokenizer, docs, eval_seq_len, eos, spread, start)

    train_blocks = _take_mixed(train_streams, weights, math.ceil(train_tokens / seq_len), source, seq_len)
    eval_blocks: dict[str, torch.Tensor] = {}
    wanted_eval = math.ceil(eval_tokens_per_domain / eval_seq_len)
    for domain, stream in eval_streams.items():
        blocks = stream.take(wanted_eval)
        if wanted_eval and not blocks:
            raise LinearizeError(
                f"the '{domain}' part of data source '{source}' has too little held-out text for one "
                f"evaluation block of {eval_seq_len} tokens: give it more text (about "
                f"{HELD_OUT_FRACTION:.0%} of documents are held out) or ask for no evaluation tokens"
            )
        if len(blocks) < wanted_eval:
            logger.warning(
                "data source '%s' (%s) gave %d held-out evaluation blocks of the %d asked for",
                source,
                domain,
                len(blocks),
                wanted_eval,
            )
        eval_blocks[domain] = _stack(blocks, eval_seq_len)

    long_blocks, long_documents = {}, {}
    if long_tokens > 0:
        for domain in domains:
            long_blocks[domain], long_documents[domain] = _long_documents(
                tokenizer, held_out[domain], long_tokens, long_documents_per_domain, start
            )

    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
    train = _stack([block for _, block in train_blocks], seq_len)[order]
    train, answers = with_recall(train, recall_fraction, start, _tokenize(tokenizer), seed)
    train_counts = {domain: 0 for domain in domains}
    for domain, _ in train_blocks:
        train_counts[domain] += seq_len
    return Blocks(
        train=train,
        eval=eval_blocks,
        train_tokens=train_counts,
        train_documents={domain: stream.used_ids for domain, stream in train_streams.items()},
        eval_documents={domain: stream.used_ids for domain, stream in eval_streams.items()},
        long=long_blocks,
        long_documents=long_documents,
        answers=answers,
    )


def _tokenize(tokenizer: Any) -> Callable[[str], list[int]]:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def start_tokens(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer begins a sequence with (a BOS token where it adds one, as Gemma's does: Gemma 3
    270M's held-out perplexity is 1.4-2x higher without it), found by encoding one word both ways."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []


def _long_documents(tokenizer: Any, documents: list[Document], length: int, count: int, start: list[int]
                    ) -> tuple[torch.Tensor, list]:
    """The first `length` tokens (`start` and the document's first tokens) of the first `count` documents (in the
    given order) that have that many."""
    rows, ids = [], []
    for document in documents:
        if len(rows) == count:
            break
        text = document.read()
        if len(text) < length:  # fewer characters than tokens needed: too short whatever the tokenizer
            continue
        tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(tokens) >= length - len(start):
            rows.append(torch.tensor(start + tokens[: length - len(start)], dtype=torch.long))
            ids.append(document.id)
    return _stack(rows, length), ids


def file_blocks(
    tokenizer: Any, source: str, seq_len: int, max_blocks: int | None = None, text_field: str = "text"
) -> torch.Tensor:
    """All of `source` (a .txt/.jsonl file or directory; no held-out split) packed into [N, seq_len] blocks,
    for evaluating on text of the user's choosing."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream = _BlockStream(tokenizer, load_texts(source, text_field), seq_len, eos if eos is not None else 0,
                          start=start_tokens(tokenizer))
    blocks = stream.take(max_blocks if max_blocks is not None else 1 << 30)
    if not blocks:
        raise LinearizeError(
            f"'{source}' has fewer than {seq_len} tokens, too few for one evaluation block: give more text "
            "or a smaller --seq-len"
        )
    return _stack(blocks, seq_len)


def _take_mixed(
    streams: dict[str, _BlockStream], weights: dict[str, float], wanted: int, source: str, seq_len: int
) -> list[tuple[str, torch.Tensor]]:
    """`wanted` blocks split between domains by weight; a domain that runs short leaves its share to
    the others."""
    total_weight = sum(weights[domain] for domain in streams)
    quotas = {domain: int(wanted * weights[domain] / total_weight) for domain in streams}
    for domain in list(streams)[: wanted - sum(quotas.values())]:
        quotas[domain] += 1
    taken: list[tuple[str, torch.Tensor]] = []
    for domain, stream in streams.items():
        taken += [(domain, block) for block in stream.take(quotas[domain])]
    for domain, stream in streams.items():  # refill any shortfall from domains with text left
        taken += [(domain, block) for block in stream.take(wanted - len(taken))]
    if wanted and not taken:
        raise LinearizeError(
            f"data source '{source}' has too little training text for one block of {seq_len} tokens: "
            "give it more text or use a shorter sequence length"
        )
    if len(taken) < wanted:
        logger.warning(
            "data source '%s' ran out of training text: %d blocks of %d tokens instead of %d",
            source,
            len(taken),
            seq_len,
            wanted,
        )
    return taken


class _BlockStream:
    """Reads documents in order, tokenizes them in batches and hands out packed blocks on demand.
    With `one_per_document`, a document of at least a block gives exactly one block (from an offset fixed
    by its id) and shorter ones are packed together, so the blocks spread over many documents. Every block
    begins with `start` (the tokenizer's BOS, if it has one), then `block_len - len(start)` tokens of text."""

    def __init__(self, tokenizer: Any, documents: list[Document], block_len: int, eos: int,
                 one_per_document: bool = False, start: list[int] | None = None):
        self.tokenizer = tokenizer
        self.start = list(start or [])
        self.block_len = block_len - len(self.start)  # text tokens per block
        self.eos = eos
        self.one_per_document = one_per_document
        self.used_ids: list[str] = []
        self._documents = iter(documents)
        self._buffer: list[int] = []
        self._ready: list[torch.Tensor] = []

    def take(self, count: int) -> list[torch.Tensor]:
        blocks: list[torch.Tensor] = []
        while len(blocks) < count:
            if self._ready:
                blocks.append(self._with_start(self._ready.pop(0)))
                continue
            needed_tokens = (count - len(blocks)) * self.block_len - len(self._buffer)
            if len(self._buffer) < self.block_len and not self._fill(needed_tokens):
                break
            ready = min(len(self._buffer) // self.block_len, count - len(blocks))
            cut = ready * self.block_len
            packed = torch.tensor(self._buffer[:cut], dtype=torch.long).view(ready, self.block_len)
            blocks.extend(self._with_start(block) for block in packed)
            self._buffer = self._buffer[cut:]
        return blocks

    def _with_start(self, block: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.tensor(self.start, dtype=torch.long), block]) if self.start else block

    def _fill(self, needed_tokens: int) -> bool:
        """Tokenize the next documents, about `needed_tokens` worth, into the buffer.

        Returns False once all documents are used.
        """
        batch_ids, batch_texts, chars = [], [], 0
        for document in self._documents:
            text = document.read()
            if not text.strip():
                continue
            span = SPREAD_CHARS_PER_TOKEN * self.block_len
            if self.one_per_document and len(text) > 2 * span:
                # a long document gives one block: tokenize only a stretch at an offset fixed by its id
                start = int(_hash_unit(document.id + "#offset") * (len(text) - span))
                newline = text.find("\n", start, start + span)  # start on a line, not mid-word
                text = text[newline + 1 if newline >= 0 else start : start + span]
            batch_ids.append(document.id)
            batch_texts.append(text)
            chars += len(text)
            if chars >= min(TOKENIZE_BATCH_CHARS, CHARS_PER_TOKEN_GUESS * needed_tokens):
                break
        if not batch_texts:
            return False
        encoded = self.tokenizer(batch_texts, add_special_tokens=False, verbose=False)["input_ids"]
        for document_id, ids in zip(batch_ids, encoded):
            ids = ids + [self.eos]
            if self.one_per_document and len(ids) >= self.block_len:
                # one whole block from a long document, at an offset fixed by its id (not always its header)
                start = int(_hash_unit(document_id + "#block") * (len(ids) - self.block_len + 1))
                self._ready.append(torch.tensor(ids[start : start + self.block_len], dtype=torch.long))
                continue
            self._buffer.extend(ids)
        self.used_ids.extend(batch_ids)
        return True


def _stack(blocks: list[torch.Tensor], block_len: int) -> torch.Tensor:
    return torch.stack(blocks) if blocks else torch.empty(0, block_len, dtype=torch.long)


def _hash_unit(text: str) -> float:
    """A stable number in [0, 1) for `text` (unlike hash(), the same in every process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
