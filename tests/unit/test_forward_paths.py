"""The forward path's GPU-minded choices, checked on CPU tensors against plain references.

* Unpacked micro-batches use the log-prob kernel's in-place backward: the gradient reaching the
  model equals the one of the plain (not in-place) reference, and it is written into the logits
  buffer (no second logits-sized tensor).
* No per-micro-batch label check (a host sync): token ids are checked once, at data load
  (``PreferenceDataset.check_token_ids``), which still refuses an id outside the vocabulary.
* Sequence parallelism: micro-batch lengths and packing budgets become multiples of tp, and a
  pipelined call with a length that does not split is refused.
* The reference pass: micro-batch groups a multiple of pp with interleaving, 8 * pp per call,
  and the same number of calls on every DP rank.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from selm_mcore.config.schema import DataConfig
from selm_mcore.data.batches import collate_preferences
from selm_mcore.data.packing import collate_packed, pack_budget
from selm_mcore.data.tokenize import PreferenceDataset, TokenizedExample
from selm_mcore.kernels.torch_logprobs import reference_vocab_parallel_logprobs
from selm_mcore.mcore.forward import (
    collate_micro_batches,
    length_multiple,
    run_micro_batches,
    sequence_logps,
    token_multiple,
)
from selm_mcore.train.refpass import microbatches_per_call, shard_for_rank

VOCAB = 50


def _examples(count: int = 4, yref: bool = True) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(3)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(1, VOCAB, (n,), generator=gen).tolist())

    return [
        TokenizedExample(
            index=i,
            prompt_ids=ids(3 + i),
            chosen_ids=ids(2 + 2 * i),
            rejected_ids=ids(6 - i),
            yref_ids=ids(4) if yref else None,
        )
        for i in range(count)
    ]


def test_unpacked_logps_backward_in_place_gives_the_reference_gradient():
    batch = collate_preferences(_examples(), pad_id=0, pad_to_multiple_of=4)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*batch.tokens.shape, 16, generator=gen)
    weight = torch.randn(16, 64, generator=gen, requires_grad=True)  # 64 columns: 14 padded
    upstream = torch.randn(batch.tokens.shape[0], generator=gen)

    logits = hidden @ weight
    (sequence_logps(logits, batch, tp_group=None, vocab_size=VOCAB) * upstream).sum().backward()
    ours = weight.grad.clone()

    weight.grad = None
    reference_logits = hidden @ weight
    reference_logits.retain_grad()
    token_logps = reference_vocab_parallel_logprobs(
        reference_logits, batch.labels, batch.loss_mask, vocab_size=VOCAB
    )
    (token_logps.sum(-1) * upstream).sum().backward()
    torch.testing.assert_close(ours, weight.grad, rtol=1e-5, atol=1e-6)
    # The logits buffer now holds the gradient: the backward wrote it in place.
    torch.testing.assert_close(logits.detach(), reference_logits.grad, rtol=1e-5, atol=1e-6)


def test_labels_are_checked_at_load_not_per_micro_batch(monkeypatch):
    import selm_mcore.train.logprobs as logprobs

    def no_check(*args, **kwargs):
        raise AssertionError("labels checked per micro-batch")

    monkeypatch.setattr(logprobs, "_check_labels", no_check)
    examples = _examples()
    unpacked = collate_preferences(examples, pad_id=0, pad_to_multiple_of=4)
    logits = torch.randn(*unpacked.tokens.shape, VOCAB)
    assert sequence_logps(logits, unpacked, tp_group=None, vocab_size=VOCAB).shape == (12,)
    packed = collate_packed(examples, pad_id=0, shared_prompt=True, has_yref=True)
    head_logits = torch.randn(packed.head_index.numel(), VOCAB)
    assert sequence_logps(head_logits, packed, tp_group=None, vocab_size=VOCAB).shape == (12,)

    dataset = PreferenceDataset(examples)
    dataset.check_token_ids(VOCAB)
    with pytest.raises(
        ValueError,
        match=r"example 0 holds token id 60, outside the model's "
        r"vocabulary \[0, 50\)",
    ):
        PreferenceDataset(
            [TokenizedExample(index=0, prompt_ids=(1, 2), chosen_ids=(60,), rejected_ids=(3,))]
        ).check_token_ids(VOCAB)


def _models(tp: int, sequence_parallel: bool, pp: int = 1):
    config = SimpleNamespace(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pp,
    )
    return [SimpleNamespace(config=config)]


def test_sequence_parallel_lengths_are_multiples_of_tp():
    assert token_multiple(_models(4, True)) == 4 and token_multiple(_models(4, False)) == 1
    assert length_multiple(6, _models(4, True)) == 12
    assert length_multiple(64, _models(4, True)) == 64
    assert length_multiple(6, multiple=1) == 6
    dataset = PreferenceDataset(_examples())
    for seq_length in (None, 30):
        batches = collate_micro_batches(
            dataset,
            [[0, 1], [2, 3]],
            pad_id=0,
            pad_to_multiple_of=length_multiple(3, multiple=4),
            seq_length=seq_length,
        )
        assert {mb.batch.tokens.shape[1] % 4 for mb in batches} == {0}
    with pytest.raises(ValueError, match="multiples of 4 .*sequence parallelism"):
        odd = collate_micro_batches(dataset, [[0, 1]], pad_id=0, pad_to_multiple_of=3)
        run_micro_batches(_models(4, True), odd, lambda mb, out: None, forward_only=True)


def test_pack_budget_rounds_up_to_the_multiple():
    examples = _examples()
    cfg = DataConfig(packing="shared_prompt", pad_to_multiple_of=1)
    plain = pack_budget(cfg, examples)
    assert plain % 4 != 0  # the case that needs rounding
    assert pack_budget(cfg, examples, multiple=4) == -(-plain // 4) * 4
    assert pack_budget(cfg, examples, refpass=True, multiple=4) % 4 == 0
    assert pack_budget(DataConfig(packing="none"), examples, multiple=4) == 0


@pytest.mark.parametrize(
    "num_examples, dp, micro, pp, vpp", [(13, 2, 2, 2, 2), (9, 3, 1, 4, None), (40, 2, 1, 2, None)]
)
def test_refpass_groups_and_calls(num_examples, dp, micro, pp, vpp):
    examples = [
        TokenizedExample(
            index=i, prompt_ids=(1,) * (1 + i % 5), chosen_ids=(2, 3), rejected_ids=(4,)
        )
        for i in range(num_examples)
    ]
    dataset = PreferenceDataset(examples)
    multiple = pp if vpp else 1
    shards = [
        shard_for_rank(
            dataset, SimpleNamespace(dp=dp, dp_rank=r), micro, num_microbatches_multiple=multiple
        )
        for r in range(dp)
    ]
    assert sorted(i for _, owned in shards for i in owned) == list(range(num_examples))
    per_call = microbatches_per_call(pp)
    assert per_call == 8 * pp
    calls = {-(-len(groups) // per_call) for groups, _ in shards}
    assert len(calls) == 1  # every DP rank makes the same number of calls
    assert all(len(groups) % multiple == 0 for groups, _ in shards)
