"""Tokenised preference examples: chat template, tokenisation, truncation, the dataset.

Needs only a Hugging Face tokenizer object (duck-typed); no torch, no Megatron.

Tokenisation (a documented, clean choice; the reference code inherits chat-template quirks):

* prompt   = ``apply_chat_template(prompt conversation, add_generation_prompt=True)`` as text,
  encoded once with ``add_special_tokens=False`` (the template itself writes any BOS: Llama-3's,
  ChatML's none). A tokenizer that starts every text with its BOS (``add_bos_token``: the
  Llama-style tokenizers of Mistral/Zephyr and Phi-3, whose templates write none) gets that one
  BOS in front, as its model saw in training; vLLM generation renders prompts with the same
  function, so its prompt tokens are the training ones;
* response = the assistant content encoded once with ``add_special_tokens=False``, then the
  tokenizer's EOS id appended;
* only response tokens (EOS included) carry labels.

Truncation as the reference code (its ``tokenize_row``: TRL 0.8.6 with truncation_mode
keep_end), decided by the PAIR alone: when ``len(prompt) + longer(chosen, rejected) >
max_length``, the prompt keeps its LAST ``max_prompt_length`` tokens; if still too long, chosen
and rejected are cut to ``max_length - max_prompt_length`` tokens (the EOS may be cut off, as
there). y_ref never makes the prompt, chosen or rejected shorter; it shares the prompt as
truncated for the pair and is cut on its own:

* when the pair's responses were cut, y_ref is cut to the same ``max_length -
  max_prompt_length`` tokens (exactly the reference code, which applies the pair's rule to it);
* otherwise the reference code leaves y_ref whole, so its sequence may run past max_length (a
  generated y_ref holds up to generation.max_tokens tokens + EOS). Here it is cut to
  ``max_length - len(prompt)`` tokens instead: one documented difference, so that every
  sequence of an example fits ``max_length`` (padding, ``data.pad_to_max_length`` and the
  packing budgets rely on it).

So a pair's size is bounded: each of its 2-3 sequences (prompt + response) is at most
``max_length`` tokens.

    tokenizer = load_tokenizer(cfg.model, tokenizer_dir)
    dataset = load_preferences(cfg.data, tokenizer)      # PreferenceDataset, indices 0..n-1
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from selm_mcore.data.rows import PreferenceRow, read_rows
from selm_mcore.runtime.errors import InputError

logger = logging.getLogger(__name__)


# --- tokenisation -----------------------------------------------------------------------------


def load_tokenizer(model_cfg, tokenizer_dir: str | os.PathLike):
    """The HF tokenizer of a model folder (remote code only with model.trust_remote_code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(tokenizer_dir), trust_remote_code=model_cfg.trust_remote_code
    )


def pad_token_id(tokenizer) -> int:
    """The id right-padding uses: pad_token_id, else eos_token_id (padding is never a label)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise InputError("the tokenizer has neither pad_token_id nor eos_token_id")
    return int(pad)


def render_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The chat-templated prompt with the generation prompt, as text."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, "
            "expected str; does the tokenizer have a chat template?"
        )
    return text


def leading_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of every text by default (``add_bos_token``:
    Mistral's, Phi-3's, Llama-3's), or None when it adds none (ChatML tokenizers). Llama-3's
    template writes that BOS itself, so ``encode_prompt`` adds none there."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    without = list(tokenizer.encode("a", add_special_tokens=False))
    return int(bos) if with_special[:1] == [bos] and without[:1] != [bos] else None


def encode_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Prompt token ids: the templated text encoded once, no special tokens added, except the
    tokenizer's default leading BOS when the template wrote none (``leading_bos``)."""
    ids = list(tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False))
    bos = leading_bos(tokenizer)
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


def encode_response(tokenizer, content: str) -> list[int]:
    """Response token ids: the assistant content encoded once (no special tokens) + EOS."""
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos_token_id; set eos_token in its config")
    return list(tokenizer.encode(content, add_special_tokens=False)) + [tokenizer.eos_token_id]


