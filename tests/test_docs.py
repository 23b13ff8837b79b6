"""README.md and docs/ name only flags, config keys, presets and methods that exist."""
from __future__ import annotations

import re

import pytest

from fastncl.cli import _parser
from fastncl.config import Config, presets
from fastncl.methods.registry import names

from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", re.S)
KEY = re.compile(r"^([a-z_][a-z_0-9]*(?:\.[a-z_][a-z_0-9]*)+)(=\S*)?$")


def _paths(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _paths(value, f"{prefix}{key}.")
    return out


CONFIG = Config().to_dict()
KEYS = _paths(CONFIG)
def _subcommands(parser, prefix: str = "") -> dict[str, set]:
    """'train', 'data emoji', 'data embed', ... -> their flags."""
    out = {}
    for action in (parser._subparsers._group_actions if parser._subparsers else ()):
        for name, sub in action.choices.items():
            out[prefix + name] = set(sub._option_string_actions)
            out |= _subcommands(sub, f"{prefix}{name} ")
    return out


SUBCOMMANDS = _subcommands(_parser(names(), tuple(presets())))


def code_tokens(path):
    """(line of the document, the code's lines) for every code span and fenced block."""
    text = path.read_text(encoding="utf-8")
    for m in CODE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        yield line, (m.group(1) or m.group(2)).replace("\\\n", " ").splitlines()


def _words(code_line: str) -> list[str]:
    return [w.strip(",;()[]{}'\"") for w in code_line.split("#")[0].split()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_config_key_named_exists(doc):
    missing = []
    for line, code in code_tokens(doc):
        for word in (w for c in code for w in _words(c)):
            m = KEY.match(word)
            if m and m.group(1).split(".")[0] in CONFIG and m.group(1) not in KEYS:
                missing.append(f"{doc.name}:{line}: {word}")
    assert not missing, "config keys that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_fastncl_command_uses_real_flags_presets_and_methods(doc):
    wrong, commands = [], 0
    for line, code in code_tokens(doc):
        for text in code:
            words = _words(text)
            while "fastncl" in words:  # `pip ... && fastncl train ...` too
                words = words[words.index("fastncl") + 1:]
                if not words or words[0] not in SUBCOMMANDS:
                    break
                commands += 1
                sub, args = words[0], words[1:]
                if args and f"{sub} {args[0]}" in SUBCOMMANDS:  # fastncl data embed ...
                    sub, args = f"{sub} {args[0]}", args[1:]
                for i, word in enumerate(args):
                    if word in ("&&", "|", ";"):
                        break
                    flag = word.split("=")[0]
                    if flag.startswith("--") and flag not in SUBCOMMANDS[sub]:
                        wrong.append(f"{doc.name}:{line}: fastncl {sub} {flag}")
                    value = args[i + 1] if i + 1 < len(args) else ""
                    known = {"--preset": presets(), "--method": names()}.get(word)
                    if known is not None and value.islower():  # NAME, METHOD: placeholders
                        # a synopsis's alternatives, {a,b,c} or a|b (the braces already stripped)
                        wrong += [f"{doc.name}:{line}: {word} {v}" for v in re.split("[,|]", value) if v not in known]
    assert not wrong, "not what the CLI takes:\n" + "\n".join(wrong)
    if doc.name == "README.md":
        assert commands >= 2  # the two set-up commands at least


def test_the_checks_catch_what_they_are_for(tmp_path):
    doc = tmp_path / "bad.md"
    doc.write_text("Run `fastncl train --methd sps --preset sps-offical sps.not_a_key=1`.\n")
    with pytest.raises(AssertionError, match="sps.not_a_key"):
        test_every_config_key_named_exists(doc)
    with pytest.raises(AssertionError, match=r"--methd(.|\n)*--preset sps-offical"):
        test_every_fastncl_command_uses_real_flags_presets_and_methods(doc)
    doc.write_text("Run `fastncl data embed SRC OUT --encoder hf --chekpoint DIR`.\n")  # a nested subcommand's flags
    with pytest.raises(AssertionError, match=r"fastncl data embed --chekpoint"):
        test_every_fastncl_command_uses_real_flags_presets_and_methods(doc)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_local_link_and_figure_exists(doc):
    links = re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8"))
    missing = [link for link in links if "://" not in link
               and not (doc.parent / link.split("#")[0]).exists()]
    assert not missing, f"{doc.name} links to what is not there: {missing}"
