"""The offline reference pass: one round's reference log-probs, computed once and cached.

    selm refpass CONFIG [--set train.init_from=DIR] [--set train.ref_cache=FILE]
    torchrun --nproc-per-node 4 -m selm_mcore.cli refpass CONFIG --set parallel.tp=2 ...

The frozen reference (the round's starting policy, ``train.init_from`` or ``model.hf_dir``: a
Megatron checkpoint folder or an HF folder) runs forward-only, at any TP/PP/VPP/DP, over every
example of ``data.train_path`` and stores the SUMMED response log-probs of chosen, rejected and
y_ref per example in a safetensors file (``train.ref_cache``, default
``<train.output_dir>/ref_logps.safetensors``)::

    ref_chosen_logps [N] fp32, ref_rejected_logps [N] fp32, ref_yref_logps [N] fp32 (with y_ref)
    metadata: format, key (sha256), key_json (its components), num_examples

Row i of each tensor belongs to example i of ``PreferenceDataset`` (file order after any skipped
rows). The key hashes (tokenised data rows, tokenizer files, reference checkpoint, max lengths);
the trainer recomputes it and refuses a cache whose key differs (``StaleReferenceCacheError``
names the parts that changed and the command that rebuilds the cache).

The forward and log-prob code path is the trainer's: ``collate_micro_batches`` +
``run_micro_batches`` (Megatron's ``get_forward_backward_func``; 1F1B, interleaved when VPP > 1)
with ``sequence_logps`` (``selm_mcore.logprobs.vocab_parallel_logprobs`` on the vocab-parallel
logits). The trainer's on-the-fly reference mode calls ``micro_batch_reference_logps`` below, the
same function this pass runs per group of micro-batches.

Shape legend: B examples per micro-batch, S = 2 or 3 sequences per example (chosen, rejected,
y_ref), N = S * B sequences, T padded tokens, V/tp vocabulary columns on this rank.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from selm_mcore.config import SelmConfig, add_config_arguments, config_from_args
from selm_mcore.data import (
    PreferenceBatch,
    PreferenceDataset,
    TokenizedExample,
    collate_preferences,
    padded_length,
)

logger = logging.getLogger(__name__)

CACHE_FORMAT = "selm-refcache/1"
CACHE_NAMES = ("ref_chosen_logps", "ref_rejected_logps", "ref_yref_logps")
# Micro-batches per forward_backward call of the reference pass (one padded length per call).
REFPASS_MICROBATCHES_PER_CALL = 8


class StaleReferenceCacheError(RuntimeError):
    """A reference log-prob cache that does not belong to this run's data/tokenizer/reference."""


# --- the cache key ----------------------------------------------------------------------------


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def is_megatron_checkpoint(path: str | Path) -> bool:
    """True for a folder in the Megatron checkpoint format (docs/architecture.md)."""
    return (Path(path) / "selm_checkpoint.json").is_file()


def hf_files_dir(model_path: str | Path) -> Path:
    """The folder with config.json and tokenizer files of an HF folder or Megatron checkpoint."""
    path = Path(model_path)
    return path / "hf" if is_megatron_checkpoint(path) else path


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "tokenizer.model", "vocab.json", "merges.txt")


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
            "point train.init_from / model.hf_dir at a model folder with its tokenizer")
    return digest.hexdigest()


