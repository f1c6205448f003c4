"""The key of a reference log-prob cache: what the cached log-probs depend on.

    key = reference_key(dataset, reference_path, max_length=..., max_prompt_length=...)
    key.digest                       # stored in the cache (``selm_mcore.train.refpass``)
    stored.differences(key)          # the parts that changed, worded for an error

The key hashes the tokenised data rows, the tokenizer files, the reference model's own files
(``reference_fingerprint``: a Megatron checkpoint's model, or an HF folder's config and weight
files, never other files stored beside them such as a reference cache) and the max lengths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.data.tokenize import PreferenceDataset
from selm_mcore.mcore.checkpoint import hf_files_dir, is_megatron_checkpoint
from selm_mcore.runtime.files import hash_path
from selm_mcore.runtime.weight_files import HF_INDEX_FILE, HF_SINGLE_FILE

CACHE_FORMAT = "selm-refcache/1"


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """sha256 over the tokenizer files (vocabulary, merges, special tokens, chat template)."""
    tokenizer_dir = Path(tokenizer_dir)
    digest = hashlib.sha256(b"selm-tokenizer/1")
    found = False
    for name in _TOKENIZER_FILES:
        path = tokenizer_dir / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0" + path.read_bytes())
    if not found:
        raise FileNotFoundError(
            f"{tokenizer_dir} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...); "
            "point train.init_from / model.hf_dir at a model folder with its tokenizer"
        )
    return digest.hexdigest()


def _is_reference_cache(path: Path) -> bool:
    """A safetensors file ``selm refpass`` wrote (its metadata names the cache format)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == CACHE_FORMAT
    except Exception:  # not readable as safetensors: not a cache of ours
        return False


def model_weight_files(hf_dir: str | Path) -> list[Path]:
    """The weight files of an HF folder's own model: the index and the shards it lists, else
    ``model.safetensors``, else every ``*.safetensors`` / ``*.bin`` that is not a reference
    cache. Other files in the folder (a reference cache stored there, notes, logs) are not the
    model's and leave its fingerprint alone."""
    path = Path(hf_dir)
    index = path / HF_INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [index, *(path / str(name) for name in shards)]
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable index: the loader names it; fingerprint what is there
    if (path / HF_SINGLE_FILE).is_file():
        return [path / HF_SINGLE_FILE]
    found = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin"))
    return [p for p in found if p.is_file() and not _is_reference_cache(p)]


def reference_fingerprint(model_path: str | Path) -> str:
    """sha256 of the reference weights + architecture (not its optimizer state or tokenizer).

    Megatron checkpoint: ``selm_checkpoint.json``, ``hf/config.json`` and the ``model/`` dist
    checkpoint. HF folder: ``config.json`` and the model's own weight files
    (``model_weight_files``: a reference cache stored in the folder is not one of them). Large
    files are fingerprinted by size and sampled windows (``selm_mcore.runtime.files.hash_path``).
    """
    path = Path(model_path)
    if is_megatron_checkpoint(path):
        parts = [path / "selm_checkpoint.json", path / "hf" / "config.json", path / "model"]
    else:
        weights = model_weight_files(path)
        if not weights:
            raise FileNotFoundError(
                f"{path} is neither a Megatron checkpoint (no selm_checkpoint.json) nor an HF "
                "folder with *.safetensors weights; check train.init_from / model.hf_dir"
            )
        parts = [path / "config.json", *weights]
    digest = hashlib.sha256(b"selm-reference/1")
    for part in parts:
        digest.update(part.name.encode() + b"\0" + bytes.fromhex(hash_path(part)))
    return digest.hexdigest()


@dataclass(frozen=True)
class ReferenceKey:
    """What a reference log-prob cache depends on; ``digest`` is the cache key."""

    data: str
    tokenizer: str
    reference: str
    max_length: int
    max_prompt_length: int

    @property
    def digest(self) -> str:
        return _sha256_json({"format": CACHE_FORMAT, **dataclasses.asdict(self)})

    def differences(self, other: ReferenceKey) -> list[str]:
        """Names of the components that differ, worded for an error message."""
        labels = {
            "data": "data rows (data.train_path or its tokenisation)",
            "tokenizer": "tokenizer files",
            "reference": "reference checkpoint (train.init_from / model.hf_dir)",
            "max_length": "data.max_length",
            "max_prompt_length": "data.max_prompt_length",
        }
        return [
            labels[f.name]
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def reference_key(
    dataset: PreferenceDataset,
    reference_path: str | Path,
    *,
    max_length: int,
    max_prompt_length: int,
) -> ReferenceKey:
    """The key of ``dataset`` scored by the reference at ``reference_path``."""
    return ReferenceKey(
        data=dataset.content_hash(),
        tokenizer=tokenizer_fingerprint(hf_files_dir(reference_path)),
        reference=reference_fingerprint(reference_path),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )
