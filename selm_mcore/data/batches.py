"""Batches for the Megatron forward: collation of tokenised examples, and the DP sampler.

Shape legend: B examples, S = 2 or 3 sequences per example (chosen, rejected, y_ref),
N = S * B sequences, T padded length.

``collate_preferences`` turns a micro-batch into one ``PreferenceBatch`` of N sequences ordered
``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}, yref_0..yref_{B-1}]`` with tokens,
labels (``labels[:, t] = tokens[:, t + 1]``), loss_mask (1 where the label is a response token)
and position_ids, right-padded to T.

``DistributedBatchSampler`` deals each optimizer step's global batch out to the data-parallel
ranks; ``batches()`` runs through as many epochs as the trainer asks for, resumably.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from selm_mcore.data.tokenize import TokenizedExample

# --- collation --------------------------------------------------------------------------------


def is_on(tensor: torch.Tensor, device: torch.device | str) -> bool:
    """``tensor`` lives on ``device`` (a device without an index matches any of its type)."""
    device = torch.device(device)
    return tensor.device == device or (device.type == tensor.device.type and device.index is None)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; host -> CUDA copies go through pinned memory without blocking
    the host (an ordinary copy from pageable memory synchronises the stream)."""
    device = torch.device(device)
    if is_on(tensor, device):
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class PairOrder:
    """Sequences of B pairs in the order [chosen_0..B-1, rejected_0..B-1, (yref_0..B-1)]: what
    a batch of either layout (``PreferenceBatch``, ``selm_mcore.data.packing.PackedBatch``) shares.
    Subclasses have ``example_indices`` [B] and ``has_yref``."""

    example_indices: torch.Tensor
    has_yref: bool

    @property
    def num_examples(self) -> int:
        return int(self.example_indices.numel())

    @property
    def sequences_per_example(self) -> int:
        return 3 if self.has_yref else 2

    @property
    def num_sequences(self) -> int:
        return self.num_examples * self.sequences_per_example

    def split(self, per_sequence: torch.Tensor):
        """Split a per-sequence tensor [N, ...] into (chosen, rejected, yref or None), each [B]."""
        b = self.num_examples
        if per_sequence.shape[0] != self.num_sequences:
            raise ValueError(
                f"expected {self.num_sequences} sequences, got {per_sequence.shape[0]}"
            )
        yref = per_sequence[2 * b :] if self.has_yref else None
        return per_sequence[:b], per_sequence[b : 2 * b], yref


@dataclass
class PreferenceBatch(PairOrder):
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

    def to(self, device: torch.device | str) -> PreferenceBatch:
        """Tensors to ``device`` (pinned, non-blocking from the host); ``example_indices`` stays
        on the host, where only the host reads it."""
        return PreferenceBatch(
            tokens=to_device(self.tokens, device),
            labels=to_device(self.labels, device),
            loss_mask=to_device(self.loss_mask, device),
            position_ids=to_device(self.position_ids, device),
            example_indices=self.example_indices,
            has_yref=self.has_yref,
        )

    def response_lengths(self) -> torch.Tensor:
        """[N] response tokens of each sequence (the labels each sequence sums)."""
        return self.loss_mask.sum(-1)


def padded_length(longest: int, pad_to_multiple_of: int = 64, seq_length: int | None = None) -> int:
    """T for a batch whose longest sequence has ``longest`` tokens.

    ``seq_length`` fixes T (equal shapes for every micro-batch, as pipeline parallelism needs);
    otherwise T is ``longest`` rounded up to a multiple of ``pad_to_multiple_of``.
    """
    if seq_length is not None:
        if longest > seq_length:
            raise ValueError(
                f"a sequence has {longest} tokens > seq_length={seq_length}; "
                "raise seq_length to at least data.max_length"
            )
        return seq_length
    return int(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)


def collate_preferences(
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    pad_to_multiple_of: int = 64,
    seq_length: int | None = None,
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
            sequences.append((len(example.prompt_ids), example.prompt_ids + example.responses[s]))
    longest = max(len(ids) for _, ids in sequences)
    t = padded_length(longest, pad_to_multiple_of, seq_length)
    n = len(sequences)
    tokens = torch.full((n, t), pad_id, dtype=torch.long)
    labels = torch.full((n, t), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, t), dtype=torch.float32)
    for i, (prompt_len, ids) in enumerate(sequences):
        if prompt_len < 1:
            raise ValueError(
                "a prompt has no tokens: the first response token needs a position "
                "to be predicted from"
            )
        ids_t = torch.tensor(ids, dtype=torch.long)
        length = len(ids)
        tokens[i, :length] = ids_t
        labels[i, : length - 1] = ids_t[1:]
        # position t predicts ids[t + 1]: a response token when t + 1 >= prompt_len
        loss_mask[i, prompt_len - 1 : length - 1] = 1.0
    position_ids = torch.arange(t, dtype=torch.long).unsqueeze(0).expand(n, t).contiguous()
    return PreferenceBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=position_ids,
        example_indices=torch.tensor([e.index for e in examples], dtype=torch.long),
        has_yref=has_yref,
    )


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

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        consumed_samples: int = 0,
    ):
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple "
                f"of the data-parallel size {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, {dp_size})")
        if num_examples < global_batch_size:
            raise ValueError(
                f"{num_examples} examples are fewer than train.global_batch_size="
                f"{global_batch_size}: use more data or a smaller global batch"
            )
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
        if (
            consumed_samples % self.global_batch_size
            or not 0 <= consumed_samples <= self.num_steps * self.global_batch_size
        ):
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a multiple of global_batch_size="
                f"{self.global_batch_size} in [0, {self.num_steps * self.global_batch_size}]; "
                "was the checkpoint written with another batch size or dataset?"
            )

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
            yield order[start : start + local]

    def batches(self) -> Iterator[list[int]]:
        """This rank's slice of every following step, epoch after epoch (new order per epoch
        when shuffling); the caller stops. The state after a yield resumes at the next step."""
        while True:
            if len(self) == 0:
                self.epoch += 1
                self.consumed_samples = 0
            yield from self

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": self.num_examples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "global_batch_size", "num_examples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data position was saved with {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; resume with the same data and batch size"
                )
        self._check_position(state["consumed_samples"])
        self.epoch = state["epoch"]
        self.consumed_samples = state["consumed_samples"]


def micro_batches(indices: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Split one rank's slice of a global batch into micro-batches (it must divide evenly)."""
    if micro_batch_size < 1 or len(indices) % micro_batch_size:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} must divide the per-rank batch "
            f"of {len(indices)} (global_batch_size / data-parallel size)"
        )
    return [
        list(indices[i : i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)
    ]
