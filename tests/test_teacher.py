"""Teachers load from every kind of source, come back frozen, and unsupported families are refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from linearize.errors import LinearizeError
from linearize.teacher import CACHE_FORMAT, CACHE_MARKER, TeacherInfo, load_teacher
from linearize.teacher.loading import _cache_entry_is_valid


def test_local_directory_round_trip(tmp_path, byte_tokenizer):
    model = make_tiny_model("qwen3", seed=1)
    model.save_pretrained(tmp_path)
    byte_tokenizer.save_pretrained(tmp_path)

    loaded, tokenizer = load_teacher(str(tmp_path))

    assert loaded.teacher_info == TeacherInfo(str(tmp_path), str(tmp_path.resolve()), "qwen3")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.config._attn_implementation == "sdpa"
    assert tokenizer.eos_token_id == 256
    input_ids = torch.tensor([tokenizer("def f(): pass")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)


def test_local_directory_loads_in_requested_dtype(tmp_path, byte_tokenizer):
    make_tiny_model("llama").save_pretrained(tmp_path)
    byte_tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_teacher(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_unsupported_model_type_names_supported_ones(tmp_path):
    config = GPT2Config(vocab_size=260, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(
        LinearizeError, match="model type 'gpt2' is not supported.*llama, mistral, qwen2, qwen3"
    ):
        load_teacher(str(tmp_path))


def test_missing_local_path_says_what_to_pass(tmp_path):
    with pytest.raises(LinearizeError, match="does not exist"):
        load_teacher(str(tmp_path / "nowhere" / "model.gguf"))


def test_directory_without_config_or_gguf_is_refused(tmp_path):
    with pytest.raises(LinearizeError, match="no config.json"):
        load_teacher(str(tmp_path))


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(LinearizeError, match="not a .gguf file"):
        load_teacher(str(path))


def test_teacher_cache_validation_spots_missing_and_truncated_files(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path)
    files = {p.name: p.stat().st_size for p in tmp_path.iterdir() if p.is_file()}
    assert not _cache_entry_is_valid(tmp_path)  # no marker yet: an interrupted build
    (tmp_path / CACHE_MARKER).write_text(json.dumps({"format": CACHE_FORMAT, "files": files}))
    assert _cache_entry_is_valid(tmp_path)

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert not _cache_entry_is_valid(tmp_path)
    weights.unlink()
    assert not _cache_entry_is_valid(tmp_path)


def test_embedded_default_teacher_is_smollm2(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert model.teacher_info.source_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert getattr(config, "quantization_config", None) is None
    assert not any(p.requires_grad for p in model.parameters())

    input_ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_gguf_cache_is_keyed_by_contents_and_drops_stale_entries(tmp_path, monkeypatch):
    """Two installs of one file share an entry; an edited file replaces its entry; an old-format entry
    whose file is gone is removed (fresh installs used to leave half a GB each behind).
    """
    from safetensors.torch import save_file

    import linearize.teacher.loading as teacher

    builds = []

    def fake_build(gguf, entry, fingerprint):  # the real one de-quantises; the keying is what is tested
        entry.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(entry / "model.safetensors"))
        manifest = {"format": CACHE_FORMAT, "source": fingerprint, "files": {"model.safetensors": 0}}
        manifest["files"]["model.safetensors"] = (entry / "model.safetensors").stat().st_size
        (entry / CACHE_MARKER).write_text(json.dumps(manifest))
        builds.append(entry)

    monkeypatch.setattr(teacher, "_build_gguf_cache", fake_build)
    cache = tmp_path / "cache"
    orphan = cache / "teachers" / "model-0123456789ab"  # format 1, built from a venv since deleted
    orphan.mkdir(parents=True)
    gone = str(tmp_path / "deleted-venv" / "model.gguf")
    (orphan / CACHE_MARKER).write_text(json.dumps({"format": 1, "source": {"gguf": gone, "format": 1}, "files": {}}))
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(64)))

    entry = teacher._cached_gguf_dir(first, cache)
    assert teacher._cached_gguf_dir(second, cache) == entry  # same contents, other path: no second build
    assert builds == [entry] and not orphan.exists()

    first.write_bytes(b"GGUF" + bytes(range(1, 65)))  # the file at that path changes
    edited = teacher._cached_gguf_dir(first, cache)
    assert edited != entry and builds == [entry, edited]
    assert sorted(p.name for p in (cache / "teachers").iterdir()) == [edited.name]


def write_gguf(path, architecture: str) -> None:
    """A minimal GGUF file (one tensor, a few keys) claiming `architecture`."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("architecture,message", [
    ("jamba", r"cannot read GGUF file '.*unreadable\.gguf': GGUF model with architecture jamba is not supported"),
    ("mamba", r"model type 'mamba' is not supported \(teacher '.*unreadable\.gguf'\)"),
])
def test_a_gguf_of_another_architecture_is_refused_naming_the_file(tmp_path, architecture, message):
    from linearize.teacher import load_teacher_config

    path = tmp_path / "unreadable.gguf"
    write_gguf(path, architecture)
    for load in (load_teacher_config, load_teacher):
        with pytest.raises(LinearizeError, match=message):
            load(str(path), cache_dir=tmp_path / "cache")


