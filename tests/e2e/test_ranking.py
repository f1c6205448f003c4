"""PairRM ranking through the real llm-blender (Blender.loadranker + Blender.rank) on a tiny,
offline PairRM-shaped ranker whose order is known (longer candidates win), `selm rank` as the
online loop runs it (new pairs and held-out scores from one ranker load), and the llm-blender
compatibility fix in a fresh process."""

import subprocess
import sys

import numpy as np
import pytest
from child_env import child_env

from selm_mcore.rollout.pairs import EVAL_ID_PREFIX, build_pairs
from selm_mcore.rollout.rankers import PairRMRanker, RankerError
from selm_mcore.runtime.files import read_records, write_jsonl_atomic
from selm_mcore.testing.assets import build_tiny_pairrm

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
    return PairRMRanker(
        str(tiny_pairrm), backbone=str(tiny_pairrm / "backbone"), device="auto", batch_size=2
    )


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
        ranker.blender.rank(PROMPTS, CANDIDATES, return_scores=False, disable_tqdm=True), ranks
    )
    # The source does not change the order; every ordered pair was compared (c * (c - 1)).
    np.testing.assert_array_equal(ranker.rank(["x", "y"], CANDIDATES), ranks)


def test_ties_share_the_better_rank(ranker):
    candidates = [["same answer", "a much longer answer than the others", "same answer"]]
    scores = ranker.scores(["Q"], candidates)
    assert scores[0, 0] == scores[0, 2] < scores[0, 1]
    np.testing.assert_array_equal(ranker.rank(["Q"], candidates), [[2, 1, 2]])


def test_build_pairs_with_pairrm(ranker, preference_row):
    def row(prompt_id, prompt, y_w, y_l):
        return preference_row(prompt, y_w, y_l, prompt_id=prompt_id)

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


