"""Ranking rules without a real model: ranks and ties, the best/worst pair rule, the verifiable
ranker, rankers that fail, the reward-model ranker against HF, and the llm-blender compat fix."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from selm_mcore.ranking import (
    Ranker,
    RankerError,
    RewardModelRanker,
    VerifiableAnswerRanker,
    build_pairs,
    build_ranker,
    ranks_from_scores,
    resolve_device,
    summarize_stats,
)


class TableRanker(Ranker):
    """Scores looked up by candidate text (unknown text scores 0)."""

    name = "table"

    def __init__(self, table):
        self.table = table
        self.calls = []

    def _scores(self, prompts, candidates, answers):
        self.calls.append((prompts, candidates))
        return [[self.table.get(c, 0.0) for c in cands] for cands in candidates]


def pref_row(prompt_id, y_w, y_l, prompt="Q?"):
    user = {"role": "user", "content": prompt}
    return {"prompt": prompt, "prompt_id": prompt_id,
            "chosen": [user, {"role": "assistant", "content": y_w}],
            "rejected": [user, {"role": "assistant", "content": y_l}],
            "messages": [user, {"role": "assistant", "content": y_w}],
            "score_chosen": 9.0, "score_rejected": 2.0}


def test_ranks_from_scores_matches_llm_blender():
    from selm_mcore.ranking import import_llm_blender

    import_llm_blender()
    from llm_blender.gpt_eval.utils import get_ranks_from_scores

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(50, 4)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(ranks_from_scores(scores), get_ranks_from_scores(scores))
    np.testing.assert_array_equal(ranks_from_scores(np.array([[0.5, 0.5, 0.1]])), [[1, 1, 3]])
    np.testing.assert_array_equal(ranks_from_scores(np.array([[0.1, 0.5, 0.5]])), [[3, 1, 1]])


def test_best_worst_rule_ties_and_yw_becoming_rejected():
    rows = [
        pref_row("a", "w_a", "l_a"),      # y_ref best, y_l worst
        pref_row("b", "w_b", "l_b"),      # y_l best, y_w worst: the original y_w is rejected
        pref_row("c", "w_c", "l_c"),      # y_ref ties y_w at the top: y_ref wins the tie
        pref_row("d", "w_d", "l_d"),      # full tie: chosen == rejected == y_ref
        pref_row("e", "w_e", "l_e"),      # y_w and y_l tie at the bottom: y_w (lower index) lost
    ]
    y_refs = {"a": ["r_a"], "b": ["r_b"], "c": "r_c", "d": ["r_d"], "e": ["r_e"]}
    table = {"r_a": 3, "w_a": 2, "l_a": 1, "r_b": 2, "w_b": 1, "l_b": 3,
             "r_c": 5, "w_c": 5, "l_c": 1, "r_d": 1, "w_d": 1, "l_d": 1,
             "r_e": 4, "w_e": 0, "l_e": 0}
    ranker = TableRanker(table)
    new_rows, stats = build_pairs(rows, y_refs, ranker)
    assert ranker.calls[0][0] == ["Q?"] * 5  # one group of 3 candidates, raw prompt text
    assert ranker.calls[0][1][1] == ["r_b", "w_b", "l_b"]  # [y_ref, y_w, y_l] in this order
    picked = [(r["chosen"][-1]["content"], r["rejected"][-1]["content"]) for r in new_rows]
    assert picked == [("r_a", "l_a"), ("l_b", "w_b"), ("r_c", "l_c"), ("r_d", "r_d"),
                      ("r_e", "w_e")]
    assert [s["chosen"] for s in stats] == ["y_ref", "y_l", "y_ref", "y_ref", "y_ref"]
    assert [s["rejected"] for s in stats] == ["y_l", "y_w", "y_l", "y_ref", "y_w"]
    assert [s["tie"] for s in stats] == [False, False, False, True, False]
    assert stats[2]["ranks"] == [1, 1, 3]
    for row, new, ref in zip(rows, new_rows, ["r_a", "r_b", "r_c", "r_d", "r_e"]):
        assert new["reference_response"] == ref
        assert new["prompt"] == "Q?" and new["prompt_id"] == row["prompt_id"]
        assert new["chosen"][:-1] == row["chosen"][:-1] == new["rejected"][:-1]
        assert new["chosen"][-1]["role"] == new["rejected"][-1]["role"] == "assistant"
        assert new["messages"] == new["chosen"]
    assert (new_rows[1]["score_chosen"], new_rows[1]["score_rejected"]) == (3.0, 1.0)
    summary = summarize_stats(stats)
    assert summary["chosen_y_ref"] == 4 and summary["rejected_y_w"] == 2 and summary["ties"] == 1


def test_prompt_only_rows_rank_their_samples_and_mixed_groups():
    rows = [
        {"prompt_id": "s", "messages": [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "old"}]},
        {"prompt_id": "t", "prompt": "Yo"},
        pref_row("p", "w", "l"),
    ]
    y_refs = {"s": ["s0", "s1", "s2", "s3"], "t": ["t0", "t1", "t2", "t3"], "p": ["r"]}
    table = {"s0": 1, "s1": 4, "s2": 0, "s3": 2, "t0": 1, "t1": 1, "t2": 1, "t3": 1,
             "r": 0, "w": 2, "l": 1}
    ranker = TableRanker(table)
    new_rows, stats = build_pairs(rows, y_refs, ranker)
    assert sorted(len(c[0]) for _, c in ranker.calls) == [3, 4]  # grouped by candidate count
    assert new_rows[0]["prompt"] == "Hi"
    assert new_rows[0]["chosen"] == [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "s1"}]
    assert new_rows[0]["rejected"][-1]["content"] == "s2"
    assert new_rows[0]["reference_response"] == "s0"
    assert stats[0]["candidates"] == ["sample_0", "sample_1", "sample_2", "sample_3"]
    assert (new_rows[1]["chosen"][-1]["content"], new_rows[1]["rejected"][-1]["content"]) == \
        ("t0", "t0")
    assert (stats[2]["chosen"], stats[2]["rejected"]) == ("y_w", "y_ref")


def test_build_pairs_refuses_missing_or_short_generations():
    ranker = TableRanker({})
    with pytest.raises(KeyError, match="prompt_id='x'"):
        build_pairs([pref_row("x", "w", "l")], {}, ranker)
    with pytest.raises(ValueError, match="needs >= 2 generated responses"):
        build_pairs([{"prompt_id": "y", "prompt": "Q"}], {"y": ["only"]}, ranker)
    with pytest.raises(ValueError, match="'chosen' must be a message list"):
        build_pairs([{"prompt_id": "z", "prompt": "Q", "chosen": [], "rejected": []}],
                    {"z": ["r"]}, ranker)


class BrokenRanker(Ranker):
    name = "broken"

    def __init__(self, result=None, exc=None):
        self.result, self.exc = result, exc

    def _scores(self, prompts, candidates, answers):
        if self.exc:
            raise self.exc
        return self.result


@pytest.mark.parametrize("ranker, message", [
    (BrokenRanker(exc=RuntimeError("CUDA out of memory")), "broken ranker failed.*out of memory"),
    (BrokenRanker(result=np.zeros((1, 2))), r"shape \(1, 2\), expected \(1, 3\)"),
    (BrokenRanker(result=np.array([[0.0, np.nan, 1.0]])), "non-finite scores for prompt 0"),
])
def test_a_failing_ranker_stops_build_pairs(ranker, message):
    with pytest.raises(RankerError, match=message):
        build_pairs([pref_row("a", "w", "l")], {"a": ["r"]}, ranker)


def test_verifiable_ranker():
    ranker = VerifiableAnswerRanker()
    prompts = ["What is 12 plus 30?", "Capital of France?"]
    candidates = [["It is 42.", "The answer: 41", "So 40 + 2 = 42, the answer is 42", "no idea"],
                  ["Paris.", "paris is the capital", "Lyon", "Parisian food"]]
    scores = ranker.scores(prompts, candidates, answers=["42", "Paris"])
    ranks = ranker.rank(prompts, candidates, answers=["42", "Paris"])
    np.testing.assert_array_equal(ranks, [[1, 3, 2, 3], [1, 2, 3, 3]])
    assert scores[0, 1] == scores[0, 3] == 0.0 and scores[0, 0] > scores[0, 2] > 1.0
    assert VerifiableAnswerRanker.is_correct("total: 1,234", "1234")
    assert VerifiableAnswerRanker.is_correct("x = -3.50", "-3.5")
    assert not VerifiableAnswerRanker.is_correct("42 is not it, 43", "42")  # the LAST number
    with pytest.raises(RankerError, match="prompt 1 has no answer"):
        ranker.scores(prompts, candidates, answers=["42", None])
    rows = [{**pref_row("m", "y_w 7", "y_l 8", prompt="3 + 4?"), "answer": 7}]
    new_rows, stats = build_pairs(rows, {"m": ["I think 9"]}, ranker)
    assert (stats[0]["chosen"], stats[0]["rejected"]) == ("y_w", "y_ref")
    assert new_rows[0]["answer"] == 7


def test_build_ranker_and_device():
    from selm_mcore.config import RankingConfig

    assert isinstance(build_ranker(RankingConfig(kind="verifiable")), VerifiableAnswerRanker)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


def test_reward_model_ranker_matches_hf(tmp_path):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from selm_mcore.assets import build_tiny_llama

    build_tiny_llama(tmp_path, seed=0, num_hidden_layers=2)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(tmp_path, num_labels=1,
                                                           dtype=torch.float32)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(tmp_path)
    prompts = ["What is 2 plus 3?", "Tell me a story about the sea and a boy"]
    candidates = [["five", "It is 5, because two plus three equals five.", ""],
                  ["Once upon a time.", "No.", "A boy went to the sea and found a fish."]]
    ranker = RewardModelRanker(str(tmp_path), device="cpu", batch_size=4)
    scores = ranker.scores(prompts, candidates)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model.eval()
    for i, prompt in enumerate(prompts):
        for j, response in enumerate(candidates[i]):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                expected = model(input_ids=ids).logits[0, 0].item()
            assert scores[i, j] == pytest.approx(expected, abs=1e-5)
    assert len(set(scores.ravel().round(6))) == 6  # batching/padding kept them apart


def test_llm_blender_imports_with_the_compat_fix():
    """Fails loudly when llm-blender (or transformers) moves so the fix no longer applies."""
    code = (
        "import sys\n"
        "from selm_mcore.ranking import import_llm_blender, _encode_texts\n"
        "lb = import_llm_blender()\n"
        "from llm_blender.pair_ranker import collator\n"
        "from llm_blender.blender import blender\n"
        "import transformers.utils.hub as hub\n"
        "assert collator.encode_texts is _encode_texts\n"
        "assert hub.TRANSFORMERS_CACHE\n"
        "assert 'vllm' not in sys.modules and blender.is_vllm_imported is False\n"
        "assert import_llm_blender() is lb\n"
        "print('ok', hasattr(__import__('transformers').PreTrainedTokenizerBase,"
        " 'batch_encode_plus'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("ok")


def test_encode_texts_replacement_matches_tokenizer_call(tmp_path):
    from selm_mcore.assets import build_tiny_tokenizer
    from selm_mcore.ranking import _encode_texts

    tokenizer = build_tiny_tokenizer(tmp_path)
    texts = ["What is 2 plus 3?", "a"]
    ids, mask = _encode_texts(texts, tokenizer, max_length=8)
    expected = tokenizer(texts, max_length=8, padding="max_length", truncation=True)
    assert ids.tolist() == expected["input_ids"] and mask.tolist() == expected["attention_mask"]
    assert ids.shape == (2, 8)
