"""A SELM run as a paper reproduction runs it (tests/e2e/conftest.py's ``paper_run``: the data
by name from a hub cache, AlpacaEval and MT-Bench answers of every policy judged offline by a tiny
PairRM, W&B offline, stage 1 one round at 1 process, stage 2 resumed to 2 rounds at DP=2).

Each check compares with something computed independently: the official packages' readers
(alpaca_eval's, FastChat's), the rows written into the hub cache, HF transformers' greedy
continuation of the conversation MT-Bench's second turn asks, token counts of the tiny PairRM's
tokenizer, the metrics files the trainer writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from official_readers import alpaca_eval_utils, fastchat_common, fastchat_root
from selm_run_data import ALPACA, HELD_OUT, TRAIN

from selm_mcore.runtime.files import read_records

pytestmark = pytest.mark.slow


@pytest.fixture
def run(paper_run):
    return paper_run


def test_resume_adds_a_round_at_two_processes_and_keeps_round_one(run):
    workdir = run.workdir
    phases = json.loads((workdir / "manifest.json").read_text())["phases"]
    for name, record in run.stage1.items():
        if not name.startswith("final/"):
            assert phases[name] == record, name  # round 1 untouched: same output hashes
    assert "final/export" in run.stage1 and "round2/train" in phases
    assert list(phases)[-4:] == ["final/export", "final/generate", "final/rank", "final/report"]
    assert (workdir / "final" / "policy_hf").resolve() == workdir / "round_2" / "policy_hf"
    train_log = (workdir / "logs" / "round2_train.log").read_text()
    assert "--nproc-per-node=2" in train_log
    assert "over dp 2" in train_log
    assert "over dp 1" in (workdir / "logs" / "round1_train.log").read_text()
    generate_log = (workdir / "logs" / "round2_generate.log").read_text()
    assert f"--model-dir {workdir / 'round_1' / 'policy_hf'}" in generate_log
    # portions: round 1 = rows 1-4 (of 8, capped at 4), round 2 = rows 5-8 of the hub split
    for t, rows in ((1, TRAIN[:4]), (2, TRAIN[4:])):
        portion = read_records(workdir / f"round_{t}" / "portion.jsonl")
        assert [(r["prompt_id"], r["chosen"], r["rejected"]) for r in portion] == [
            (r["prompt_id"], r["chosen"], r["rejected"]) for r in rows
        ]
    held_out = read_records(workdir / "round_1" / "generate" / "eval_rows.jsonl")
    assert [r["prompt_id"] for r in held_out] == [r["prompt_id"] for r in HELD_OUT]


def _eval_dirs(workdir: Path) -> dict[str, Path]:
    return {
        "start": workdir / "start" / "eval",
        "round 1": workdir / "round_1" / "eval",
        "round 2": workdir / "round_2" / "eval",
    }


def test_answer_files_load_with_the_official_readers(run):
    utils = alpaca_eval_utils()
    common = fastchat_common()
    for label, folder in _eval_dirs(run.workdir).items():
        summary = json.loads((folder / "summary.json").read_text())
        frame = utils.load_or_convert_to_dataframe(folder / "alpaca_eval" / "model_outputs.json")
        assert frame["instruction"].tolist() == [r["instruction"] for r in ALPACA]
        assert utils.get_generator_name(None, frame) == summary["model_name"]
        assert frame["dataset"].tolist() == [r["dataset"] for r in ALPACA]
        reference = utils.load_or_convert_to_dataframe(
            folder / "alpaca_eval" / "reference_outputs.json"
        )
        assert reference["output"].tolist() == [r["output"] for r in ALPACA]
        answers = common.load_model_answers(str(folder / "mt_bench" / "model_answer"))
        assert list(answers) == [summary["model_name"]], label
        questions = common.load_questions(str(folder / "mt_bench" / "question.jsonl"), None, None)
        assert [q["question_id"] for q in questions] == [q["question_id"] for q in run.questions]
        common.check_data(questions, answers, {}, [summary["model_name"]], {})
        for question in run.questions:
            turns = answers[summary["model_name"]][question["question_id"]]["choices"][0]["turns"]
            assert len(turns) == 2
    names = [json.loads((d / "summary.json").read_text())["model_name"]
             for d in _eval_dirs(run.workdir).values()]  # fmt: skip
    assert names == ["tinyrun-start", "tinyrun-round1", "tinyrun-round2"]


def test_mt_bench_second_turn_continues_the_models_own_first_answer(run):
    """Greedy categories: both turns equal HF transformers' greedy continuation of the
    conversation, the second one after the model's own first answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = run.workdir / "round_2" / "eval"
    policy = run.workdir / "round_2" / "policy_hf"
    model = AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    answers = {
        json.loads(x)["question_id"]: json.loads(x)["choices"][0]["turns"]
        for x in next((folder / "mt_bench" / "model_answer").glob("*.jsonl"))
        .read_text()
        .split("\n")
        if x
    }
    plans = {r["item_id"]: r for r in read_records(folder / "mt_bench" / "generation.jsonl")}
    checked = 0
    for question in run.questions:
        plan = plans[str(question["question_id"])]
        expected_temperature = 0.7 if question["category"] == "writing" else 0.0
        assert plan["temperature"] == expected_temperature
        if expected_temperature:
            continue
        turns = answers[question["question_id"]]
        messages = []
        for k, user in enumerate(question["turns"]):
            messages.append({"role": "user", "content": user})
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=16)  # fmt: skip
            greedy = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
            assert turns[k] == greedy, (question["question_id"], k)
            messages.append({"role": "assistant", "content": turns[k]})  # its own answer
            checked += 1
    assert checked == 4


