"""Datasets laid out in a Hugging Face hub cache as the hub serves them, for offline tests.

    write_hub_dataset(hub_cache, "acme/prefs", {"train_prefs": rows, "test_prefs": rows2})
    write_hub_files(hub_cache, "tatsu-lab/alpaca_eval", {"alpaca_eval_gpt4_baseline.json": text})

The files go where ``hf download --repo-type dataset OWNER/NAME`` puts them:
``HUB/datasets--OWNER--NAME/snapshots/<commit>/...`` with ``refs/main`` naming the commit. A
dataset's splits are parquet shards ``data/<split>-0000k-of-0000n.parquet``, as the hub's
datasets (e.g. HuggingFaceH4/ultrafeedback_binarized) store them. Point ``HF_HUB_CACHE`` at
``HUB`` and set ``HF_HUB_OFFLINE=1``: ``selm_mcore.data.hub`` then reads them through
``datasets`` without a network call.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def _snapshot(hub_cache: str | os.PathLike, repo_id: str, salt: str) -> Path:
    repo = Path(hub_cache) / f"datasets--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}:{salt}".encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def write_hub_dataset(
    hub_cache: str | os.PathLike,
    repo_id: str,
    splits: Mapping[str, Sequence[dict]],
    *,
    shards: int = 1,
) -> Path:
    """Write each split as ``shards`` parquet files in the hub layout; returns the snapshot."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    snapshot = _snapshot(hub_cache, repo_id, ",".join(sorted(splits)))
    data = snapshot / "data"
    data.mkdir(exist_ok=True)
    for split, rows in splits.items():
        size = -(-len(rows) // shards)
        for k in range(shards):
            part = list(rows[k * size : (k + 1) * size])
            name = f"{split}-{k:05d}-of-{shards:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(part), data / name)
    return snapshot


def write_hub_files(
    hub_cache: str | os.PathLike, repo_id: str, files: Mapping[str, str | bytes]
) -> Path:
    """Write raw repository files (e.g. a JSON list at the top, a dataset script) into a
    snapshot; returns it."""
    snapshot = _snapshot(hub_cache, repo_id, ",".join(sorted(files)))
    for name, content in files.items():
        path = snapshot / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return snapshot
