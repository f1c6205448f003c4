"""selm_mcore.mcore.model without a process group: RoPE frequencies against transformers, refusal of
unsupported configs and layouts, vocab padding, and the TransformerConfig it derives (on CPU and
for a GPU layout: sequence parallelism, fused weight-gradient accumulation, recompute choices)."""

import pytest
import torch
from transformers import LlamaConfig

from selm_mcore.mcore.model import (
    UnsupportedModelError,
    layers_of_stage,
    padded_vocab_size,
    recompute_mode,
    recompute_settings,
    rope_inv_freq,
    transformer_config,
    validate_hf_config,
    validate_layout,
)
from selm_mcore.mcore.parallel import (
    ParallelContext,
    ParallelLayoutError,
    sequence_length_multiple,
    sequence_parallel_enabled,
)


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=500,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3_short_context": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "llama3_8k": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "llama3_other_factors": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 128,
    },
}


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_inv_freq_equals_transformers(name, theta):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = ROPES[name]
    config = tiny_config(
        hidden_size=256,
        num_attention_heads=4,
        rope_theta=theta,
        rope_scaling=None if rope is None else {**rope, "rope_theta": theta},
    )
    ours = rope_inv_freq(config)
    reference = LlamaRotaryEmbedding(config).inv_freq
    assert ours.dtype == torch.float32 and ours.shape == (32,)
    assert torch.equal(ours, reference)
    if rope is not None:
        inv, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None)
        assert torch.equal(ours, inv)