def test_embedded_gemma3_270m_is_read_from_its_packages(tmp_path):
    """The second embedded teacher: its GGUF assembled from the part packages into the cache, read as a
    gemma3_text config whose 15 local layers a conversion keeps and whose 3 global ones it converts (meta
    device: no weight is de-quantised)."""
    from linearize.layers.attention import linearized_attentions
    from linearize.models import LinearizedForCausalLM
    from linearize.teacher import load_teacher_config, teacher_license
    from linearize.teacher.families import local_layers
    from linearize.teacher.streaming import empty_teacher

    config = load_teacher_config("gemma3-270m", cache_dir=tmp_path)
    assert (tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf").stat().st_size > 200e6
    assert (config.model_type, config.num_hidden_layers, config.head_dim, config.sliding_window) == (
        "gemma3_text", 18, 256, 512)
    assert local_layers(config) == [i for i in range(18) if i not in (5, 11, 17)]
    student = LinearizedForCausalLM.from_teacher(empty_teacher(config, torch.float32), "hybrid", {},
                                                 device=torch.device("meta"))
    assert [layer.layer_idx for layer in linearized_attentions(student)] == [5, 11, 17]
    assert "Gemma Terms of Use" in teacher_license("gemma3-270m")


def test_a_missing_embedded_teacher_package_says_what_to_install(monkeypatch, tmp_path):
    import importlib

    from linearize.teacher import load_teacher_config

    real = importlib.import_module

    def without_gemma(name, *args):
        if name.startswith("gemma3_270m"):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_gemma)
    with pytest.raises(LinearizeError, match=r"pip install 'linearize\[gemma\]'"):
        load_teacher_config("gemma3-270m", cache_dir=tmp_path)


def test_a_kept_teacher_result_is_read_back_equal_and_any_change_is_a_new_entry(tmp_path, byte_tokenizer):
    """TeacherResults: the second ask reads the first's value and tensors back, equal; another input, setting,
    kind, code fingerprint or teacher file computes again; an unreadable entry is computed again and replaced."""
    import os

    from linearize.teacher.results import TeacherResults

    teacher = tmp_path / "teacher"
    make_tiny_model("llama").save_pretrained(teacher)
    byte_tokenizer.save_pretrained(teacher)
    blocks = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    calls = []

    def compute():
        calls.append(1)
        return {"nll": 1 / 3, "pair": (1, 2)}, {"predictions": blocks[:, 1:].to(torch.int32)}

    def ask(results, inputs=(blocks,), kind="held-out", settings=1):
        return results.get(kind, list(inputs), compute, {"n": settings})

    results = TeacherResults(teacher, torch.float32, torch.device("cpu"), code="v1", root=tmp_path / "cache")
    first, again = ask(results), ask(results)
    assert len(calls) == 1 and first[0] == again[0] == {"nll": 1 / 3, "pair": [1, 2]}
    assert torch.equal(first[1]["predictions"], again[1]["predictions"])
    ask(results, inputs=(blocks + 1,))
    ask(results, settings=2)
    ask(results, kind="another")
    ask(TeacherResults(teacher, torch.float32, torch.device("cpu"), code="v2", root=tmp_path / "cache"))
    os.utime(teacher / "config.json", ns=(1, 1))
    ask(TeacherResults(teacher, torch.float32, torch.device("cpu"), code="v1", root=tmp_path / "cache"))
    assert len(calls) == 6
    ask(TeacherResults(teacher, torch.float32, torch.device("cpu"), code="v1", root=tmp_path / "cache"))
    assert len(calls) == 6
    for entry in (tmp_path / "cache" / "teacher-results").glob("held-out-*.json"):
        entry.write_text("{")
    ask(results)
    assert len(calls) == 7 and ask(results)[0] == first[0] and len(calls) == 7
