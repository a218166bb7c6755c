"""Stage 1 block by block: every store and every split into blocks trains the same mixers, a streamed teacher
holds one block of weights at a time, and a block resumes from its own checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_model

from linearize import LinearizeError, linearize
from linearize.config import TransferConfig
from linearize.models import LinearizedForCausalLM
from linearize.teacher import FileWeights
from linearize.teacher.streaming import empty_teacher, tied_names
from linearize.train.targets import TeacherTargets
from linearize.train.transfer import AttentionTransfer, attention_transfer

ATTENTION = {"window_size": 8, "sink_tokens": 2, "memory_buckets": 16}
LAYERS = 4


def teacher():
    return make_tiny_model("llama", initializer_range=0.2, num_hidden_layers=LAYERS)


def sequences() -> torch.Tensor:
    return torch.randint(0, 250, (4, 48), generator=torch.Generator().manual_seed(0))


def stage1(**changes) -> TransferConfig:
    settings = {"tokens": 4 * 48, "epochs": 2, "lr": 0.05, "warmup_steps": 1, "cache_dtype": "float32"}
    return TransferConfig(**{**settings, **changes})


def mixers(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.mixer_state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Today's layout: one block of every layer, every layer's activations stored."""
    model = linearize(teacher(), "hybrid", ATTENTION)
    result = attention_transfer(model, sequences(), stage1(store="layers"), tmp_path_factory.mktemp("ref"), 100)
    return mixers(model), result


