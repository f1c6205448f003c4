"""Preference and prompt datasets: reading, validation, tokenisation, truncation, collation.

Pure CPU; needs only a Hugging Face tokenizer object (duck-typed), torch for collation and, for
Parquet files, pyarrow (``pip install selm-mcore[data]``).

File schema (one row per line of JSONL, or per row of a Parquet file), as UltraFeedback-binarized::

    {"prompt": "What is 2 plus 3?",                      # required
     "prompt_id": "a1b2",                                  # optional
     "chosen":   [{"role": "user", "content": "What is 2 plus 3?"},
                  {"role": "assistant", "content": "5."}],
     "rejected": [{"role": "user", "content": "What is 2 plus 3?"},
                  {"role": "assistant", "content": "6."}],
     "reference_response": "The answer is 5."}             # optional: y_ref

``chosen`` and ``rejected`` are whole conversations: an optional system turn, then user and
assistant turns alternating from a user turn, ending with the assistant turn being compared; both
must share the turns before that last one (the prompt conversation). A *prompt-only* file (later
rounds generate the pairs) has just ``prompt`` [+ ``prompt_id``]. Other columns are ignored; a
null optional field counts as absent (Parquet fills missing columns with nulls).

A bad row raises ``DataError`` naming file, 1-based row (line), the rule and the fix; with
``skip_bad_rows=True`` such rows are skipped, and their count is logged and returned.

Tokenisation (a documented, clean choice; the reference code inherits chat-template quirks):

* prompt   = ``apply_chat_template(prompt conversation, add_generation_prompt=True)`` as text,
  encoded once with ``add_special_tokens=False`` (the template itself writes any BOS);
* response = the assistant content encoded once with ``add_special_tokens=False``, then the
  tokenizer's EOS id appended;
* only response tokens (EOS included) carry labels.

Truncation as the reference code (TRL 0.8.6 ``tokenize_row``, truncation_mode keep_end): when
``len(prompt) + longest response > max_length`` the prompt keeps its LAST ``max_prompt_length``
tokens; if still too long, every response is cut to ``max_length - max_prompt_length`` tokens
(the EOS may be cut off, as there). One prompt is shared by chosen, rejected and y_ref, so y_ref
counts in "longest response" too: every sequence of an example then fits ``max_length``.

Collation (shape legend: B examples, S = 2 or 3 sequences per example, N = S * B, T padded length)
turns a micro-batch into one ``PreferenceBatch`` of N sequences ordered
``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}, yref_0..yref_{B-1}]`` with tokens,
labels (``labels[:, t] = tokens[:, t + 1]``), loss_mask (1 where the label is a response token)
and position_ids, right-padded to T.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
# How many skipped-row messages a skip-mode load writes to the log (the count is always logged).
_LOGGED_SKIPS = 5

_SCHEMA_HINT = (
    "see the schema in selm_mcore/data.py: preference rows need prompt (str) and chosen/rejected "
    "(lists of {role, content} ending in the assistant turn); prompt-only rows need prompt")


class DataError(ValueError):
    """A user-fixable problem in a data file, naming the file, the 1-based row, the rule, a fix."""

    def __init__(self, path: str | os.PathLike, row: int | None, rule: str, fix: str):
        self.path = str(path)
        self.row = row
        self.rule = rule
        self.fix = fix
        where = f"{self.path} row {row}" if row is not None else self.path
        super().__init__(f"{where}: {rule}. Fix: {fix}")


# --- rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceRow:
    """One validated row. ``chosen``/``rejected`` hold the final assistant contents only.

    ``prompt_messages`` is the conversation before the compared assistant turn (for prompt-only
    rows: one user turn with ``prompt``). ``source`` is ``"file:row"`` for later error messages.
    """

    prompt: str
    prompt_messages: tuple[dict[str, str], ...]
    chosen: str | None = None
    rejected: str | None = None
    reference_response: str | None = None
    prompt_id: str | None = None
    source: str = ""

    @property
    def has_pair(self) -> bool:
        return self.chosen is not None and self.rejected is not None

    def to_record(self) -> dict[str, Any]:
        """The row in the file schema (UltraFeedback-binarized), e.g. for a new round's data."""
        record: dict[str, Any] = {"prompt": self.prompt}
        if self.prompt_id is not None:
            record["prompt_id"] = self.prompt_id
        history = [dict(m) for m in self.prompt_messages]
        if self.has_pair:
            record["chosen"] = history + [{"role": "assistant", "content": self.chosen}]
            record["rejected"] = history + [{"role": "assistant", "content": self.rejected}]
        if self.reference_response is not None:
            record["reference_response"] = self.reference_response
        return record


