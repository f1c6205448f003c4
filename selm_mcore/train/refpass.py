"""The offline reference pass: one round's reference log-probs, computed once and cached.

    selm refpass CONFIG [--set train.init_from=DIR] [--set train.ref_cache=FILE] [--overwrite]
    torchrun --nproc-per-node 4 -m selm_mcore.cli refpass CONFIG --set parallel.tp=2 ...

The frozen reference (the round's starting policy, ``train.init_from`` or ``model.hf_dir``: a
Megatron checkpoint folder or an HF folder) runs forward-only, at any TP/PP/VPP/DP, over every
example of ``data.train_path`` and stores the SUMMED response log-probs of chosen, rejected and
y_ref per example in a safetensors file (``train.ref_cache``, default
``<train.output_dir>/ref_logps.safetensors``)::

    ref_chosen_logps [N] fp32, ref_rejected_logps [N] fp32, ref_yref_logps [N] fp32 (with y_ref)
    metadata: format, key (sha256), key_json (its components), num_examples,
              tensors_sha256 (of the tensors' names, shapes and bytes: checked on every load)

Row i of each tensor belongs to example i of ``PreferenceDataset`` (file order after any skipped
rows). The key (``selm_mcore.train.refkey``) hashes the tokenised data rows, the tokenizer files,
the reference model's own files and the max lengths;
the trainer recomputes it and refuses a cache whose key differs (``StaleReferenceCacheError``
names the parts that changed and the command that rebuilds the cache).

The forward and log-prob code path is the trainer's (``selm_mcore.mcore.forward``): the pass
runs ``forward_only_logps`` per group of micro-batches, the same function the trainer's
on-the-fly reference mode calls.

Shape legend: B examples per micro-batch, S = 2 or 3 sequences per example (chosen, rejected,
y_ref), N = S * B sequences, T padded tokens, V/tp vocabulary columns on this rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from selm_mcore.config.io import add_config_arguments, config_from_args
from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.batches import PreferenceBatch
from selm_mcore.data.packing import PackedBatch, pack_budget
from selm_mcore.data.tokenize import (
    PreferenceDataset,
    load_preferences,
    load_tokenizer,
    pad_token_id,
)
from selm_mcore.mcore.checkpoint import hf_files_dir
from selm_mcore.mcore.families import check_model_config_dir
from selm_mcore.mcore.forward import (
    MicroBatch,
    collate_micro_batches,
    forward_only_logps,
    length_multiple,
    longest_sequence,
    pack_micro_batches,
)
from selm_mcore.mcore.parallel import ParallelContext, sequence_length_multiple
from selm_mcore.runtime.errors import InputError, UserError
from selm_mcore.runtime.files import ChecksumError, atomic_open
from selm_mcore.runtime.outputs import add_overwrite_argument, output_locks, refuse_finished
from selm_mcore.runtime.preflight import check_model_run, check_output_dir
from selm_mcore.train.refkey import CACHE_FORMAT, ReferenceKey, reference_key

logger = logging.getLogger(__name__)

CACHE_NAMES = ("ref_chosen_logps", "ref_rejected_logps", "ref_yref_logps")
# Micro-batches per forward_backward call of the reference pass, per pipeline stage (one padded
# length per call): with pp stages a call of m micro-batches idles (pp - 1) / (m + pp - 1) of
# the time, ~11% at 8 * pp.
REFPASS_MICROBATCHES_PER_CALL = 8


class StaleReferenceCacheError(UserError, RuntimeError):
    """A reference log-prob cache that does not belong to this run's data/tokenizer/reference."""


