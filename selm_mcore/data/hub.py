"""Datasets by name: ``hf://OWNER/NAME[/CONFIG][:SPLIT]`` through the ``datasets`` library.

    spec = parse_hub_source("hf://HuggingFaceH4/ultrafeedback_binarized:train_prefs")
    for row_number, record in iter_hub_records(spec): ...      # 1-based, in the split's order
    digest = hub_content_hash(spec)

Any data path of the config (``data.train_path``, ``data.eval_prompts_path``, the ``eval.*``
sources) may name a dataset this way. The rows come in the split's own order, so the round
portions stay the reference's contiguous slices of that split.

Where the rows come from, in this order:

1. ``datasets.load_dataset(OWNER/NAME, CONFIG, split=SPLIT)``: downloads once into the
   ``datasets`` cache (``HF_DATASETS_CACHE``) and, offline (``HF_HUB_OFFLINE=1``), reads that
   cache;
2. the repository's files in the Hugging Face hub cache (``HF_HUB_CACHE``, what ``hf download
   --repo-type dataset OWNER/NAME`` leaves; downloaded here when online and step 1 refused a
   script-based dataset): a file named after CONFIG at the top of the repository (``CONFIG.json``
   / ``.jsonl`` / ``.parquet``, the layout of tatsu-lab/alpaca_eval) or its parquet shards
   (``CONFIG/SPLIT/*.parquet``), else the repository's data files as ``datasets`` lays them out
   (``data/SPLIT-00000-of-0000N.parquet``, README configs); read through ``datasets`` too, so
   they are converted once into its cache.

Without SPLIT a dataset with one split gives that split; several splits are refused, naming
them. Nothing here runs a dataset script.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.runtime.errors import UserError

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf://"
_SPEC = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<config>[\w.-]+))?(?::(?P<split>[\w.-]+))?$"
)
_DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class HubDatasetError(UserError, ValueError):
    """A dataset named by ``hf://`` that cannot be read: its name, the reason and the fix."""


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf://OWNER/NAME[/CONFIG][:SPLIT]``."""

    repo_id: str
    config: str | None
    split: str | None

    def __str__(self) -> str:
        config = f"/{self.config}" if self.config else ""
        split = f":{self.split}" if self.split else ""
        return f"{HUB_PREFIX}{self.repo_id}{config}{split}"


