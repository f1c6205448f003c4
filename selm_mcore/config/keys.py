"""Every config key with its type, default and one-line doc: ``selm config keys [SECTION]``.

    selm config keys                 # all sections, as plain text
    selm config keys eval            # one section
    selm config keys --markdown      # the table of docs/config.md

The docs are the comments written above each field in the config tree's source
(``selm_mcore/config/schema.py``, ``selm_mcore/config/eval_section.py``): one place to document a
key (a test checks that every key has one). The one-line doc is the comment's first sentence.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass

from selm_mcore.config.schema import ConfigError, SelmConfig


@dataclass(frozen=True)
class KeyDoc:
    key: str  # section.name
    type: str
    default: str
    doc: str


def _field_comments(cls: type) -> dict[str, str]:
    """{field: the comment block right above it} from the class's source."""
    lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse("".join(lines))
    out: dict[str, str] = {}
    for node in tree.body[0].body:  # type: ignore[attr-defined]
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        block: list[str] = []
        row = node.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            block.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        out[node.target.id] = " ".join(block)
    return out


_SENTENCE_END = re.compile(r"(?<!\.[a-z])\.\s")  # not the dots of "e.g. " / "i.e. "


def _first_sentence(text: str) -> str:
    match = _SENTENCE_END.search(text)
    return text[: match.start() + 1] if match else text


def _type_name(annotation: typing.Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def key_docs(section: str | None = None) -> list[KeyDoc]:
    """The keys of every section (or of ``section``), in the config tree's order."""
    sections = typing.get_type_hints(SelmConfig)
    if section is not None and section not in sections:
        raise ConfigError(f"unknown section {section!r}; known: {', '.join(sections)}")
    out = []
    for name, cls in sections.items():
        if section is not None and name != section:
            continue
        comments = _field_comments(cls)
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            out.append(
                KeyDoc(
                    f"{name}.{f.name}",
                    _type_name(hints[f.name]),
                    repr(getattr(defaults, f.name)),
                    _first_sentence(comments.get(f.name, "")),
                )
            )
    return out


def format_text(docs: list[KeyDoc]) -> str:
    width = max(len(d.key) for d in docs)
    return "\n".join(
        f"{d.key:<{width}}  {d.type}, default {d.default}\n{'':<{width}}  {d.doc}" for d in docs
    )


def format_markdown(docs: list[KeyDoc]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [f"| `{d.key}` | {cell(d.type)} | `{cell(d.default)}` | {cell(d.doc)} |" for d in docs]
    return "\n".join(["| key | type | default | what it is |", "|---|---|---|---|", *rows])


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["keys"], help="keys: list the config keys")
    parser.add_argument("section", nargs="?", default=None, help="only this section")
    parser.add_argument("--markdown", action="store_true", help="a markdown table")


def main(args) -> int:
    docs = key_docs(args.section)
    print(format_markdown(docs) if args.markdown else format_text(docs))
    return 0