# --- the cache file ---------------------------------------------------------------------------


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    digest = hashlib.sha256(b"selm-tensors/1")
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ReferenceLogps:
    """Per-example reference log-probs [num_examples] (fp32); ``yref`` is None without y_ref."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    yref: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.chosen.numel())

    def for_batch(self, batch: PreferenceBatch | PackedBatch) -> torch.Tensor:
        """[N] reference log-probs in the batch's sequence order (chosen.., rejected.., yref..)."""
        index = batch.example_indices.cpu()
        parts = [self.chosen[index], self.rejected[index]]
        if batch.has_yref:
            if self.yref is None:
                raise ValueError(
                    "the batch has y_ref sequences but the cache holds no y_ref "
                    "log-probs; rebuild it with `selm refpass`"
                )
            parts.append(self.yref[index])
        return torch.cat(parts)

    def save(self, path: str | Path, key: ReferenceKey) -> None:
        """Write the cache atomically (temp file + rename)."""
        from safetensors.torch import save

        tensors = {"ref_chosen_logps": self.chosen, "ref_rejected_logps": self.rejected}
        if self.yref is not None:
            tensors["ref_yref_logps"] = self.yref
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in tensors.items()}
        metadata = {
            "format": CACHE_FORMAT,
            "key": key.digest,
            "key_json": json.dumps(dataclasses.asdict(key), sort_keys=True),
            "num_examples": str(len(self)),
            "tensors_sha256": tensors_digest(tensors),
        }
        with atomic_open(path, "wb") as handle:
            handle.write(save(tensors, metadata=metadata))


def load_reference_cache(path: str | Path, expected: ReferenceKey) -> ReferenceLogps:
    """Read a cache written by ``selm refpass``; refuse it unless its key equals ``expected``."""
    from safetensors import safe_open

    path = Path(path)
    rebuild = (
        "rerun `selm refpass CONFIG --overwrite` with this run's config (same "
        "data.train_path, train.init_from, data.max_length, data.max_prompt_length) to rebuild it"
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"reference cache {path} (train.ref_cache) does not exist: "
            f"{rebuild}, or set train.reference_mode=onthefly"
        )
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise ChecksumError(
            path, f"not a readable safetensors file ({exc}; truncated or corrupt)", rebuild
        ) from None
    with handle as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CACHE_FORMAT:
            raise StaleReferenceCacheError(
                f"{path} is not a reference cache of format {CACHE_FORMAT} "
                f"(found {metadata.get('format')!r}); {rebuild}"
            )
        if metadata.get("key") != expected.digest:
            try:
                stored = ReferenceKey(**json.loads(metadata["key_json"]))
                changed = ", ".join(stored.differences(expected)) or "the key format"
            except (KeyError, TypeError, ValueError):
                changed = "unknown parts (the key description is unreadable)"
            raise StaleReferenceCacheError(
                f"reference cache {path} is stale: it was computed for other {changed} than "
                f"this run uses (cache key {metadata.get('key', '?')[:12]}..., this run "
                f"{expected.digest[:12]}...); {rebuild}"
            )
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    recorded = metadata.get("tensors_sha256")
    if recorded is None:
        logger.warning(
            "reference cache %s has no tensors_sha256 (an older version): loaded unchecked", path
        )
    elif tensors_digest(tensors) != recorded:
        raise ChecksumError(
            path,
            "the log-probs differ from the tensors_sha256 recorded when the "
            "cache was written (corrupt)",
            rebuild,
        )
    return ReferenceLogps(
        chosen=tensors["ref_chosen_logps"],
        rejected=tensors["ref_rejected_logps"],
        yref=tensors.get("ref_yref_logps"),
    )


# --- the pass over a whole dataset ------------------------------------------------------------


def microbatches_per_call(pp: int) -> int:
    """Micro-batches per forward-only pipeline call of the reference pass (a multiple of pp)."""
    return REFPASS_MICROBATCHES_PER_CALL * pp