@dataclass
class LoadedRows:
    """What ``read_rows`` returns: the valid rows and what was skipped (skip mode only)."""

    path: str
    kind: str  # "preference" or "prompt"
    rows: list[PreferenceRow]
    num_skipped: int = 0
    skipped: list[DataError] = field(default_factory=list)


def read_rows(path: str | os.PathLike, *, kind: str = "auto",
              skip_bad_rows: bool = False) -> LoadedRows:
    """Read and validate a JSONL or Parquet file of preference (or prompt-only) rows.

    kind: "preference" (prompt + chosen + rejected), "prompt" (prompt [+ prompt_id]; any pair
    columns are ignored) or "auto" (preference when the first row has ``chosen`` or ``rejected``).
    In a preference file either every row has ``reference_response`` or none does (the first valid
    row decides). Raises ``DataError`` on the first bad row unless ``skip_bad_rows``.
    """
    if kind not in ("auto", "preference", "prompt"):
        raise ValueError(f"kind={kind!r} must be one of auto, preference, prompt")
    path = Path(path)
    rows: list[PreferenceRow] = []
    skipped: list[DataError] = []
    has_yref: bool | None = None
    num_records = 0
    for row_number, record in _iter_records(path):
        num_records += 1
        try:
            if isinstance(record, DataError):
                raise record
            if kind == "auto":
                kind = "preference" if ("chosen" in record or "rejected" in record) else "prompt"
            row = _parse_record(record, kind, f"{path}:{row_number}", path, row_number)
            if kind == "preference":
                row_has_yref = row.reference_response is not None
                if has_yref is None:
                    has_yref = row_has_yref
                elif row_has_yref != has_yref:
                    raise DataError(
                        path, row_number,
                        "reference_response is " + ("present" if row_has_yref else "missing")
                        + " but earlier rows " + ("lack it" if has_yref else "have it")
                        + "; every row must have it or none",
                        "fill reference_response for every row (generate y_ref) or drop the "
                        "column, or set data.skip_bad_rows=true")
        except DataError as exc:
            if not skip_bad_rows:
                raise
            skipped.append(exc)
            continue
        rows.append(row)
    if num_records == 0:
        raise DataError(path, None, "the file holds no rows", "point data.train_path at a "
                        "non-empty JSONL or Parquet file")
    if skipped:
        logger.warning("%s: skipped %d of %d rows (data.skip_bad_rows=true)", path, len(skipped),
                       num_records)
        for exc in skipped[:_LOGGED_SKIPS]:
            logger.warning("  skipped: %s", exc)
        if len(skipped) > _LOGGED_SKIPS:
            logger.warning("  ... and %d more", len(skipped) - _LOGGED_SKIPS)
    if not rows:
        raise DataError(path, None, f"all {num_records} rows are invalid (first: {skipped[0]})",
                        "fix the file; " + _SCHEMA_HINT)
    logger.info("%s: read %d %s rows", path, len(rows), kind)
    return LoadedRows(path=str(path), kind=kind, rows=rows,
                      num_skipped=len(skipped), skipped=skipped)


