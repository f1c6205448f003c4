"""Preference and prompt rows: the file schema, validation with clear errors, and prompts.

Pure Python (no torch): reading goes through ``selm_mcore.runtime.files`` (JSONL or Parquet).

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
``skip_bad_rows=True`` such rows are skipped, and their count is logged and returned. A row
with more than ``max_row_bytes`` of text (data.max_row_bytes) is such a bad row: it is refused
before tokenisation, which would otherwise cost memory in proportion (a 10 MB row: 3.4 GB).

Repeated rows, repeated prompt_ids and rows whose chosen equals their rejected response are
valid but suspicious (a duplicated file, a merge gone wrong, a full tie in ranking: no
preference signal); ``read_rows`` counts them (``find_duplicates``) and logs a warning with the
counts and the first rows concerned.

``LoadedRows.record_rows`` keeps the file row of every record, valid or not, so the round
portions (``selm_mcore.data.portions.file_portion``) are slices of the ORIGINAL file; skipped rows
leave their portion smaller and never shift a boundary.

``prompt_conversation(row)`` is the one place that says which conversation a (loosely shaped)
row asks to continue; generation, ranking and the online loop all use it.

Next in the data flow: ``selm_mcore.data.tokenize`` (tokenisation, truncation) and
``selm_mcore.data.batches`` (collation, sampling).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selm_mcore.data.hub import is_hub_source
from selm_mcore.data.sources import iter_source_records
from selm_mcore.runtime.errors import InputError
from selm_mcore.runtime.files import DataError, write_jsonl_atomic

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# How many skipped-row messages a skip-mode load writes to the log (the count is always logged).
_LOGGED_SKIPS = 5

_SCHEMA_HINT = (
    "see the schema in selm_mcore/data/rows.py: preference rows need prompt (str) and "
    "chosen/rejected "
    "(lists of {role, content} ending in the assistant turn); prompt-only rows need prompt"
)

__all__ = [
    "DataError",
    "PreferenceRow",
    "LoadedRows",
    "read_rows",
    "write_rows",
    "prompt_conversation",
    "raw_prompt",
    "strip_response",
    "DuplicateReport",
    "find_duplicates",
]
# The fields a row's text is read from (other columns are ignored, so not counted).
_TEXT_FIELDS = ("prompt", "chosen", "rejected", "reference_response")
# How many rows of each kind a duplicate warning names.
_NAMED_DUPLICATES = 3


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
    """What ``read_rows`` returns: the valid rows and what was skipped (skip mode only).

    ``record_rows``: the 1-based row of every record of the file, valid or not, in file order
    (what ``file_portion`` splits, so skipped rows never shift a portion's boundaries).
    """

    path: str
    kind: str  # "preference" or "prompt"
    rows: list[PreferenceRow]
    num_skipped: int = 0
    skipped: list[DataError] = field(default_factory=list)
    record_rows: list[int] = field(default_factory=list)
    duplicates: DuplicateReport | None = None


def read_rows(
    path: str | os.PathLike,
    *,
    kind: str = "auto",
    skip_bad_rows: bool = False,
    max_row_bytes: int = 0,
) -> LoadedRows:
    """Read and validate a JSONL or Parquet file (or an ``hf://`` dataset,
    ``selm_mcore.data.sources``) of preference (or prompt-only) rows.

    kind: "preference" (prompt + chosen + rejected), "prompt" (prompt [+ prompt_id]; any pair
    columns are ignored) or "auto" (preference when the first row has ``chosen`` or ``rejected``).
    In a preference file either every row has ``reference_response`` or none does (the first valid
    row decides). Raises ``DataError`` on the first bad row unless ``skip_bad_rows``; a row with
    more than ``max_row_bytes`` bytes of text (0 = no limit) is a bad row. Repeated rows and
    prompt_ids and chosen == rejected are counted (``LoadedRows.duplicates``) and logged.
    """
    if kind not in ("auto", "preference", "prompt"):
        raise ValueError(f"kind={kind!r} must be one of auto, preference, prompt")
    path = str(path) if is_hub_source(path) else Path(path)
    rows: list[PreferenceRow] = []
    skipped: list[DataError] = []
    has_yref: bool | None = None
    record_rows: list[int] = []
    for row_number, record in iter_source_records(path):
        record_rows.append(row_number)
        try:
            if isinstance(record, DataError):
                raise record
            _check_row_size(record, max_row_bytes, path, row_number)
            if kind == "auto":
                kind = "preference" if ("chosen" in record or "rejected" in record) else "prompt"
            row = _parse_record(record, kind, path, row_number)
            if kind == "preference":
                has_yref = _same_yref_column(row, has_yref, path, row_number)
        except DataError as exc:
            if not skip_bad_rows:
                raise
            skipped.append(exc)
            continue
        rows.append(row)
    num_records = len(record_rows)
    if num_records == 0:
        raise DataError(
            path,
            None,
            "the file holds no rows",
            "point data.train_path at a non-empty JSONL or Parquet file",
        )
    if skipped:
        _log_skipped(path, skipped, num_records)
    if not rows:
        raise DataError(
            path,
            None,
            f"all {num_records} rows are invalid (first: {skipped[0]})",
            "fix the file; " + _SCHEMA_HINT,
        )
    logger.info("%s: read %d %s rows", path, len(rows), kind)
    duplicates = find_duplicates(rows)
    if duplicates.any():
        logger.warning("%s: %s", path, duplicates.summary())
    return LoadedRows(
        path=str(path),
        kind=kind,
        rows=rows,
        num_skipped=len(skipped),
        skipped=skipped,
        record_rows=record_rows,
        duplicates=duplicates,
    )


def _same_yref_column(
    row: PreferenceRow, file_has_yref: bool | None, path: str | Path, row_number: int
) -> bool:
    """Whether the file's preference rows have y_ref (the first valid row decides); a row that
    differs from the earlier ones is a bad row."""
    row_has_yref = row.reference_response is not None
    if file_has_yref is not None and row_has_yref != file_has_yref:
        raise DataError(
            path,
            row_number,
            "reference_response is "
            + ("present" if row_has_yref else "missing")
            + " but earlier rows "
            + ("lack it" if file_has_yref else "have it")
            + "; every row must have it or none",
            "fill reference_response for every row (generate y_ref) or drop the "
            "column, or set data.skip_bad_rows=true",
        )
    return row_has_yref


def _log_skipped(path: str | Path, skipped: Sequence[DataError], num_records: int) -> None:
    logger.warning(
        "%s: skipped %d of %d rows (data.skip_bad_rows=true)", path, len(skipped), num_records
    )
    for error in skipped[:_LOGGED_SKIPS]:
        logger.warning("  skipped: %s", error)
    if len(skipped) > _LOGGED_SKIPS:
        logger.warning("  ... and %d more", len(skipped) - _LOGGED_SKIPS)


def _text_bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(v) for v in value)
    return 0


def _check_row_size(record: dict, max_row_bytes: int, path: str | Path, row: int) -> None:
    if not max_row_bytes:
        return
    size = sum(_text_bytes(record.get(name)) for name in _TEXT_FIELDS)
    if size > max_row_bytes:
        raise DataError(
            path,
            row,
            f"the row holds {size} bytes of text (prompt, conversations, "
            f"reference_response), over data.max_row_bytes={max_row_bytes}",
            "shorten or drop the row, raise data.max_row_bytes (0 = no limit), or "
            "set data.skip_bad_rows=true to skip such rows",
        )


# --- duplicates -------------------------------------------------------------------------------


@dataclass
class DuplicateReport:
    """Counts of suspicious but valid rows, with the first few rows of each kind named."""

    repeated_rows: int = 0  # rows equal to an earlier row (prompt, responses)
    repeated_prompt_ids: int = 0  # rows whose prompt_id an earlier row already has
    chosen_equals_rejected: int = 0  # preference rows without a preference
    examples: dict[str, list[str]] = field(default_factory=dict)

    def any(self) -> bool:
        return bool(self.repeated_rows or self.repeated_prompt_ids or self.chosen_equals_rejected)

    def summary(self) -> str:
        parts = []
        for count, kind, what in (
            (self.repeated_rows, "repeated_rows", "rows repeat an earlier row"),
            (
                self.repeated_prompt_ids,
                "repeated_prompt_ids",
                "rows repeat an earlier row's prompt_id",
            ),
            (
                self.chosen_equals_rejected,
                "chosen_equals_rejected",
                "rows have chosen == rejected (no preference: a zero DPO gradient)",
            ),
        ):
            if count:
                parts.append(f"{count} {what} (e.g. {'; '.join(self.examples[kind])})")
        return "; ".join(parts) + ". Check the data (deduplicate it) if this is not intended"


def find_duplicates(rows: Sequence[PreferenceRow]) -> DuplicateReport:
    """Count repeated rows, repeated prompt_ids and chosen == rejected (``row.source`` names
    them)."""
    report = DuplicateReport()
    first_row: dict[tuple, str] = {}
    first_id: dict[str, str] = {}

    def note(kind: str, text: str) -> None:
        examples = report.examples.setdefault(kind, [])
        if len(examples) < _NAMED_DUPLICATES:
            examples.append(text)

    for row in rows:
        where = row.source.rsplit(":", 1)[-1] if row.source else "?"
        key = (
            tuple((m["role"], m["content"]) for m in row.prompt_messages),
            row.prompt,
            row.chosen,
            row.rejected,
            row.reference_response,
        )
        if key in first_row:
            report.repeated_rows += 1
            note("repeated_rows", f"row {where} repeats row {first_row[key]}")
        else:
            first_row[key] = where
        if row.prompt_id is not None:
            if row.prompt_id in first_id:
                report.repeated_prompt_ids += 1
                note(
                    "repeated_prompt_ids",
                    f"row {where} repeats prompt_id {row.prompt_id!r} "
                    f"of row {first_id[row.prompt_id]}",
                )
            else:
                first_id[row.prompt_id] = where
        if row.has_pair and row.chosen == row.rejected:
            report.chosen_equals_rejected += 1
            note("chosen_equals_rejected", f"row {where}")
    return report


def write_rows(rows: Sequence[PreferenceRow], path: str | os.PathLike) -> None:
    """Write rows as JSONL in the file schema (atomically)."""
    write_jsonl_atomic(path, (row.to_record() for row in rows))


def _parse_record(record: dict, kind: str, path: str | Path, row: int) -> PreferenceRow:
    def fail(rule: str, fix: str) -> DataError:
        return DataError(path, row, rule, fix)

    def text_field(name: str, value: Any) -> str:
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise fail(f"{name} is not valid UTF-8", "re-encode the text as UTF-8") from None
        if not isinstance(value, str):
            raise fail(
                f"{name} must be a string, got {type(value).__name__}",
                f"write {name} as a JSON string",
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # e.g. a lone surrogate written as "\ud800" in JSON
            raise fail(
                f"{name} is not valid UTF-8 (it holds a lone surrogate)",
                "re-encode the text as UTF-8",
            ) from None
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
            raise fail(
                f"prompt_id must be a string, got {type(prompt_id).__name__}",
                "write prompt_id as a string or drop it",
            )
        prompt_id = str(prompt_id)
    reference_response = optional("reference_response")
    if reference_response is not None and not reference_response.strip():
        raise fail(
            "reference_response is empty", "regenerate y_ref for this prompt or drop the row"
        )

    if kind == "prompt":
        return PreferenceRow(
            prompt=prompt,
            prompt_messages=({"role": "user", "content": prompt},),
            reference_response=reference_response,
            prompt_id=prompt_id,
            source=f"{path}:{row}",
        )

    conversations = {}
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise fail(
                f"missing field {name!r}",
                "add both chosen and rejected conversations; " + _SCHEMA_HINT,
            )
        conversations[name] = _parse_conversation(name, record[name], fail, text_field)
    history_chosen, chosen = conversations["chosen"]
    history_rejected, rejected = conversations["rejected"]
    if history_chosen != history_rejected:
        raise fail(
            "chosen and rejected differ before their final assistant turn",
            "both must hold the same prompt conversation and differ only in the last turn",
        )
    return PreferenceRow(
        prompt=prompt,
        prompt_messages=history_chosen,
        chosen=chosen,
        rejected=rejected,
        reference_response=reference_response,
        prompt_id=prompt_id,
        source=f"{path}:{row}",
    )


def _parse_conversation(name, value, fail, text_field) -> tuple[tuple[dict[str, str], ...], str]:
    """Validate a message list; return (the turns before the last, the last assistant content)."""
    order_fix = (
        "order the turns as an optional system turn, then user/assistant alternating "
        "from a user turn, ending with the assistant turn"
    )
    if not isinstance(value, list) or len(value) < 2:
        raise fail(
            f"{name} must be a list of at least 2 {{role, content}} messages",
            'write e.g. [{"role": "user", ...}, {"role": "assistant", ...}]',
        )
    messages = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") is None
            or message.get("content") is None
        ):
            raise fail(
                f"{name}[{i}] must be a mapping with role and content",
                'write each message as {"role": ..., "content": ...}',
            )
        role = message["role"]
        if role not in ROLES:
            raise fail(f"{name}[{i}] has role {role!r}, not one of {', '.join(ROLES)}", order_fix)
        messages.append(
            {"role": role, "content": text_field(f"{name}[{i}].content", message["content"])}
        )
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    expected = [("user", "assistant")[(i - start) % 2] for i in range(start, len(roles))]
    if roles[start:] != expected or roles[-1] != "assistant" or len(roles) - start < 2:
        raise fail(f"{name} has role order {roles}", order_fix)
    response = messages[-1]["content"]
    if not response.strip():
        raise fail(
            f"{name} has an empty final assistant response", "drop the row or fill the response"
        )
    return tuple(messages[:-1]), response


# --- prompts ----------------------------------------------------------------------------------


def prompt_conversation(row: Mapping[str, Any], where: str = "row") -> list[dict[str, str]]:
    """The conversation a row asks the policy to continue (it ends with a user turn).

    * ``chosen`` (a message list ending with the compared assistant turn): the turns before it;
    * else ``prompt`` (str): one user turn;
    * else ``messages``: the list without its trailing assistant turns (UltraFeedback's
      ``messages`` holds the chosen reply).

    ``where`` names the row in the error (e.g. "prompts.jsonl row 3").
    """
    chosen = row.get("chosen")
    if chosen is not None:
        if (
            not isinstance(chosen, list)
            or not chosen
            or not isinstance(chosen[-1], Mapping)
            or chosen[-1].get("role") != "assistant"
        ):
            raise InputError(
                f"{where}: 'chosen' must be a message list ending with an assistant "
                "turn (UltraFeedback-binarized schema)"
            )
        return [dict(m) for m in chosen[:-1]]
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    messages = [dict(m) for m in row.get("messages") or []]
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()
    if not messages or messages[-1].get("role") != "user":
        raise InputError(
            f"{where}: needs 'prompt' (str), 'chosen' or 'messages' ending with a user turn"
        )
    return messages


def raw_prompt(row: Mapping[str, Any], messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text a ranker sees: ``prompt`` when the row has it, else the last user turn."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    return next(m["content"] for m in reversed(messages) if m.get("role") == "user")


def strip_response(text: str) -> str:
    """A generated response as it is ranked and trained on: without surrounding whitespace (the
    reference code strips vLLM's text the same way before ranking and training)."""
    return text.strip()