def test_megatron_llama3_constants_are_hard_coded():
    """Why build_model overrides rotary_pos_emb.inv_freq: Megatron's llama3 scaling fixes
    low/high frequency factors 1/4 and original context 8192, so it matches HF only there."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    def megatron_inv_freq(config):
        return RotaryEmbedding(
            kv_channels=64,
            rotary_percent=1.0,
            rotary_base=500000,
            rope_scaling=True,
            rope_scaling_factor=8.0,
            use_cpu_initialization=True,
        ).inv_freq

    base = dict(hidden_size=256, num_attention_heads=4, rope_theta=500000.0)
    matching = tiny_config(**base, rope_scaling={**ROPES["llama3_8k"], "rope_theta": 500000.0})
    other = tiny_config(
        **base, rope_scaling={**ROPES["llama3_short_context"], "rope_theta": 500000.0}
    )
    assert torch.allclose(megatron_inv_freq(matching), rope_inv_freq(matching))
    assert not torch.allclose(megatron_inv_freq(other), rope_inv_freq(other))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        (
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "rope_theta": 10000.0,
                    "original_max_position_embeddings": 256,
                }
            },
            "yarn",
        ),
    ],
)
def test_unsupported_configs_refused(overrides, key):
    with pytest.raises(UnsupportedModelError, match=key):
        validate_hf_config(tiny_config(**overrides))


def test_moe_and_other_architectures_refused():
    config = tiny_config()
    config.num_local_experts = 8
    with pytest.raises(UnsupportedModelError, match="num_local_experts=8.*mixture-of-experts"):
        validate_hf_config(config)
    from transformers import GemmaConfig

    with pytest.raises(UnsupportedModelError, match="model_type='gemma'"):
        validate_hf_config(GemmaConfig())
    # A sliding window is checked against the run's lengths (tests/unit/test_families.py).
    config = tiny_config()
    config.sliding_window = 4096
    validate_hf_config(config)
    validate_hf_config(tiny_config())  # the plain layout passes


def test_layout_errors_name_the_rule_and_options():
    with pytest.raises(
        ParallelLayoutError,
        match=r"parallel.tp=3 must divide model.num_key_value_heads \(query groups\)"
        r"=8; choose one of \[1, 2, 4, 8\]",
    ):
        validate_layout(
            tiny_config(
                num_attention_heads=24,
                num_key_value_heads=8,
                hidden_size=768,
                intermediate_size=384,
            ),
            tp=3,
            pp=1,
        )
    with pytest.raises(
        ParallelLayoutError, match="parallel.pp=3 must divide model.num_hidden_layers=4"
    ):
        validate_layout(tiny_config(), tp=1, pp=3)
    with pytest.raises(ParallelLayoutError, match="parallel.pp\\*vpp=8"):
        validate_layout(tiny_config(), tp=1, pp=2, vpp=4)
    with pytest.raises(ParallelLayoutError, match="padded_vocab_size=501"):
        validate_layout(tiny_config(), tp=2, pp=1, padded_vocab=501)
    # SmolLM2-135M: 9 heads, 3 query groups -> tp must be 1, 3 (or 9 for heads only).
    smol = tiny_config(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        num_hidden_layers=30,
    )
    with pytest.raises(
        ParallelLayoutError, match="parallel.tp=2 must divide model.num_attention_heads=9"
    ):
        validate_layout(smol, tp=2, pp=1)
    validate_layout(smol, tp=3, pp=2)
    validate_layout(tiny_config(), tp=2, pp=2, vpp=2, padded_vocab=512)


@pytest.mark.parametrize(
    "vocab, tp, divisible_by, expected",
    [
        (500, 1, 128, 512),
        (500, 2, 128, 512),
        (500, 4, 128, 512),
        (513, 2, 128, 768),
        (49152, 3, 128, 49152),
        (128256, 8, 128, 129024),
        (32000, 1, 1, 32000),
    ],
)
def test_padded_vocab_size(vocab, tp, divisible_by, expected):
    padded = padded_vocab_size(vocab, tp, divisible_by)
    assert padded == expected and padded % (divisible_by * tp) == 0 and padded >= vocab


def test_layers_of_stage_follow_megatrons_interleaved_split():
    # 8 layers, pp 2, vpp 2: chunk 0 of stage 0 = 0-1, of stage 1 = 2-3; chunk 1: 4-5, 6-7.
    split = {(r, v): layers_of_stage(8, 2, 2, r, v) for r in range(2) for v in range(2)}
    assert split == {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}
    assert layers_of_stage(4, 1, 1, 0, 0) == [0, 1, 2, 3]
    assert [layers_of_stage(30, 3, 1, r, 0)[0] for r in range(3)] == [0, 10, 20]


def _ctx(tp=1, pp=1, vpp=None):
    return ParallelContext(
        rank=0,
        world_size=tp * pp,
        tp=tp,
        pp=pp,
        vpp=vpp,
        dp=1,
        tp_rank=0,
        pp_rank=0,
        dp_rank=0,
        tp_group=None,
        pp_group=None,
        dp_group=None,
        device=torch.device("cpu"),
    )


def test_transformer_config_llama3_layout():
    config = tiny_config(head_dim=48, num_attention_heads=4, hidden_size=128, rms_norm_eps=1e-6)
    tc = transformer_config(
        config, _ctx(tp=2, pp=2), params_dtype=torch.bfloat16, recompute=True, use_te=False
    )
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (4, 128, 256)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (4, 2, 48)
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-6
    assert tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu
    assert not tc.add_bias_linear and not tc.add_qkv_bias
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    assert tc.bf16 and tc.params_dtype == torch.bfloat16 and tc.pipeline_dtype == torch.bfloat16
    assert tc.use_cpu_initialization and not tc.batch_p2p_comm  # CPU / gloo rules
    assert (tc.recompute_granularity, tc.recompute_method) == ("full", "uniform")
    assert tc.transformer_impl == "local"
    fp32 = transformer_config(config, _ctx(), use_te=False)
    assert not fp32.bf16 and fp32.params_dtype == torch.float32
    assert fp32.recompute_granularity is None
    with pytest.raises(ValueError, match="float16"):
        transformer_config(config, _ctx(), params_dtype=torch.float16, use_te=False)


def _gpu_ctx(tp=2, pp=2, vpp=None, dp=2):
    return ParallelContext(
        sequence_parallel=tp > 1,
        rank=0,
        world_size=tp * pp * dp,
        tp=tp,
        pp=pp,
        vpp=vpp,
        dp=dp,
        tp_rank=0,
        pp_rank=0,
        dp_rank=0,
        tp_group=None,
        pp_group=None,
        dp_group=None,
        device=torch.device("cuda", 0),
    )


@pytest.fixture
def te_rope_probe(monkeypatch):
    """TransformerConfig refuses apply_rope_fusion unless TE's fused RoPE kernel imported: the
    one availability probe a GPU layout's config meets without TE installed."""
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", object())


