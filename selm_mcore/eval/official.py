"""The official judges of the benchmarks: the exact commands, run when they can run.

    jobs = official_jobs(out_dir, benchmarks, model_name)      # what to print / run
    results = run_official_jobs(jobs, mode="auto", out_dir=out_dir)

Both judge with GPT-4 through the OpenAI API (they cost money; `eval.official_judge: print`
only prints the commands):

* AlpacaEval 2 (package ``alpaca-eval``): ``alpaca_eval --model_outputs
  DIR/alpaca_eval/model_outputs.json --reference_outputs DIR/alpaca_eval/reference_outputs.json
  --annotators_config weighted_alpaca_eval_gpt4_turbo``; its leaderboard (win rate and the
  length-controlled win rate the paper reports) lands in
  ``DIR/alpaca_eval/weighted_alpaca_eval_gpt4_turbo/leaderboard.csv``.
* MT-Bench (package ``fschat[llm_judge]``): FastChat's judge reads answers from its own
  ``llm_judge/data/mt_bench/model_answer/``; the command copies the answer file there, then runs
  ``gen_judgment`` (single-answer grading by GPT-4) and ``show_result`` from that folder; the
  scores land in ``data/mt_bench/model_judgment/gpt-4_single.jsonl`` there.

"auto" runs a judge when its package is importable and OPENAI_API_KEY is set, and says which of
the two is missing otherwise. A judge that fails is reported (its log kept) without failing the
evaluation: the answers and the offline judgment stand on their own.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from selm_mcore.eval.answers import ALPACA_EVAL_OUTPUTS, ALPACA_EVAL_REFERENCE, mt_bench_answer_path
from selm_mcore.runtime.procs import ChildProcesses, CommandFailed

logger = logging.getLogger(__name__)

ALPACA_EVAL_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
API_KEY_ENV = "OPENAI_API_KEY"


@dataclass
class OfficialJob:
    benchmark: str
    commands: list[list[str]]  # run in order
    cwd: Path | None  # where the commands run (None: anywhere)
    package: str  # the import name that must be present
    install: str
    prepare: list[tuple[Path, Path]] = field(default_factory=list)  # files copied first

    def shell(self, moved: tuple[Path, Path] | None = None) -> str:
        """The commands as one shell line (what is printed); ``moved`` = (folder, where it
        will be) names the answer files at their final place."""
        steps = [f"cp {shlex.quote(str(a))} {shlex.quote(str(b))}" for a, b in self.prepare]
        steps += [shlex.join(cmd) for cmd in self.commands]
        cd = f"cd {shlex.quote(str(self.cwd))} && " if self.cwd else ""
        text = cd + " && ".join(steps)
        return text.replace(str(moved[0]), str(moved[1])) if moved else text


def _fastchat_judge_dir() -> Path | None:
    spec = importlib.util.find_spec("fastchat")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "llm_judge"
    return folder if (folder / "gen_judgment.py").is_file() else None


def official_jobs(out_dir: Path, benchmarks: list[str], model_name: str) -> list[OfficialJob]:
    """The official judge commands for the answer files written in ``out_dir``."""
    jobs = []
    out_dir = out_dir.absolute()
    if "alpaca_eval" in benchmarks:
        command = ["alpaca_eval", "--model_outputs", str(out_dir / ALPACA_EVAL_OUTPUTS)]
        if (out_dir / ALPACA_EVAL_REFERENCE).is_file():
            command += ["--reference_outputs", str(out_dir / ALPACA_EVAL_REFERENCE)]
        command += ["--annotators_config", ALPACA_EVAL_ANNOTATOR]
        jobs.append(
            OfficialJob("alpaca_eval", [command], None, "alpaca_eval", "pip install alpaca-eval")
        )
    if "mt_bench" in benchmarks:
        judge_dir = _fastchat_judge_dir()
        shown = judge_dir or Path("<fastchat>/llm_judge")
        python = sys.executable if judge_dir else "python"
        common = ["--model-list", model_name]
        jobs.append(
            OfficialJob(
                "mt_bench",
                [
                    [python, "gen_judgment.py", *common, "--parallel", "2"],
                    [python, "show_result.py", *common],
                ],
                shown,
                "fastchat.llm_judge",
                "pip install 'fschat[model_worker,llm_judge]'",
                prepare=[
                    (
                        out_dir / mt_bench_answer_path(model_name),
                        shown / "data" / "mt_bench" / "model_answer" / f"{model_name}.jsonl",
                    )
                ],
            )
        )
    return jobs


def why_not_runnable(job: OfficialJob) -> str | None:
    """None when the job can run here, else what is missing."""
    reasons = []
    if job.benchmark == "alpaca_eval":
        present = shutil.which("alpaca_eval") is not None and _importable("fire", "alpaca_eval")
    else:
        present = _fastchat_judge_dir() is not None
    if not present:
        reasons.append(
            f"the {job.package} judge is not installed with its dependencies ({job.install})"
        )
    if not os.environ.get(API_KEY_ENV):
        reasons.append(f"{API_KEY_ENV} is not set")
    return "; ".join(reasons) or None


def _importable(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def run_official_jobs(
    jobs: list[OfficialJob], *, mode: str, out_dir: Path, publish_dir: Path | None = None
) -> dict[str, dict]:
    """Print each job's command; run it when ``mode`` is "auto" and it can run. Returns
    {benchmark: {"command", "ran", "reason", "result"}} (result: the parsed scores). The
    printed commands name ``publish_dir`` where ``out_dir`` will be moved to."""
    report: dict[str, dict] = {}
    moved = (out_dir.absolute(), publish_dir.absolute()) if publish_dir else None
    for job in jobs:
        reason = "eval.official_judge=print" if mode == "print" else why_not_runnable(job)
        command = job.shell(moved)
        entry: dict = {"command": command, "ran": False, "reason": reason, "result": None}
        print(f"[{job.benchmark}] official judge: {command}", flush=True)
        if reason is None:
            entry.update(_run(job, out_dir))
        else:
            print(f"[{job.benchmark}] not run: {reason}", flush=True)
        report[job.benchmark] = entry
    return report


def _run(job: OfficialJob, out_dir: Path) -> dict:
    """Copy the job's files, then run its commands in order (each through the child-process
    supervisor, its output in one log); the first that fails stops the job."""
    log = out_dir / f"official_{job.benchmark}.log"
    try:
        for source, target in job.prepare:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        log.write_bytes(b"")
        for command in job.commands:
            with ChildProcesses() as children:
                child = children.start(command, log, cwd=job.cwd, append=True)
                failed = not children.wait().ok
            if failed:
                raise CommandFailed(
                    f"`{shlex.join(command)}` exited with status {child.returncode}"
                )
    except (OSError, CommandFailed) as exc:
        logger.warning("%s: the official judge failed (%s); see %s", job.benchmark, exc, log)
        return {"ran": True, "reason": f"failed: {exc}"}
    return {"ran": True, "result": parse_official_result(job, out_dir)}


def parse_official_result(job: OfficialJob, out_dir: Path) -> dict | None:
    """The official scores, read from the judge's own output files."""
    if job.benchmark == "alpaca_eval":
        path = out_dir / "alpaca_eval" / ALPACA_EVAL_ANNOTATOR / "leaderboard.csv"
        if not path.is_file():
            return None
        with open(path, newline="") as handle:
            row = next(csv.DictReader(handle), None)
        keys = ("win_rate", "length_controlled_winrate", "avg_length")
        return {k: float(row[k]) for k in keys if row and row.get(k)} if row else None
    path = Path(str(job.cwd)) / "data" / "mt_bench" / "model_judgment" / "gpt-4_single.jsonl"
    if not path.is_file():
        return None
    model = job.commands[0][job.commands[0].index("--model-list") + 1]
    scores = [
        row["score"]
        for row in map(json.loads, path.read_text().splitlines())
        if row.get("model") == model and row.get("score", -1) >= 0
    ]
    return {"score": statistics.fmean(scores), "judgments": len(scores)} if scores else None