def test_offline_judge_follows_the_rankers_length_rule(run):
    """The tiny PairRM prefers the candidate with more tokens (candidates cut at its
    candidate_maxlength): recompute each outcome from token counts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run.root / "tiny_pairrm" / "backbone"))
    limit = json.loads((run.root / "tiny_pairrm" / "config.json").read_text())[
        "candidate_maxlength"
    ]

    def length(text: str) -> int:
        return min(len(tokenizer.encode(text, add_special_tokens=False)), limit)

    outcomes = set()
    for folder in _eval_dirs(run.workdir).values():
        summary = json.loads((folder / "summary.json").read_text())
        for name in ("alpaca_eval", "mt_bench"):
            rows = read_records(folder / name / "judgment.jsonl")
            if name == "alpaca_eval":
                outputs = json.loads((folder / name / "model_outputs.json").read_text())
                pairs = [(o["output"], r["output"]) for o, r in zip(outputs, ALPACA)]
            else:
                answer_file = next((folder / "mt_bench" / "model_answer").glob("*.jsonl"))
                answers = {str(json.loads(x)["question_id"]): json.loads(x)["choices"][0]["turns"]
                           for x in answer_file.read_text().splitlines()}  # fmt: skip
                refs = fastchat_root() / "fastchat/llm_judge/data/mt_bench/reference_answer"
                gpt4 = {str(json.loads(x)["question_id"]): json.loads(x)["choices"][0]["turns"]
                        for x in (refs / "gpt-4.jsonl").read_text().splitlines()}  # fmt: skip
                pairs = [(answers[q][t], gpt4[q][t]) for q in answers if q in gpt4 for t in (0, 1)]
            expected = [
                "win" if length(a) > length(b) else "tie" if length(a) == length(b) else "loss"
                for a, b in pairs
            ]
            assert [r["outcome"] for r in rows] == expected, (folder, name)
            outcomes.update(expected)
            wins = expected.count("win") + 0.5 * expected.count("tie")
            result = summary["benchmarks"][name]
            assert result["win_rate"] == pytest.approx(100 * wins / len(expected))
            answers_text = [a for a, _ in pairs] if name == "alpaca_eval" else None
            if answers_text is not None:
                assert result["mean_length"] == pytest.approx(
                    sum(map(len, answers_text)) / len(answers_text)
                )
    assert len(outcomes) >= 2, outcomes


def test_reports_cards_and_closing_table_show_the_benchmarks(run):
    workdir, stdout = run.workdir, run.second.stdout
    assert "Benchmarks per policy" in stdout
    lines = stdout.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("Benchmarks per policy"))) + 1
    table = lines[start : start + 5]  # (the eval phases' own one-row tables come earlier)
    assert table[0].startswith("| policy | AlpacaEval win % vs ref_writer (pairrm) |")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["start", "round 1", "round 2"]
    for label, folder in _eval_dirs(workdir).items():
        summary = json.loads((folder / "summary.json").read_text())
        rate = summary["benchmarks"]["alpaca_eval"]["win_rate"]
        row = next(x for x in table if x.startswith(f"| {label} |"))
        assert f"| {rate:.1f} (n=3) |" in row
    commands = [x for x in lines if x.startswith("official alpaca_eval judge of round 2")]
    assert str(workdir / "round_2" / "eval" / "alpaca_eval" / "model_outputs.json") in commands[0]
    assert ".partial" not in commands[0]
    for t in (1, 2):
        report = (workdir / f"round_{t}" / "report" / "report.md").read_text()
        assert "## Benchmarks" in report and f"| round {t} |" in report
        assert (workdir / f"round_{t}" / "report" / "eval.png").stat().st_size > 1000
        card = (workdir / f"round_{t}" / "policy_hf" / "README.md").read_text()
        assert f"the policy after round {t}" in card and f"| round {t} | " in card
        assert "hf://acme/uf_tiny:train_prefs" in card and "- acme/uf_tiny" in card
    # the cards were rewritten after the exports were recorded: the outputs still verify
    again = run.selm_run(run.run_config, *run.stage2_args, "--list-phases", timeout_s=600)
    assert again.returncode == 0 and "todo" not in again.stdout, again.stdout + again.stderr


def test_wandb_offline_runs_hold_the_step_metrics_summaries_and_images(run):
    from wandb_records import read_offline_run

    folders = sorted((run.workdir / "wandb" / "wandb").glob("offline-run-*"))
    runs = [(folder, read_offline_run(folder)) for folder in folders]
    train = {r["run"]["name"]: r for _, r in runs if r["run"]["job_type"] == "train"}
    assert sorted(train) == ["tinyrun-round1", "tinyrun-round2"]  # rank 0 only at DP=2
    for t in (1, 2):
        record = train[f"tinyrun-round{t}"]
        assert record["run"]["group"] == "tinyrun" and record["run"]["project"] == "selm-e2e"
        metrics = read_records(run.workdir / f"round_{t}" / "train" / "metrics.jsonl")
        assert [h["train/loss"] for h in record["history"]] == [m["loss"] for m in metrics]
        assert [h["rewards/chosen"] for h in record["history"]] == [
            m["rewards/chosen"] for m in metrics
        ]
        assert [h["_step"] for h in record["history"]] == [m["step"] for m in metrics]
    summary_runs = [(f, r) for f, r in runs if r["run"]["job_type"] == "selm-run"]
    assert len({r["run"]["id"] for _, r in summary_runs}) == 1  # one run, resumed each round
    points = {h["_step"]: h for _, r in summary_runs for h in r["history"]}
    assert sorted(points) == [0, 1, 2]
    for step, folder in enumerate(_eval_dirs(run.workdir).values()):
        summary = json.loads((folder / "summary.json").read_text())
        for name in ("alpaca_eval", "mt_bench"):
            assert points[step][f"eval/{name}/win_rate"] == pytest.approx(
                summary["benchmarks"][name]["win_rate"]
            )
    for t in (1, 2):
        report = json.loads((run.workdir / f"round_{t}" / "report" / "summary.json").read_text())
        assert points[t]["round/train_loss_last"] == pytest.approx(report["train"]["loss_last"])
        # an image is logged as a file reference (its path under the run folder's files/)
        images = [
            f / "files" / points[t][f"report/{n}/path"]
            for f, _ in summary_runs
            for n in ("scores", "rewards", "eval")
            if (f / "files" / points[t][f"report/{n}/path"]).is_file()
        ]
        assert len(images) == 3 and all(p.stat().st_size > 1000 for p in images)
