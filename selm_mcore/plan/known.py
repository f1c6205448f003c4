"""The models ``selm plan --model NAME`` knows without a download, and what the planner reads
from the example config of each size.

``KNOWN_MODELS``: Hub name -> (the numbers of its config.json as published, the example config
of that size). ``EXAMPLE_SETTINGS``: per example config (``examples/configs/NAME``), the keys
the planner prices (dtype, recompute, layout, lengths, y_ref, batch sizes, step checkpoints), as
a raw config (section -> key -> value), so an installed package plans without the repository's
examples/ folder; tests/unit/test_plan.py checks them against the files.
"""

from __future__ import annotations

from typing import Any

_LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    num_attention_heads=None,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
)
_LLAMA3_8B = {
    **_LLAMA3,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
_LLAMA3_70B = {
    **_LLAMA3,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
# Mistral-7B-v0.1 and its fine-tunes (mistral-7b-sft-beta: the paper's Zephyr start model).
_MISTRAL_7B = dict(
    model_type="mistral",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=4096,
    tie_word_embeddings=False,
    hidden_act="silu",
)
_QWEN25_7B = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
    sliding_window=131072,
    max_window_layers=28,
    tie_word_embeddings=False,
    hidden_act="silu",
)
_PHI3_MINI_4K = dict(
    model_type="phi3",
    vocab_size=32064,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=2047,
    tie_word_embeddings=False,
    hidden_act="silu",
)
KNOWN_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "meta-llama/Meta-Llama-3-8B": (_LLAMA3_8B, "selm_llama3_8b.yaml"),
    "meta-llama/Meta-Llama-3-8B-Instruct": (_LLAMA3_8B, "selm_llama3_8b.yaml"),
    "meta-llama/Meta-Llama-3-70B": (_LLAMA3_70B, "selm_llama3_70b.yaml"),
    "meta-llama/Meta-Llama-3-70B-Instruct": (_LLAMA3_70B, "selm_llama3_70b.yaml"),
    "mistralai/Mistral-7B-v0.1": (_MISTRAL_7B, "selm_zephyr_7b.yaml"),
    "HuggingFaceH4/mistral-7b-sft-beta": (_MISTRAL_7B, "selm_zephyr_7b.yaml"),
    "Qwen/Qwen2.5-7B": (_QWEN25_7B, "selm_llama3_8b.yaml"),
    "Qwen/Qwen2.5-7B-Instruct": (_QWEN25_7B, "selm_llama3_8b.yaml"),
    "microsoft/Phi-3-mini-4k-instruct": (_PHI3_MINI_4K, "selm_llama3_8b.yaml"),
}

# The example a model outside KNOWN_MODELS is priced with.
DEFAULT_EXAMPLE = "selm_llama3_8b.yaml"

# The 8B and 70B examples share their recipe (dtype, recompute, lengths, y_ref); the layout and
# the micro-batch and step-checkpoint settings differ. The Zephyr example differs in alpha and
# the global batch (256 pairs).
_RECIPE: dict[str, dict[str, Any]] = {
    "model": {"dtype": "bf16", "recompute": "none"},
    "data": {"max_length": 1024, "max_prompt_length": 512, "pad_to_multiple_of": 64},
    "loss": {"alpha": 1.0e-4},
}
# What the round estimate (`selm plan --round`) reads besides: generation, ranking, held-out.
_ROUND = {
    "ranking": {"kind": "pairrm", "batch_size": 32},
}
EXAMPLE_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "selm_llama3_8b.yaml": {
        **_RECIPE,
        **_ROUND,
        "parallel": {"tp": 2, "pp": 1},
        "train": {"global_batch_size": 128, "micro_batch_size": 2, "save_interval": 20},
        "generation": {"num_engines": 8, "tensor_parallel_size": 1, "max_tokens": 1024},
        "online": {"max_eval_prompts": 2000, "nproc_per_node": 8, "export_tp": 1},
    },
    "selm_llama3_70b.yaml": {
        **_RECIPE,
        **_ROUND,
        "parallel": {"tp": 8, "pp": 2},
        "train": {"global_batch_size": 128, "micro_batch_size": 1, "save_interval": 10},
        "generation": {"num_engines": 8, "tensor_parallel_size": 8, "max_tokens": 1024},
        "online": {"max_eval_prompts": 2000, "nproc_per_node": 8, "export_tp": 8},
    },
    "selm_zephyr_7b.yaml": {
        **_RECIPE,
        **_ROUND,
        "loss": {"alpha": 1.0e-3},
        "parallel": {"tp": 2, "pp": 1},
        "train": {"global_batch_size": 256, "micro_batch_size": 2, "save_interval": 10},
        "generation": {"num_engines": 8, "tensor_parallel_size": 1, "max_tokens": 1024},
        "online": {"max_eval_prompts": 2000, "nproc_per_node": 8, "export_tp": 1},
    },
}
