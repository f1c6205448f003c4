"""The benchmark's FLOP formula against a hand count and against torch's FLOP counter on HF Llama.

No timing is asserted anywhere in the benchmark tests: these check what the numbers mean.
"""

import json

import pytest
import torch

from selm_mcore.bench import (
    ModelShape,
    format_table,
    forward_flops,
    median_summary,
    phase_times,
    training_flops,
)

# L=2, h=8, ffn=16, 2 heads of 4 (d_q = 8), 1 kv head (d_kv = 4), V=10.
HAND_SHAPE = ModelShape(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_heads=2,
                        num_kv_heads=1, head_dim=4, vocab_size=10)


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


def test_shape_from_hf_config_dict_and_object():
    from transformers import LlamaConfig

    raw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    expected = ModelShape(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_heads=4,
                          num_kv_heads=2, head_dim=8, vocab_size=96)
    assert ModelShape.from_hf_config(raw) == expected
    assert ModelShape.from_hf_config(LlamaConfig(**raw)) == expected


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_training_flops_equal_torch_flop_counter_on_hf_llama(num_kv_heads):
    """torch's FlopCounterMode counts every matmul of HF's eager Llama, forward + backward.

    Eager attention multiplies the full s x s score matrix (the mask is added afterwards), so
    it matches the formula's ``causal=False`` count exactly; backward costs 2x forward.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=64,
                         attn_implementation="eager")
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


def test_phase_times_read_the_online_manifest(tmp_path):
    from selm_mcore.online import Manifest

    manifest = Manifest(tmp_path / "manifest.json", {"online": {"rounds": 1}})
    for name, seconds in [("round1/export", 1.5), ("round1/generate", 10.0),
                          ("round1/rank", 2.0), ("round1/refpass", 3.0), ("round1/train", 20.0),
                          ("final/generate", 4.0)]:
        manifest.record(name, name.replace("/", "_"), "0" * 64, seconds)
    rows = {r["round"]: r for r in phase_times(tmp_path)}
    assert rows["round1"]["generate"] == 10.0 and rows["round1"]["train"] == 20.0
    assert rows["round1"]["total"] == pytest.approx(36.5)
    assert rows["final"] == {"round": "final", "generate": 4.0, "total": 4.0}
    json.dumps(rows)  # the JSON output must serialise


def test_median_summary_and_table():
    summary = median_summary([{"a": 1.0}, {"a": 5.0}, {"a": 2.0}, {"a": None}], ["a"])
    assert summary["a"] == 2.0 and summary["a_all"] == [1.0, 5.0, 2.0]
    table = format_table([{"name": "ours", "x": 1234.5}, {"name": "trl", "x": None}],
                         [("name", "impl", ""), ("x", "tok/s", ".0f")])
    lines = table.splitlines()
    assert lines[0].split() == ["impl", "tok/s"]
    assert lines[2].split() == ["ours", "1234"] and lines[3].split() == ["trl", "-"]