def write_rows(rows: Sequence[PreferenceRow], path: str | os.PathLike) -> None:
    """Write rows as JSONL in the file schema (atomically: a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.to_record(), ensure_ascii=False) + "\n")
    tmp.replace(path)


def split_rounds(rows: Sequence[Any], num_rounds: int) -> list[list[Any]]:
    """Contiguous, disjoint, equal portions (integer division; the tail remainder is unused)."""
    if num_rounds < 1:
        raise ValueError(f"num_rounds={num_rounds} must be >= 1")
    size = len(rows) // num_rounds
    if size == 0:
        raise ValueError(f"{len(rows)} rows cannot be split into {num_rounds} non-empty rounds; "
                         "use more data or fewer rounds (online.rounds)")
    return [list(rows[r * size:(r + 1) * size]) for r in range(num_rounds)]


def _iter_records(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """Yield (1-based row, raw dict) or (row, DataError) for rows that do not even parse."""
    if not path.is_file():
        raise DataError(path, None, "the file does not exist", "check data.train_path")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path)
    elif suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(path)
    else:
        raise DataError(path, None, f"unknown file type {suffix!r}",
                        "use JSONL (.jsonl, one JSON object per line) or Parquet (.parquet)")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_number, DataError(
                    path, line_number, f"the line is not valid UTF-8 (byte {exc.start}: "
                    f"{raw[exc.start:exc.start + 4]!r})", "re-encode the file as UTF-8")
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_number, DataError(
                    path, line_number, f"invalid JSON ({exc.msg} at column {exc.colno})",
                    "write exactly one JSON object per line (check quotes, escapes, commas)")
                continue
            if not isinstance(record, dict):
                yield line_number, DataError(
                    path, line_number,
                    f"a row must be a JSON object, got {type(record).__name__}",
                    "write one {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...} object "
                    "per line")
                continue
            yield line_number, record


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading Parquet needs pyarrow: pip install 'selm-mcore[data]'") from exc
    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(path, None, f"not a readable Parquet file ({exc})",
                        "rewrite the file with pyarrow/pandas, or use JSONL") from exc
    row_number = 0
    for batch in parquet_file.iter_batches(batch_size=1024):
        try:
            records = batch.to_pylist()
        except UnicodeDecodeError:  # a string column holding invalid UTF-8: find the row(s)
            records = []
            for i in range(batch.num_rows):
                try:
                    records.extend(batch.slice(i, 1).to_pylist())
                except UnicodeDecodeError as exc:
                    records.append(DataError(path, row_number + i + 1,
                                             f"a text field is not valid UTF-8 ({exc.reason})",
                                             "re-encode the text as UTF-8"))
        for record in records:
            row_number += 1
            yield row_number, record


def _parse_record(record: dict, kind: str, source: str, path: Path, row: int) -> PreferenceRow:
    def fail(rule: str, fix: str) -> DataError:
        return DataError(path, row, rule, fix)

    def text_field(name: str, value: Any) -> str:
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise fail(f"{name} is not valid UTF-8", "re-encode the text as UTF-8") from None
        if not isinstance(value, str):
            raise fail(f"{name} must be a string, got {type(value).__name__}",
                       f"write {name} as a JSON string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # e.g. a lone surrogate written as "\ud800" in JSON
            raise fail(f"{name} is not valid UTF-8 (it holds a lone surrogate)",
                       "re-encode the text as UTF-8") from None
        return value

    def optional(name: str) -> str | None:
        value = record.get(name)
        return None if value is None else text_field(name, value)

    if record.get("prompt") is None:
        raise fail("missing field 'prompt'", "add the prompt text; " + _SCHEMA_HINT)
    prompt = text_field("prompt", record["prompt"])
    if not prompt.strip():
        raise fail("prompt is empty", "drop the row or fill the prompt")
    prompt_id = record.get("prompt_id")
    if prompt_id is not None:
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
            raise fail(f"prompt_id must be a string, got {type(prompt_id).__name__}",
                       "write prompt_id as a string or drop it")
        prompt_id = str(prompt_id)
    reference_response = optional("reference_response")
    if reference_response is not None and not reference_response.strip():
        raise fail("reference_response is empty",
                   "regenerate y_ref for this prompt or drop the row")

    if kind == "prompt":
        return PreferenceRow(prompt=prompt, prompt_messages=({"role": "user", "content": prompt},),
                             reference_response=reference_response, prompt_id=prompt_id,
                             source=source)

    conversations = {}
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise fail(f"missing field {name!r}", "add both chosen and rejected conversations; "
                       + _SCHEMA_HINT)
        conversations[name] = _parse_conversation(name, record[name], fail, text_field)
    history_chosen, chosen = conversations["chosen"]
    history_rejected, rejected = conversations["rejected"]
    if history_chosen != history_rejected:
        raise fail("chosen and rejected differ before their final assistant turn",
                   "both must hold the same prompt conversation and differ only in the last turn")
    return PreferenceRow(prompt=prompt, prompt_messages=history_chosen, chosen=chosen,
                         rejected=rejected, reference_response=reference_response,
                         prompt_id=prompt_id, source=source)


def _parse_conversation(name, value, fail, text_field) -> tuple[tuple[dict[str, str], ...], str]:
    """Validate a message list; return (the turns before the last, the last assistant content)."""
    order_fix = ("order the turns as an optional system turn, then user/assistant alternating "
                 "from a user turn, ending with the assistant turn")
    if not isinstance(value, list) or len(value) < 2:
        raise fail(f"{name} must be a list of at least 2 {{role, content}} messages",
                   "write e.g. [{\"role\": \"user\", ...}, {\"role\": \"assistant\", ...}]")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") is None or \
                message.get("content") is None:
            raise fail(f"{name}[{i}] must be a mapping with role and content",
                       "write each message as {\"role\": ..., \"content\": ...}")
        role = message["role"]
        if role not in ROLES:
            raise fail(f"{name}[{i}] has role {role!r}, not one of {', '.join(ROLES)}", order_fix)
        messages.append({"role": role, "content": text_field(f"{name}[{i}].content",
                                                             message["content"])})
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    expected = [("user", "assistant")[(i - start) % 2] for i in range(start, len(roles))]
    if roles[start:] != expected or roles[-1] != "assistant" or len(roles) - start < 2:
        raise fail(f"{name} has role order {roles}", order_fix)
    response = messages[-1]["content"]
    if not response.strip():
        raise fail(f"{name} has an empty final assistant response",
                   "drop the row or fill the response")
    return tuple(messages[:-1]), response


# --- tokenisation -----------------------------------------------------------------------------


def prompt_text(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The chat-templated prompt with the generation prompt, as text (also what vLLM is given)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, "
                        "expected str; does the tokenizer have a chat template?")
    return text


def encode_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Prompt token ids: the templated text encoded once, no special tokens added."""
    return list(tokenizer.encode(prompt_text(tokenizer, messages), add_special_tokens=False))