def shard_for_rank(
    dataset: PreferenceDataset, ctx, micro_batch_size: int, *, num_microbatches_multiple: int = 1
) -> tuple[list[list[int]], set[int]]:
    """This DP rank's micro-batches of example indices for the reference pass, and the indices
    it owns.

    Examples are ordered by length (less padding per micro-batch) and dealt out contiguously to
    the DP ranks; each rank's share is filled up to the same number of whole micro-batches
    (a multiple of ``num_microbatches_multiple``: interleaved pipelines need a multiple of pp)
    with repeats, which are computed but not written (every rank runs the same number of calls).
    """
    order = sorted(range(len(dataset)), key=lambda i: longest_sequence(dataset[i]), reverse=True)
    per_rank = -(-len(order) // ctx.dp)
    owned = order[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]
    num_micro = -(-per_rank // micro_batch_size)
    num_micro = -(-num_micro // num_microbatches_multiple) * num_microbatches_multiple
    filler = (owned or order)[-1]
    indices = owned + [filler] * (num_micro * micro_batch_size - len(owned))
    groups = [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
    return groups, set(owned)


def _micro_batch_calls(
    dataset: PreferenceDataset,
    groups: list[list[int]],
    ctx: ParallelContext,
    *,
    per_call: int,
    pad_id: int,
    pad_to_multiple_of: int,
    seq_length: int | None,
    pack_tokens: int,
    shared_prompt: bool,
) -> Iterator[list[MicroBatch]]:
    """This rank's micro-batches, ``per_call`` per pipeline call: packed rows of ``pack_tokens``
    tokens (``groups`` is then one group of every owned example), else one right-padded
    micro-batch per group."""
    if not pack_tokens:
        for start in range(0, len(groups), per_call):
            yield collate_micro_batches(
                dataset,
                groups[start : start + per_call],
                pad_id=pad_id,
                pad_to_multiple_of=pad_to_multiple_of,
                seq_length=seq_length,
                device=ctx.device,
            )
        return
    packed = pack_micro_batches(
        dataset,
        groups[0] if groups else [],
        budget=pack_tokens,
        shared_prompt=shared_prompt,
        pad_id=pad_id,
        pad_to_multiple_of=pad_to_multiple_of,
        fixed_length=ctx.pp > 1,
        num_microbatches_multiple=ctx.pp if ctx.vpp else 1,
        device=ctx.device,
    )
    for start in range(0, len(packed), per_call):
        yield packed[start : start + per_call]


def _gather_over_ranks(
    values: torch.Tensor, counts: torch.Tensor, ctx: ParallelContext
) -> torch.Tensor:
    """Every example's values on every rank, each checked to be written exactly once."""
    # Each example was written by exactly one rank (last stage, TP rank 0 of one DP replica):
    # a sum over the world gathers them exactly (x + 0 = x).
    if ctx.world_size > 1:  # on the backend's device (NCCL needs CUDA tensors)
        gathered = torch.cat([values, counts[:, None]], 1).to(ctx.device)
        dist.all_reduce(gathered)
        gathered = gathered.cpu()
        values, counts = gathered[:, :-1], gathered[:, -1]
    missing = (counts != 1).nonzero().flatten()
    if missing.numel():
        raise RuntimeError(
            f"reference pass covered examples {missing[:10].tolist()} "
            f"{counts[missing[:10]].tolist()} times instead of once"
        )
    return values


def compute_reference_logps(
    models: list,
    ctx,
    dataset: PreferenceDataset,
    *,
    pad_id: int,
    micro_batch_size: int,
    pad_to_multiple_of: int,
    seq_length: int | None = None,
    pack_tokens: int = 0,
    shared_prompt: bool = False,
    progress: bool = True,
) -> ReferenceLogps:
    """Reference log-probs of every example of ``dataset``, identical on every rank.

    ``pack_tokens > 0`` packs this rank's examples first-fit-decreasing into rows of that many
    tokens (``selm_mcore.data.packing``; ``shared_prompt`` as data.packing), else micro-batches of
    ``micro_batch_size`` right-padded examples.
    """
    vocab_size = models[0].true_vocab_size
    sequences_per_example = 3 if dataset.has_yref else 2
    pad_to_multiple_of = length_multiple(pad_to_multiple_of, models)
    groups, owned = shard_for_rank(
        dataset, ctx, micro_batch_size, num_microbatches_multiple=ctx.pp if ctx.vpp else 1
    )
    if pack_tokens:
        groups = [sorted(owned)] if owned else []
    # Many micro-batches per call keep the pipeline bubble small; every DP rank has as many
    # groups (filled with repeats), so all ranks make the same number of calls.
    per_call = microbatches_per_call(ctx.pp)
    values = torch.zeros(len(dataset), sequences_per_example, dtype=torch.float64)
    counts = torch.zeros(len(dataset), dtype=torch.float64)

    calls = _micro_batch_calls(
        dataset,
        groups,
        ctx,
        per_call=per_call,
        pad_id=pad_id,
        pad_to_multiple_of=pad_to_multiple_of,
        seq_length=seq_length,
        pack_tokens=pack_tokens,
        shared_prompt=shared_prompt,
    )
    bar = None
    if progress and ctx.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(owned), desc="refpass", unit="pair", mininterval=1.0)
    writer = ctx.is_last_stage and ctx.tp_rank == 0
    for micro_batches in calls:
        logps = forward_only_logps(models, ctx, micro_batches, vocab_size)
        if writer:
            assert logps is not None  # the last pipeline stage holds the log-probs
            for micro_batch, seq in zip(micro_batches, logps):
                per_example = seq.cpu().double().view(sequences_per_example, -1).t()
                for row, i in enumerate(micro_batch.batch.example_indices.tolist()):
                    if i in owned:  # fillers repeat an index: its value is written once
                        values[i] = per_example[row]
                        counts[i] = 1.0
        if bar is not None:
            bar.update(
                len({i for mb in micro_batches for i in mb.batch.example_indices.tolist()} & owned)
            )
    if bar is not None:
        bar.close()
    values = _gather_over_ranks(values, counts, ctx).float()
    return ReferenceLogps(
        chosen=values[:, 0].clone(),
        rejected=values[:, 1].clone(),
        yref=values[:, 2].clone() if dataset.has_yref else None,
    )


# --- the `selm refpass` command ---------------------------------------------------------------


def run_refpass(cfg: SelmConfig) -> Path:
    """Compute and write the reference cache of ``cfg``'s data; returns its path."""
    from selm_mcore.mcore.checkpoint import load_frozen_policy
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel_from

    # The cache is written after the whole pass: prove now that it can be.
    if cfg.train.ref_cache_path().is_dir():
        raise InputError(
            f"train.ref_cache={cfg.train.ref_cache_path()} is a folder; point it at "
            "a file (e.g. ref_logps.safetensors)"
        )
    check_output_dir(cfg.train.ref_cache_path().parent, what="train.ref_cache")
    check_model_run(cfg, hf_files_dir(cfg.start_model()), job="refpass")
    ctx = init_parallel_from(cfg.parallel)
    try:
        source = cfg.start_model()
        check_model_config_dir(hf_files_dir(source), max_length=cfg.data.max_length)
        tokenizer = load_tokenizer(cfg.model, hf_files_dir(source))
        dataset = load_preferences(cfg.data, tokenizer)
        key = reference_key(
            dataset,
            source,
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
        )
        pack_tokens = pack_budget(
            cfg.data,
            dataset.examples,
            refpass=True,
            multiple=sequence_length_multiple(cfg.parallel.tp, cfg.parallel.sequence_parallel),
        )
        models = load_frozen_policy(source, ctx, cfg.model, packed=pack_tokens > 0)
        dataset.check_token_ids(models[0].true_vocab_size)
        micro_batch_size = cfg.train.refpass_micro_batch_size or cfg.train.micro_batch_size
        start = time.perf_counter()
        logps = compute_reference_logps(
            models,
            ctx,
            dataset,
            pad_id=pad_token_id(tokenizer),
            micro_batch_size=micro_batch_size,
            pad_to_multiple_of=cfg.data.pad_to_multiple_of,
            seq_length=cfg.data.seq_length(),
            pack_tokens=pack_tokens,
            shared_prompt=cfg.data.packing == "shared_prompt",
        )
        elapsed = time.perf_counter() - start
        path = cfg.train.ref_cache_path()
        if ctx.rank == 0:
            logps.save(path, key)
            logger.info(
                "reference pass: %d examples in %.1f s -> %s (key %s...)",
                *(len(dataset), elapsed, path, key.digest[:12]),
            )
        if ctx.world_size > 1:
            dist.barrier()
        return path
    finally:
        destroy_parallel()


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    add_overwrite_argument(parser, "the train.ref_cache file")


def main(args) -> int:
    cfg = config_from_args(args)
    cache = cfg.train.ref_cache_path()
    with output_locks({cache: "train.ref_cache"}, command="selm refpass"):
        if not cache.is_dir():  # a folder is refused by run_refpass, naming the rule
            refuse_finished(
                cache, setting="train.ref_cache", overwrite=args.overwrite, what="a reference cache"
            )
        run_refpass(cfg)
    return 0