@pytest.mark.parametrize("packed", [False, True])
def test_transformer_config_of_a_gpu_layout_turns_on_the_gpu_paths(te_rope_probe, packed):
    config = tiny_config()
    tc = transformer_config(
        config,
        _gpu_ctx(tp=2),
        params_dtype=torch.bfloat16,
        use_te=True,
        wgrad_fusion=True,
        packed=packed,
        recompute="selective",
    )
    assert tc.sequence_parallel and tc.gradient_accumulation_fusion and tc.batch_p2p_comm
    assert tc.transformer_impl == "transformer_engine" and not tc.use_cpu_initialization
    assert tc.apply_rope_fusion is not packed  # packed rows carry a position per token
    assert (tc.recompute_granularity, tc.recompute_modules) == ("selective", ["core_attn"])
    # Without apex's fused wgrad extension Megatron's LM head refuses the flag: off.
    assert not transformer_config(
        config, _gpu_ctx(tp=2), use_te=True, wgrad_fusion=False, packed=packed
    ).gradient_accumulation_fusion
    # Sequence parallelism as the context says: off at tp=1, on with the local spec too.
    assert not transformer_config(
        config, _gpu_ctx(tp=1), use_te=True, wgrad_fusion=True, packed=packed
    ).sequence_parallel
    assert transformer_config(
        config, _gpu_ctx(tp=2), use_te=False, wgrad_fusion=True, packed=packed
    ).sequence_parallel


def test_transformer_config_on_cpu_keeps_the_gpu_paths_off():
    tc = transformer_config(tiny_config(), _ctx(tp=2, pp=2), use_te=False, wgrad_fusion=True)
    assert not tc.sequence_parallel and not tc.gradient_accumulation_fusion
    assert not tc.batch_p2p_comm and tc.use_cpu_initialization


@pytest.mark.parametrize(
    "recompute, expected",
    [
        ("none", (None, None, None)),
        (False, (None, None, None)),
        (None, (None, None, None)),
        ("selective", ("selective", None, None)),
        ("full", ("full", "uniform", 1)),
        (True, ("full", "uniform", 1)),
    ],
)
def test_recompute_choice_maps_to_megatron(recompute, expected):
    tc = transformer_config(tiny_config(), _ctx(), recompute=recompute, use_te=False)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == expected
    assert (
        recompute_mode(recompute)
        == {None: "none", "selective": "selective", "full": "full"}[expected[0]]
    )
    with pytest.raises(
        ValueError, match="model.recompute='partial' must be one of none, selective, full"
    ):
        recompute_settings("partial")


def test_sequence_parallel_choice_and_length_multiple():
    # auto: on with tp > 1 on a GPU only; true: also on CPU; false: never.
    assert sequence_parallel_enabled("auto", 2, on_gpu=True)
    assert not sequence_parallel_enabled("auto", 2, on_gpu=False)
    assert not sequence_parallel_enabled("auto", 1, on_gpu=True)
    assert sequence_parallel_enabled("true", 2, on_gpu=False)
    assert sequence_parallel_enabled(True, 2, on_gpu=False)
    assert not sequence_parallel_enabled("false", 4, on_gpu=True)
    assert sequence_length_multiple(4, "auto", on_gpu=True) == 4
    assert sequence_length_multiple(4, "auto", on_gpu=False) == 1
    assert sequence_length_multiple(4, "true", on_gpu=False) == 4
    assert sequence_length_multiple(1, "auto", on_gpu=True) == 1
    with pytest.raises(ParallelLayoutError, match="sequence_parallel=true needs parallel.tp > 1"):
        sequence_parallel_enabled("true", 1)
    with pytest.raises(ParallelLayoutError, match="not one of auto, true, false"):
        sequence_parallel_enabled("yes", 2)


