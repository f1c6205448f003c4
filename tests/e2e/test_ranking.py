"""PairRM ranking through the real llm-blender (Blender.loadranker + Blender.rank) on a tiny,
offline PairRM-shaped ranker whose order is known (longer candidates win), plus `selm rank`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from selm_mcore.generation import read_jsonl, write_jsonl_atomic
from selm_mcore.ranking import PairRMRanker, RankerError, build_pairs, build_tiny_pairrm

PROMPTS = ["What is 2 plus 3?", "Tell me a story about the sea."]
CANDIDATES = [
    ["5", "The answer is five, because two plus three is five.", "It is five."],
    ["Once upon a time a boy sailed the sea.", "A boat.", "The sea was calm and blue."],
]


@pytest.fixture(scope="module")
def tiny_pairrm(tmp_path_factory):
    return build_tiny_pairrm(tmp_path_factory.mktemp("pairrm") / "ranker", seed=0)


@pytest.fixture(scope="module")
def ranker(tiny_pairrm):
    return PairRMRanker(str(tiny_pairrm), backbone=str(tiny_pairrm / "backbone"), device="auto",
                        batch_size=2)


def token_lengths(ranker, candidates):
    tokenizer = ranker.blender.ranker_tokenizer
    return np.array([[len(tokenizer.encode(c)) for c in cands] for cands in candidates])


def test_known_order_through_blender(ranker):
    ranks = ranker.rank(PROMPTS, CANDIDATES)
    lengths = token_lengths(ranker, CANDIDATES)
    assert len(set(lengths[0])) == 3 and len(set(lengths[1])) == 3
    expected = np.argsort(np.argsort(-lengths, axis=1), axis=1) + 1  # longest = rank 1
    np.testing.assert_array_equal(ranks, expected)
    # Blender.rank's own ranks (llm-blender's tie rule) agree with ours.
    np.testing.assert_array_equal(
        ranker.blender.rank(PROMPTS, CANDIDATES, return_scores=False, disable_tqdm=True), ranks)
    # The source does not change the order; every ordered pair was compared (c * (c - 1)).
    np.testing.assert_array_equal(ranker.rank(["x", "y"], CANDIDATES), ranks)


def test_ties_share_the_better_rank(ranker):
    candidates = [["same answer", "a much longer answer than the others", "same answer"]]
    scores = ranker.scores(["Q"], candidates)
    assert scores[0, 0] == scores[0, 2] < scores[0, 1]
    np.testing.assert_array_equal(ranker.rank(["Q"], candidates), [[2, 1, 2]])


def test_build_pairs_with_pairrm(ranker):
    def row(prompt_id, prompt, y_w, y_l):
        user = {"role": "user", "content": prompt}
        return {"prompt": prompt, "prompt_id": prompt_id,
                "chosen": [user, {"role": "assistant", "content": y_w}],
                "rejected": [user, {"role": "assistant", "content": y_l}]}

    rows = [
        row("a", PROMPTS[0], "Five.", "It is five, since two and three make five in total."),
        row("b", PROMPTS[1], "A long story about the sea and a boy and a boat.", "Sea."),
        row("c", PROMPTS[1], "Same length!", "Same length?"),
    ]
    y_refs = {"a": ["Two plus three is five."], "b": ["The sea."], "c": ["Same length."]}
    new_rows, stats = build_pairs(rows, y_refs, ranker)
    # a: y_l is the longest -> chosen; the original y_w (shortest) becomes rejected.
    assert (stats[0]["chosen"], stats[0]["rejected"]) == ("y_l", "y_w")
    assert new_rows[0]["rejected"][-1]["content"] == "Five."
    # b: y_w longest, y_l shortest.
    assert (stats[1]["chosen"], stats[1]["rejected"]) == ("y_w", "y_l")
    # c: all three have the same token length -> full tie -> chosen == rejected == y_ref.
    assert stats[2]["tie"] and new_rows[2]["chosen"] == new_rows[2]["rejected"]
    assert new_rows[2]["chosen"][-1]["content"] == "Same length."
    assert [r["reference_response"] for r in new_rows] == [y_refs[k][0] for k in "abc"]


def test_selm_rank_cli(tiny_pairrm, tmp_path):
    rows = [{"prompt_id": "q1", "prompt": PROMPTS[0], "answer": "5"},
            {"prompt_id": "q2", "prompt": PROMPTS[1]}]
    write_jsonl_atomic(tmp_path / "rows.jsonl", rows)
    write_jsonl_atomic(tmp_path / "gen.jsonl", [
        {"prompt_id": "q1", "prompt": PROMPTS[0], "responses": CANDIDATES[0]},
        {"prompt_id": "q2", "prompt": PROMPTS[1], "responses": CANDIDATES[1]}])
    (tmp_path / "cfg.yaml").write_text(json.dumps({"ranking": {
        "kind": "pairrm", "model_path": str(tiny_pairrm),
        "backbone": str(tiny_pairrm / "backbone"), "device": "cpu"}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def selm_rank(*overrides):
        args = ["rank", str(tmp_path / "cfg.yaml"), "--rows", str(tmp_path / "rows.jsonl"),
                "--generations", str(tmp_path / "gen.jsonl"), "--out", str(tmp_path / "pairs.jsonl")]
        for item in overrides:
            args += ["--set", item]
        return subprocess.run([sys.executable, "-m", "selm_mcore.cli", *args], env=env,
                              capture_output=True, text=True, timeout=240)

    proc = selm_rank()
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    stats = read_jsonl(tmp_path / "pairs.stats.jsonl")
    assert [p["chosen"][-1]["content"] for p in pairs] == [CANDIDATES[0][1], CANDIDATES[1][0]]
    assert [p["rejected"][-1]["content"] for p in pairs] == [CANDIDATES[0][0], CANDIDATES[1][1]]
    assert [s["chosen_index"] for s in stats] == [1, 0]

    # A ranker failure stops with a clear error and a non-zero exit; the old output survives.
    proc = selm_rank("ranking.kind=verifiable")
    assert proc.returncode != 0
    assert "prompt 1 has no answer" in proc.stderr
    assert read_jsonl(tmp_path / "pairs.jsonl") == pairs


def test_loading_errors_are_clear(tiny_pairrm, tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(FileNotFoundError, match="no config.json"):
        PairRMRanker(str(tmp_path), device="cpu")
    with pytest.raises(FileNotFoundError, match="ranking.backbone"):
        PairRMRanker(str(tiny_pairrm), backbone=str(tmp_path / "nope"), device="cpu")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    with pytest.raises(RankerError, match="not a local folder"):
        PairRMRanker("llm-blender/definitely-not-here", device="cpu")
