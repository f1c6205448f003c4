"""Example configs load and validate; run-level checks refuse bad layouts before any phase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selm_mcore.config import ConfigError, load_config
from selm_mcore.online import (RoundPhases, RunPaths, validate_run, write_portion)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize("name", ["cpu_demo.yaml", "selm_llama3_8b.yaml", "selm_llama3_70b.yaml"])
def test_example_configs_load(name):
    cfg = load_config(EXAMPLES / name)
    world = cfg.online.nproc_per_node * cfg.online.nnodes
    assert world % (cfg.parallel.tp * cfg.parallel.pp) == 0
    dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    assert cfg.train.global_batch_size % (dp * cfg.train.micro_batch_size) == 0


def test_reference_recipe_in_the_llama3_8b_config():
    cfg = load_config(EXAMPLES / "selm_llama3_8b.yaml")
    assert (cfg.loss.alpha, cfg.loss.beta) == (1e-4, 0.01)
    assert cfg.optim.lr_per_round == [5e-7, 3e-7, 1e-7] and cfg.online.rounds == 3
    assert cfg.train.global_batch_size == 128 and cfg.optim.warmup_ratio == 0.1
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1024, 512)
    assert (cfg.generation.temperature, cfg.generation.n, cfg.generation.max_tokens) == (0.0, 1, 1024)
    assert cfg.ranking.kind == "pairrm" and cfg.model.dtype == "bf16"


def _write(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pref(i, answer=None):
    user = {"role": "user", "content": f"q{i}"}
    row = {"prompt": f"q{i}", "chosen": [user, {"role": "assistant", "content": f"a{i}"}],
           "rejected": [user, {"role": "assistant", "content": f"b{i}"}]}
    if answer is not None:
        row["answer"] = answer
    return row


def test_validate_run_refuses_bad_layouts(tmp_path):
    train = _write(tmp_path, [_pref(0)])
    base = [f"model.hf_dir={tmp_path}", f"data.train_path={train}"]
    validate_run(load_config(None, base + ["train.global_batch_size=8"]))
    with pytest.raises(ConfigError, match="multiple of parallel.tp \\* parallel.pp = 4"):
        validate_run(load_config(None, base + ["online.nproc_per_node=6", "parallel.tp=4"]))
    with pytest.raises(ConfigError, match="data-parallel size 4"):
        validate_run(load_config(None, base + ["online.nproc_per_node=8", "parallel.tp=2",
                                               "train.global_batch_size=6"]))
    with pytest.raises(ConfigError, match="model.hf_dir"):
        validate_run(load_config(None, [f"data.train_path={train}"]))


def test_write_portion_takes_contiguous_thirds_and_keeps_answers(tmp_path):
    rows = [_pref(i, answer=str(i)) for i in range(10)]
    rows[4]["prompt_id"] = "given-id"
    train = _write(tmp_path, rows)
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


def test_write_portion_refuses_repeated_prompt_ids(tmp_path):
    rows = [dict(_pref(i), prompt_id="same") for i in range(4)]
    cfg = load_config(None, [f"data.train_path={_write(tmp_path, rows)}", "online.rounds=2"])
    with pytest.raises(ValueError, match="prompt_id 'same' repeats row 1"):
        write_portion(cfg, 1, tmp_path / "p.jsonl")


def test_pairrm_needs_anchored_heldout_rows_at_start(tmp_path):
    from selm_mcore.online import OnlineError

    evals = _write(tmp_path, [{"prompt_id": "e0", "prompt": "q"}], "eval.jsonl")
    cfg = load_config(None, [f"data.eval_prompts_path={evals}", "ranking.kind=pairrm"])
    with pytest.raises(OnlineError, match="held-out prompt 'e0'.*no 'chosen'"):
        RoundPhases(cfg, RunPaths(tmp_path))
    cfg = load_config(None, [f"data.eval_prompts_path={evals}", "ranking.kind=verifiable"])
    assert RoundPhases(cfg, RunPaths(tmp_path)).eval_rows[0]["prompt_id"] == "e0"


def test_phase_plan(tmp_path):
    evals = _write(tmp_path, [{"prompt_id": "e0", "prompt": "q", "answer": "1"}], "eval.jsonl")
    cfg = load_config(None, [f"data.eval_prompts_path={evals}", "ranking.kind=verifiable",
                             "online.rounds=2", f"model.hf_dir={tmp_path}"])
    from selm_mcore.online import Manifest

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


def _pair(chosen, rejected, y_ref):
    user = {"role": "user", "content": "q"}
    return {"chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}],
            "reference_response": y_ref}


def test_pairs_with_an_empty_response_leave_training():
    from selm_mcore.online import drop_empty_responses

    pairs = [_pair("a", "b", "c"), _pair("a", "", "x"), _pair("a", "b", "  \n")]
    stats = [{}, {}, {}]
    assert drop_empty_responses(pairs, stats) == [pairs[0]]
    assert [s["dropped_empty"] for s in stats] == [False, True, True]


def test_heldout_scores_with_the_verifiable_ranker():
    from selm_mcore.online import EVAL_ID_PREFIX, score_eval_responses
    from selm_mcore.ranking import VerifiableAnswerRanker

    rows = [{"prompt_id": "a", "prompt": "What is 2 + 2?", "answer": "4"},
            {"prompt_id": "b", "prompt": "What is 3 + 3?", "answer": "6"}]
    generations = {EVAL_ID_PREFIX + "a": ["2 + 2 = 4"], EVAL_ID_PREFIX + "b": ["It is 7."],
                   "a": ["not a held-out response"]}
    scored = score_eval_responses(VerifiableAnswerRanker(), rows, generations, "answer")
    assert [r["prompt_id"] for r in scored] == ["a", "b"]
    assert scored[0]["response"] == "2 + 2 = 4" and scored[0]["score"] > 1.0  # correct
    assert scored[1]["score"] == 0.0                                         # wrong