def truncate(
    prompt_ids: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[list[int]], bool, bool]:
    """The reference code's truncation (see the module docstring).

    ``responses`` = [chosen, rejected] or [chosen, rejected, y_ref]: the length check uses the
    longer of chosen and rejected only; y_ref is cut on its own (``truncate_yref``).
    Returns (prompt_ids, responses, prompt_truncated, pair_truncated): pair_truncated says
    whether chosen or rejected lost tokens.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length={max_prompt_length} < max_length={max_length}"
        )
    if len(responses) not in (2, 3):
        raise ValueError(
            f"expected [chosen, rejected] or [chosen, rejected, y_ref], got "
            f"{len(responses)} responses"
        )
    pair, yref = list(responses[:2]), responses[2] if len(responses) == 3 else None
    longer = max(len(r) for r in pair)
    prompt_truncated = pair_cut = False
    if len(prompt_ids) + longer > max_length and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        prompt_truncated = True
    if len(prompt_ids) + longer > max_length:
        pair_cut = True
        pair = [r[: max_length - max_prompt_length] for r in pair]
    pair_truncated = any(len(cut) < len(r) for cut, r in zip(pair, responses[:2]))
    if yref is not None:
        pair.append(truncate_yref(yref, len(prompt_ids), pair_cut, max_length, max_prompt_length))
    return prompt_ids, pair, prompt_truncated, pair_truncated


def truncate_yref(
    yref_ids: list[int], prompt_length: int, pair_cut: bool, max_length: int, max_prompt_length: int
) -> list[int]:
    """y_ref after the pair's truncation: cut like the pair when the pair was cut (the
    reference code), else to what fits after the pair's prompt (``max_length - prompt_length``;
    the reference code leaves it whole there)."""
    limit = max_length - max_prompt_length if pair_cut else max_length - prompt_length
    return list(yref_ids[:limit])


@dataclass(frozen=True)
class TokenizedExample:
    """One example's token ids: the shared prompt and each response (EOS included)."""

    index: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    yref_ids: tuple[int, ...] | None = None
    prompt_truncated: bool = False
    response_truncated: bool = False  # chosen or rejected cut
    yref_truncated: bool = False

    @property
    def responses(self) -> list[tuple[int, ...]]:
        """chosen, rejected[, y_ref]: the collation order."""
        out = [self.chosen_ids, self.rejected_ids]
        if self.yref_ids is not None:
            out.append(self.yref_ids)
        return out


@dataclass
class TruncationStats:
    num_examples: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0  # examples whose chosen or rejected was cut
    yref_truncated: int = 0


def tokenize_row(
    row: PreferenceRow, tokenizer, *, index: int, max_length: int, max_prompt_length: int
) -> TokenizedExample:
    """Tokenise and truncate one preference row (y_ref too, when the row has one)."""
    if not row.has_pair:
        raise InputError(
            f"{row.source}: a prompt-only row cannot be tokenised for training; "
            "generate and rank responses first"
        )
    assert row.chosen is not None and row.rejected is not None  # has_pair
    prompt_ids = encode_prompt(tokenizer, row.prompt_messages)
    responses = [encode_response(tokenizer, row.chosen), encode_response(tokenizer, row.rejected)]
    if row.reference_response is not None:
        responses.append(encode_response(tokenizer, row.reference_response))
    full_yref_length = len(responses[2]) if len(responses) == 3 else 0
    prompt_ids, responses, prompt_cut, response_cut = truncate(
        prompt_ids, responses, max_length, max_prompt_length
    )
    return TokenizedExample(
        index=index,
        prompt_ids=tuple(prompt_ids),
        chosen_ids=tuple(responses[0]),
        rejected_ids=tuple(responses[1]),
        yref_ids=tuple(responses[2]) if len(responses) == 3 else None,
        prompt_truncated=prompt_cut,
        response_truncated=response_cut,
        yref_truncated=len(responses) == 3 and len(responses[2]) < full_yref_length,
    )


def row_hash(example: TokenizedExample) -> str:
    """sha256 of one tokenised example (prompt and every response, in order)."""
    digest = hashlib.sha256()
    for part in (example.prompt_ids, *example.responses):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(np.asarray(part, dtype="<i8").tobytes())
    if example.yref_ids is None:
        digest.update(b"no-yref")
    return digest.hexdigest()


