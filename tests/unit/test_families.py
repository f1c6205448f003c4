"""The supported families (selm_mcore.mcore.families) without a process group: which configs are
accepted and which refused (with the key and the fix), the sliding-window rule at every command
that takes lengths, the Megatron config each family gets, parameter counts against HF's own
models, the planner's view of them, and each family's chat format through the tokenizer.

The end-to-end checks (converters, reference pass, training, vLLM) are tests/dist/test_families.py.
"""

import json

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from selm_mcore.config.io import load_config
from selm_mcore.data.tokenize import encode_prompt, leading_bos, render_prompt
from selm_mcore.mcore.families import (
    SlidingWindowError,
    UnsupportedModelError,
    attention_window,
    check_attention_window,
    check_family_config,
    family_of,
)
from selm_mcore.mcore.model import transformer_config, validate_hf_config
from selm_mcore.mcore.parallel import ParallelContext
from selm_mcore.modelspec import ModelShape
from selm_mcore.plan import PlanError, resolve_model

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def test_the_supported_families_pass_and_others_are_refused_by_name():
    for config in (LlamaConfig(), MistralConfig(), Qwen2Config(), Phi3Config()):
        validate_hf_config(config)
    with pytest.raises(UnsupportedModelError, match="model_type='gemma'.*llama, mistral, qwen2"):
        check_family_config({"model_type": "gemma"})
    with pytest.raises(UnsupportedModelError, match="model_type='qwen2_moe'"):
        family_of({"model_type": "qwen2_moe"})


@pytest.mark.parametrize(
    "config, key, fix",
    [
        (MistralConfig(num_local_experts=8), "num_local_experts=8", "dense mistral"),
        (Qwen2Config(use_qk_norm=True), "use_qk_norm=True", "remove the key"),
        (LlamaConfig(attn_logit_softcapping=50.0), "attn_logit_softcapping", "Gemma-2"),
        (MistralConfig(attention_bias=True), "attention_bias=true", "without linear biases"),
        (
            Phi3Config(
                rope_scaling={
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 48,
                    "long_factor": [2.0] * 48,
                    "original_max_position_embeddings": 4096,
                },
                max_position_embeddings=131072,
            ),
            "'longrope'",
            "Phi-3-mini-4k-instruct",
        ),
    ],
)
def test_unsupported_features_of_a_supported_family_name_the_key_and_the_fix(config, key, fix):
    with pytest.raises(UnsupportedModelError, match=key) as info:
        validate_hf_config(config)
    assert fix in str(info.value)


def test_the_sliding_window_is_allowed_while_every_sequence_fits():
    mistral = MistralConfig(sliding_window=4096)
    assert attention_window(mistral) == 4096
    check_attention_window(mistral, max_length=4096, generation_context=4096)
    with pytest.raises(SlidingWindowError, match="data.max_length=8192") as info:
        check_attention_window(mistral, max_length=8192, generation_context=2048)
    assert "sliding_window=4096" in str(info.value)
    assert "--set data.max_length=4096" in str(info.value)
    # Phi-3-mini-4k's window (2047) is one token shorter than the default generation context.
    phi3 = {"model_type": "phi3", "sliding_window": 2047}
    with pytest.raises(SlidingWindowError, match="generation.max_model_len=2048"):
        check_attention_window(phi3, max_length=1024, generation_context=2048)
    # Qwen2 has a window only with use_sliding_window, on the layers layer_types names.
    assert attention_window(Qwen2Config(sliding_window=4096)) is None
    windowed = Qwen2Config(
        use_sliding_window=True, sliding_window=512, max_window_layers=1, num_hidden_layers=2
    )
    assert attention_window(windowed) == 512
    full = Qwen2Config(
        use_sliding_window=True, sliding_window=512, max_window_layers=2, num_hidden_layers=2
    )
    assert attention_window(full) is None
    assert attention_window(LlamaConfig()) is None


def test_commands_refuse_a_window_shorter_than_their_lengths(tmp_path, write_jsonl, preference_row):
    """selm run (before any phase) and the vLLM engine (before it starts) name the key."""
    from selm_mcore.config.schema import GenerationConfig
    from selm_mcore.loop.online import check_run_inputs
    from selm_mcore.rollout.vllm_engine import VLLMGenerator

    MistralConfig(**TINY, sliding_window=256, head_dim=32).save_pretrained(str(tmp_path))
    train = write_jsonl(tmp_path / "train.jsonl", [preference_row("q0", "a0", "b0")])
    base = [
        f"model.hf_dir={tmp_path}",
        f"data.train_path={train}",
        "train.global_batch_size=1",
        "data.max_prompt_length=128",
        "generation.max_tokens=128",
    ]
    check_run_inputs(
        load_config(None, base + ["data.max_length=256", "generation.max_model_len=256"])
    )
    with pytest.raises(SlidingWindowError, match="generation.max_model_len=2048"):
        check_run_inputs(load_config(None, base + ["data.max_length=256"]))
    with pytest.raises(SlidingWindowError, match="data.max_length=1024"):
        check_run_inputs(load_config(None, base + ["generation.max_model_len=256"]))
    with pytest.raises(SlidingWindowError, match=f"{tmp_path}/config.json: sliding_window=256"):
        VLLMGenerator(tmp_path, GenerationConfig(max_tokens=16, max_model_len=512))


