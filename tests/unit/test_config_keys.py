"""`selm config keys` and `selm --help`: every key documented, docs/config.md current, the help
in plain text."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

from child_env import child_env

from selm_mcore.config.keys import format_markdown, key_docs
from selm_mcore.config.schema import SelmConfig

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_every_key_is_listed_with_its_default_and_a_doc():
    docs = {d.key: d for d in key_docs()}
    expected = [
        f"{section}.{f.name}"
        for section, cls in typing.get_type_hints(SelmConfig).items()
        for f in dataclasses.fields(cls)
    ]
    assert list(docs) == expected
    assert [k for k, d in docs.items() if len(d.doc) < 10] == []  # each says what it is
    assert docs["online.eval"].type == "list[str]" and docs["online.eval"].default == "[]"
    assert docs["train.wandb_mode"].default == "'online'"
    assert docs["loss.beta"].doc.startswith("DPO's beta")
    assert [d.key for d in key_docs("eval")][0] == "eval.alpaca_eval_prompts"


def test_docs_config_md_is_the_commands_output():
    table = DOCS.read_text().split("\n\n", 2)[2].strip()
    assert table == format_markdown(key_docs()), "regenerate: selm config keys --markdown"


def test_help_is_plain_text():
    result = subprocess.run(
        [sys.executable, "-m", "selm_mcore.cli", "--help"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "``" not in result.stdout and ":func:" not in result.stdout
    assert "selm config keys" in result.stdout and "eval" in result.stdout
