"""Where rows come from: a local file or a dataset by name, in the project's file schema.

    for row_number, record in iter_source_records(path): ...   # (1-based row, dict | DataError)
    records = read_source_records(path)
    digest = source_hash(path)
    check_source(path, "data.train_path")                     # ConfigError before a run starts

A source is a local file (JSONL, one JSON object per line; a JSON file holding one list of
objects, as alpaca_eval writes its files; Parquet) or ``hf://OWNER/NAME[/CONFIG][:SPLIT]``
(``selm_mcore.data.hub``). Every record passes through ``normalize_record``, which maps the
common preference schemas onto the file schema of ``selm_mcore.data.rows``:

* UltraFeedback-binarized (prompt, chosen and rejected message lists): unchanged;
* prompt / chosen / rejected strings (TRL's and many DPO sets' "standard" format): chosen and
  rejected become [user: prompt, assistant: response] conversations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selm_mcore.data.hub import hub_content_hash, is_hub_source, iter_hub_records, parse_hub_source
from selm_mcore.runtime.files import DataError, hash_path, iter_records, unreadable_json

Source = str | os.PathLike


def normalize_record(record: dict[str, Any]) -> dict[str, Any]:
    """A preference record in the file schema: string chosen/rejected responses to a string
    prompt become one-turn conversations; anything else is returned as it is."""
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        return record
    out = record
    for key in ("chosen", "rejected"):
        value = record.get(key)
        if isinstance(value, str):
            if out is record:
                out = dict(record)
            out[key] = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": value},
            ]
    return out


def _json_list(path: Path) -> Iterator[tuple[int, dict | DataError]] | None:
    """The records of a ``.json`` file holding one JSON list; None for a JSONL file."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if not head.startswith(b"["):
        return None
    try:
        items = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            path, None, f"not a valid JSON list ({exc})", "write one JSON list of objects"
        ) from None
    except (ValueError, RecursionError) as exc:  # an integer past the digit limit, deep nesting
        raise unreadable_json(path, None, exc) from None
    return (
        (
            index,
            item
            if isinstance(item, dict)
            else DataError(
                path, index, f"a row must be a JSON object, got {type(item).__name__}", "fix it"
            ),
        )
        for index, item in enumerate(items, start=1)
    )


def iter_source_records(path: Source) -> Iterator[tuple[int, dict | DataError]]:
    """(1-based row, normalised record) of a local file or an ``hf://`` dataset; a row that
    does not parse comes as a ``DataError``."""
    if is_hub_source(path):
        records: Iterator[tuple[int, dict | DataError]] = iter_hub_records(
            parse_hub_source(str(path))
        )
    else:
        local = Path(path)
        listed = _json_list(local) if local.suffix.lower() == ".json" and local.is_file() else None
        records = listed if listed is not None else iter_records(local)
    for row, record in records:
        yield row, record if isinstance(record, DataError) else normalize_record(record)


def read_source_records(path: Source, *, with_row_numbers: bool = False) -> list:
    """Every record of a source; the first row that does not parse raises (``DataError``)."""
    out = []
    for row, record in iter_source_records(path):
        if isinstance(record, DataError):
            raise record
        out.append((row, record) if with_row_numbers else record)
    return out


def source_hash(path: Source, full_hash_max_bytes: int = 64 << 20) -> str:
    """The content hash of a local file (``files.hash_path``) or of an ``hf://`` dataset."""
    if is_hub_source(path):
        return hub_content_hash(parse_hub_source(str(path)), full_hash_max_bytes)
    return hash_path(path, full_hash_max_bytes)


def source_label(path: Source) -> str:
    """How messages name a source (``hf://`` names are kept as written)."""
    return str(path) if is_hub_source(path) else os.fspath(path)


def check_source(path: Source, key: str) -> None:
    """Refuse (``ConfigError``) a source that is neither a file nor a readable dataset."""
    from selm_mcore.config.schema import ConfigError
    from selm_mcore.data.hub import HubDatasetError, load_hub_dataset

    if is_hub_source(path):
        try:
            load_hub_dataset(parse_hub_source(str(path)))
        except HubDatasetError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        return
    if not path or not Path(path).is_file():
        raise ConfigError(
            f"{key}={str(path)!r} is not a file: point it at the rows (JSONL, JSON list or "
            "Parquet) or a dataset, hf://OWNER/NAME[/CONFIG][:SPLIT]"
        )