def reference_fingerprint(model_path: str | Path) -> str:
    """sha256 of the reference weights + architecture (not its optimizer state or tokenizer).

    Megatron checkpoint: ``selm_checkpoint.json``, ``hf/config.json`` and the ``model/`` dist
    checkpoint. HF folder: ``config.json`` and the ``*.safetensors`` / ``*.bin`` weights. Large
    files are fingerprinted by size and sampled windows (``selm_mcore.online.hash_path``).
    """
    from selm_mcore.online import hash_path

    path = Path(model_path)
    if is_megatron_checkpoint(path):
        parts = [path / "selm_checkpoint.json", path / "hf" / "config.json", path / "model"]
    else:
        weights = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin"))
        if not weights:
            raise FileNotFoundError(
                f"{path} is neither a Megatron checkpoint (no selm_checkpoint.json) nor an HF "
                "folder with *.safetensors weights; check train.init_from / model.hf_dir")
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
        labels = {"data": "data rows (data.train_path or its tokenisation)",
                  "tokenizer": "tokenizer files",
                  "reference": "reference checkpoint (train.init_from / model.hf_dir)",
                  "max_length": "data.max_length", "max_prompt_length": "data.max_prompt_length"}
        return [labels[f.name] for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


def reference_key(dataset: PreferenceDataset, reference_path: str | Path, *, max_length: int,
                  max_prompt_length: int) -> ReferenceKey:
    """The key of ``dataset`` scored by the reference at ``reference_path``."""
    return ReferenceKey(
        data=dataset.content_hash(),
        tokenizer=tokenizer_fingerprint(hf_files_dir(reference_path)),
        reference=reference_fingerprint(reference_path),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )


# --- the cache file ---------------------------------------------------------------------------


@dataclass
class ReferenceLogps:
    """Per-example reference log-probs [num_examples] (fp32); ``yref`` is None without y_ref."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    yref: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.chosen.numel())

    def for_batch(self, batch: PreferenceBatch) -> torch.Tensor:
        """[N] reference log-probs in the batch's sequence order (chosen.., rejected.., yref..)."""
        index = batch.example_indices.cpu()
        parts = [self.chosen[index], self.rejected[index]]
        if batch.has_yref:
            if self.yref is None:
                raise ValueError("the batch has y_ref sequences but the cache holds no y_ref "
                                 "log-probs; rebuild it with `selm refpass`")
            parts.append(self.yref[index])
        return torch.cat(parts)

    def save(self, path: str | Path, key: ReferenceKey) -> None:
        """Write the cache atomically (temp file + rename)."""
        from safetensors.torch import save_file

        tensors = {"ref_chosen_logps": self.chosen, "ref_rejected_logps": self.rejected}
        if self.yref is not None:
            tensors["ref_yref_logps"] = self.yref
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in tensors.items()}
        metadata = {"format": CACHE_FORMAT, "key": key.digest,
                    "key_json": json.dumps(dataclasses.asdict(key), sort_keys=True),
                    "num_examples": str(len(self))}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)


def load_reference_cache(path: str | Path, expected: ReferenceKey) -> ReferenceLogps:
    """Read a cache written by ``selm refpass``; refuse it unless its key equals ``expected``."""
    from safetensors import safe_open

    path = Path(path)
    rebuild = ("rerun `selm refpass CONFIG` with this run's config (same data.train_path, "
               "train.init_from, data.max_length, data.max_prompt_length) to rebuild it")
    if not path.is_file():
        raise FileNotFoundError(f"reference cache {path} (train.ref_cache) does not exist: "
                                f"{rebuild}, or set train.reference_mode=onthefly")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CACHE_FORMAT:
            raise StaleReferenceCacheError(
                f"{path} is not a reference cache of format {CACHE_FORMAT} "
                f"(found {metadata.get('format')!r}); {rebuild}")
        if metadata.get("key") != expected.digest:
            try:
                stored = ReferenceKey(**json.loads(metadata["key_json"]))
                changed = ", ".join(stored.differences(expected)) or "the key format"
            except (KeyError, TypeError, ValueError):
                changed = "unknown parts (the key description is unreadable)"
            raise StaleReferenceCacheError(
                f"reference cache {path} is stale: it was computed for other {changed} than "
                f"this run uses (cache key {metadata.get('key', '?')[:12]}..., this run "
                f"{expected.digest[:12]}...); {rebuild}")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return ReferenceLogps(chosen=tensors["ref_chosen_logps"],
                          rejected=tensors["ref_rejected_logps"],
                          yref=tensors.get("ref_yref_logps"))


# --- the forward path shared with the trainer -------------------------------------------------


@dataclass
class MicroBatch:
    """One micro-batch of B examples as N = S*B sequences, plus what the loss needs.

    ``ref_logps`` [N]: reference sequence log-probs in the batch's order (trainer only).
    ``num_tokens``: real (unpadded) tokens over the N sequences, for throughput.
    """

    batch: PreferenceBatch
    num_tokens: int
    ref_logps: torch.Tensor | None = None


