"""Students are Hugging Face models: Auto classes, both directory variants, generate(), peft, push_to_hub,
and lm-eval's HFLM on padded batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_byte_tokenizer, make_tiny_model, tokens

import linearize
from linearize.models import ADAPTER_FILE
from linearize.models.saving import save_adapter, save_full

ROOT = Path(__file__).resolve().parents[1]


def trained_student(teacher_dir: Path, method: str = "hybrid", attention: dict | None = None):
    """A student of the tiny teacher saved in `teacher_dir`, with perturbed mixers and a random LoRA
    adapter, as training would leave it (a PeftModel)."""
    from peft import LoraConfig, get_peft_model

    from linearize.teacher import load_teacher

    teacher, _ = load_teacher(str(teacher_dir))
    model = linearize.linearize(teacher, method, attention or {"window_size": 8, "sink_tokens": 2, "decay": 0.9})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.mixer_state_dict().values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return peft_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(teacher dir, adapter-only dir, full-weights dir, logits of the trained student on `tokens()`)."""
    root = tmp_path_factory.mktemp("hf")
    make_tiny_model("qwen3").save_pretrained(root / "teacher")
    make_byte_tokenizer().save_pretrained(root / "teacher")
    student = trained_student(root / "teacher")
    with torch.no_grad():
        logits = student(tokens()).logits
    save_adapter(student, root / "adapter", tokenizer=make_byte_tokenizer())
    save_full(student, root / "full", tokenizer=make_byte_tokenizer())
    return root / "teacher", root / "adapter", root / "full", logits


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")


def test_both_variants_hold_what_they_should(saved):
    _, adapter, full, _ = saved
    assert (adapter / ADAPTER_FILE).is_file() and not (adapter / "model.safetensors").exists()
    assert (full / "model.safetensors").is_file() and not (full / ADAPTER_FILE).exists()
    assert (adapter / ADAPTER_FILE).stat().st_size < (full / "model.safetensors").stat().st_size / 5
    for directory in (adapter, full):
        assert '"model_type": "linearized"' in (directory / "config.json").read_text()
        assert (directory / "tokenizer.json").is_file()


@pytest.mark.parametrize("variant", ["adapter", "full"])
def test_auto_classes_in_a_fresh_process_give_the_logits_of_linearize_load(saved, variant, tmp_path):
    _, adapter, full, expected = saved
    directory = adapter if variant == "adapter" else full
    code = f"""
import torch, linearize
from transformers import AutoModelForCausalLM, AutoTokenizer
from safetensors.torch import save_file
from helpers import tokens
from linearize.layers.attention import LinearizedAttention
model = AutoModelForCausalLM.from_pretrained({str(directory)!r})
AutoTokenizer.from_pretrained({str(directory)!r})
assert type(model).__name__ == "LinearizedForCausalLM", type(model)
assert all(isinstance(layer.self_attn, LinearizedAttention) for layer in model.model.layers)
with torch.no_grad():
    save_file({{"logits": model(tokens()).logits}}, {str(tmp_path / "logits.safetensors")!r})
"""
    result = python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file

    auto = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    loaded, _ = linearize.load(directory)
    with torch.no_grad():
        torch.testing.assert_close(auto, loaded(tokens()).logits, rtol=0, atol=0)
    torch.testing.assert_close(auto, expected, rtol=1e-5, atol=1e-5)


def test_transformers_without_linearize_refuses_the_directory(saved):
    _, _, full, _ = saved
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(full)!r})"
    result = python(code)
    assert result.returncode != 0
    assert "linearized" in result.stderr


def test_a_run_directory_or_its_model_directory_load_alike(saved, tmp_path):
    _, adapter, _, _ = saved
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(adapter, target_is_directory=True)
    assert linearize.api.find_model_dir(run) == run / "model"
    with pytest.raises(linearize.LinearizeError, match="not a linearized model directory"):
        linearize.load(tmp_path / "nothing")


