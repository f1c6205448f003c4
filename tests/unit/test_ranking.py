"""Rankers without a real PairRM: ranks and ties (llm-blender's rule), the verifiable ranker, the
reward-model ranker against HF, building a ranker from the config, and the llm-blender compat fix
seen through llm-blender's own collator. (The fix in a fresh process and PairRM through
llm-blender: tests/e2e/test_ranking.py; what SELM makes of the scores: test_pairs.py.)"""

import numpy as np
import pytest
import torch

from selm_mcore.rollout.pairs import build_pairs
from selm_mcore.rollout.rankers import (
    RankerError,
    RewardModelRanker,
    VerifiableAnswerRanker,
    build_ranker,
    import_llm_blender,
    ranks_from_scores,
    resolve_device,
)


def test_ranks_from_scores_matches_llm_blender():
    import_llm_blender()
    from llm_blender.gpt_eval.utils import get_ranks_from_scores

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(50, 4)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(ranks_from_scores(scores), get_ranks_from_scores(scores))
    np.testing.assert_array_equal(ranks_from_scores(np.array([[0.5, 0.5, 0.1]])), [[1, 1, 3]])
    np.testing.assert_array_equal(ranks_from_scores(np.array([[0.1, 0.5, 0.5]])), [[3, 1, 1]])


def test_verifiable_ranker(preference_row):
    ranker = VerifiableAnswerRanker()
    prompts = ["What is 12 plus 30?", "Capital of France?"]
    candidates = [
        ["It is 42.", "The answer: 41", "So 40 + 2 = 42, the answer is 42", "no idea"],
        ["Paris.", "paris is the capital", "Lyon", "Parisian food"],
    ]
    scores = ranker.scores(prompts, candidates, answers=["42", "Paris"])
    ranks = ranker.rank(prompts, candidates, answers=["42", "Paris"])
    np.testing.assert_array_equal(ranks, [[1, 3, 2, 3], [1, 2, 3, 3]])
    assert scores[0, 1] == scores[0, 3] == 0.0 and scores[0, 0] > scores[0, 2] > 1.0
    assert VerifiableAnswerRanker.is_correct("total: 1,234", "1234")
    assert VerifiableAnswerRanker.is_correct("x = -3.50", "-3.5")
    assert not VerifiableAnswerRanker.is_correct("42 is not it, 43", "42")  # the LAST number
    with pytest.raises(RankerError, match="prompt 1 has no answer"):
        ranker.scores(prompts, candidates, answers=["42", None])
    row = preference_row("3 + 4?", "y_w 7", "y_l 8", prompt_id="m", answer=7)
    new_rows, stats = build_pairs([row], {"m": ["I think 9"]}, ranker)
    assert (stats[0]["chosen"], stats[0]["rejected"]) == ("y_w", "y_ref")
    assert new_rows[0]["answer"] == 7


def test_scores_refuse_malformed_candidate_lists():
    ranker = VerifiableAnswerRanker()
    with pytest.raises(ValueError, match="2 prompts but 1 candidate lists"):
        ranker.scores(["a", "b"], [["x"]], answers=["1", "2"])
    with pytest.raises(ValueError, match="prompt 1 has 1 candidates, prompt 0 has 2"):
        ranker.scores(["a", "b"], [["x", "y"], ["z"]], answers=["1", "2"])
    assert ranker.scores([], []).shape == (0, 0)


def test_build_ranker_and_device():
    from selm_mcore.config.schema import RankingConfig

    assert isinstance(build_ranker(RankingConfig(kind="verifiable")), VerifiableAnswerRanker)
    with pytest.raises(ValueError, match="ranking.kind='bleu' is not one of"):
        build_ranker(RankingConfig(kind="bleu"))
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


def test_reward_model_ranker_matches_hf(tmp_path):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from selm_mcore.testing.assets import build_tiny_llama

    # Its own folder: the classification head is saved into it.
    build_tiny_llama(tmp_path, seed=0, num_hidden_layers=2)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(
        tmp_path, num_labels=1, dtype=torch.float32
    )
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(tmp_path)
    prompts = ["What is 2 plus 3?", "Tell me a story about the sea and a boy"]
    candidates = [
        ["five", "It is 5, because two plus three equals five.", ""],
        ["Once upon a time.", "No.", "A boy went to the sea and found a fish."],
    ]
    ranker = RewardModelRanker(str(tmp_path), device="cpu", batch_size=4)
    scores = ranker.scores(prompts, candidates)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model.eval()
    for i, prompt in enumerate(prompts):
        for j, response in enumerate(candidates[i]):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False,
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                expected = model(input_ids=ids).logits[0, 0].item()
            assert scores[i, j] == pytest.approx(expected, abs=1e-5)
    assert len(set(scores.ravel().round(6))) == 6  # batching/padding kept them apart


def test_llm_blenders_encode_texts_works_under_transformers_5(tiny_tokenizer):
    """llm-blender's collator calls the removed ``batch_encode_plus``; after import_llm_blender
    its ``encode_texts`` gives what a plain tokenizer call gives."""
    llm_blender = import_llm_blender()
    from llm_blender.pair_ranker import collator

    assert import_llm_blender() is llm_blender  # idempotent
    texts = ["What is 2 plus 3?", "a"]
    ids, mask = collator.encode_texts(texts, tiny_tokenizer, max_length=8)
    expected = tiny_tokenizer(texts, max_length=8, padding="max_length", truncation=True)
    assert ids.tolist() == expected["input_ids"] and mask.tolist() == expected["attention_mask"]
    assert ids.shape == (2, 8)


def test_pairrm_refuses_what_llm_blender_would_load_as_another_model(tmp_path):
    """llm-blender loads some reward models by their name (Starling's loader calls torch.load
    without weights_only); a folder whose config.json is not a pairranker is refused too, both
    before llm-blender reads a file."""
    from selm_mcore.rollout.rankers import PairRMRanker

    for name in ("berkeley-nest/Starling-RM-7B-alpha", "/cache/openbmb/UltraRM-13b/"):
        with pytest.raises(RankerError, match=r"names .*, a reward model llm-blender loads"):
            PairRMRanker(name, device="cpu")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"ranker_type": "deberta-rm"}')
    with pytest.raises(RankerError, match=r"is a 'deberta-rm' ranker \(its config.json\)"):
        PairRMRanker(str(other), device="cpu")
