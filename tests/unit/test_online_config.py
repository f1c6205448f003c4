"""selm_mcore.loop.online and selm_mcore.loop.rounds without running phases: example configs
load and validate, run-level checks refuse bad layouts before any phase, round portions, the
phase plan and the phase commands."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from selm_mcore.config.io import load_config
from selm_mcore.config.schema import ConfigError, SelmConfig
from selm_mcore.data.portions import write_portion
from selm_mcore.loop.online import check_run_inputs, first_readers
from selm_mcore.loop.rounds import RoundPhases, RunPaths, generation_input, megatron_command
from selm_mcore.loop.runner import Manifest, OnlineError, selm_command
from selm_mcore.runtime.files import DataError

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
    assert (cfg.generation.temperature, cfg.generation.n, cfg.generation.max_tokens) == (
        0.0,
        1,
        1024,
    )
    assert cfg.ranking.kind == "pairrm" and cfg.model.dtype == "bf16"


def test_online_config_validation():
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        load_config(None, ["online.nnodes=2"])
    with pytest.raises(ConfigError, match="online.rounds"):
        load_config(None, ["online.rounds=0"])


def write_model_config(folder: Path) -> Path:
    """A config.json alone (what `selm run` reads of the start model before any phase)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(
        model_type="llama",
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_check_run_inputs_refuses_bad_layouts_and_missing_inputs(
    tmp_path, write_jsonl, preference_row
):
    train = write_jsonl(tmp_path / "train.jsonl", [preference_row("q0", "a0", "b0")])
    write_model_config(tmp_path)
    base = [f"model.hf_dir={tmp_path}", f"data.train_path={train}"]
    check_run_inputs(load_config(None, base + ["train.global_batch_size=8"]))
    with pytest.raises(ConfigError, match="multiple of parallel.tp \\* parallel.pp = 4"):
        check_run_inputs(load_config(None, base + ["online.nproc_per_node=6", "parallel.tp=4"]))
    with pytest.raises(ConfigError, match="data-parallel size 4"):
        check_run_inputs(
            load_config(
                None,
                base + ["online.nproc_per_node=8", "parallel.tp=2", "train.global_batch_size=6"],
            )
        )
    with pytest.raises(ConfigError, match="model.hf_dir"):
        check_run_inputs(load_config(None, [f"data.train_path={train}"]))
    with pytest.raises(ConfigError, match="data.train_path=.*missing.jsonl.* is not a file"):
        check_run_inputs(
            load_config(
                None, [f"model.hf_dir={tmp_path}", f"data.train_path={tmp_path / 'missing.jsonl'}"]
            )
        )


def test_write_portion_takes_contiguous_thirds_and_keeps_answers(
    tmp_path, write_jsonl, preference_row
):
    rows = [preference_row(f"q{i}", f"a{i}", f"b{i}", answer=str(i)) for i in range(10)]
    rows[4]["prompt_id"] = "given-id"
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    train.write_text("\n" + train.read_text().replace("\n", "\n\n", 2))  # blank lines
    cfg = load_config(
        None, [f"data.train_path={train}", "online.rounds=3", "ranking.kind=verifiable"]
    )
    portions = []
    for t in (1, 2, 3):
        out = tmp_path / f"portion{t}.jsonl"
        assert write_portion(cfg, t, out) == 3  # 10 // 3; the remainder row is unused
        portions.append([json.loads(line) for line in out.read_text().splitlines()])
    assert [[r["prompt"] for r in p] for p in portions] == [
        ["q0", "q1", "q2"],
        ["q3", "q4", "q5"],
        ["q6", "q7", "q8"],
    ]
    assert portions[1][1]["prompt_id"] == "given-id"
    assert portions[0][0]["prompt_id"] == "row-2" and portions[0][0]["answer"] == "0"
    assert [r["answer"] for p in portions for r in p] == [str(i) for i in range(9)]
    assert portions[0][0]["chosen"][-1] == {"role": "assistant", "content": "a0"}

    capped = load_config(
        None, [f"data.train_path={train}", "online.rounds=3", "online.max_prompts_per_round=2"]
    )
    assert write_portion(capped, 2, tmp_path / "capped.jsonl") == 2


def test_write_portion_refuses_repeated_prompt_ids(tmp_path, write_jsonl, preference_row):
    rows = [preference_row(f"q{i}", f"a{i}", f"b{i}", prompt_id="same") for i in range(4)]
    cfg = load_config(
        None, [f"data.train_path={write_jsonl(tmp_path / 'train.jsonl', rows)}", "online.rounds=2"]
    )
    with pytest.raises(ValueError, match="prompt_id 'same' repeats row 1"):
        write_portion(cfg, 1, tmp_path / "p.jsonl")


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_portion_keeps_the_original_boundaries_and_counts_skipped(
    tmp_path, write_jsonl, preference_row, caplog
):
    rows = [preference_row(f"q{i}", f"a{i}", f"b{i}") for i in range(12)]
    rows[0]["chosen"][-1]["content"] = ""  # rows 1 and 2 of the file fail validation
    del rows[1]["rejected"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(
        None, [f"data.train_path={train}", "online.rounds=3", "data.skip_bad_rows=true"]
    )
    portions = []
    with caplog.at_level(logging.INFO, logger="selm_mcore.data.portions"):
        for t in (1, 2, 3):
            write_portion(cfg, t, tmp_path / f"p{t}.jsonl")
            portions.append([r["prompt"] for r in _read_jsonl(tmp_path / f"p{t}.jsonl")])
    # thirds of the 12 original rows; not thirds of the 10 valid ones
    assert portions == [["q2", "q3"], ["q4", "q5", "q6", "q7"], ["q8", "q9", "q10", "q11"]]
    assert (
        "portion 1 of 3" in caplog.text
        and "file rows 1..4 (4 rows), 2 valid, 2 skipped" in caplog.text
        and "file rows 5..8 (4 rows), 4 valid, 0 skipped" in caplog.text
    )
    assert f"skipped {train} row 1: chosen has an empty final assistant response" in caplog.text

    strict = load_config(None, [f"data.train_path={train}", "online.rounds=3"])
    with pytest.raises(DataError, match="row 1: chosen has an empty.*data.skip_bad_rows=true"):
        write_portion(strict, 2, tmp_path / "p.jsonl")


def test_portion_with_no_valid_row_stops_naming_it(tmp_path, write_jsonl, preference_row):
    rows = [preference_row(f"q{i}", f"a{i}", f"b{i}") for i in range(6)]
    for row in rows[3:]:
        row["rejected"][-1]["content"] = " "
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(
        None, [f"data.train_path={train}", "online.rounds=2", "data.skip_bad_rows=true"]
    )
    assert write_portion(cfg, 1, tmp_path / "p1.jsonl") == 3
    with pytest.raises(
        ValueError, match="every one of the 3 rows of portion 2 \\(file rows 4..6\\)"
    ):
        write_portion(cfg, 2, tmp_path / "p2.jsonl")


def test_docs_state_the_round_order_the_code_runs(tmp_path):
    cfg = load_config(None, ["online.rounds=2", f"model.hf_dir={tmp_path}"])
    names = [
        p.name
        for p in RoundPhases(cfg, RunPaths(tmp_path)).build(
            Manifest(tmp_path / "manifest.json", cfg.to_dict())
        )
    ]
    assert [n.split("/")[1] for n in names if n.startswith("round2/")] == [
        "portion",
        "generate",
        "rank",
        "refpass",
        "train",
        "export",
        "report",
    ]
    root = EXAMPLES.parents[1]
    # consecutive arrows: generate (...) -> rank (...) -> reference pass -> train -> export
    chain = re.compile(r"generate[^>]{0,40}-> rank[^>]{0,40}-> reference pass -> train -> export")
    for doc in (
        root / "README.md",
        root / "docs" / "architecture.md",
        root / "selm_mcore" / "loop" / "online.py",
        root / "examples" / "selm_cpu_demo.sh",
    ):
        text = re.sub(r"\n#? *", " ", doc.read_text())  # one line, without comment marks
        assert chain.search(text), doc


def test_warmup_round_reads_the_first_portion_of_original_pairs(
    tmp_path, write_jsonl, preference_row
):
    rows = [
        preference_row(f"q{i}", f"a{i}", f"b{i}", reference_response=f"r{i}") for i in range(10)
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(
        None, [f"data.train_path={train}", "online.rounds=2", "online.warmup_dpo_round=true"]
    )
    portions = {}
    for t in (0, 1, 2):
        assert write_portion(cfg, t, tmp_path / f"p{t}.jsonl") == 3  # 10 // (2 + 1)
        portions[t] = _read_jsonl(tmp_path / f"p{t}.jsonl")
    assert {t: [r["prompt"] for r in p] for t, p in portions.items()} == {
        0: ["q0", "q1", "q2"],
        1: ["q3", "q4", "q5"],
        2: ["q6", "q7", "q8"],
    }
    assert all("reference_response" not in r for r in portions[0])  # plain DPO pairs
    assert portions[0][0]["chosen"] == rows[0]["chosen"]
    assert [r["reference_response"] for r in portions[1]] == ["r3", "r4", "r5"]

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(6)])
    cfg = load_config(
        None, [f"data.train_path={prompts}", "online.rounds=2", "online.warmup_dpo_round=true"]
    )
    with pytest.raises(ValueError, match="warmup_dpo_round=true.*prompt-only rows"):
        write_portion(cfg, 0, tmp_path / "p.jsonl")
    assert write_portion(cfg, 1, tmp_path / "p.jsonl") == 2


def test_phase_plan_with_the_dpo_warmup_round(tmp_path, write_jsonl):
    evals = write_jsonl(
        tmp_path / "eval.jsonl", [{"prompt_id": "e0", "prompt": "q", "answer": "1"}]
    )
    cfg = load_config(
        None,
        [
            f"data.eval_prompts_path={evals}",
            "ranking.kind=verifiable",
            "online.rounds=2",
            f"model.hf_dir={tmp_path}",
            "online.warmup_dpo_round=true",
            "online.final_eval=false",
        ],
    )
    paths = RunPaths(tmp_path / "run")
    plan = RoundPhases(cfg, paths)
    names = [p.name for p in plan.build(Manifest(tmp_path / "manifest.json", cfg.to_dict()))]
    assert names == [
        "round0/portion",
        "round0/generate",
        "round0/rank",
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
        "round2/portion",
        "round2/generate",
        "round2/rank",
        "round2/refpass",
        "round2/train",
        "round2/export",
        "round2/report",
        "final/export",
    ]
    # round 0: plain DPO on its portion, from the start model, lr_per_round[0]
    assert plan.train_data(0) == paths.round_dir(0) / "portion.jsonl"
    assert plan.round_overrides(0) == {"train__round_index": 1, "loss__alpha": 0}
    assert plan.policy_start(0) == plan.policy_hf(0) == tmp_path
    # round 1: the ranked pairs, from round 0's policy, lr_per_round[1]
    assert plan.train_data(1) == paths.round_dir(1) / "rank" / "pairs.jsonl"
    assert plan.round_overrides(1) == {"train__round_index": 2}
    assert plan.policy_start(1) == paths.round_dir(0) / "train" / "final"
    assert plan.policy_hf(1) == paths.round_dir(0) / "policy_hf"  # the policy after round 0
    assert first_readers(cfg)["model.hf_dir"] == "round0/generate"

    cfg.data.eval_prompts_path = ""
    names = [
        p.name for p in RoundPhases(cfg, paths).build(Manifest(tmp_path / "m2.json", cfg.to_dict()))
    ]
    assert names[:5] == [
        "round0/portion",
        "round0/refpass",
        "round0/train",
        "round0/export",
        "round0/report",
    ]
    assert first_readers(cfg) == {
        "data.train_path": "round0/portion",
        "model.hf_dir": "round0/refpass",
        "data.eval_prompts_path": "round0/generate",
        "ranking": "round1/rank",
    }


def test_pairrm_needs_anchored_heldout_rows_at_start(tmp_path, write_jsonl):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt_id": "e0", "prompt": "q"}])
    cfg = load_config(None, [f"data.eval_prompts_path={evals}", "ranking.kind=pairrm"])
    with pytest.raises(OnlineError, match="held-out prompt 'e0'.*no 'chosen'"):
        RoundPhases(cfg, RunPaths(tmp_path))
    cfg = load_config(None, [f"data.eval_prompts_path={evals}", "ranking.kind=verifiable"])
    assert RoundPhases(cfg, RunPaths(tmp_path)).eval_rows[0]["prompt_id"] == "e0"


def test_phase_plan(tmp_path, write_jsonl):
    evals = write_jsonl(
        tmp_path / "eval.jsonl", [{"prompt_id": "e0", "prompt": "q", "answer": "1"}]
    )
    cfg = load_config(
        None,
        [
            f"data.eval_prompts_path={evals}",
            "ranking.kind=verifiable",
            "online.rounds=2",
            f"model.hf_dir={tmp_path}",
        ],
    )
    manifest = Manifest(tmp_path / "manifest.json", cfg.to_dict())
    names = [p.name for p in RoundPhases(cfg, RunPaths(tmp_path)).build(manifest)]
    assert names == [
        "round1/portion",
        "round1/generate",
        "round1/rank",
        "round1/refpass",
        "round1/train",
        "round1/export",
        "round1/report",
        "round2/portion",
        "round2/generate",
        "round2/rank",
        "round2/refpass",
        "round2/train",
        "round2/export",
        "round2/report",
        "final/export",
        "final/generate",
        "final/rank",
        "final/report",
    ]
    cfg.train.reference_mode = "onthefly"
    cfg.online.final_eval = False
    names = [p.name for p in RoundPhases(cfg, RunPaths(tmp_path)).build(manifest)]
    assert "round1/refpass" not in names
    # without the final evaluation the run still ends with the last policy at final/policy_hf
    assert [n for n in names if n.startswith("final/")] == ["final/export"]


def test_generation_inputs_carry_the_conversation_to_continue(preference_row):
    row = preference_row("q0", "a0", "b0", prompt_id="p0")
    row["chosen"] = [{"role": "system", "content": "Be brief."}] + row["chosen"]
    assert generation_input(row, "eval::p0") == {
        "prompt_id": "eval::p0",
        "messages": row["chosen"][:-1],
    }
    assert generation_input({"prompt": "Hi"}, "x")["messages"] == [
        {"role": "user", "content": "Hi"}
    ]
    with pytest.raises(ValueError, match="prompt_id 'p9'"):
        generation_input({"prompt_id": "p9"}, "p9")


def test_megatron_command_plain_torchrun_and_multinode():
    cfg = SelmConfig()
    plain = megatron_command(cfg, "train", "c.yaml")
    assert plain == selm_command("train", "c.yaml")
    assert plain == [sys.executable, "-P", "-m", "selm_mcore.cli", "train", "c.yaml"]
    cfg.online.nproc_per_node = 8
    single = megatron_command(cfg, "refpass", "c.yaml")
    assert single[:5] == [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc-per-node=8"]
    assert "--standalone" in single
    assert single[-4:] == ["-m", "selm_mcore.cli", "refpass", "c.yaml"]
    cfg.online.nnodes = 4
    cfg.online.rdzv_endpoint = "node0:29500"
    cfg.online.launcher = "srun --nodes=4 --ntasks-per-node=1"
    multi = megatron_command(cfg, "train", "c.yaml")
    assert multi[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", sys.executable]
    assert "--nnodes=4" in multi and "--rdzv-endpoint=node0:29500" in multi
    assert "--standalone" not in multi


def test_run_with_its_manifest_deleted_refuses_before_any_phase(
    tmp_path, write_jsonl, preference_row
):
    """A finished round-1 portion and trained model are left exactly as they were."""
    from selm_mcore.loop.online import run_online
    from selm_mcore.runtime.files import hash_path

    model = write_model_config(tmp_path / "model")
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [preference_row(f"q{i}", "a", "b", prompt_id=f"p{i}") for i in range(4)],
    )
    workdir = tmp_path / "run"
    finished = {
        workdir / "round_1" / "portion.jsonl": "rows\n",
        workdir / "round_1" / "train" / "final" / "weights.bin": "trained",
    }
    for path, text in finished.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    before = hash_path(workdir / "round_1")
    cfg = load_config(
        None,
        [
            f"model.hf_dir={model}",
            f"data.train_path={train}",
            "ranking.kind=verifiable",
            "online.rounds=1",
            "train.global_batch_size=2",
            f"online.workdir={workdir}",
        ],
    )
    with pytest.raises(OnlineError) as info:
        run_online(cfg)
    message = str(info.value)
    assert f"{workdir} holds finished outputs" in message
    assert "round_1/portion.jsonl (round1/portion)" in message
    assert "round_1/train (round1/train)" in message
    assert "--redo round1/portion" in message and "--fresh" in message
    assert hash_path(workdir / "round_1") == before


def test_redo_and_fresh_exclude_each_other(capsys):
    from selm_mcore import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["run", "c.yaml", "--redo", "round1/rank", "--fresh"])
    assert info.value.code == 2
    assert "not allowed with argument --redo" in capsys.readouterr().err


def test_phases_run_with_a_safe_path(tmp_path, monkeypatch):
    """torchrun's and srun's Python children inherit PYTHONSAFEPATH=1 (python -P): every phase
    process is started by runner.run_command."""
    from selm_mcore.loop.runner import run_command

    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    log = tmp_path / "phase.log"
    run_command(
        [sys.executable, "-c", "import os; print('safe', os.environ['PYTHONSAFEPATH'])"],
        log,
        timeout_s=60,
    )
    assert "safe 1" in log.read_text()


BAD_MANIFESTS = {
    "a_list": (b"[]", "the manifest must be a JSON object, got a list"),
    "config_a_string": (
        b'{"format": "selm-online/1", "config": "tiny", "phases": {}}',
        "config must be an object, got a string",
    ),
    "phases_a_list": (
        b'{"format": "selm-online/1", "config": {}, "phases": ["round1/portion"]}',
        "phases must be an object of phase records, got a list",
    ),
    "sha256_a_number": (
        b'{"format": "selm-online/1", "config": {}, "phases": {"round1/portion": '
        b'{"output": "round_1/portion.jsonl", "sha256": 12, "seconds": 1.0}}}',
        "phases.round1/portion.sha256=12 must be a string",
    ),
    "invalid_utf8": (
        b'{"format": "selm-online/1", "config": {"x": "\xff\xfe"}, "phases": {}}',
        "is not valid JSON ('utf-8' codec can't decode byte 0xff",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_manifest_of_the_wrong_shape_is_one_line(
    case, tmp_path, tiny_llama_dir, write_jsonl, write_config, preference_row, capsys
):
    """`selm run` on a workdir whose manifest.json was edited into another shape: one line
    naming the file and what is wrong (before: AttributeError / TypeError tracebacks)."""
    from selm_mcore import cli

    workdir = tmp_path / "run"
    workdir.mkdir()
    content, expected = BAD_MANIFESTS[case]
    (workdir / "manifest.json").write_bytes(content)
    rows = write_jsonl(tmp_path / "rows.jsonl", [preference_row("Q?", "A.", "B.", answer="1")] * 4)
    config = write_config(
        tmp_path / "run.yaml",
        model={"hf_dir": str(tiny_llama_dir)},
        data={"train_path": str(rows)},
        ranking={"kind": "verifiable"},
        train={"global_batch_size": 2},
        generation={"max_model_len": 512, "max_tokens": 16},
        online={"rounds": 1, "workdir": str(workdir)},
    )
    assert cli.main(["run", str(config), "--list-phases"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"selm run: error: {workdir / 'manifest.json'}"), err
    assert expected in err[0] and "edited by hand" in err[0], err[0]
    assert len(err) == 2 and err[1].startswith("selm run stopped")  # the run's hint