def test_tp_hint_lists_only_sizes_that_fit_every_rule():
    # SmolLM2-135M: 9 heads but 3 query groups: tp=9 divides the heads, not the groups.
    smol = tiny_config(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        num_hidden_layers=30,
        vocab_size=49152,
    )
    with pytest.raises(
        ParallelLayoutError,
        match=r"parallel.tp=2 must divide "
        r"model.num_attention_heads=9; choose one of "
        r"\[1, 3\]$",
    ):
        validate_layout(smol, tp=2, pp=1)
    # A padded vocabulary fixed by a checkpoint (saved at tp=1: 1664 = 13 * 128) must divide
    # too: 12 heads and groups alone would allow 1, 2, 3, 4, 6, 12.
    wide = tiny_config(
        hidden_size=384,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=768,
        vocab_size=1600,
    )
    fixed = padded_vocab_size(1600, 1)
    assert fixed == 1664
    with pytest.raises(ParallelLayoutError, match=r"choose one of \[1, 2, 4\]$"):
        validate_layout(wide, tp=5, pp=1, padded_vocab=fixed)
    # Padded for the tp itself (a fresh build), the vocabulary never limits tp.
    with pytest.raises(ParallelLayoutError, match=r"choose one of \[1, 2, 3, 4, 6, 12\]$"):
        validate_layout(wide, tp=5, pp=1)
    for tp in (1, 2, 3, 4, 6, 12):
        validate_layout(wide, tp=tp, pp=1, padded_vocab=padded_vocab_size(1600, tp))


def test_local_spec_norms_support_sequence_parallelism():
    """The local spec's norms (``LocalNorm``): in every norm slot and as the decoder's final
    norm, weights in the parameter dtype and marked for Megatron's tensor-parallel gradient
    all-reduce under sequence parallelism; in fp32 the same maths as torch's RMSNorm."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from selm_mcore.mcore.attention import PackedAttention
    from selm_mcore.mcore.layer_spec import LocalNorm, decoder_spec, gpt_layer_spec

    spec = gpt_layer_spec(use_te=False, packed=True)

    def slots(node):
        if isinstance(node, ModuleSpec):
            yield node.module
            yield from slots(node.submodules)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for field in dataclasses.fields(node):
                yield from slots(getattr(node, field.name))
        else:
            yield node

    modules = list(slots(spec))
    assert WrappedTorchNorm not in modules and modules.count(LocalNorm) == 2
    assert spec.submodules.self_attention.submodules.core_attention is PackedAttention
    config = transformer_config(
        tiny_config(), _gpu_ctx(tp=2, pp=2), params_dtype=torch.bfloat16, use_te=False
    )
    assert config.sequence_parallel  # the context's choice, local spec included
    block = decoder_spec(spec, config, vp_stage=None, pp_rank=1)
    assert block.layer_norm is LocalNorm and block.layer_specs == [spec, spec]  # 4 layers / pp 2
    norm = LocalNorm(config, 128, eps=1e-5)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.dtype == torch.bfloat16
    assert norm.weight.sequence_parallel is True

    fp32 = transformer_config(tiny_config(), _ctx(), use_te=False)
    ours, torch_norm = LocalNorm(fp32, 128, eps=1e-5), torch.nn.RMSNorm(128, eps=1e-5)
    assert ours.weight.dtype == torch.float32 and ours.weight.sequence_parallel is False
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(128, generator=gen), torch.randn(5, 3, 128, generator=gen)
    with torch.no_grad():
        ours.weight.copy_(weight)
        torch_norm.weight.copy_(weight)
    assert torch.equal(ours(x), torch_norm(x))
