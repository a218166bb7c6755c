"""The docs do not rot: the config reference lists exactly the schema's keys, every `linearize` command in the
README's and docs' shell blocks parses, its settings included, and every relative link and image resolves."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from linearize.config import RunConfig, deep_merge, load_user_config
from linearize.methods import METHODS, build_config

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def reference_rows() -> dict[str, set[str]]:
    """{section: keys} from the table in docs/config.md ("top level", "data", "attention (hybrid)", ...)."""
    rows = {}
    for line in (ROOT / "docs" / "config.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("section", "---"):
            continue
        section = cells[0].replace("`", "")
        keys = {re.match(r"`([a-z_]+)`", item.strip()).group(1) for item in cells[1].split(", ") if
                re.match(r"`([a-z_]+)`", item.strip())}
        rows[section] = keys
    return rows


def schema() -> dict[str, set[str]]:
    """{section: keys} of the config schema: every dataclass section of RunConfig (found, not listed, so a new
    section is caught too), the top level, and each method's attention settings."""
    sections = {f.name: type(f.default_factory()) for f in dataclasses.fields(RunConfig)
                if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())}
    assert {"data", "transfer", "finetune"} <= set(sections)
    out = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in sections.items()}
    out["top level"] = {f.name for f in dataclasses.fields(RunConfig)} - set(sections) - {"attention"}
    for name, method in METHODS.items():
        out[f"attention ({name})"] = {f.name for f in dataclasses.fields(method.Settings)}
    return out


def test_the_config_reference_lists_exactly_the_schemas_keys():
    documented, expected = reference_rows(), schema()
    assert set(documented) == set(expected)
    for section, keys in expected.items():
        assert documented[section] == keys, f"{section}: missing {keys - documented[section]}, " \
                                            f"unknown {documented[section] - keys}"


def test_the_reference_check_fails_when_a_key_or_a_section_is_added_without_docs(monkeypatch):
    from linearize.config import TransferConfig

    @dataclasses.dataclass
    class Grown(TransferConfig):
        a_new_key: int = 0

    @dataclasses.dataclass
    class WithGrownTransfer(RunConfig):
        transfer: Grown = dataclasses.field(default_factory=Grown)

    monkeypatch.setitem(globals(), "RunConfig", WithGrownTransfer)
    with pytest.raises(AssertionError, match="a_new_key"):
        test_the_config_reference_lists_exactly_the_schemas_keys()

    @dataclasses.dataclass
    class Serving:
        knob: int = 0

    @dataclasses.dataclass
    class WithNewSection(RunConfig):
        serving: Serving = dataclasses.field(default_factory=Serving)

    monkeypatch.setitem(globals(), "RunConfig", WithNewSection)
    with pytest.raises(AssertionError, match="serving"):
        test_the_config_reference_lists_exactly_the_schemas_keys()


def shell_commands() -> list[tuple[str, str]]:
    """(document, command) for every line of a ```bash block that runs linearize (continuations joined)."""
    found = []
    for document in DOCUMENTS:
        for block in re.findall(r"```bash\n(.*?)```", document.read_text(), flags=re.S):
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split(" # ")[0].strip()
                if re.match(r"^(linearize |torchrun .*-m linearize )", command):
                    found.append((document.name, command))
    return found


COMMANDS = shell_commands()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 15 and {d for d, _ in COMMANDS} >= {"README.md", "scale.md"}


@pytest.mark.parametrize("document,command", COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_every_documented_command_parses(document, command):
    from linearize.cli import parser, resolve_config_path

    words = shlex.split(command)
    args = parser().parse_args(words[words.index("linearize") + 1 :] if words[0] == "linearize" else
                               words[words.index("-m") + 2 :])
    if args.command in ("run", "config", "plan"):  # the settings are real keys with valid values
        path = args.config
        user = load_user_config(None, args.overrides)
        if path is not None and (Path(path).is_file() or "/" not in path and not path.endswith(".yaml")):
            user = deep_merge(load_user_config(resolve_config_path(path)), user)
        build_config(user)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|(?:src|href)=[\"']([^\"']+)[\"']")


def relative_links(document: Path) -> list[str]:
    """Targets of the Markdown links and images, and of the HTML src / href attributes, that name a file of the
    repository (not a web address, an anchor on the same page, or embedded data)."""
    targets = [a or b for a, b in LINK.findall(document.read_text())]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t)]


LINKED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*.html"))]


@pytest.mark.parametrize("document", LINKED, ids=[d.name for d in LINKED])
def test_every_relative_link_and_image_resolves(document):
    broken = [t for t in relative_links(document) if not (document.parent / t.split("#")[0]).exists()]
    assert not broken, f"{document.relative_to(ROOT)} links to missing files: {broken}"


def test_the_link_check_sees_links_images_and_html_and_skips_web_addresses(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('[a](a.md) ![b](img/b.png "title") [c](https://example.org/c) [d](#d) [e](e.md#part) '
                    '<img src="f.png"> <a href="mailto:x@y.z">x</a> <img src="data:image/png;base64,AAAA">')
    assert relative_links(page) == ["a.md", "img/b.png", "e.md#part", "f.png"]