def encode_response(tokenizer, content: str) -> list[int]:
    """Response token ids: the assistant content encoded once (no special tokens) + EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; set eos_token in its config")
    return list(tokenizer.encode(content, add_special_tokens=False)) + [tokenizer.eos_token_id]


def truncate(prompt_ids: list[int], responses: list[list[int]], max_length: int,
             max_prompt_length: int) -> tuple[list[int], list[list[int]], bool, bool]:
    """The reference code's truncation (see the module docstring).

    Returns (prompt_ids, responses, prompt_truncated, response_truncated).
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length={max_prompt_length} < "
                         f"max_length={max_length}")
    longest = max(len(r) for r in responses)
    prompt_truncated = response_truncated = False
    if len(prompt_ids) + longest > max_length and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        prompt_truncated = True
    if len(prompt_ids) + longest > max_length:
        limit = max_length - max_prompt_length
        response_truncated = any(len(r) > limit for r in responses)
        responses = [r[:limit] for r in responses]
    return prompt_ids, responses, prompt_truncated, response_truncated


@dataclass(frozen=True)
class TokenizedExample:
    """One example's token ids: the shared prompt and each response (EOS included)."""

    index: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    yref_ids: tuple[int, ...] | None = None
    prompt_truncated: bool = False
    response_truncated: bool = False

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
    response_truncated: int = 0


