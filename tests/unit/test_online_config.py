"""selm_mcore.online without running phases: example configs load and validate, run-level checks
refuse bad layouts before any phase, round portions, the phase plan and the phase commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from selm_mcore.config import ConfigError, SelmConfig, load_config
from selm_mcore.online import (
    RoundPhases,
    RunPaths,
    check_run_inputs,
    generation_input,
    megatron_command,
    write_portion,
)
from selm_mcore.runner import Manifest, OnlineError, selm_command

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize("name", ["cpu_demo.yaml", "selm_llama3_8b.yaml", "selm_llama3_70b.yaml"])
def test_example_configs_load(name):
    cfg = load_config(EXAMPLES / name)
    world = cfg.online.nproc_per_node * cfg.online.nnodes
    assert world % (cfg.parallel.tp * cfg.parallel.pp) == 0
    dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    assert cfg.train.global_batch_size % (dp * cfg.train.micro_batch_size) == 0
    cfg.validate(world_size=world)


def test_reference_recipe_in_the_llama3_8b_config():
    cfg = load_config(EXAMPLES / "selm_llama3_8b.yaml")
    assert (cfg.loss.alpha, cfg.loss.beta) == (1e-4, 0.01)
    assert cfg.optim.lr_per_round == [5e-7, 3e-7, 1e-7] and cfg.online.rounds == 3
    assert cfg.train.global_batch_size == 128 and cfg.optim.warmup_ratio == 0.1
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 512)
    assert (cfg.generation.temperature, cfg.generation.n, cfg.generation.max_tokens) == (0.0, 1, 1024)
    assert cfg.ranking.kind == "pairrm" and cfg.model.dtype == "bf16"


def test_online_config_validation():
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        load_config(None, ["online.nnodes=2"])
    with pytest.raises(ConfigError, match="online.rounds"):
        load_config(None, ["online.rounds=0"])


def test_check_run_inputs_refuses_bad_layouts_and_missing_inputs(tmp_path, write_jsonl,
                                                                  preference_row):
    train = write_jsonl(tmp_path / "train.jsonl", [preference_row("q0", "a0", "b0")])
    base = [f"model.hf_dir={tmp_path}", f"data.train_path={train}"]
    check_run_inputs(load_config(None, base + ["train.global_batch_size=8"]))
    with pytest.raises(ConfigError, match="multiple of parallel.tp \\* parallel.pp = 4"):
        check_run_inputs(load_config(None, base + ["online.nproc_per_node=6", "parallel.tp=4"]))
    with pytest.raises(ConfigError, match="data-parallel size 4"):
        check_run_inputs(load_config(None, base + ["online.nproc_per_node=8", "parallel.tp=2",
                                                   "train.global_batch_size=6"]))
    with pytest.raises(ConfigError, match="model.hf_dir"):
        check_run_inputs(load_config(None, [f"data.train_path={train}"]))
    with pytest.raises(ConfigError, match="data.train_path=.*missing.jsonl.* is not a file"):
        check_run_inputs(load_config(None, [f"model.hf_dir={tmp_path}",
                                            f"data.train_path={tmp_path / 'missing.jsonl'}"]))


def test_write_portion_takes_contiguous_thirds_and_keeps_answers(tmp_path, write_jsonl,
                                                                 preference_row):
    rows = [preference_row(f"q{i}", f"a{i}", f"b{i}", answer=str(i)) for i in range(10)]
    rows[4]["prompt_id"] = "given-id"
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    train.write_text("\n" + train.read_text().replace("\n", "\n\n", 2))  # blank lines
    cfg = load_config(None, [f"data.train_path={train}", "online.rounds=3",
                             "ranking.kind=verifiable"])
    portions = []
    for t in (1, 2, 3):
        out = tmp_path / f"portion{t}.jsonl"
        assert write_portion(cfg, t, out) == 3  # 10 // 3; the remainder row is unused
        portions.append([json.loads(line) for line in out.read_text().splitlines()])
    assert [[r["prompt"] for r in p] for p in portions] == [
        ["q0", "q1", "q2"], ["q3", "q4", "q5"], ["q6", "q7", "q8"]]
    assert portions[1][1]["prompt_id"] == "given-id"
    assert portions[0][0]["prompt_id"] == "row-2" and portions[0][0]["answer"] == "0"
    assert [r["answer"] for p in portions for r in p] == [str(i) for i in range(9)]
    assert portions[0][0]["chosen"][-1] == {"role": "assistant", "content": "a0"}

    capped = load_config(None, [f"data.train_path={train}", "online.rounds=3",
                                "online.max_prompts_per_round=2"])
    assert write_portion(capped, 2, tmp_path / "capped.jsonl") == 2


def test_write_portion_refuses_repeated_prompt_ids(tmp_path, write_jsonl, preference_row):
    rows = [preference_row(f"q{i}", f"a{i}", f"b{i}", prompt_id="same") for i in range(4)]
    cfg = load_config(None, [f"data.train_path={write_jsonl(tmp_path / 'train.jsonl', rows)}",
                             "online.rounds=2"])
    with pytest.raises(ValueError, match="prompt_id 'same' repeats row 1"):
        write_portion(cfg, 1, tmp_path / "p.jsonl")


def test_pairrm_needs_anchored_heldout_rows_at_start(tmp_path, write_jsonl):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt_id": "e0", "prompt": "q"}])
    cfg = load_config(None, [f"data.eval_prompts_path={evals}", "ranking.kind=pairrm"])
    with pytest.raises(OnlineError, match="held-out prompt 'e0'.*no 'chosen'"):
        RoundPhases(cfg, RunPaths(tmp_path))
    cfg = load_config(None, [f"data.eval_prompts_path={evals}", "ranking.kind=verifiable"])
    assert RoundPhases(cfg, RunPaths(tmp_path)).eval_rows[0]["prompt_id"] == "e0"


def test_phase_plan(tmp_path, write_jsonl):
    evals = write_jsonl(tmp_path / "eval.jsonl",
                        [{"prompt_id": "e0", "prompt": "q", "answer": "1"}])
    cfg = load_config(None, [f"data.eval_prompts_path={evals}", "ranking.kind=verifiable",
                             "online.rounds=2", f"model.hf_dir={tmp_path}"])
    manifest = Manifest(tmp_path / "manifest.json", cfg.to_dict())
    names = [p.name for p in RoundPhases(cfg, RunPaths(tmp_path)).build(manifest)]
    assert names == ["round1/portion", "round1/generate", "round1/rank", "round1/refpass",
                     "round1/train", "round1/report", "round2/portion", "round2/export",
                     "round2/generate", "round2/rank", "round2/refpass", "round2/train",
                     "round2/report", "final/export", "final/generate", "final/rank",
                     "final/report"]
    cfg.train.reference_mode = "onthefly"
    cfg.online.final_eval = False
    names = [p.name for p in RoundPhases(cfg, RunPaths(tmp_path)).build(manifest)]
    assert "round1/refpass" not in names and not any(n.startswith("final/") for n in names)


def test_generation_inputs_carry_the_conversation_to_continue(preference_row):
    row = preference_row("q0", "a0", "b0", prompt_id="p0")
    row["chosen"] = [{"role": "system", "content": "Be brief."}] + row["chosen"]
    assert generation_input(row, "eval::p0") == {"prompt_id": "eval::p0",
                                                  "messages": row["chosen"][:-1]}
    assert generation_input({"prompt": "Hi"}, "x")["messages"] == [{"role": "user",
                                                                    "content": "Hi"}]
    with pytest.raises(ValueError, match="prompt_id 'p9'"):
        generation_input({"prompt_id": "p9"}, "p9")


def test_megatron_command_plain_torchrun_and_multinode():
    cfg = SelmConfig()
    plain = megatron_command(cfg, "train", "c.yaml")
    assert plain == selm_command("train", "c.yaml")
    assert plain == [sys.executable, "-P", "-m", "selm_mcore.cli", "train", "c.yaml"]
    cfg.online.nproc_per_node = 8
    single = megatron_command(cfg, "refpass", "c.yaml")
    assert single[:5] == [sys.executable, "-P", "-m", "torch.distributed.run",
                          "--nproc-per-node=8"]
    assert "--standalone" in single
    assert single[-4:] == ["-m", "selm_mcore.cli", "refpass", "c.yaml"]
    cfg.online.nnodes = 4
    cfg.online.rdzv_endpoint = "node0:29500"
    cfg.online.launcher = "srun --nodes=4 --ntasks-per-node=1"
    multi = megatron_command(cfg, "train", "c.yaml")
    assert multi[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", sys.executable]
    assert "--nnodes=4" in multi and "--rdzv-endpoint=node0:29500" in multi
    assert "--standalone" not in multi


def test_phases_run_with_a_safe_path():
    """torchrun's and srun's Python children inherit PYTHONSAFEPATH=1 (python -P)."""
    from selm_mcore.online import phase_env

    assert phase_env()["PYTHONSAFEPATH"] == "1"
