"""Special-token text inside the data: the rule ``data.special_tokens_in_text``.

A Hugging Face tokenizer turns the text of a special token (``<|im_end|>``, ``<|eot_id|>``,
``</s>``, ...) into that control token wherever it meets it. A response that quotes ChatML would
then hold an EOS and a turn marker mid-response, and a prompt could close its own turn. The
project never lets data become a control token:

* every prompt and response is tokenised with its special-token text as plain text (the
  characters, like any other text): only the chat template's own markers and the EOS appended
  to a response are special tokens (``selm_mcore.data.tokenize.encode_prompt`` /
  ``encode_response``). A prompt holding such text is encoded piece by piece between the
  template's markers (the text hidden from the template while it renders), so the markers stay
  special and the text does not; rows without such text are tokenised exactly as before;
* ``data.special_tokens_in_text`` says what a command does with a row that holds such text:

  ``plain`` (the default)  tokenise it as above;
  ``refuse``               stop, naming the file, row, field and token;
  ``skip``                 leave the row out: training and the reference pass drop it,
                           ``selm generate`` writes the prompt's row with no responses and
                           ``"skipped"``, and ``selm rank`` leaves such rows out.

  Every command that tokenises counts the rows concerned in its summary line.

Why plain by default: such text is data (a question about chat markup, a response that quotes
it, a literal the policy itself wrote in an earlier round), and the characters are what it
says; refusing would stop an online run on text the policy generated, and skipping changes the
data. ``refuse`` and ``skip`` are there for data where such text means a broken export.

Special tokens are the tokenizer's added tokens marked special plus its named special tokens
(bos, eos, pad, ...); other added tokens are vocabulary and keep their ids.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from selm_mcore.runtime.errors import InputError, short_repr

RULES = ("plain", "refuse", "skip")


class SpecialTokensError(InputError):
    """A row holds special-token text and data.special_tokens_in_text=refuse."""


class SpecialTokenText:
    """Finds the text of a tokenizer's special tokens (build once per tokenizer: it compiles
    one pattern of every special token, longest first)."""

    def __init__(self, tokenizer: Any):
        texts = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(token, "special", False):
                texts.add(str(token.content))
        texts.discard("")
        ordered = sorted(texts, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def find(self, text: str) -> str | None:
        """The first special-token text in ``text``, or None."""
        if self.pattern is None:
            return None
        match = self.pattern.search(text)
        return match.group(0) if match else None


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with special-token text encoded as plain text, nothing added."""
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def encode_prompt_plain(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    specials: SpecialTokenText,
    render: Callable[[Any, Sequence[Mapping[str, str]]], str],
) -> list[int]:
    """Prompt ids of a conversation whose contents hold special-token text: the contents'
    special-token text is hidden while ``render`` runs the chat template, the rendered text is
    cut at the template's own special tokens (kept as those tokens), and each piece between them
    is encoded with the hidden text put back as plain text."""
    assert specials.pattern is not None
    nonce = secrets.token_hex(4)
    hidden: list[str] = []

    def hide(match: re.Match[str]) -> str:
        hidden.append(match.group(0))
        return f"\ue000{nonce}:{len(hidden) - 1}\ue001"

    masked = [{**m, "content": specials.pattern.sub(hide, m["content"])} for m in messages]
    text = render(tokenizer, masked)
    placeholder = re.compile(f"\ue000{nonce}:(\\d+)\ue001")

    def encode_piece(piece: str) -> list[int]:
        restored = placeholder.sub(lambda m: hidden[int(m.group(1))], piece)
        return encode_plain(tokenizer, restored) if restored else []

    ids: list[int] = []
    position = 0
    for marker in specials.pattern.finditer(text):  # the template's own: the contents' are hidden
        ids += encode_piece(text[position : marker.start()])
        ids.append(int(tokenizer.convert_tokens_to_ids(marker.group(0))))
        position = marker.end()
    return ids + encode_piece(text[position:])


def row_texts(row: Any) -> Iterator[tuple[str, str]]:
    """(field, text) of every text a preference or prompt row is tokenised from."""
    for i, message in enumerate(row.prompt_messages):
        yield f"prompt message {i} ({message['role']})", message["content"]
    for name in ("chosen", "rejected", "reference_response"):
        value = getattr(row, name)
        if value is not None:
            yield name, value


def first_special_text(
    specials: SpecialTokenText, texts: Iterator[tuple[str, str]] | Sequence[tuple[str, str]]
) -> tuple[str, str] | None:
    """(field, token) of the first text holding special-token text, or None."""
    for field, text in texts:
        token = specials.find(text)
        if token is not None:
            return field, token
    return None


def keep_row(rule: str, hit: tuple[str, str] | None, where: str) -> bool:
    """Whether a row with ``hit`` (from ``first_special_text``) is tokenised under ``rule``:
    True for plain (or no hit), False for skip; refuse raises ``SpecialTokensError``."""
    if hit is None or rule == "plain":
        return True
    if rule == "skip":
        return False
    field, token = hit
    raise SpecialTokensError(
        f"{where}: {field} holds the text of the special token {short_repr(token)}, which "
        "would not be tokenised as that token (data.special_tokens_in_text=refuse). Fix: "
        "remove it from the data, or set data.special_tokens_in_text=plain (tokenise it as "
        "text) or skip (leave such rows out)"
    )


def messages_texts(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(field, text) of a conversation's messages."""
    return [
        (f"message {i} ({m.get('role')})", str(m.get("content", "")))
        for i, m in enumerate(messages)
    ]