def is_hub_source(path: Any) -> bool:
    """True for an ``hf://`` dataset name (a str; a Path has lost its ``//`` already)."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub_source(text: str) -> HubSpec:
    match = _SPEC.match(text.strip())
    if match is None:
        raise HubDatasetError(
            f"{text!r} is not a dataset name: write hf://OWNER/NAME[/CONFIG][:SPLIT], e.g. "
            "hf://HuggingFaceH4/ultrafeedback_binarized:train_prefs or "
            "hf://tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline:eval"
        )
    return HubSpec(match["repo"], match["config"], match["split"])


def _import_datasets():
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "datasets by name (hf://) need the datasets package: pip install 'selm-mcore[data]'"
        ) from exc
    return datasets


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_hub_dataset(spec: HubSpec):
    """The ``datasets.Dataset`` of ``spec`` (module docstring: the datasets cache, then the
    hub cache's files)."""
    _import_datasets()
    from datasets.exceptions import DatasetGenerationError

    try:
        return _one_split(_load(spec), spec)
    except DatasetGenerationError as exc:  # a file datasets cannot convert: name the cause
        cause = exc.__cause__ or exc
        raise HubDatasetError(
            f"{spec}: datasets could not read the files ({type(cause).__name__}: "
            f"{str(cause)[:300]}); every split of a dataset must have the same columns"
        ) from None


def _load(spec: HubSpec):
    datasets = _import_datasets()
    from datasets.exceptions import DatasetNotFoundError

    try:
        loaded = datasets.load_dataset(spec.repo_id, spec.config, split=spec.split)
    except (ConnectionError, FileNotFoundError, RuntimeError, DatasetNotFoundError) as first:
        snapshot = _hub_snapshot(spec)
        if snapshot is None:
            raise HubDatasetError(
                f"{spec}: not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) nor "
                f"the hub cache ({_hub_cache()}) ({type(first).__name__}: {first}). Fix: load "
                "it once with network access (the same command, or `hf download --repo-type "
                f"dataset {spec.repo_id}`), or point the key at a local JSONL/Parquet file"
            ) from first
        loaded = _load_snapshot(snapshot, spec)
    except ValueError as exc:  # an unknown split or config: datasets lists the known ones
        raise HubDatasetError(f"{spec}: {exc}") from None
    return loaded


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_snapshot(spec: HubSpec) -> Path | None:
    """The repository's folder in the hub cache; downloaded (only the CONFIG's files when a
    CONFIG is named) when online and not there yet; None when absent offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec.repo_id, repo_type="dataset", local_files_only=True))
    except LocalEntryNotFoundError:
        if _offline():
            return None
    patterns = [f"{spec.config}.*", f"{spec.config}/**"] if spec.config else None
    try:
        return Path(snapshot_download(spec.repo_id, repo_type="dataset", allow_patterns=patterns))
    except Exception as exc:  # network, authentication, missing repository
        logger.warning("downloading %s failed: %s", spec.repo_id, exc)
        return None


def _config_files(snapshot: Path, spec: HubSpec) -> tuple[str, list[str]] | None:
    """(builder, files) of a CONFIG named by a top-level file or a parquet-export folder."""
    if not spec.config:
        return None
    for suffix, builder in _DATA_SUFFIXES.items():
        path = snapshot / f"{spec.config}{suffix}"
        if path.is_file():
            return builder, [str(path)]
    folder = snapshot / spec.config
    shards = sorted((folder / spec.split).glob("*.parquet")) if spec.split else []
    shards = shards or sorted(folder.glob("*.parquet"))
    return ("parquet", [str(p) for p in shards]) if shards else None


def _load_snapshot(snapshot: Path, spec: HubSpec):
    datasets = _import_datasets()
    named = _config_files(snapshot, spec)
    if named is not None:
        builder, files = named
        split = spec.split or "train"
        logger.info("%s: reading %s from the hub cache", spec, ", ".join(files))
        return datasets.load_dataset(builder, data_files={split: files}, split=split)
    if any(snapshot.glob("*.py")) and not (snapshot / "data").is_dir():
        raise HubDatasetError(
            f"{spec}: the hub cache's copy ({snapshot}) is a script-based dataset without "
            f"data files for config {spec.config!r}; name a config whose file is in the "
            f"repository (files: {', '.join(sorted(p.name for p in snapshot.iterdir()))})"
        )
    logger.info("%s: reading the hub cache's copy %s", spec, snapshot)
    return datasets.load_dataset(str(snapshot), spec.config, split=spec.split)


def _one_split(loaded, spec: HubSpec):
    datasets = _import_datasets()
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if len(loaded) != 1:
        raise HubDatasetError(
            f"{spec}: the dataset has several splits ({', '.join(loaded)}); name one, e.g. "
            f"{HubSpec(spec.repo_id, spec.config, next(iter(loaded)))}"
        )
    return next(iter(loaded.values()))


def iter_hub_records(spec: HubSpec, batch_size: int = 1024) -> Iterator[tuple[int, dict]]:
    """(1-based row, record) of every row of the split, in its order."""
    dataset = load_hub_dataset(spec)
    row = 0
    for batch in dataset.with_format("arrow").iter(batch_size=batch_size):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def hub_content_hash(spec: HubSpec, full_hash_max_bytes: int = 64 << 20) -> str:
    """A hash of the split's rows as stored in the datasets cache (its Arrow files), so a
    resumed run notices a dataset that changed under the same name."""
    from selm_mcore.runtime.files import hash_path

    dataset = load_hub_dataset(spec)
    digest = hashlib.sha256(str(spec).encode())
    files = [entry["filename"] for entry in dataset.cache_files]
    if not files:  # an in-memory dataset: hash its fingerprint
        digest.update(str(dataset._fingerprint).encode())
    for name in files:
        digest.update(hash_path(os.fspath(name), full_hash_max_bytes).encode())
    return digest.hexdigest()