@pytest.mark.parametrize("variant", ["adapter", "full"])
def test_push_to_hub_uploads_the_variant_with_a_model_card(saved, variant, monkeypatch):
    """Everything up to the network: the repo is created and the folder uploaded (both calls captured)."""
    import huggingface_hub

    _, adapter, full, _ = saved
    model, tokenizer = linearize.load(adapter if variant == "adapter" else full)
    calls = {}

    class Repo:
        repo_id = "someone/tiny-linearized"

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id
        return Repo()

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        return "uploaded"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert model.push_to_hub("tiny-linearized", tokenizer=tokenizer) == "uploaded"
    weights = ADAPTER_FILE if variant == "adapter" else "model.safetensors"
    assert weights in calls["files"] and "config.json" in calls["files"] and "tokenizer.json" in calls["files"]
    assert "import linearize" in calls["card"]


@pytest.mark.parametrize("method", ["hybrid", "liger"])
def test_beam_search_reorders_the_whole_state_sinks_included(method):
    """Beam search through the constant-memory cache (reordered each step) = beam search recomputing
    everything from scratch each step (no cache): only right if every part of the state follows its beam."""
    model = linearize.linearize(make_tiny_model("llama"), method, {"window_size": 4, "sink_tokens": 2})
    prompt = tokens(batch=1, length=6)
    kwargs = {"max_new_tokens": 10, "num_beams": 3, "do_sample": False, "pad_token_id": 0, "num_return_sequences": 3}
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_sampling_is_reproducible_and_stays_in_the_vocabulary():
    model = linearize.linearize(make_tiny_model("mistral"), "hybrid", {"window_size": 4})
    prompt = tokens(batch=2, length=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0))
    assert torch.equal(*runs) and runs[0].shape == (2, 14) and int(runs[0].max()) < 260


def test_peft_trains_a_loaded_student(saved):
    from peft import LoraConfig, get_peft_model

    _, adapter, _, _ = saved
    model, _ = linearize.load(adapter)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    losses = []
    for _ in range(3):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_student_saved_before_memory_bias_existed_is_served_without_it(saved, tmp_path):
    """A saved hybrid's config lacking `memory_bias` (written before it existed) loads with bias 0, as the
    student was trained; one that holds it keeps it."""
    import json
    import shutil

    from linearize.models.configuration import LinearizedConfig

    _, _, full, _ = saved
    assert LinearizedConfig.from_pretrained(full).attention["memory_bias"] == 2.0  # the default, saved
    old = tmp_path / "old"
    shutil.copytree(full, old)
    config = json.loads((old / "config.json").read_text())
    del config["attention"]["memory_bias"]
    (old / "config.json").write_text(json.dumps(config))
    model, _ = linearize.load(old, device="cpu")
    assert model.config.attention["memory_bias"] == 0.0
    mixers = [m.mixer for m in model.modules() if hasattr(m, "mixer") and hasattr(m.mixer, "memory_bias")]
    assert mixers and all(m.memory_bias == () for m in mixers)


def test_a_trained_student_takes_a_sparse_cache_when_loaded_and_nothing_that_needs_training(saved):
    """LoLA's use: the cache set on a saved student (no weight changes); settings that change weights refused."""
    _, _, full, logits = saved
    x = tokens()
    model, _ = linearize.load(full, device="cpu", attention={"sparse_keys": 3, "sparse_heads": [[1, 0]]})
    assert model.config.attention["sparse_keys"] == 3
    kept = [getattr(m.self_attn.mixer, "sparse_keys", 0) for m in model.model.layers]
    assert kept[1] == 3 and kept[0] == 0
    with torch.no_grad():
        cached = model(x).logits
    torch.testing.assert_close(cached[:, :8], logits[:, :8])  # within the window nothing differs
    assert (cached - logits).abs().max() > 1e-4
    with pytest.raises(linearize.LinearizeError, match="feature_dim.*cannot change without retraining"):
        linearize.load(full, device="cpu", attention={"feature_dim": 4})
    with pytest.raises(linearize.LinearizeError, match="sparse_heads lists"):
        linearize.load(full, device="cpu", attention={"sparse_keys": 3, "sparse_heads": [[9, 0]]})
