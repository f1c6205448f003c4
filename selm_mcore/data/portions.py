"""The round portions of the online loop: which rows of data.train_path each round reads.

As the reference code slices its data, data.train_path is cut into contiguous, equal portions
of its ORIGINAL rows (integer division; the tail remainder is unused): one per SELM round, plus
one for the DPO warm-up round 0 when online.warmup_dpo_round is set (Zephyr: quarters, round 0
on the first). Round t reads portion t (t + 1 after a warm-up). Rows that fail validation are
skipped inside their portion with a count under data.skip_bad_rows (without it the first one
stops the run, naming the row and that switch); they never shift a boundary. data.train_path
may name a dataset (``hf://OWNER/NAME[:SPLIT]``): the portions are slices of that split.

    write_portion(cfg, round_index, "round_1/portion.jsonl")   # the ``roundN/portion`` phase
    portion_records(cfg, round_index)                          # the same rows, not written
    file_portion(read_rows(path), num_portions, index)          # any file's portion k of P
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.hub import is_hub_source
from selm_mcore.data.rows import LoadedRows, PreferenceRow, read_rows
from selm_mcore.data.sources import read_source_records
from selm_mcore.runtime.errors import InputError
from selm_mcore.runtime.files import DataError, write_jsonl_atomic

logger = logging.getLogger(__name__)


@dataclass
class Portion:
    """Portion ``index`` (1-based) of ``num_portions`` of a file: its file rows
    ``first_row..last_row`` (``num_records`` records), the valid rows among them and the bad
    rows skipped there."""

    index: int
    num_portions: int
    first_row: int
    last_row: int
    num_records: int
    rows: list[PreferenceRow]
    skipped: list[DataError]


def split_rounds(rows: Sequence[Any], num_rounds: int) -> list[list[Any]]:
    """Contiguous, disjoint, equal portions (integer division; the tail remainder is unused)."""
    if num_rounds < 1:
        raise ValueError(f"num_rounds={num_rounds} must be >= 1")
    size = len(rows) // num_rounds
    if size == 0:
        raise InputError(
            f"{len(rows)} rows cannot be split into {num_rounds} non-empty rounds; "
            "use more data or fewer rounds (online.rounds)"
        )
    return [list(rows[r * size : (r + 1) * size]) for r in range(num_rounds)]


def source_row(row: PreferenceRow) -> int:
    """The 1-based file row a validated row came from (its ``source`` is ``file:row``)."""
    return int(row.source.rsplit(":", 1)[1])


def file_portion(loaded: LoadedRows, num_portions: int, index: int) -> Portion:
    """Portion ``index`` (1-based) of the file's contiguous, equal split, as the reference code
    slices its data (``train_prefs[k*n//P : (k+1)*n//P]``): the ORIGINAL file's records, valid or
    not, are split by position first (``split_rounds``: integer division, the tail remainder
    unused), then the valid rows inside the portion are kept. A bad row skipped
    (data.skip_bad_rows) makes its portion smaller and never shifts a boundary."""
    if not 1 <= index <= num_portions:
        raise ValueError(f"portion {index} does not exist: portions are 1..{num_portions}")
    records = split_rounds(loaded.record_rows, num_portions)[index - 1]
    first, last = records[0], records[-1]
    return Portion(
        index=index,
        num_portions=num_portions,
        first_row=first,
        last_row=last,
        num_records=len(records),
        rows=[row for row in loaded.rows if first <= source_row(row) <= last],
        skipped=[exc for exc in loaded.skipped if exc.row is not None and first <= exc.row <= last],
    )


def num_portions(cfg: SelmConfig) -> int:
    """Portions data.train_path is split into: one per round, the DPO warm-up's included."""
    return cfg.online.rounds + (1 if cfg.online.warmup_dpo_round else 0)


def first_round(cfg: SelmConfig) -> int:
    """0 with the DPO warm-up round (online.warmup_dpo_round), else 1."""
    return 0 if cfg.online.warmup_dpo_round else 1


def _read_train_rows(cfg: SelmConfig, train_path: str | Path):
    try:
        return read_rows(
            train_path, skip_bad_rows=cfg.data.skip_bad_rows, max_row_bytes=cfg.data.max_row_bytes
        )
    except DataError as exc:
        if exc.row is None:
            raise
        raise DataError(
            exc.path,
            exc.row,
            exc.rule,
            f"{exc.fix}; or set data.skip_bad_rows=true to skip such rows (counted "
            "per portion; the portion boundaries stay those of the whole file)",
        ) from None


def write_portion(cfg: SelmConfig, round_index: int, out_path: Path) -> int:
    """Write ``portion_records`` of round ``round_index`` to ``out_path`` (atomically); returns
    the row count."""
    records = portion_records(cfg, round_index)
    write_jsonl_atomic(out_path, records)
    logger.info("round %d: %d rows", round_index, len(records))
    return len(records)


def portion_records(cfg: SelmConfig, round_index: int) -> list[dict]:
    """The rows of round ``round_index`` (0 = the DPO warm-up) as validated rows in the file
    schema plus the ranking's answer column; rows without a prompt_id get ``row-<file row>``.

    Round t reads portion t (t + 1 after a warm-up) of ``num_portions`` contiguous, equal
    portions of data.train_path's ORIGINAL rows (``file_portion``); bad rows inside it are
    skipped with a count under data.skip_bad_rows, never shifting the boundaries. The result is
    capped at online.max_prompts_per_round. The warm-up trains on the original chosen/rejected
    pairs alone (any reference_response column is left out).
    """
    train_path: str | Path = cfg.data.train_path
    if not is_hub_source(train_path):
        train_path = Path(train_path)
    if not cfg.data.train_path:
        raise InputError("data.train_path is empty: point it at the preference (or prompt) rows")
    loaded = _read_train_rows(cfg, train_path)
    if round_index == 0 and loaded.kind != "preference":
        raise InputError(
            f"online.warmup_dpo_round=true trains round 0 on the original chosen/rejected pairs, "
            f"but {train_path} holds prompt-only rows; use preference rows (e.g. UltraFeedback "
            "train_prefs) or set online.warmup_dpo_round=false"
        )
    # Only the verifiable ranker reads a column beyond the file schema (its answers).
    raw = (
        dict(read_source_records(train_path, with_row_numbers=True))  # (row, record) pairs
        if cfg.ranking.kind == "verifiable"
        else {}
    )
    portion = file_portion(loaded, num_portions(cfg), round_index + 1 - first_round(cfg))
    _report_portion(round_index, portion, train_path)
    rows = portion.rows
    if cfg.online.max_prompts_per_round:
        rows = rows[: cfg.online.max_prompts_per_round]
    records: list[dict] = []
    seen: dict[str, int] = {}  # prompt_id -> its file row
    for row in rows:
        file_row = source_row(row)
        record = row.to_record()
        if round_index == 0:
            record.pop("reference_response", None)
        record.setdefault("prompt_id", f"row-{file_row}")
        answer = raw.get(file_row, {}).get(cfg.ranking.answer_key)
        if answer is not None:
            record[cfg.ranking.answer_key] = answer
        if record["prompt_id"] in seen:
            raise DataError(
                train_path,
                file_row,
                f"prompt_id {record['prompt_id']!r} repeats row {seen[record['prompt_id']]} "
                f"(round {round_index}'s portion; prompt ids key each generated response to its "
                "row)",
                "give every row its own prompt_id (or drop the column: rows without one get "
                "row-<line>), or remove the duplicated rows",
            )
        seen[record["prompt_id"]] = file_row
        records.append(record)
    return records


def _report_portion(round_index: int, portion: Portion, train_path: str | Path) -> None:
    logger.info(
        "round %d: portion %d of %d of %s: file rows %d..%d (%d rows), %d valid, %d "
        "skipped as bad (data.skip_bad_rows)",
        round_index,
        portion.index,
        portion.num_portions,
        train_path,
        portion.first_row,
        portion.last_row,
        portion.num_records,
        len(portion.rows),
        len(portion.skipped),
    )
    for exc in portion.skipped[:3]:
        logger.warning("round %d: skipped %s", round_index, exc)
    if not portion.rows:
        raise InputError(
            f"{train_path}: every one of the {portion.num_records} rows of portion "
            f"{portion.index} (file rows {portion.first_row}..{portion.last_row}) is invalid "
            f"(first: {portion.skipped[0] if portion.skipped else 'none'}); fix the file"
        )