def tokenize_row(row: PreferenceRow, tokenizer, *, index: int, max_length: int,
                 max_prompt_length: int) -> TokenizedExample:
    """Tokenise and truncate one preference row (y_ref too, when the row has one)."""
    if not row.has_pair:
        raise ValueError(f"{row.source}: a prompt-only row cannot be tokenised for training; "
                         "generate and rank responses first")
    prompt_ids = encode_prompt(tokenizer, row.prompt_messages)
    responses = [encode_response(tokenizer, row.chosen), encode_response(tokenizer, row.rejected)]
    if row.reference_response is not None:
        responses.append(encode_response(tokenizer, row.reference_response))
    prompt_ids, responses, prompt_cut, response_cut = truncate(
        prompt_ids, responses, max_length, max_prompt_length)
    return TokenizedExample(
        index=index,
        prompt_ids=tuple(prompt_ids),
        chosen_ids=tuple(responses[0]),
        rejected_ids=tuple(responses[1]),
        yref_ids=tuple(responses[2]) if len(responses) == 3 else None,
        prompt_truncated=prompt_cut,
        response_truncated=response_cut,
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

    def __init__(self, examples: Sequence[TokenizedExample],
                 stats: TruncationStats | None = None):
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
    def from_rows(cls, rows: Sequence[PreferenceRow], tokenizer, *, max_length: int,
                  max_prompt_length: int) -> PreferenceDataset:
        stats = TruncationStats(num_examples=len(rows))
        examples = []
        for i, row in enumerate(rows):
            example = tokenize_row(row, tokenizer, index=i, max_length=max_length,
                                   max_prompt_length=max_prompt_length)
            stats.prompt_truncated += example.prompt_truncated
            stats.response_truncated += example.response_truncated
            examples.append(example)
        logger.info(
            "tokenised %d examples (max_length %d, max_prompt_length %d): %d prompts truncated "
            "(kept the last %d tokens), %d examples with responses cut to %d tokens",
            stats.num_examples, max_length, max_prompt_length, stats.prompt_truncated,
            max_prompt_length, stats.response_truncated, max_length - max_prompt_length)
        return cls(examples, stats)

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer, *, max_length: int,
                  max_prompt_length: int, skip_bad_rows: bool = False) -> PreferenceDataset:
        loaded = read_rows(path, kind="preference", skip_bad_rows=skip_bad_rows)
        return cls.from_rows(loaded.rows, tokenizer, max_length=max_length,
                             max_prompt_length=max_prompt_length)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]

    def content_hash(self) -> str:
        return content_hash(self.examples)

    def max_sequence_length(self) -> int:
        return max(len(e.prompt_ids) + max(map(len, e.responses)) for e in self.examples)


# --- collation --------------------------------------------------------------------------------