def test_training_data_longer_than_the_window_is_refused_before_tokenising(
    tmp_path, write_jsonl, preference_row
):
    from selm_mcore.train.build import load_round_data

    MistralConfig(**TINY, sliding_window=256).save_pretrained(str(tmp_path))
    train = write_jsonl(tmp_path / "train.jsonl", [preference_row("q0", "a0", "b0")])
    cfg = load_config(None, [f"model.hf_dir={tmp_path}", f"data.train_path={train}"])
    with pytest.raises(SlidingWindowError, match="data.max_length=1024"):
        load_round_data(cfg)  # no tokenizer in the folder: the window is checked first


def test_qwen2_gets_qkv_biases_in_megatron_and_the_others_do_not():
    ctx = ParallelContext(
        rank=0,
        world_size=1,
        tp=1,
        pp=1,
        vpp=None,
        dp=1,
        tp_rank=0,
        pp_rank=0,
        dp_rank=0,
        tp_group=None,
        pp_group=None,
        dp_group=None,
        device=torch.device("cpu"),
    )
    for config, bias in (
        (Qwen2Config(**TINY), True),
        (MistralConfig(**TINY), False),
        (Phi3Config(**TINY), False),
    ):
        tc = transformer_config(config, ctx, use_te=False)
        assert (tc.add_qkv_bias, tc.add_bias_linear) == (bias, False)


@pytest.mark.parametrize(
    "model_class, config",
    [
        (MistralForCausalLM, MistralConfig(**TINY)),
        (Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=True)),
        (Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=False)),
        (Phi3ForCausalLM, Phi3Config(**TINY, pad_token_id=0)),
    ],
)
def test_parameter_counts_equal_hf_models(model_class, config):
    model = model_class(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert ModelShape.from_hf_config(config).num_params() == sum(unique.values())
    assert ModelShape.from_hf_config(config.to_dict()).num_params() == sum(unique.values())


def test_the_planner_takes_known_models_and_folders_of_each_family(tmp_path):
    for name, low, high, example in (
        ("HuggingFaceH4/mistral-7b-sft-beta", 7.2e9, 7.3e9, "selm_zephyr_7b.yaml"),
        ("Qwen/Qwen2.5-7B-Instruct", 7.6e9, 7.7e9, "selm_llama3_8b.yaml"),
        ("microsoft/Phi-3-mini-4k-instruct", 3.8e9, 3.9e9, "selm_llama3_8b.yaml"),
    ):
        model, got_example = resolve_model(name)
        assert low < model.num_params() < high and got_example == example, name
    Phi3Config(**TINY).save_pretrained(str(tmp_path / "phi3"))
    model, _ = resolve_model(str(tmp_path / "phi3"))
    assert (model.hidden_size, model.num_layers) == (64, 2)
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(PlanError, match="gemma/config.json: config.json model_type='gemma2'"):
        resolve_model(str(tmp_path / "gemma"))


# --- chat formats through the tokenizer ----------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 plus 3?"},
]
RENDERED = {
    # the formats of mistral-7b-sft-beta (Zephyr), Qwen2 / SmolLM2 (ChatML) and Phi-3
    "zephyr": "<|system|>\nYou are a helpful assistant.</s>\n<|user|>\nWhat is 2 plus 3?</s>\n"
    "<|assistant|>\n",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "What is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n",
    "phi3": "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nWhat is 2 plus 3?<|end|>\n"
    "<|assistant|>\n",
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from selm_mcore.testing.assets import build_tiny_tokenizer

    out = {}
    for name in RENDERED:
        folder = tmp_path_factory.mktemp(name)
        build_tiny_tokenizer(folder, chat_format=name)
        out[name] = AutoTokenizer.from_pretrained(str(folder))
    return out


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_chat_format_renders_and_tokenises_with_one_bos(tokenizers, name):
    tokenizer = tokenizers[name]
    text = render_prompt(tokenizer, CONVERSATION)
    assert text == RENDERED[name]
    ids = encode_prompt(tokenizer, CONVERSATION)
    if name == "chatml":  # the template writes what the model needs; the tokenizer adds nothing
        assert leading_bos(tokenizer) is None
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    else:  # Zephyr's and Phi-3's tokenizers put their BOS in front of every text
        assert leading_bos(tokenizer) == tokenizer.bos_token_id
        assert ids == tokenizer(text)["input_ids"] and ids.count(tokenizer.bos_token_id) == 1
        assert ids[1:] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_template_that_writes_the_bos_gets_no_second_one(tokenizers):
    tokenizer = tokenizers["zephyr"]
    template = tokenizer.chat_template
    tokenizer.chat_template = "{{ bos_token }}" + template
    try:
        ids = encode_prompt(tokenizer, CONVERSATION)
    finally:
        tokenizer.chat_template = template
    assert ids == tokenizer(RENDERED["zephyr"])["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