def content_hash(examples: Sequence[TokenizedExample]) -> str:
    """sha256 over the ordered row hashes: the data part of the reference-cache key."""
    digest = hashlib.sha256(f"selm-data/1 {len(examples)}".encode())
    for example in examples:
        digest.update(bytes.fromhex(row_hash(example)))
    return digest.hexdigest()


class PreferenceDataset:
    """Tokenised examples with stable indices 0..len-1 (the order of the rows given)."""

    def __init__(self, examples: Sequence[TokenizedExample], stats: TruncationStats | None = None):
        for i, example in enumerate(examples):
            if example.index != i:
                raise ValueError(f"example {i} has index {example.index}; indices must be 0..n-1")
        with_yref = {example.yref_ids is not None for example in examples}
        if len(with_yref) > 1:
            raise ValueError("some examples have y_ref and others do not")
        self.examples = list(examples)
        self.has_yref = with_yref == {True}
        self.stats = stats or TruncationStats(num_examples=len(self.examples))

    @classmethod
    def from_rows(
        cls, rows: Sequence[PreferenceRow], tokenizer, *, max_length: int, max_prompt_length: int
    ) -> PreferenceDataset:
        stats = TruncationStats(num_examples=len(rows))
        examples = []
        for i, row in enumerate(rows):
            example = tokenize_row(
                row, tokenizer, index=i, max_length=max_length, max_prompt_length=max_prompt_length
            )
            stats.prompt_truncated += example.prompt_truncated
            stats.response_truncated += example.response_truncated
            stats.yref_truncated += example.yref_truncated
            examples.append(example)
        logger.info(
            "tokenised %d examples (max_length %d, max_prompt_length %d): %d prompts truncated "
            "(kept the last %d tokens), %d examples with chosen/rejected cut to %d tokens, %d "
            "y_ref cut to fit",
            stats.num_examples,
            max_length,
            max_prompt_length,
            stats.prompt_truncated,
            max_prompt_length,
            stats.response_truncated,
            max_length - max_prompt_length,
            stats.yref_truncated,
        )
        return cls(examples, stats)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        tokenizer,
        *,
        max_length: int,
        max_prompt_length: int,
        skip_bad_rows: bool = False,
        max_row_bytes: int = 0,
    ) -> PreferenceDataset:
        loaded = read_rows(
            path, kind="preference", skip_bad_rows=skip_bad_rows, max_row_bytes=max_row_bytes
        )
        return cls.from_rows(
            loaded.rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length
        )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]

    def content_hash(self) -> str:
        return content_hash(self.examples)

    def check_token_ids(self, vocab_size: int) -> None:
        """Refuse token ids outside the model's vocabulary (a tokenizer that does not belong to
        the model): checked once here instead of on every micro-batch."""
        for example in self.examples:
            for ids in (example.prompt_ids, *example.responses):
                if ids and (max(ids) >= vocab_size or min(ids) < 0):
                    bad = max(ids) if max(ids) >= vocab_size else min(ids)
                    raise InputError(
                        f"example {example.index} holds token id {bad}, outside the model's "
                        f"vocabulary [0, {vocab_size}): the tokenizer does not belong to the "
                        "model; use the model folder's own tokenizer"
                    )

    def max_sequence_length(self) -> int:
        return max(len(e.prompt_ids) + max(map(len, e.responses)) for e in self.examples)


def load_preferences(data_cfg, tokenizer) -> PreferenceDataset:
    """The tokenised preference pairs of ``data.train_path`` (rules of ``data_cfg``)."""
    if not data_cfg.train_path:
        raise InputError(
            "data.train_path is empty: point it at the round's preference pairs (JSONL or Parquet)"
        )
    return PreferenceDataset.from_file(
        data_cfg.train_path,
        tokenizer,
        max_length=data_cfg.max_length,
        max_prompt_length=data_cfg.max_prompt_length,
        skip_bad_rows=data_cfg.skip_bad_rows,
        max_row_bytes=data_cfg.max_row_bytes,
    )