def _num_real_tokens(example: TokenizedExample) -> int:
    return sum(len(example.prompt_ids) + len(r) for r in example.responses)


def _longest_sequence(example: TokenizedExample) -> int:
    return len(example.prompt_ids) + max(map(len, example.responses))


def collate_micro_batches(dataset: PreferenceDataset, index_groups: Sequence[Sequence[int]], *,
                          pad_id: int, pad_to_multiple_of: int,
                          seq_length: int | None = None,
                          device: torch.device | None = None) -> list[MicroBatch]:
    """Collate groups of example indices into micro-batches that share one padded length T.

    Megatron's pipeline schedule sends [T, N, hidden] activations between stages with one shape
    per call, so every micro-batch of a call is padded to the longest sequence of all of them
    (rounded up to ``pad_to_multiple_of``; or ``seq_length`` when fixed).
    """
    examples = [[dataset[i] for i in group] for group in index_groups]
    longest = max(_longest_sequence(e) for group in examples for e in group)
    t = padded_length(longest, pad_to_multiple_of, seq_length)
    out = []
    for group in examples:
        batch = collate_preferences(group, pad_id=pad_id, seq_length=t)
        if device is not None:
            batch = batch.to(device)
        out.append(MicroBatch(batch=batch, num_tokens=sum(map(_num_real_tokens, group))))
    return out


def sequence_logps(logits: torch.Tensor, batch: PreferenceBatch, *, tp_group,
                   vocab_size: int) -> torch.Tensor:
    """[N] fp32 summed response log-probs from this rank's vocab-parallel logits [N, T, V/tp]."""
    from selm_mcore.logprobs import vocab_parallel_logprobs

    _, seq_logps = vocab_parallel_logprobs(logits, batch.labels, batch.loss_mask,
                                           tp_group=tp_group, vocab_size=vocab_size)
    return seq_logps


def _forward_step(data_iterator, model, *, loss_fn: Callable):
    """Megatron ``forward_step_func``: one micro-batch through one model chunk.

    Every chunk consumes every micro-batch from its own iterator (inputs are only used on the
    first stage, labels only on the last), so interleaved schedules stay aligned.
    """
    micro_batch = next(data_iterator)
    batch = micro_batch.batch
    output = model(batch.tokens, batch.position_ids, attention_mask=None)
    return output, functools.partial(loss_fn, micro_batch)