@dataclass
class PreferenceBatch:
    """N = S * B sequences ordered [chosen_0..B-1, rejected_0..B-1, (yref_0..B-1)], padded to T.

    tokens, labels, position_ids: int64 [N, T]; loss_mask: float32 [N, T];
    example_indices: int64 [B] (dataset indices, e.g. to look up cached reference log-probs).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    example_indices: torch.Tensor
    has_yref: bool

    @property
    def num_examples(self) -> int:
        return int(self.example_indices.numel())

    @property
    def sequences_per_example(self) -> int:
        return 3 if self.has_yref else 2

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(
            tokens=self.tokens.to(device), labels=self.labels.to(device),
            loss_mask=self.loss_mask.to(device), position_ids=self.position_ids.to(device),
            example_indices=self.example_indices.to(device), has_yref=self.has_yref)

    def split(self, per_sequence: torch.Tensor):
        """Split a per-sequence tensor [N, ...] into (chosen, rejected, yref or None), each [B]."""
        b = self.num_examples
        if per_sequence.shape[0] != b * self.sequences_per_example:
            raise ValueError(f"expected {b * self.sequences_per_example} sequences, "
                             f"got {per_sequence.shape[0]}")
        yref = per_sequence[2 * b:] if self.has_yref else None
        return per_sequence[:b], per_sequence[b:2 * b], yref


def padded_length(longest: int, pad_to_multiple_of: int = 64, seq_length: int | None = None) -> int:
    """T for a batch whose longest sequence has ``longest`` tokens.

    ``seq_length`` fixes T (equal shapes for every micro-batch, as pipeline parallelism needs);
    otherwise T is ``longest`` rounded up to a multiple of ``pad_to_multiple_of``.
    """
    if seq_length is not None:
        if longest > seq_length:
            raise ValueError(f"a sequence has {longest} tokens > seq_length={seq_length}; "
                             "raise seq_length to at least data.max_length")
        return seq_length
    return int(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)


def collate_preferences(examples: Sequence[TokenizedExample], *, pad_id: int,
                        pad_to_multiple_of: int = 64, seq_length: int | None = None
                        ) -> PreferenceBatch:
    """One PreferenceBatch from B examples (see the module docstring for the layout)."""
    if not examples:
        raise ValueError("cannot collate an empty micro-batch")
    with_yref = {e.yref_ids is not None for e in examples}
    if len(with_yref) > 1:
        raise ValueError("a micro-batch mixes examples with and without y_ref")
    has_yref = with_yref == {True}
    num_sequences = 3 if has_yref else 2
    sequences = []  # (prompt length, full ids)
    for s in range(num_sequences):
        for example in examples:
            sequences.append((len(example.prompt_ids),
                              example.prompt_ids + example.responses[s]))
    longest = max(len(ids) for _, ids in sequences)
    t = padded_length(longest, pad_to_multiple_of, seq_length)
    n = len(sequences)
    tokens = torch.full((n, t), pad_id, dtype=torch.long)
    labels = torch.full((n, t), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, t), dtype=torch.float32)
    for i, (prompt_len, ids) in enumerate(sequences):
        if prompt_len < 1:
            raise ValueError("a prompt has no tokens: the first response token needs a position "
                             "to be predicted from")
        ids_t = torch.tensor(ids, dtype=torch.long)
        length = len(ids)
        tokens[i, :length] = ids_t
        labels[i, :length - 1] = ids_t[1:]
        # position t predicts ids[t + 1]: a response token when t + 1 >= prompt_len
        loss_mask[i, prompt_len - 1:length - 1] = 1.0
    position_ids = torch.arange(t, dtype=torch.long).unsqueeze(0).expand(n, t).contiguous()
    return PreferenceBatch(
        tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
        example_indices=torch.tensor([e.index for e in examples], dtype=torch.long),
        has_yref=has_yref)


# --- sampling ---------------------------------------------------------------------------------


class DistributedBatchSampler:
    """An epoch's global batches of dataset indices; each DP rank gets its slice of each.

    The epoch order is ``range(n)`` or a permutation seeded by (seed, epoch). Step k's global batch
    is ``order[k * G:(k + 1) * G]`` (G = global_batch_size); DP rank r gets the contiguous slice
    ``[r * G/dp, (r + 1) * G/dp)`` of it, so ranks are disjoint and together cover the batch. The
    incomplete tail (n mod G examples) is dropped, so every step has the same shape.

    ``consumed_samples`` (a multiple of G) is the position in the epoch order; it advances when a
    batch is yielded, so a checkpoint taken after processing that batch resumes at the next one.
    """

    def __init__(self, num_examples: int, global_batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 consumed_samples: int = 0):
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                             f"of the data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, {dp_size})")
        if num_examples < global_batch_size:
            raise ValueError(f"{num_examples} examples are fewer than train.global_batch_size="
                             f"{global_batch_size}: use more data or a smaller global batch")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.num_steps = num_examples // global_batch_size
        self._check_position(consumed_samples)
        self.consumed_samples = consumed_samples

    def _check_position(self, consumed_samples: int) -> None:
        if consumed_samples % self.global_batch_size or \
                not 0 <= consumed_samples <= self.num_steps * self.global_batch_size:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a multiple of global_batch_size="
                f"{self.global_batch_size} in [0, {self.num_steps * self.global_batch_size}]; "
                "was the checkpoint written with another batch size or dataset?")

    def epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def __len__(self) -> int:
        """Steps left in this epoch."""
        return self.num_steps - self.consumed_samples // self.global_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order()
        local = self.global_batch_size // self.dp_size
        end = self.num_steps * self.global_batch_size
        while self.consumed_samples < end:
            start = self.consumed_samples + self.dp_rank * local
            self.consumed_samples += self.global_batch_size
            yield order[start:start + local]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed_samples": self.consumed_samples, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "global_batch_size", "num_examples"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data position was saved with {key}={state[key]}, this run has "
                                 f"{getattr(self, key)}; resume with the same data and batch size")
        self._check_position(state["consumed_samples"])
        self.epoch = state["epoch"]
        self.consumed_samples = state["consumed_samples"]


def micro_batches(indices: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Split one rank's slice of a global batch into micro-batches (it must divide evenly)."""
    if micro_batch_size < 1 or len(indices) % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} must divide the per-rank batch "
                         f"of {len(indices)} (global_batch_size / data-parallel size)")
    return [list(indices[i:i + micro_batch_size])
            for i in range(0, len(indices), micro_batch_size)]
