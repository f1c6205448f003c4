"""selm_mcore.train.metrics: per-step records (JSONL, the log line, resume truncation, TensorBoard)
and
the FLOP formula behind MFU, against a hand count and torch's FLOP counter on HF Llama."""

import logging
import math

import pytest
import torch

from selm_mcore.runtime.files import read_records
from selm_mcore.train.metrics import (
    ModelShape,
    StepMetricsWriter,
    format_step_line,
    forward_flops,
    training_flops,
)

# --- step records -----------------------------------------------------------------------------


def test_jsonl_log_line_and_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="selm_mcore.train.metrics")
    writer = StepMetricsWriter(tmp_path, total_steps=4, enabled=True, progress_bar=False)
    for step in (1, 2, 3):
        writer.log(
            step,
            {
                "loss": [0.69, 0.68, 0.67][step - 1],
                "lr": 1e-6,
                "grad_norm": 2.0,
                "rewards/accuracies": 0.5,
                "mfu": 0.1234,
                "not_finite": float("nan"),
                "overflow": float("inf"),
            },
        )
    writer.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    # Non-finite values are kept (as NaN / Infinity), not dropped: a diverging run shows it.
    assert math.isnan(records[0]["not_finite"]) and records[0]["overflow"] == math.inf
    assert (
        "step 3/4 | loss 0.670000 | acc 0.500 | gnorm 2 | lr 1.000e-06 | MFU 0.123" in caplog.text
    )

    # A run resumed from the step-2 checkpoint drops the interrupted run's step 3.
    writer = StepMetricsWriter(
        tmp_path, total_steps=4, enabled=True, resume_step=2, progress_bar=False
    )
    writer.log(3, {"loss": 0.5})
    writer.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.69), (2, 0.68), (3, 0.5)]
    assert math.isnan(records[1]["not_finite"])  # kept through the resume rewrite too


def test_disabled_writer_writes_nothing(tmp_path):
    writer = StepMetricsWriter(tmp_path / "out", total_steps=2, enabled=False, tensorboard=True)
    writer.log(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "out").exists()


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = StepMetricsWriter(
        tmp_path, total_steps=2, enabled=True, tensorboard=True, progress_bar=False
    )
    writer.log(1, {"loss": 0.25, "rewards/margins": 0.5})
    writer.log(2, {"loss": 0.125, "rewards/margins": 1.0})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.25), (2, 0.125)]
    assert [e.value for e in events.Scalars("rewards/margins")] == [0.5, 1.0]


def test_format_step_line_skips_missing_fields():
    assert format_step_line(1, 10, {"loss": 0.5}) == "step 1/10 | loss 0.500000"
    assert (
        format_step_line(2, 10, {"loss": 0.5, "mfu": None, "tokens_per_s": 1234.4})
        == "step 2/10 | loss 0.500000 | 1234 tok/s"
    )


# --- FLOPs ------------------------------------------------------------------------------------

# L=2, h=8, ffn=16, 2 heads of 4 (d_q = 8), 1 kv head (d_kv = 4), V=10.
HAND_SHAPE = ModelShape(
    num_layers=2,
    hidden_size=8,
    ffn_hidden_size=16,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    vocab_size=10,
)


def test_matmul_params_hand_count():
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; mlp 3*8*16 = 384 -> 576; x2 layers = 1152
    # LM head 8*10 = 80
    assert HAND_SHAPE.matmul_params() == 1232


def test_forward_and_training_flops_hand_count():
    # two sequences of 3 and 5 tokens
    # dense: 2 * 1232 * (3 + 5) = 19712
    # causal attention: 2 * L * d_q * s * (s + 1) = 2*2*8*(3*4 + 5*6) = 32 * 42 = 1344
    assert forward_flops(HAND_SHAPE, [3, 5]) == 19712 + 1344
    # full (unmasked) attention: 4 * L * d_q * s^2 = 4*2*8*(9 + 25) = 2176
    assert forward_flops(HAND_SHAPE, [3, 5], causal=False) == 19712 + 2176
    on_the_fly = training_flops(HAND_SHAPE, [3, 5], reference_forward=True)
    assert on_the_fly == {"policy": 3 * 21056, "reference": 21056, "total": 4 * 21056}
    precomputed = training_flops(HAND_SHAPE, [3, 5], reference_forward=False)
    assert precomputed == {"policy": 3 * 21056, "reference": 0.0, "total": 3 * 21056}


def test_shape_from_hf_config_dict_object_and_folder(tiny_llama_dir):
    import json

    from transformers import LlamaConfig

    raw = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    expected = ModelShape(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        vocab_size=96,
    )
    assert ModelShape.from_hf_config(raw) == expected
    assert ModelShape.from_hf_config(LlamaConfig(**raw)) == expected
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert ModelShape.from_dir(tiny_llama_dir) == ModelShape.from_hf_config(config)
    with pytest.raises(FileNotFoundError, match="model.hf_dir must be an HF model folder"):
        ModelShape.from_dir(tiny_llama_dir / "missing")


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_training_flops_equal_torch_flop_counter_on_hf_llama(num_kv_heads):
    """torch's FlopCounterMode counts every matmul of HF's eager Llama, forward + backward.

    Eager attention multiplies the full s x s score matrix (the mask is added afterwards), so
    it matches the formula's ``causal=False`` count exactly; backward costs 2x forward.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    batch, seq = 3, 11
    input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(input_ids=input_ids).logits
        forward_only = counter.get_total_flops()
        logits.float().sum().backward()
    shape = ModelShape.from_hf_config(config)
    assert forward_only == forward_flops(shape, [seq] * batch, causal=False)
    counted = training_flops(shape, [seq] * batch, reference_forward=False, causal=False)
    assert counter.get_total_flops() == counted["policy"]