@pytest.mark.parametrize("store,layers_per_block", [("layers", 1), ("blocks", 1), ("blocks", 3), ("none", 2)])
def test_every_store_and_split_into_blocks_trains_the_same_mixers(reference, tmp_path, store, layers_per_block):
    model = linearize(teacher(), "hybrid", ATTENTION)
    config = stage1(store=store, layers_per_block=layers_per_block)
    result = attention_transfer(model, sequences(), config, tmp_path, 100)
    expected, expected_result = reference
    for name, value in mixers(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the stage's loss curve is the same joint loss, summed over blocks
    assert [h["step"] for h in result.history] == [h["step"] for h in expected_result.history]
    for mine, theirs in zip(result.history, expected_result.history):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    assert set(result.per_layer_loss) == set(range(LAYERS))


def test_what_each_store_keeps_on_disk(tmp_path):
    """layers: every layer's input and output; blocks: one hidden state per block boundary; none: nothing."""
    sizes = {}
    for store in ("layers", "blocks", "none"):
        model = linearize(teacher(), "hybrid", ATTENTION)
        stage = AttentionTransfer(model, sequences(), stage1(store=store, layers_per_block=1), tmp_path / store, 100)
        stage.collect()
        kept = [p for p in (tmp_path / store).rglob("*.safetensors")]
        sizes[store] = sum(p.stat().st_size for p in kept)
        names = {p.parent.parent.name for p in kept}
        assert names == {"layers": {"activations", "inputs"}, "blocks": {"inputs"}, "none": set()}[store]
    tokens, hidden, heads = 4 * 48, 64, 4 * 16
    assert sizes["blocks"] == pytest.approx(tokens * (LAYERS - 1) * hidden * 4, rel=0.05)  # float32 here
    assert sizes["layers"] == pytest.approx(sizes["blocks"] + tokens * LAYERS * (hidden + heads) * 4, rel=0.05)
    assert sizes["none"] == 0


def test_a_streamed_teacher_holds_one_block_and_trains_the_same_mixers(reference, tmp_path):
    """The teacher read from its files one block at a time: the same mixers as with the whole teacher in memory,
    at most one block of weights resident (counted by the loader), and the stage-2 targets from the last block,
    for the blocks stage 2 reads only."""
    whole = teacher()
    whole.save_pretrained(tmp_path / "teacher")
    skeleton = empty_teacher(whole.config, torch.float32)
    assert all(p.is_meta for p in skeleton.parameters())
    assert (skeleton.lm_head.weight is skeleton.model.embed_tokens.weight) == whole.config.tie_word_embeddings
    model = LinearizedForCausalLM.from_teacher(skeleton, "hybrid", ATTENTION)
    weights = FileWeights(tmp_path / "teacher", torch.float32, tied=tied_names(whole.config))
    targets = TeacherTargets(tmp_path / "targets", top_k=8, blocks=[0, 1, 3])
    attention_transfer(model, sequences(), stage1(store="blocks", layers_per_block=1), tmp_path / "s1", 100,
                       targets=targets, weights=weights)
    expected, _ = reference
    for name, value in mixers(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)

    size = {name: p.numel() * 4 for name, p in whole.named_parameters()}
    layer = sum(v for k, v in size.items() if k.startswith("model.layers.0."))
    embed, head = size["model.embed_tokens.weight"], size["lm_head.weight"] + size["model.norm.weight"]
    assert weights.peak_bytes == max(layer + embed, layer + head)  # block 0 + embeddings, or the last + head
    assert weights.peak_bytes < 0.5 * sum(size.values())
    assert weights.resident_bytes == 0 and all(p.is_meta for n, p in model.named_parameters() if ".mixer." not in n)

    assert targets.missing(list(range(4))) == [2] and targets.wanted(list(range(4))) == []
    ids = [0, 1, 3]
    stored_indices, stored_logprobs = targets.get(ids, lambda rows: pytest.fail("targets should be stored"))
    with torch.no_grad():
        logprobs = whole(sequences()[ids]).logits.log_softmax(-1)
    torch.testing.assert_close(stored_logprobs, logprobs.gather(-1, stored_indices), rtol=1e-4, atol=1e-5)


def test_a_block_resumes_from_its_own_checkpoint_and_finished_blocks_are_not_redone(reference, tmp_path, monkeypatch):
    import linearize.train.transfer as transfer

    calls = {"n": 0}
    real = transfer.transfer_loss

    def dies_in_block_two(layer, *args, **kwargs):
        calls["n"] += layer.layer_idx == 2
        if calls["n"] > 3:
            raise KeyboardInterrupt  # a killed process, between two checkpoints of block 2
        return real(layer, *args, **kwargs)

    model = linearize(teacher(), "hybrid", ATTENTION)
    config = stage1(store="blocks", layers_per_block=1)
    monkeypatch.setattr(transfer, "transfer_loss", dies_in_block_two)
    with pytest.raises(KeyboardInterrupt):
        attention_transfer(model, sequences(), config, tmp_path, checkpoint_every=2)
    monkeypatch.setattr(transfer, "transfer_loss", real)
    blocks = tmp_path / "blocks"
    finished = {b.name: (b / "result.json").stat().st_mtime_ns for b in blocks.iterdir()
                if (b / "result.json").exists()}
    assert sorted(finished) == ["block_00", "block_01"]
    assert json.loads((blocks / "block_02" / "state" / "state.json").read_text())["progress"]["step"] >= 2

    resumed = linearize(teacher(), "hybrid", ATTENTION)
    attention_transfer(resumed, sequences(), config, tmp_path, checkpoint_every=2)
    assert {b: (blocks / b / "result.json").stat().st_mtime_ns for b in finished} == finished
    expected, _ = reference
    for name, value in mixers(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_corrupt_stored_shard_is_a_clear_error(tmp_path):
    model = linearize(teacher(), "hybrid", ATTENTION)
    stage = AttentionTransfer(model, sequences(), stage1(store="blocks", layers_per_block=2), tmp_path, 100)
    stage.collect()
    shard = next((tmp_path / "inputs").rglob("shard_*.safetensors"))
    shard.write_bytes(b"garbage")
    with pytest.raises(LinearizeError, match="corrupt .* delete the file and re-run"):
        stage.train_block(1)
