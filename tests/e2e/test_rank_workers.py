"""Every ranker on every GPU (selm_mcore.rollout.rank_workers), on the CPU with the real
llm-blender classes and a tiny PairRM with a random head (scores without ties or a simple
order): ``selm rank`` with 2 worker processes, and over 2 "nodes" (what srun starts once per
node) joined by the phase's merge, writes exactly the pairs, stats and held-out scores of one
ranker in one process; node 0 alone prints the progress lines, with the whole job's count. And
llm-blender pads each batch to its longest input, not the maximum length."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from child_env import child_env

from selm_mcore.config.schema import RankingConfig
from selm_mcore.rollout.pairs import EVAL_ID_PREFIX
from selm_mcore.rollout.rank_workers import merge_rank_nodes, rank_rows
from selm_mcore.rollout.rankers import PairRMRanker
from selm_mcore.runtime.files import read_records, write_jsonl_atomic
from selm_mcore.testing.assets import build_tiny_pairrm

WORDS = "the sea cat dog water story answer number good bad first next final result".split()
BATCH = 2


def text(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=words))


def preference_row(k: int) -> dict:
    prompt = f"question {k}: " + text(k, 3 + k % 5)
    user = {"role": "user", "content": prompt}
    return {
        "prompt_id": f"q{k}",
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": text(100 + k, 2 + k % 7)}],
        "rejected": [user, {"role": "assistant", "content": text(200 + k, 4 + k % 3)}],
    }


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A random-head tiny PairRM, 9 rows (5 batches of 2, the last short), 3 held-out rows, the
    generations, a config, and the 1-process result computed in this process."""
    root = tmp_path_factory.mktemp("rank_workers")
    ranker_dir = build_tiny_pairrm(root / "ranker", seed=3, prefer="random")
    rows = [preference_row(k) for k in range(9)]
    eval_rows = [preference_row(50 + k) for k in range(3)]
    generations = {r["prompt_id"]: [text(300 + k, 1 + k % 6)] for k, r in enumerate(rows)}
    generations |= {
        EVAL_ID_PREFIX + r["prompt_id"]: [text(400 + k, 5)] for k, r in enumerate(eval_rows)
    }
    write_jsonl_atomic(root / "rows.jsonl", rows)
    write_jsonl_atomic(root / "eval.jsonl", eval_rows)
    write_jsonl_atomic(
        root / "gen.jsonl", [{"prompt_id": k, "responses": v} for k, v in generations.items()]
    )
    ranking = dict(
        kind="pairrm",
        model_path=str(ranker_dir),
        backbone=str(ranker_dir / "backbone"),
        device="cpu",
        batch_size=BATCH,
    )
    import yaml

    (root / "cfg.yaml").write_text(yaml.safe_dump({"ranking": ranking}))
    one = rank_rows(
        RankingConfig(**ranking),
        False,
        rows,
        eval_rows,
        generations,
        progress_path=root / "one.jsonl",
    )
    return root, ranker_dir, one


def selm_rank(root, out: str, *extra, env=None) -> subprocess.Popen:
    """Start `selm rank` on the module's rows and held-out rows, writing OUT{,.stats,.eval}."""
    args = [
        "rank",
        str(root / "cfg.yaml"),
        "--rows",
        str(root / "rows.jsonl"),
        "--generations",
        str(root / "gen.jsonl"),
        "--out",
        str(root / f"{out}.jsonl"),
        "--stats",
        str(root / f"{out}.stats.jsonl"),
        "--eval-rows",
        str(root / "eval.jsonl"),
        "--eval-out",
        str(root / f"{out}.eval.jsonl"),
        *extra,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "selm_mcore.cli", *args],
        env={**child_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    """Its stderr, once it exited 0."""
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def outputs(root, out: str):
    return [read_records(root / f"{out}{suffix}.jsonl") for suffix in ("", ".stats", ".eval")]


def test_two_workers_and_two_nodes_equal_one_process(job):
    root, _, one = job
    expected = [one.pairs, one.stats, one.eval_scores]
    assert len(one.stats) == 9 and len(one.eval_scores) == 3
    assert len({s["scores"][0] for s in one.stats}) == 9  # random head: no ties to hide behind

    # 2 workers, and node 1 of 2 at the same time; then node 0 (which counts node 1's rows)
    two = selm_rank(root, "two", "--set", "ranking.num_workers=2")
    node1 = selm_rank(root, "nodes", "--num-nodes", "2", env={"SLURM_NODEID": "1"})
    stderr = finish(two)
    assert "started 2 ranker processes on rows [(0, 6), (6, 9)]" in stderr
    assert "rank: 12/12 prompts (100.0%)" in stderr  # both workers' counts
    assert outputs(root, "two") == expected
    assert not list(root.glob(".rankers.*"))  # no worker folders left next to the outputs
    assert not re.search(r"rank: \d+/12", finish(node1))  # only node 0 reports
    stderr = finish(selm_rank(root, "nodes", "--num-nodes", "2", env={"SLURM_NODEID": "0"}))
    assert "rank: 12/12 prompts (100.0%)" in stderr
    merge_rank_nodes([root / f"nodes{s}.jsonl" for s in ("", ".stats", ".eval")], 2)
    assert outputs(root, "nodes") == expected
    assert not list(root.glob(".nodes*")) and not list(root.glob("nodes*.node*"))


def test_batches_are_padded_to_their_longest_input(job):
    """The backbone's input is as wide as the batch's longest source + candidate pair: no
    column that every row pads, far below the collator's maximum length."""
    _, ranker_dir, _ = job
    ranker = PairRMRanker(
        str(ranker_dir), backbone=str(ranker_dir / "backbone"), device="cpu", batch_size=3
    )
    backbone = ranker.blender.ranker.pretrained_model
    widths = []

    def record(module, args, kwargs):
        mask = kwargs["attention_mask"]
        widths.append((mask.shape[1], int(mask.sum(dim=1).max())))

    handle = backbone.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ranker.scores(
            ["short", "a much longer question about the sea " * 3, "mid question"],
            [["a", "b c", "d"], ["the answer is long " * 4, "x", "y z"], ["q", "r", "s"]],
        )
    finally:
        handle.remove()
    assert len(widths) == 6  # 3 candidates: every ordered pair of the one batch
    assert all(width == longest for width, longest in widths)
    assert max(width for width, _ in widths) < ranker.blender.ranker_collator.max_length // 10
