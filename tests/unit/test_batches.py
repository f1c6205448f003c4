"""selm_mcore.data.batches: collation layout, padding and label shift; the DP sampler (disjoint
shards, resume, epochs); micro-batches."""

from __future__ import annotations

import pytest
import torch

from selm_mcore.data.batches import (
    DistributedBatchSampler,
    collate_preferences,
    micro_batches,
    padded_length,
)
from selm_mcore.data.rows import read_rows
from selm_mcore.data.tokenize import PreferenceDataset


@pytest.fixture
def dataset(tmp_path, write_jsonl, sample_rows, tiny_tokenizer):
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", sample_rows)).rows
    return PreferenceDataset.from_rows(rows, tiny_tokenizer, max_length=256, max_prompt_length=128)


# --- collation --------------------------------------------------------------------------------


def test_collation_layout_padding_and_shift(dataset, tiny_tokenizer):
    examples = [dataset[2], dataset[0]]
    pad = tiny_tokenizer.pad_token_id
    batch = collate_preferences(examples, pad_id=pad, pad_to_multiple_of=64)
    n, t = batch.tokens.shape
    assert n == 6 and batch.sequences_per_example == 3 and batch.num_examples == 2
    longest = max(len(e.prompt_ids) + len(r) for e in examples for r in e.responses)
    assert t == -(-longest // 64) * 64 and t >= longest
    assert batch.example_indices.tolist() == [2, 0]
    order = [(e, s) for s in range(3) for e in examples]  # chosen_0, chosen_1, rejected_0, ...
    for i, (example, s) in enumerate(order):
        ids = list(example.prompt_ids) + list(example.responses[s])
        assert batch.tokens[i, : len(ids)].tolist() == ids
        assert (batch.tokens[i, len(ids) :] == pad).all()
        assert batch.loss_mask[i].sum().item() == len(example.responses[s])
        assert (batch.loss_mask[i, len(ids) - 1 :] == 0).all()
    assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
    assert (batch.labels[:, -1] == pad).all()
    assert torch.equal(batch.position_ids, torch.arange(t).expand(n, t))
    assert batch.loss_mask.dtype == torch.float32 and batch.tokens.dtype == torch.long
    chosen, rejected, yref = batch.split(torch.arange(6))
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3] and yref.tolist() == [4, 5]

    fixed = collate_preferences(examples, pad_id=pad, seq_length=200)
    assert fixed.tokens.shape == (6, 200)
    assert torch.equal(fixed.tokens[:, :longest], batch.tokens[:, :longest])
    assert torch.equal(fixed.loss_mask[:, :longest], batch.loss_mask[:, :longest])
    assert fixed.loss_mask[:, longest:].sum() == 0
    with pytest.raises(ValueError, match="> seq_length=8"):
        collate_preferences(examples, pad_id=pad, seq_length=8)


def test_collation_without_yref(tmp_path, write_jsonl, sample_rows, tiny_tokenizer):
    rows = [{k: v for k, v in r.items() if k != "reference_response"} for r in sample_rows]
    dataset = PreferenceDataset.from_file(
        write_jsonl(tmp_path / "d.jsonl", rows),
        tiny_tokenizer,
        max_length=256,
        max_prompt_length=128,
    )
    assert not dataset.has_yref
    batch = collate_preferences(dataset.examples, pad_id=0, pad_to_multiple_of=16)
    assert batch.tokens.shape[0] == 6 and batch.sequences_per_example == 2
    chosen, rejected, yref = batch.split(batch.loss_mask.sum(1))
    assert yref is None
    assert chosen.tolist() == [len(e.chosen_ids) for e in dataset.examples]
    assert rejected.tolist() == [len(e.rejected_ids) for e in dataset.examples]
    with pytest.raises(ValueError, match="expected 6 sequences, got 9"):
        batch.split(torch.zeros(9))


def test_collation_refuses_empty_and_mixed_batches(dataset):
    from dataclasses import replace

    with pytest.raises(ValueError, match="empty micro-batch"):
        collate_preferences([], pad_id=0)
    with pytest.raises(ValueError, match="mixes examples with and without y_ref"):
        collate_preferences([dataset[0], replace(dataset[1], yref_ids=None)], pad_id=0)