def run_micro_batches(models: list, micro_batches: Sequence[MicroBatch], loss_fn: Callable, *,
                      forward_only: bool) -> list[dict[str, torch.Tensor]]:
    """Run micro-batches through Megatron's pipeline schedule (1F1B; interleaved with VPP).

    ``loss_fn(micro_batch, output)`` runs on the last pipeline stage and returns
    ``(loss, reduced: dict)``; the returned list holds each micro-batch's ``reduced`` dict on the
    last stage and is empty elsewhere. All micro-batches must share one padded length.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shapes = {tuple(mb.batch.tokens.shape) for mb in micro_batches}
    if len(shapes) != 1:
        raise ValueError(f"micro-batches of one call must share a shape, got {sorted(shapes)}")
    (num_sequences, seq_length), = shapes
    step = functools.partial(_forward_step, loss_fn=loss_fn)
    data_iterator = ([iter(micro_batches) for _ in models] if len(models) > 1
                     else iter(micro_batches))
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=step, data_iterator=data_iterator, model=models,
        num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=num_sequences, forward_only=forward_only)


def micro_batch_reference_logps(models: list, ctx, micro_batches: Sequence[MicroBatch],
                                vocab_size: int) -> list[torch.Tensor] | None:
    """Forward-only log-probs [N] of each micro-batch (last stage; None on other stages)."""
    tp_group = ctx.tp_group if ctx.tp > 1 else None

    def collect(micro_batch: MicroBatch, output: torch.Tensor):
        seq = sequence_logps(output, micro_batch.batch, tp_group=tp_group, vocab_size=vocab_size)
        return output.new_zeros(()), {"seq_logps": seq.detach().float()}

    with torch.no_grad():
        reduced = run_micro_batches(models, micro_batches, collect, forward_only=True)
    if not ctx.is_last_stage:
        return None
    return [r["seq_logps"] for r in reduced]


# --- the pass over a whole dataset ------------------------------------------------------------


def _shard_for_rank(dataset: PreferenceDataset, ctx,
                    micro_batch_size: int) -> tuple[list[list[int]], set[int]]:
    """This DP rank's micro-batches of example indices for the reference pass, and the indices
    it owns.

    Examples are ordered by length (less padding per micro-batch) and dealt out contiguously to
    the DP ranks; each rank's share is filled up to the same number of whole micro-batches with
    repeats, which are computed but not written (every rank runs the same number of calls).
    """
    order = sorted(range(len(dataset)), key=lambda i: _longest_sequence(dataset[i]),
                   reverse=True)
    per_rank = -(-len(order) // ctx.dp)
    owned = order[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank]
    num_micro = -(-per_rank // micro_batch_size)
    filler = (owned or order)[-1]
    indices = owned + [filler] * (num_micro * micro_batch_size - len(owned))
    groups = [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
    return groups, set(owned)


def compute_reference_logps(models: list, ctx, dataset: PreferenceDataset, *, pad_id: int,
                            micro_batch_size: int, pad_to_multiple_of: int,
                            seq_length: int | None = None,
                            progress: bool = True) -> ReferenceLogps:
    """Reference log-probs of every example of ``dataset``, identical on every rank."""
    vocab_size = models[0].true_vocab_size
    sequences_per_example = 3 if dataset.has_yref else 2
    groups, owned = _shard_for_rank(dataset, ctx, micro_batch_size)
    # Every rank of the world runs the same number of calls (pipelines stay in lock step).
    values = torch.zeros(len(dataset), sequences_per_example, dtype=torch.float64)
    counts = torch.zeros(len(dataset), dtype=torch.float64)
    bar = None
    if progress and ctx.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(groups), desc="refpass", unit="micro-batch", mininterval=1.0)
    writer = ctx.is_last_stage and ctx.tp_rank == 0
    for start in range(0, len(groups), REFPASS_MICROBATCHES_PER_CALL):
        call_groups = groups[start:start + REFPASS_MICROBATCHES_PER_CALL]
        micro_batches = collate_micro_batches(dataset, call_groups, pad_id=pad_id,
                                              pad_to_multiple_of=pad_to_multiple_of,
                                              seq_length=seq_length, device=ctx.device)
        logps = micro_batch_reference_logps(models, ctx, micro_batches, vocab_size)
        if writer:
            for micro_batch, seq in zip(micro_batches, logps):
                per_example = seq.cpu().double().view(sequences_per_example, -1).t()
                for row, i in enumerate(micro_batch.batch.example_indices.tolist()):
                    if i in owned:  # fillers repeat an index: its value is written once
                        values[i] = per_example[row]
                        counts[i] = 1.0
        if bar is not None:
            bar.update(len(call_groups))
    if bar is not None:
        bar.close()
    # Each example was written by exactly one rank (last stage, TP rank 0 of one DP replica):
    # a sum over the world gathers them exactly (x + 0 = x).
    if ctx.world_size > 1:  # on the backend's device (NCCL needs CUDA tensors)
        gathered = torch.cat([values, counts[:, None]], 1).to(ctx.device)
        dist.all_reduce(gathered)
        gathered = gathered.cpu()
        values, counts = gathered[:, :-1], gathered[:, -1]
    missing = (counts != 1).nonzero().flatten()
    if missing.numel():
        raise RuntimeError(f"reference pass covered examples {missing[:10].tolist()} "
                           f"{counts[missing[:10]].tolist()} times instead of once")
    values = values.float()
    return ReferenceLogps(chosen=values[:, 0].clone(), rejected=values[:, 1].clone(),
                          yref=values[:, 2].clone() if dataset.has_yref else None)


# --- the `selm refpass` command ---------------------------------------------------------------


def reference_source(cfg: SelmConfig) -> Path:
    """The round's reference / starting policy: train.init_from, else model.hf_dir."""
    source = cfg.train.init_from or cfg.model.hf_dir
    if not source:
        raise ValueError("no model to start from: set train.init_from (a Megatron checkpoint or "
                         "HF folder) or model.hf_dir")
    if not Path(source).is_dir():
        raise FileNotFoundError(f"train.init_from / model.hf_dir = {source} is not a folder")
    return Path(source)