def test_selm_rank_cli(tiny_pairrm, ranker, tmp_path, write_config):
    rows = [
        {"prompt_id": "q1", "prompt": PROMPTS[0], "answer": "5"},
        {"prompt_id": "q2", "prompt": PROMPTS[1]},
    ]
    write_jsonl_atomic(tmp_path / "rows.jsonl", rows)
    # Held-out prompt e1 with its chosen response: PairRM scores the policy's answer against it.
    anchor = "Two plus three is five."
    write_jsonl_atomic(
        tmp_path / "eval.jsonl",
        [
            {
                "prompt_id": "e1",
                "prompt": PROMPTS[0],
                "chosen": [
                    {"role": "user", "content": PROMPTS[0]},
                    {"role": "assistant", "content": anchor},
                ],
            }
        ],
    )
    write_jsonl_atomic(
        tmp_path / "gen.jsonl",
        [
            {"prompt_id": "q1", "prompt": PROMPTS[0], "responses": CANDIDATES[0]},
            {"prompt_id": "q2", "prompt": PROMPTS[1], "responses": CANDIDATES[1]},
            {"prompt_id": EVAL_ID_PREFIX + "e1", "prompt": PROMPTS[0], "responses": ["It is 5."]},
        ],
    )
    write_config(
        tmp_path / "cfg.yaml",
        ranking={
            "kind": "pairrm",
            "model_path": str(tiny_pairrm),
            "backbone": str(tiny_pairrm / "backbone"),
            "device": "cpu",
        },
    )
    env = child_env()

    def selm_rank(*overrides, flags=()):
        args = [
            "rank",
            str(tmp_path / "cfg.yaml"),
            "--rows",
            str(tmp_path / "rows.jsonl"),
            "--generations",
            str(tmp_path / "gen.jsonl"),
            "--out",
            str(tmp_path / "pairs.jsonl"),
            "--eval-rows",
            str(tmp_path / "eval.jsonl"),
            "--eval-out",
            str(tmp_path / "eval_scores.jsonl"),
            *flags,
        ]
        for item in overrides:
            args += ["--set", item]
        return subprocess.run(
            [sys.executable, "-m", "selm_mcore.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )

    proc = selm_rank()
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = read_records(tmp_path / "pairs.jsonl")
    stats = read_records(tmp_path / "pairs.stats.jsonl")
    assert [p["chosen"][-1]["content"] for p in pairs] == [CANDIDATES[0][1], CANDIDATES[1][0]]
    assert [p["rejected"][-1]["content"] for p in pairs] == [CANDIDATES[0][0], CANDIDATES[1][1]]
    assert [s["chosen_index"] for s in stats] == [1, 0]
    (scored,) = read_records(tmp_path / "eval_scores.jsonl")
    assert scored["prompt_id"] == "e1" and scored["response"] == "It is 5."
    expected = ranker.scores([PROMPTS[0]], [["It is 5.", anchor]])[0, 0]
    assert scored["score"] == pytest.approx(expected, abs=1e-4)

    # A rerun does not replace the finished pairs silently: it names --overwrite.
    proc = selm_rank()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'pairs.jsonl'} already holds ranking results (--out)" in proc.stderr
    assert "Pass --overwrite" in proc.stderr
    # A ranker failure stops with a clear error and a non-zero exit; the old output survives.
    proc = selm_rank("ranking.kind=verifiable", flags=["--overwrite"])
    assert proc.returncode != 0
    assert "prompt 1 has no answer" in proc.stderr
    assert read_records(tmp_path / "pairs.jsonl") == pairs


def test_loading_errors_are_clear(tiny_pairrm, tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(FileNotFoundError, match="no config.json"):
        PairRMRanker(str(tmp_path), device="cpu")
    with pytest.raises(FileNotFoundError, match="ranking.backbone"):
        PairRMRanker(str(tiny_pairrm), backbone=str(tmp_path / "nope"), device="cpu")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    with pytest.raises(RankerError, match="not a local folder"):
        PairRMRanker("llm-blender/definitely-not-here", device="cpu")


def test_llm_blender_imports_with_the_compat_fix():
    """In a fresh process: fails loudly when llm-blender (or transformers) moves so the fix no
    longer applies; llm-blender loads without vLLM and its collator no longer needs
    ``batch_encode_plus``."""
    code = (
        "import sys\n"
        "from selm_mcore.rollout.rankers import import_llm_blender\n"
        "lb = import_llm_blender()\n"
        "from llm_blender.pair_ranker import collator\n"
        "from llm_blender.blender import blender\n"
        "import transformers.utils.hub as hub\n"
        "assert collator.encode_texts.__module__ == 'selm_mcore.rollout.rankers'\n"
        "assert hub.TRANSFORMERS_CACHE\n"
        "assert 'vllm' not in sys.modules and blender.is_vllm_imported is False\n"
        "assert import_llm_blender() is lb\n"
        "print('ok', hasattr(__import__('transformers').PreTrainedTokenizerBase,"
        " 'batch_encode_plus'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("ok")


def test_a_pickle_payload_in_the_ranker_weights_is_refused(
    tiny_pairrm, ranker, tmp_path, write_config
):
    """The ranker weights as pytorch_model.bin whose pickle also holds a payload that would run
    ``touch MARKER``, with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (which turns llm-blender's own
    ``torch.load`` into a plain unpickle): `selm rank` refuses naming the file and the global,
    and the payload never runs. The same weights saved without the payload load through the
    restricted reader and score exactly as the safetensors ranker."""
    import torch
    from payloads import FORBIDDEN, TouchOnUnpickle
    from safetensors.torch import load_file

    weights = load_file(str(tiny_pairrm / "model.safetensors"))
    config = (tiny_pairrm / "config.json").read_text()  # its backbone: an absolute path
    clean, hostile = tmp_path / "clean", tmp_path / "hostile"
    for folder in (clean, hostile):
        folder.mkdir()
        (folder / "config.json").write_text(config)
    torch.save(weights, clean / "pytorch_model.bin")
    marker = tmp_path / "marker"
    torch.save({**weights, "extra": TouchOnUnpickle(marker)}, hostile / "pytorch_model.bin")

    write_jsonl_atomic(
        tmp_path / "gen.jsonl",
        [{"prompt_id": "q1", "prompt": PROMPTS[0], "responses": CANDIDATES[0]}],
    )
    write_jsonl_atomic(tmp_path / "rows.jsonl", [{"prompt_id": "q1", "prompt": PROMPTS[0]}])
    write_config(
        tmp_path / "cfg.yaml",
        ranking={"kind": "pairrm", "model_path": str(hostile), "device": "cpu"},
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "selm_mcore.cli",
            "rank",
            str(tmp_path / "cfg.yaml"),
            "--rows",
            str(tmp_path / "rows.jsonl"),
            "--generations",
            str(tmp_path / "gen.jsonl"),
            "--out",
            str(tmp_path / "pairs.jsonl"),
        ],
        env={**child_env(), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [row for row in proc.stderr.splitlines() if ": error: " in row]
    assert line.startswith("selm rank: error: ")
    assert f"{hostile / 'pytorch_model.bin'}: refusing to unpickle the global {FORBIDDEN}" in line
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "pairs.jsonl").exists()

    from_bin = PairRMRanker(str(clean), device="cpu", batch_size=2)
    np.testing.assert_array_equal(
        from_bin.scores(PROMPTS, CANDIDATES), ranker.scores(PROMPTS, CANDIDATES)
    )
