"""selm_mcore.train.build and selm_mcore.train.step without processes: the round's data (loaded
and checked before any process group exists), the step count, and the loss of one micro-batch
with its reduced metrics, against log-probs and the SELM loss computed here from the same
logits.

Training itself (Megatron, TP/PP/DP, resume) is tested in tests/dist/test_train_parallel.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from selm_mcore.config.io import load_config
from selm_mcore.config.schema import ConfigError
from selm_mcore.data.tokenize import pad_token_id
from selm_mcore.mcore.forward import collate_micro_batches
from selm_mcore.modelspec import ModelShape, forward_flops
from selm_mcore.train.build import load_round_data, total_train_steps
from selm_mcore.train.loss import selm_loss
from selm_mcore.train.step import reduce_step_metrics, selm_step_loss, step_counts


def round_config(model_dir, train_path, *overrides):
    return load_config(
        None,
        [
            f"model.hf_dir={model_dir}",
            f"data.train_path={train_path}",
            "data.max_length=64",
            "data.max_prompt_length=32",
            "train.global_batch_size=2",
            *overrides,
        ],
    )


@pytest.fixture
def train_path(tmp_path, write_jsonl, sample_rows):
    rows = sample_rows + [{**sample_rows[0], "prompt_id": "p3"}]  # 4 rows: 2 steps of 2
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_round_data_on_the_fly_needs_no_cache(tiny_llama_dir, train_path):
    data = load_round_data(
        round_config(tiny_llama_dir, train_path, "train.reference_mode=onthefly")
    )
    assert data.source == tiny_llama_dir and data.reference_cache is None
    assert len(data.dataset) == 4 and data.dataset.has_yref and data.total_steps == 2
    assert data.tokenizer.eos_token_id == data.dataset[0].chosen_ids[-1]


def test_round_data_refusals_come_before_any_process(
    tiny_llama_dir, train_path, tmp_path, write_jsonl, sample_rows
):
    # precomputed without a cache: the missing file is named with the command that writes it
    with pytest.raises(FileNotFoundError, match="selm refpass"):
        load_round_data(
            round_config(
                tiny_llama_dir, train_path, f"train.ref_cache={tmp_path / 'none.safetensors'}"
            )
        )
    no_yref = write_jsonl(
        tmp_path / "no_yref.jsonl",
        [{k: v for k, v in r.items() if k != "reference_response"} for r in sample_rows],
    )
    with pytest.raises(ValueError, match="loss.alpha=0.5 needs y_ref"):
        load_round_data(
            round_config(tiny_llama_dir, no_yref, "loss.alpha=0.5", "train.reference_mode=onthefly")
        )
    with pytest.raises(ConfigError, match="no model to start from"):
        load_round_data(load_config(None, [f"data.train_path={train_path}"]))


def test_total_train_steps():
    cfg = load_config(None, ["train.global_batch_size=8", "train.epochs=3"])
    assert total_train_steps(cfg, 20) == 6  # 3 epochs x 2 full batches (the tail is dropped)
    cfg.train.max_steps = 5
    assert total_train_steps(cfg, 20) == 5
    with pytest.raises(ValueError, match="7 examples .* fewer than train.global_batch_size=8"):
        total_train_steps(cfg, 7)


def test_step_loss_and_reduced_metrics_match_an_independent_computation(tiny_llama_dir, train_path):
    cfg = round_config(
        tiny_llama_dir,
        train_path,
        "loss.beta=0.1",
        "loss.alpha=0.5",
        "train.reference_mode=onthefly",
    )
    data = load_round_data(cfg)
    vocab = len(data.tokenizer)
    shape = ModelShape(
        num_layers=2,
        hidden_size=16,
        ffn_hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        vocab_size=vocab,
    )
    micro = collate_micro_batches(
        data.dataset, [[0, 2], [1, 3]], pad_id=pad_token_id(data.tokenizer), pad_to_multiple_of=8
    )
    gen = torch.Generator().manual_seed(0)
    sums, expected_losses = [], []
    for mb in micro:
        n, t = mb.batch.tokens.shape
        logits = 3 * torch.randn(n, t, vocab + 12, generator=gen)  # 12 padded vocab columns
        logits[..., vocab:] = 50.0  # they must not enter the softmax
        mb.ref_logps = -10 * torch.rand(n, generator=gen)
        mb.counts = step_counts(mb, shape)
        mean, reduced = selm_step_loss(mb, logits, cfg=cfg, tp_group=None, vocab_size=vocab)
        # Independent: summed response log-probs over the true vocabulary.
        token_logps = (
            logits[..., :vocab].log_softmax(-1).gather(-1, mb.batch.labels[..., None])[..., 0]
        )
        seq = (token_logps * mb.batch.loss_mask).sum(-1)
        b = mb.batch.num_examples
        loss, _ = selm_loss(
            seq[:b],
            seq[b : 2 * b],
            mb.ref_logps[:b],
            mb.ref_logps[b : 2 * b],
            seq[2 * b :],
            mb.ref_logps[2 * b :],
            beta=0.1,
            alpha=0.5,
        )
        assert mean.item() == pytest.approx(loss.mean().item(), rel=1e-5)
        assert reduced["num_examples"].item() == b
        assert reduced["num_tokens"].item() == sum(mb.sequence_lengths) == mb.num_tokens
        examples = [data.dataset[i] for i in mb.batch.example_indices.tolist()]
        assert mb.sequence_lengths == [
            len(e.prompt_ids) + len(e.responses[s]) for s in range(3) for e in examples
        ]
        assert reduced["model_flops"].item() == 3 * forward_flops(shape, mb.sequence_lengths)
        sums.append(reduced)
        expected_losses.append(loss)

    ctx = SimpleNamespace(device=torch.device("cpu"), is_last_stage=True, dp=1, pp=1)
    metrics = reduce_step_metrics(sums, ctx)
    assert metrics["loss"] == pytest.approx(torch.cat(expected_losses).mean().item(), rel=1e-5)
    assert metrics["num_examples"] == 4
    assert metrics["num_tokens"] == sum(mb.num_tokens for mb in micro)
    assert metrics["model_flops"] == sum(r["model_flops"].item() for r in sums)
    assert all(math.isfinite(v) for v in metrics.values())
    # A metric no micro-batch produced is left out, not averaged as NaN.
    for reduced in sums:
        del reduced["loss/optimism"]
    assert "loss/optimism" not in reduce_step_metrics(sums, ctx)


def test_reduced_metrics_keep_a_non_finite_loss():
    """A NaN or infinite loss is reported as such (a metric no micro-batch produces is not)."""
    from selm_mcore.train.step import COUNTS

    def micro(loss):
        sums = {name: torch.tensor(1.0, dtype=torch.float64) for name in COUNTS}
        return {**sums, "loss": torch.tensor(loss, dtype=torch.float64)}

    ctx = SimpleNamespace(device=torch.device("cpu"), is_last_stage=True, dp=1, pp=1)
    assert math.isnan(reduce_step_metrics([micro(0.5), micro(float("nan"))], ctx)["loss"])
    assert reduce_step_metrics([micro(0.5), micro(float("inf"))], ctx)["loss"] == math.inf
    assert "loss/optimism" not in reduce_step_metrics([micro(0.5)], ctx)
