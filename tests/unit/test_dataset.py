"""selm_mcore.data.tokenize: chat template, tokenisation, truncation, hashing, the tokenised
dataset.

Token ids are checked against tokenising by hand with the tiny ChatML tokenizer (a real
PreTrainedTokenizerFast, built offline), not against dataset.py's own helpers. ``sample_rows``
(tests/unit/conftest.py): two single-turn rows and a multi-turn row with a system turn, all with
y_ref.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from selm_mcore.config.schema import DataConfig, ModelConfig
from selm_mcore.data.batches import collate_preferences
from selm_mcore.data.rows import read_rows
from selm_mcore.data.tokenize import (
    PreferenceDataset,
    content_hash,
    encode_prompt,
    encode_response,
    load_preferences,
    load_tokenizer,
    pad_token_id,
    render_prompt,
    row_hash,
    tokenize_row,
    truncate,
)


def chatml(messages):
    """The tiny tokenizer's template, written out by hand."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


@pytest.fixture
def dataset(tmp_path, write_jsonl, sample_rows, tiny_tokenizer):
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", sample_rows)).rows
    return PreferenceDataset.from_rows(rows, tiny_tokenizer, max_length=256, max_prompt_length=128)


# --- tokenisation -----------------------------------------------------------------------------


def test_tokens_and_labels_match_hand_tokenisation(dataset, sample_rows, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for record, example in zip(sample_rows, dataset.examples, strict=True):
        history = record["chosen"][:-1]
        assert (
            list(example.prompt_ids)
            == tokenizer(chatml(history), add_special_tokens=False)["input_ids"]
        )
        # the template writes no BOS of its own: exactly one <|im_start|> per turn
        assert example.prompt_ids.count(tokenizer.bos_token_id) == len(history) + 1
        for content, ids in (
            (record["chosen"][-1]["content"], example.chosen_ids),
            (record["rejected"][-1]["content"], example.rejected_ids),
            (record["reference_response"], example.yref_ids),
        ):
            assert list(ids) == tokenizer(content, add_special_tokens=False)["input_ids"] + [eos]

    batch = collate_preferences(dataset.examples, pad_id=tokenizer.pad_token_id)
    responses = (
        [e.chosen_ids for e in dataset.examples]
        + [e.rejected_ids for e in dataset.examples]
        + [e.yref_ids for e in dataset.examples]
    )
    contents = (
        [r["chosen"][-1]["content"] for r in sample_rows]
        + [r["rejected"][-1]["content"] for r in sample_rows]
        + [r["reference_response"] for r in sample_rows]
    )
    for i, (ids, content) in enumerate(zip(responses, contents, strict=True)):
        mask = batch.loss_mask[i].bool()
        # the labelled positions are exactly the response (and EOS), nothing of the prompt
        assert batch.labels[i][mask].tolist() == list(ids)
        assert tokenizer.decode(batch.labels[i][mask]) == content + "<|im_end|>"
        prompt_len = len(dataset.examples[i % 3].prompt_ids)
        assert batch.tokens[i, :prompt_len].tolist() == list(dataset.examples[i % 3].prompt_ids)
        assert mask.nonzero()[0].item() == prompt_len - 1


def test_prompt_and_response_encoders(sample_rows, tiny_tokenizer):
    """The helpers generation shares with training: templated text, its ids, response + EOS."""
    history = sample_rows[2]["chosen"][:-1]
    assert render_prompt(tiny_tokenizer, history) == chatml(history)
    assert (
        encode_prompt(tiny_tokenizer, history)
        == tiny_tokenizer(chatml(history), add_special_tokens=False)["input_ids"]
    )
    assert encode_response(tiny_tokenizer, "It is 5.") == tiny_tokenizer(
        "It is 5.", add_special_tokens=False
    )["input_ids"] + [tiny_tokenizer.eos_token_id]


def test_tokenizer_loading_and_pad_id(tiny_tokenizer_dir, tiny_tokenizer):
    tokenizer = load_tokenizer(ModelConfig(), tiny_tokenizer_dir)
    assert (
        tokenizer("What is 2 plus 3?")["input_ids"]
        == tiny_tokenizer("What is 2 plus 3?")["input_ids"]
    )
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    no_pad = type("NoPad", (), {"pad_token_id": None, "eos_token_id": 7})()
    assert pad_token_id(no_pad) == 7  # padding is never a label: EOS serves
    with pytest.raises(ValueError, match="neither pad_token_id nor eos_token_id"):
        pad_token_id(type("Bare", (), {"pad_token_id": None, "eos_token_id": None})())


def test_prompt_only_row_cannot_be_tokenised(tmp_path, write_jsonl, tiny_tokenizer):
    row = read_rows(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi there."}])).rows[0]
    with pytest.raises(ValueError, match="prompt-only row cannot be tokenised"):
        tokenize_row(row, tiny_tokenizer, index=0, max_length=64, max_prompt_length=32)


def test_parquet_and_jsonl_give_identical_tokens(
    tmp_path, write_jsonl, sample_rows, tiny_tokenizer
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # one row lacks prompt_id: Parquet stores a null there
    rows = [
        sample_rows[0],
        {k: v for k, v in sample_rows[1].items() if k != "prompt_id"},
        sample_rows[2],
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    write_jsonl(tmp_path / "d.jsonl", rows)
    datasets = {
        fmt: PreferenceDataset.from_file(
            tmp_path / f"d.{fmt}", tiny_tokenizer, max_length=64, max_prompt_length=32
        )
        for fmt in ("jsonl", "parquet")
    }
    assert datasets["jsonl"].examples == datasets["parquet"].examples
    assert datasets["jsonl"].content_hash() == datasets["parquet"].content_hash()


# --- truncation -------------------------------------------------------------------------------


def test_truncate_rules():
    prompt = list(range(100, 180))  # 80 tokens
    short, long_ = list(range(10)), list(range(50))
    # fits: untouched
    assert truncate(prompt[:20], [short, short], 64, 32) == (
        prompt[:20],
        [short, short],
        False,
        False,
    )
    # long prompt, short responses: keep the prompt's END only
    p, r, pc, rc = truncate(prompt, [short, short[:5]], 64, 32)
    assert p == prompt[-32:] and r == [short, short[:5]] and (pc, rc) == (True, False)
    # long prompt and long response: both cut, every response to max_length - max_prompt_length
    p, r, pc, rc = truncate(prompt, [long_, short], 64, 32)
    assert p == prompt[-32:] and r == [long_[:32], short] and (pc, rc) == (True, True)
    # short prompt, long response: the prompt stays, responses cut to 32 (as the reference does)
    p, r, pc, rc = truncate(prompt[:20], [short, long_], 64, 32)
    assert p == prompt[:20] and r == [short, long_[:32]] and (pc, rc) == (False, True)


def test_yref_is_truncated_on_its_own():
    """The pair alone decides; y_ref never shortens the prompt, chosen or rejected."""
    prompt = list(range(100, 180))  # 80 tokens
    short, long_, yref = list(range(10)), list(range(50)), list(range(500, 560))
    # the pair fits (40 + 10 <= 64): nothing of it is cut; y_ref gets the 64 - 40 = 24 that fit
    p, r, pc, rc = truncate(prompt[:40], [short, short, yref], 64, 32)
    assert p == prompt[:40] and r == [short, short, yref[:24]] and (pc, rc) == (False, False)
    # a short y_ref stays whole
    assert truncate(prompt[:40], [short, short, yref[:5]], 64, 32)[1] == [short, short, yref[:5]]
    # the pair is cut: y_ref follows the pair's rule (max_length - max_prompt_length = 32), even
    # where the short prompt would leave it 64 - 20 = 44 (the reference code)
    p, r, pc, rc = truncate(prompt[:20], [long_, short, yref], 64, 32)
    assert p == prompt[:20] and r == [long_[:32], short, yref[:32]] and (pc, rc) == (False, True)
    p, r, pc, rc = truncate(prompt, [long_, short, yref], 64, 32)
    assert p == prompt[-32:] and r == [long_[:32], short, yref[:32]] and (pc, rc) == (True, True)
    # the prompt is cut for the pair, y_ref fills the rest after it: 64 - 32
    p, r, pc, rc = truncate(prompt, [short, short, yref], 64, 32)
    assert p == prompt[-32:] and r == [short, short, yref[:32]] and (pc, rc) == (True, False)


def _reference_tokenize_row(prompt, chosen, rejected, yref, max_length, max_prompt_length):
    """SELMTrainer.tokenize_row's truncation (keep_end), transliterated: every answer carries its
    own copy of the prompt; the length check uses the longer of chosen and rejected."""
    answers = {
        name: {"prompt": list(prompt), "response": list(ids)}
        for name, ids in (("chosen", chosen), ("rejected", rejected), ("yref", yref))
    }
    longer = max(len(chosen), len(rejected))
    for answer in answers.values():
        if len(answer["prompt"]) + longer > max_length:
            answer["prompt"] = answer["prompt"][-max_prompt_length:]
    for answer in answers.values():
        if len(answer["prompt"]) + longer > max_length:
            answer["response"] = answer["response"][: max_length - max_prompt_length]
    return answers


def test_truncation_matches_the_reference_code_and_bounds_every_sequence():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        max_length = rng.randint(8, 80)
        max_prompt_length = rng.randint(1, max_length - 1)
        prompt, chosen, rejected, yref = (
            [rng.randint(0, 99) for _ in range(rng.randint(1, 120))] for _ in range(4)
        )
        p, (c, r, y), _, _ = truncate(
            prompt, [chosen, rejected, yref], max_length, max_prompt_length
        )
        ref = _reference_tokenize_row(prompt, chosen, rejected, yref, max_length, max_prompt_length)
        assert all(ref[name]["prompt"] == p for name in ref)  # one shared prompt, as there
        assert (c, r) == (ref["chosen"]["response"], ref["rejected"]["response"])
        pair_cut = len(ref["chosen"]["prompt"]) + max(len(chosen), len(rejected)) > max_length
        if pair_cut:
            assert y == ref["yref"]["response"]
        else:  # the reference leaves y_ref whole; here it is cut to what fits after the prompt
            assert y == yref[: max_length - len(p)]
        assert all(len(p) + len(seq) <= max_length for seq in (c, r, y))  # the packing bound
        assert y and c and r


def test_truncation_counts_and_keep_end_on_real_rows(
    tmp_path, write_jsonl, preference_row, tiny_tokenizer, caplog
):
    tokenizer = tiny_tokenizer
    long_prompt = " ".join(f"word{i}" for i in range(40))
    long_answer = "the answer is " * 30
    rows = [
        preference_row("Short?", "Yes.", "No."),
        preference_row(long_prompt, "Yes.", "No."),  # prompt cut
        preference_row(long_prompt, long_answer, "No."),  # prompt and responses cut
        preference_row("Short?", "Yes.", long_answer),  # responses cut only
    ]
    loaded = read_rows(write_jsonl(tmp_path / "d.jsonl", rows)).rows
    with caplog.at_level(logging.INFO, logger="selm_mcore.data.tokenize"):
        dataset = PreferenceDataset.from_rows(
            loaded, tokenizer, max_length=64, max_prompt_length=32
        )
    assert (dataset.stats.prompt_truncated, dataset.stats.response_truncated) == (2, 2)
    assert (
        "2 prompts truncated" in caplog.text
        and "2 examples with chosen/rejected cut to 32" in caplog.text
    )
    full_prompt = tokenizer(
        chatml([{"role": "user", "content": long_prompt}]), add_special_tokens=False
    )["input_ids"]
    assert len(full_prompt) > 32
    assert list(dataset[1].prompt_ids) == full_prompt[-32:]  # ends with the generation prompt
    assert tokenizer.decode(dataset[1].prompt_ids).endswith("<|im_start|>assistant\n")
    full_answer = tokenizer(long_answer, add_special_tokens=False)["input_ids"]
    assert list(dataset[2].chosen_ids) == full_answer[:32]  # EOS cut off, as in the reference
    assert list(dataset[3].rejected_ids) == full_answer[:32]
    assert len(dataset[3].prompt_ids) < 32 and not dataset[3].prompt_truncated
    assert dataset.max_sequence_length() <= 64
    assert not dataset[0].prompt_truncated and not dataset[0].response_truncated


def test_long_yref_leaves_the_pair_whole_on_real_rows(
    tmp_path, write_jsonl, preference_row, tiny_tokenizer, caplog
):
    """A long generated y_ref (rows as the rank phase writes them) against a short pair."""
    from selm_mcore.data.packing import auto_budget, check_budget

    tokenizer = tiny_tokenizer
    prompt = " ".join(f"word{i}" for i in range(12))
    long_yref = "the answer is " * 30
    rows = [
        preference_row(prompt, "Yes.", "No.", reference_response=long_yref),
        preference_row(prompt, "Yes.", "No.", reference_response="Maybe."),
    ]
    loaded = read_rows(write_jsonl(tmp_path / "d.jsonl", rows)).rows
    with caplog.at_level(logging.INFO, logger="selm_mcore.data.tokenize"):
        dataset = PreferenceDataset.from_rows(
            loaded, tokenizer, max_length=64, max_prompt_length=32
        )
    full_prompt = tokenizer(
        chatml([{"role": "user", "content": prompt}]), add_special_tokens=False
    )["input_ids"]
    eos = [tokenizer.eos_token_id]
    assert 32 < len(full_prompt) < 60  # longer than max_prompt_length, but the pair fits
    example = dataset[0]
    assert list(example.prompt_ids) == full_prompt and not example.prompt_truncated
    for ids, text in ((example.chosen_ids, "Yes."), (example.rejected_ids, "No.")):
        assert list(ids) == tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    full_yref = tokenizer(long_yref, add_special_tokens=False)["input_ids"]
    assert list(example.yref_ids) == full_yref[: 64 - len(full_prompt)]
    assert example.yref_truncated and not example.response_truncated
    assert not dataset[1].yref_truncated
    assert (
        dataset.stats.prompt_truncated,
        dataset.stats.response_truncated,
        dataset.stats.yref_truncated,
    ) == (0, 0, 1)
    assert "1 y_ref cut to fit" in caplog.text
    # the packing bound: every sequence fits max_length, so a budget of 3 * max_length always
    # holds a pair, and the automatic budget is the longest actual pair
    assert dataset.max_sequence_length() <= 64
    for shared in (True, False):
        check_budget(dataset.examples, 3 * 64, shared)
        assert auto_budget(dataset.examples, shared, 1) == max(
            (len(e.prompt_ids) if shared else 0)
            + sum(len(r) + (0 if shared else len(e.prompt_ids)) for r in e.responses)
            for e in dataset.examples
        )


# --- hashing and the dataset ------------------------------------------------------------------


def test_row_and_content_hash(tmp_path, write_jsonl, sample_rows, tiny_tokenizer, dataset):
    rows = read_rows(write_jsonl(tmp_path / "again.jsonl", sample_rows)).rows
    again = PreferenceDataset.from_rows(rows, tiny_tokenizer, max_length=256, max_prompt_length=128)
    assert dataset.content_hash() == again.content_hash() and len(dataset.content_hash()) == 64
    example = dataset[0]
    changed = replace(example, chosen_ids=example.chosen_ids[:-1] + (7,))
    no_yref = replace(example, yref_ids=None)
    assert len({row_hash(example), row_hash(changed), row_hash(no_yref)}) == 3
    # moving a token from the prompt to a response changes the hash (lengths are hashed)
    moved = replace(
        example,
        prompt_ids=example.prompt_ids[:-1],
        chosen_ids=example.prompt_ids[-1:] + example.chosen_ids,
    )
    assert row_hash(moved) != row_hash(example)
    assert content_hash(dataset.examples[::-1]) != dataset.content_hash()
    cut = PreferenceDataset.from_rows(rows, tiny_tokenizer, max_length=24, max_prompt_length=12)
    assert cut.content_hash() != dataset.content_hash()


def test_dataset_refuses_bad_indices_and_mixed_yref(dataset):
    examples = dataset.examples
    with pytest.raises(ValueError, match="example 0 has index 1"):
        PreferenceDataset([examples[1]])
    with pytest.raises(ValueError, match="some examples have y_ref and others do not"):
        PreferenceDataset([examples[0], replace(examples[1], yref_ids=None)])


def test_load_preferences_follows_the_data_config(
    tmp_path, write_jsonl, sample_rows, tiny_tokenizer, dataset
):
    path = write_jsonl(tmp_path / "train.jsonl", sample_rows)
    loaded = load_preferences(
        DataConfig(train_path=str(path), max_length=256, max_prompt_length=128), tiny_tokenizer
    )
    assert loaded.examples == dataset.examples and loaded.has_yref
    short = load_preferences(
        DataConfig(train_path=str(path), max_length=24, max_prompt_length=12), tiny_tokenizer
    )
    assert short.max_sequence_length() <= 24 and short.stats.prompt_truncated > 0
    with pytest.raises(ValueError, match="data.train_path is empty"):
        load_preferences(DataConfig(train_path=""), tiny_tokenizer)