def test_padded_length():
    assert padded_length(1, 64) == 64 and padded_length(64, 64) == 64
    assert padded_length(65, 64) == 128 and padded_length(65, 1) == 65
    assert padded_length(65, 64, seq_length=100) == 100  # a fixed T wins
    with pytest.raises(ValueError, match="101 tokens > seq_length=100"):
        padded_length(101, 64, seq_length=100)


# --- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_dp_shards_are_disjoint_slices_of_each_global_batch(shuffle):
    n, gbs, dp = 37, 8, 2
    samplers = [
        DistributedBatchSampler(n, gbs, dp_rank=r, dp_size=dp, shuffle=shuffle, seed=3)
        for r in range(dp)
    ]
    order = samplers[0].epoch_order()
    assert sorted(order) == list(range(n))
    assert (order == list(range(n))) == (not shuffle)
    per_rank = [list(s) for s in samplers]
    assert [len(steps) for steps in per_rank] == [4, 4]  # 37 // 8; the tail of 5 is dropped
    for step in range(4):
        shards = [per_rank[r][step] for r in range(dp)]
        assert all(len(s) == gbs // dp for s in shards)
        assert not set(shards[0]) & set(shards[1])
        assert shards[0] + shards[1] == order[step * gbs : (step + 1) * gbs]


def test_sampler_resume_continues_exactly():
    full = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5)
    uninterrupted = list(full)
    assert full.consumed_samples == 40 and len(full) == 0

    first = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5)
    it = iter(first)
    seen = [next(it), next(it)]
    state = first.state_dict()
    assert state["consumed_samples"] == 16
    resumed = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5)
    resumed.load_state_dict(state)
    assert len(resumed) == 3
    assert seen + list(resumed) == uninterrupted
    again = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5, consumed_samples=16)
    assert list(again) == uninterrupted[2:]

    other_epoch = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5, epoch=1)
    assert other_epoch.epoch_order() != full.epoch_order()
    with pytest.raises(ValueError, match="consumed_samples=12 must be a multiple"):
        DistributedBatchSampler(40, 8, consumed_samples=12)
    with pytest.raises(ValueError, match="saved with global_batch_size=8"):
        DistributedBatchSampler(40, 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of the data-parallel size 3"):
        DistributedBatchSampler(40, 8, dp_size=3)
    with pytest.raises(ValueError, match="fewer than train.global_batch_size"):
        DistributedBatchSampler(5, 8)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_run_through_epochs_and_resume_mid_way(shuffle):
    """``batches()``: every step of epoch 0, then of epoch 1 (its own order when shuffling),
    endlessly; a sampler restored from the state after any step continues identically."""

    def sampler():
        return DistributedBatchSampler(20, 8, dp_rank=1, dp_size=2, shuffle=shuffle, seed=5)

    epochs = [
        list(DistributedBatchSampler(20, 8, dp_rank=1, dp_size=2, shuffle=shuffle, seed=5, epoch=e))
        for e in range(3)
    ]
    assert [len(e) for e in epochs] == [2, 2, 2]  # 20 // 8 steps per epoch
    assert (epochs[0] != epochs[1]) == shuffle
    endless = sampler()
    steps = _take(endless.batches(), 5)
    assert steps == epochs[0] + epochs[1] + epochs[2][:1]
    assert endless.epoch == 2 and endless.consumed_samples == 8
    for done in range(1, 5):  # resume after each of the first four steps
        first = sampler()
        stream = first.batches()
        head = _take(stream, done)
        resumed = sampler()
        resumed.load_state_dict(first.state_dict())
        assert head + _take(resumed.batches(), 5 - done) == steps, done


def test_micro_batches():
    assert micro_batches([4, 9, 1, 7], 2) == [[4, 9], [1, 7]]
    assert micro_batches([4, 9, 1, 7], 4) == [[4, 9, 1, 7]]
    with pytest.raises(ValueError, match="must divide the per-rank batch of 4"):
        micro_batches([4, 9, 1, 7], 3)
