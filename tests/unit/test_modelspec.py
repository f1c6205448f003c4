"""selm_mcore.modelspec: the parameter count against the parameters of a real HF
LlamaForCausalLM (tied and untied embeddings, grouped-query and multi-head attention), the
padded vocabulary, the shape read from configs, and the FLOP formula behind MFU against a hand
count and torch's FLOP counter on HF Llama."""

import json

import pytest
import torch

from selm_mcore.modelspec import (
    ModelShape,
    forward_flops,
    packed_forward_flops,
    padded_vocab_size,
    training_flops,
)

# --- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tied, num_kv_heads, head_dim",
    [(False, 2, None), (True, 2, None), (False, 4, None), (True, 1, 24)],
)
def test_num_params_equals_the_parameters_of_hf_llama(tied, num_kv_heads, head_dim):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    # parameters() yields a tied weight once
    expected = sum(p.numel() for p in model.parameters())
    shape = ModelShape.from_hf_config(config)
    assert shape.tied_embeddings is tied
    assert shape.num_params() == expected
    assert ModelShape.from_hf_config(config.to_dict()).num_params() == expected
    # the matmul weights per token: every Linear of the layers plus the LM head (even when tied)
    layers = model.model.layers.modules()
    linears = sum(m.weight.numel() for m in layers if isinstance(m, torch.nn.Linear))
    assert shape.matmul_params() == linears + model.lm_head.weight.numel()


def test_multimodal_config_json_is_read_from_its_text_config(tmp_path):
    text = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    (tmp_path / "config.json").write_text(json.dumps({"text_config": text, "vision_config": {}}))
    assert ModelShape.from_dir(tmp_path) == ModelShape.from_hf_config(text)
    assert ModelShape.from_dir(tmp_path).tied_embeddings


@pytest.mark.parametrize(
    "vocab, tp, divisible_by, expected",
    [(500, 1, 128, 512), (500, 2, 128, 512), (513, 2, 128, 768), (128256, 8, 128, 129024)],
)
def test_padded_vocab_is_the_next_multiple_of_divisible_by_times_tp(
    vocab, tp, divisible_by, expected
):
    assert padded_vocab_size(vocab, tp, divisible_by) == expected
    shape = ModelShape(2, 8, 16, 2, 1, 4, vocab, vocab_divisible_by=divisible_by)
    assert shape.padded_vocab(tp) == expected


# --- FLOPs --------------------------------------------------------------------------------------

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


def test_packed_flops_count_the_attention_of_each_group():
    # one group: prompt 3 (causal: 6 pairs), responses 2 and 1 over the prompt and themselves:
    # 2*3 + 3 and 1*3 + 1 -> 6 + 9 + 4 = 19 pairs; 6 tokens, 4 head positions
    segments = [[0, 0, 3, 2, 1, 0]]
    layers = 2 * 576
    expected = 2 * layers * 6 + 2 * 8 * 10 * 4 + 4 * 2 * 8 * 19
    assert packed_forward_flops(HAND_SHAPE, segments, 4) == expected
    # a group of a prompt only costs what one causal sequence costs without the LM head
    alone = forward_flops(HAND_SHAPE, [5]) - 2 * 8 * 10 * 5
    assert packed_forward_flops(HAND_SHAPE, [[0, 0, 5, 0, 0, 0]], 0) == alone