def ref_cache_path(cfg: SelmConfig) -> Path:
    """train.ref_cache, else <train.output_dir>/ref_logps.safetensors."""
    return Path(cfg.train.ref_cache or Path(cfg.train.output_dir) / "ref_logps.safetensors")


def load_tokenizer(cfg: SelmConfig, model_path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_files_dir(model_path)),
                                         trust_remote_code=cfg.model.trust_remote_code)


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id")
    return int(pad)


def load_dataset(cfg: SelmConfig, tokenizer) -> PreferenceDataset:
    if not cfg.data.train_path:
        raise ValueError("data.train_path is empty: point it at the round's preference pairs "
                         "(JSONL or Parquet)")
    return PreferenceDataset.from_file(cfg.data.train_path, tokenizer,
                                       max_length=cfg.data.max_length,
                                       max_prompt_length=cfg.data.max_prompt_length,
                                       skip_bad_rows=cfg.data.skip_bad_rows)


def params_dtype(cfg: SelmConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32


def load_start_model(cfg: SelmConfig, ctx, source: str | Path, *,
                     recompute: bool = False) -> tuple[list, Any]:
    """(model chunks, HF config) of ``source``: a Megatron checkpoint folder or an HF folder."""
    from selm_mcore.model import build_model, load_hf_config
    from selm_mcore.weights import build_model_from_checkpoint, load_hf_weights

    if is_megatron_checkpoint(source):
        models, hf_config, _ = build_model_from_checkpoint(
            source, ctx, params_dtype=params_dtype(cfg), recompute=recompute)
        return models, hf_config
    hf_config = load_hf_config(source)
    models = build_model(hf_config, ctx, params_dtype=params_dtype(cfg), recompute=recompute,
                         make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
                         init_weights=False)
    load_hf_weights(models, source, ctx)
    return models, hf_config


def load_frozen_model(cfg: SelmConfig, ctx, source: str | Path) -> list:
    """The reference model chunks of ``source``, in eval mode and without gradients."""
    models, _ = load_start_model(cfg, ctx, source)
    for model in models:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    return models


def run_refpass(cfg: SelmConfig) -> Path:
    """Compute and write the reference cache of ``cfg``'s data; returns its path."""
    from selm_mcore.parallel import destroy_parallel, init_parallel

    ctx = init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp,
                        seed=cfg.parallel.seed)
    try:
        source = reference_source(cfg)
        tokenizer = load_tokenizer(cfg, source)
        dataset = load_dataset(cfg, tokenizer)
        key = reference_key(dataset, source, max_length=cfg.data.max_length,
                            max_prompt_length=cfg.data.max_prompt_length)
        models = load_frozen_model(cfg, ctx, source)
        micro_batch_size = cfg.train.refpass_micro_batch_size or cfg.train.micro_batch_size
        start = time.perf_counter()
        logps = compute_reference_logps(
            models, ctx, dataset, pad_id=pad_token_id(tokenizer),
            micro_batch_size=micro_batch_size, pad_to_multiple_of=cfg.data.pad_to_multiple_of,
            seq_length=cfg.data.seq_length())
        elapsed = time.perf_counter() - start
        path = ref_cache_path(cfg)
        if ctx.rank == 0:
            logps.save(path, key)
            logger.info("reference pass: %d examples in %.1f s -> %s (key %s...)", len(dataset),
                        elapsed, path, key.digest[:12])
        if ctx.world_size > 1:
            dist.barrier()
        return path
    finally:
        destroy_parallel()


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def main(args) -> int:
    run_refpass(config_from_args(args))
    return 0
