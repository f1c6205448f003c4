"""selm_mcore.data: reading + validation, tokenisation + truncation, collation, hashing, sampling.

Token ids are checked against tokenising by hand with the tiny ChatML tokenizer (real
PreTrainedTokenizerFast, built offline), not against data.py's own helpers.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from selm_mcore.assets import build_tiny_tokenizer
from selm_mcore.data import (
    DataError,
    DistributedBatchSampler,
    PreferenceDataset,
    collate_preferences,
    content_hash,
    micro_batches,
    read_rows,
    row_hash,
    split_rounds,
    tokenize_row,
    truncate,
    write_rows,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def pair(prompt, chosen, rejected, **extra):
    """A row in the UltraFeedback-binarized schema."""
    user = {"role": "user", "content": prompt}
    return {"prompt": prompt,
            "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}], **extra}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


RECORDS = [
    pair("What is 2 plus 3?", "The answer is 5.", "It is 6.", prompt_id="p0",
         reference_response="5."),
    pair("Tell me a story.", "Once there was a boy who found water.", "No.", prompt_id="p1",
         reference_response="A story about the sea and the sun."),
    {**pair("Explain briefly.", "Because it is the best way.", "I do not know."),
     "chosen": [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Explain briefly."},
                {"role": "assistant", "content": "First answer."},
                {"role": "user", "content": "Explain briefly."},
                {"role": "assistant", "content": "Because it is the best way."}],
     "rejected": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Explain briefly."},
                  {"role": "assistant", "content": "First answer."},
                  {"role": "user", "content": "Explain briefly."},
                  {"role": "assistant", "content": "I do not know."}],
     "reference_response": "It helps.", "score_chosen": 9.0},
]


def chatml(messages):
    """The tiny tokenizer's template, written out by hand."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


# --- reading and validation -------------------------------------------------------------------


def test_reads_preference_rows(tmp_path):
    loaded = read_rows(write_jsonl(tmp_path / "d.jsonl", RECORDS))
    assert loaded.kind == "preference" and loaded.num_skipped == 0
    first, _, multi = loaded.rows
    assert first.prompt == "What is 2 plus 3?" and first.prompt_id == "p0"
    assert first.chosen == "The answer is 5." and first.rejected == "It is 6."
    assert first.reference_response == "5."
    assert first.prompt_messages == ({"role": "user", "content": "What is 2 plus 3?"},)
    assert [m["role"] for m in multi.prompt_messages] == ["system", "user", "assistant", "user"]
    assert multi.prompt_id is None
    assert first.source == f"{tmp_path / 'd.jsonl'}:1"


def test_reads_prompt_only_rows(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl",
                       [{"prompt": "Hi there.", "prompt_id": 7}, {"prompt": "What is 4?"}])
    loaded = read_rows(path)
    assert loaded.kind == "prompt"
    assert [r.prompt for r in loaded.rows] == ["Hi there.", "What is 4?"]
    assert loaded.rows[0].prompt_id == "7" and not loaded.rows[0].has_pair
    assert loaded.rows[1].prompt_messages == ({"role": "user", "content": "What is 4?"},)
    # a preference file read as prompts keeps its prompts
    pref = read_rows(write_jsonl(tmp_path / "d.jsonl", RECORDS), kind="prompt")
    assert [r.prompt for r in pref.rows] == [r["prompt"] for r in RECORDS]
    with pytest.raises(ValueError, match="prompt-only row cannot be tokenised"):
        tokenize_row(loaded.rows[0], None, index=0, max_length=64, max_prompt_length=32)


def test_write_rows_round_trip(tmp_path):
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", RECORDS)).rows
    write_rows(rows, tmp_path / "out" / "again.jsonl")
    assert read_rows(tmp_path / "out" / "again.jsonl").rows == [
        r.__class__(**{**r.__dict__, "source": f"{tmp_path / 'out' / 'again.jsonl'}:{i + 1}"})
        for i, r in enumerate(rows)]


def _bad(name):
    good = pair("What is 2 plus 3?", "5.", "6.")
    user = {"role": "user", "content": "What is 2 plus 3?"}
    cases = {
        "missing field": ({k: v for k, v in good.items() if k != "rejected"},
                          "missing field 'rejected'"),
        "missing prompt": ({k: v for k, v in good.items() if k != "prompt"},
                           "missing field 'prompt'"),
        "wrong role order": ({**good, "chosen": [{"role": "assistant", "content": "5."}, user]},
                             "chosen has role order \\['assistant', 'user'\\]"),
        "two user turns": ({**good, "rejected": [user, user, {"role": "assistant",
                                                              "content": "6."}]},
                           "rejected has role order"),
        "unknown role": ({**good, "chosen": [{"role": "bot", "content": "x"}, user]},
                         "chosen\\[0\\] has role 'bot'"),
        "empty response": ({**good, "rejected": [user, {"role": "assistant", "content": "  "}]},
                           "rejected has an empty final assistant response"),
        "different history": ({**good, "rejected": [{"role": "user", "content": "Other?"},
                                                    {"role": "assistant", "content": "6."}]},
                              "chosen and rejected differ before their final assistant turn"),
        "not utf-8 surrogate": ({**good, "prompt": "bad \ud800 text"},
                                "prompt is not valid UTF-8"),
        "wrong type": ({**good, "prompt": 12}, "prompt must be a string, got int"),
    }
    return cases[name]


BAD_CASES = ["missing field", "missing prompt", "wrong role order", "two user turns",
             "unknown role", "empty response", "different history", "not utf-8 surrogate",
             "wrong type"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_row_error_names_file_row_rule_and_fix(tmp_path, case):
    record, rule = _bad(case)
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], record, RECORDS[1]])
    with pytest.raises(DataError, match=rf"bad\.jsonl row 2: {rule}.*Fix: ") as info:
        read_rows(path)
    assert info.value.row == 2 and info.value.path == str(path)


def _raw_lines(tmp_path, middle: bytes):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + middle + b"\n"
                     + json.dumps(RECORDS[1]).encode() + b"\n")
    return path


def test_invalid_utf8_bytes_name_the_line(tmp_path):
    line = json.dumps(pair("What is 2 plus 3?", "5.", "6.")).encode().replace(b"5.", b"5\xff.")
    with pytest.raises(DataError, match=r"raw\.jsonl row 2: the line is not valid UTF-8.*Fix: "):
        read_rows(_raw_lines(tmp_path, line))


def test_bad_json_names_the_line(tmp_path):
    with pytest.raises(DataError, match=r"raw\.jsonl row 2: invalid JSON .*Fix: one|Fix: write"):
        read_rows(_raw_lines(tmp_path, b'{"prompt": "x", "chosen": [}'))
    with pytest.raises(DataError, match=r"row 2: a row must be a JSON object, got list"):
        read_rows(_raw_lines(tmp_path, b"[1, 2]"))


def test_mixed_reference_response_is_an_error(tmp_path):
    no_yref = pair("What is 2 plus 3?", "5.", "6.")
    with pytest.raises(DataError, match=r"row 2: reference_response is missing but earlier rows"):
        read_rows(write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], no_yref]))


def test_skip_bad_rows_counts_logs_and_returns(tmp_path, caplog):
    records = [RECORDS[0]] + [_bad(case)[0] | {"reference_response": "x."} for case in BAD_CASES]
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, records + [RECORDS[1]])
    with open(path, "ab") as f:
        f.write(b"{not json\n" + json.dumps(RECORDS[2]).encode().replace(b"It", b"\xfe") + b"\n")
    with caplog.at_level(logging.WARNING, logger="selm_mcore.data"):
        loaded = read_rows(path, skip_bad_rows=True)
    expected_skips = len(BAD_CASES) + 2
    assert loaded.num_skipped == expected_skips == len(loaded.skipped)
    assert [r.prompt for r in loaded.rows] == [RECORDS[0]["prompt"], RECORDS[1]["prompt"]]
    assert f"skipped {expected_skips} of {expected_skips + 2} rows" in caplog.text
    assert [e.row for e in loaded.skipped] == list(range(2, 2 + len(BAD_CASES))) + [
        len(BAD_CASES) + 3, len(BAD_CASES) + 4]
    with pytest.raises(DataError, match="all 1 rows are invalid"):
        read_rows(write_jsonl(tmp_path / "one.jsonl", [_bad("missing field")[0]]),
                  skip_bad_rows=True)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        read_rows(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_rows(tmp_path / "empty.jsonl")


def test_parquet_and_jsonl_give_identical_tokens(tmp_path, tokenizer):
    # one row lacks prompt_id: Parquet stores a null there, which must read as absent
    records = [RECORDS[0], {k: v for k, v in RECORDS[1].items() if k != "prompt_id"}, RECORDS[2]]
    datasets = {}
    for fmt, writer in (("jsonl", write_jsonl), ("parquet", write_parquet)):
        rows = read_rows(writer(tmp_path / f"d.{fmt}", records)).rows
        datasets[fmt] = PreferenceDataset.from_rows(rows, tokenizer, max_length=64,
                                                    max_prompt_length=32)
    assert datasets["jsonl"].examples == datasets["parquet"].examples
    assert datasets["jsonl"].content_hash() == datasets["parquet"].content_hash()
    rows = read_rows(tmp_path / "d.parquet").rows
    assert rows[1].prompt_id is None and rows[2].prompt_id is None and rows[0].prompt_id == "p0"


def test_parquet_bad_row_names_the_row(tmp_path):
    path = write_parquet(tmp_path / "d.parquet",
                         [RECORDS[0], RECORDS[1], pair("Q?", "", "x") | RECORDS[0]
                          | {"rejected": [{"role": "user", "content": "What is 2 plus 3?"},
                                          {"role": "assistant", "content": ""}]}])
    with pytest.raises(DataError, match=r"d\.parquet row 3: rejected has an empty final"):
        read_rows(path)


def test_parquet_invalid_utf8_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [RECORDS[0], RECORDS[1], RECORDS[0]]
    table = pa.Table.from_pylist(records)
    # bytes that are not UTF-8 inside a string column (pyarrow itself refuses to write them, other
    # writers do not), and in a binary column
    prompts = pa.array([r["prompt"].encode() for r in records[:2]] + [b"bad \xff"],
                       type=pa.binary())
    for name, column in (("string", prompts.view(pa.string())), ("binary", prompts)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", column),
                       path)
        with pytest.raises(DataError, match=rf"{name}\.parquet row 3: .*not valid UTF-8.*Fix: "):
            read_rows(path)
        loaded = read_rows(path, skip_bad_rows=True)
        assert loaded.num_skipped == 1 and len(loaded.rows) == 2


# --- rounds -----------------------------------------------------------------------------------


def test_split_rounds_contiguous_equal_tail_unused():
    rows = list(range(11))
    assert split_rounds(rows, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert split_rounds(rows, 1) == [rows]
    # UltraFeedback train_prefs in thirds (Llama-3) and quarters (Zephyr)
    assert [len(p) for p in split_rounds(range(61135), 3)] == [20378] * 3
    assert [len(p) for p in split_rounds(range(61135), 4)] == [15283] * 4
    with pytest.raises(ValueError, match="cannot be split into 12"):
        split_rounds(rows, 12)


# --- tokenisation and truncation --------------------------------------------------------------


def test_tokens_and_labels_match_hand_tokenisation(tmp_path, tokenizer):
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", RECORDS)).rows
    dataset = PreferenceDataset.from_rows(rows, tokenizer, max_length=256, max_prompt_length=128)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for record, example in zip(RECORDS, dataset.examples, strict=True):
        history = record["chosen"][:-1]
        assert list(example.prompt_ids) == tokenizer(chatml(history),
                                                     add_special_tokens=False)["input_ids"]
        # the template writes no BOS of its own: exactly one <|im_start|> per turn
        assert example.prompt_ids.count(tokenizer.bos_token_id) == len(history) + 1
        for content, ids in ((record["chosen"][-1]["content"], example.chosen_ids),
                             (record["rejected"][-1]["content"], example.rejected_ids),
                             (record["reference_response"], example.yref_ids)):
            assert list(ids) == tokenizer(content, add_special_tokens=False)["input_ids"] + [eos]

    batch = collate_preferences(dataset.examples, pad_id=tokenizer.pad_token_id)
    responses = [e.chosen_ids for e in dataset.examples] + \
        [e.rejected_ids for e in dataset.examples] + [e.yref_ids for e in dataset.examples]
    contents = [r["chosen"][-1]["content"] for r in RECORDS] + \
        [r["rejected"][-1]["content"] for r in RECORDS] + [r["reference_response"] for r in RECORDS]
    for i, (ids, content) in enumerate(zip(responses, contents, strict=True)):
        mask = batch.loss_mask[i].bool()
        # the labelled positions are exactly the response (and EOS), nothing of the prompt
        assert batch.labels[i][mask].tolist() == list(ids)
        assert tokenizer.decode(batch.labels[i][mask]) == content + "<|im_end|>"
        prompt_len = len(dataset.examples[i % 3].prompt_ids)
        assert batch.tokens[i, :prompt_len].tolist() == list(dataset.examples[i % 3].prompt_ids)
        assert mask.nonzero()[0].item() == prompt_len - 1


def test_truncate_rules():
    prompt = list(range(100, 180))  # 80 tokens
    short, long_ = list(range(10)), list(range(50))
    # fits: untouched
    assert truncate(prompt[:20], [short, short], 64, 32) == (prompt[:20], [short, short], False,
                                                             False)
    # long prompt, short responses: keep the prompt's END only
    p, r, pc, rc = truncate(prompt, [short, short[:5]], 64, 32)
    assert p == prompt[-32:] and r == [short, short[:5]] and (pc, rc) == (True, False)
    # long prompt and long response: both cut, every response to max_length - max_prompt_length
    p, r, pc, rc = truncate(prompt, [long_, short], 64, 32)
    assert p == prompt[-32:] and r == [long_[:32], short] and (pc, rc) == (True, True)
    # short prompt, long response: the prompt stays, responses cut to 32 (as the reference does)
    p, r, pc, rc = truncate(prompt[:20], [short, long_], 64, 32)
    assert p == prompt[:20] and r == [short, long_[:32]] and (pc, rc) == (False, True)
    # a long y_ref (third response) counts in "longest"
    p, r, pc, rc = truncate(prompt[:40], [short, short, long_], 64, 32)
    assert p == prompt[8:40] and r == [short, short, long_[:32]] and (pc, rc) == (True, True)


def test_truncation_counts_and_keep_end_on_real_rows(tmp_path, tokenizer, caplog):
    long_prompt = " ".join(f"word{i}" for i in range(40))
    long_answer = "the answer is " * 30
    records = [
        pair("Short?", "Yes.", "No."),
        pair(long_prompt, "Yes.", "No."),                 # prompt cut
        pair(long_prompt, long_answer, "No."),            # prompt and responses cut
        pair("Short?", "Yes.", long_answer),              # responses cut only
    ]
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", records)).rows
    with caplog.at_level(logging.INFO, logger="selm_mcore.data"):
        dataset = PreferenceDataset.from_rows(rows, tokenizer, max_length=64, max_prompt_length=32)
    assert (dataset.stats.prompt_truncated, dataset.stats.response_truncated) == (2, 2)
    assert "2 prompts truncated" in caplog.text and "2 examples with responses cut to 32" in \
        caplog.text
    full_prompt = tokenizer(chatml([{"role": "user", "content": long_prompt}]),
                            add_special_tokens=False)["input_ids"]
    assert len(full_prompt) > 32
    assert list(dataset[1].prompt_ids) == full_prompt[-32:]  # ends with the generation prompt
    assert tokenizer.decode(dataset[1].prompt_ids).endswith("<|im_start|>assistant\n")
    full_answer = tokenizer(long_answer, add_special_tokens=False)["input_ids"]
    assert list(dataset[2].chosen_ids) == full_answer[:32]  # EOS cut off, as in the reference
    assert list(dataset[3].rejected_ids) == full_answer[:32]
    assert len(dataset[3].prompt_ids) < 32 and not dataset[3].prompt_truncated
    assert dataset.max_sequence_length() <= 64
    assert not dataset[0].prompt_truncated and not dataset[0].response_truncated


# --- collation --------------------------------------------------------------------------------


def test_collation_layout_padding_and_shift(tmp_path, tokenizer):
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", RECORDS)).rows
    dataset = PreferenceDataset.from_rows(rows, tokenizer, max_length=256, max_prompt_length=128)
    examples = [dataset[2], dataset[0]]
    pad = tokenizer.pad_token_id
    batch = collate_preferences(examples, pad_id=pad, pad_to_multiple_of=64)
    n, t = batch.tokens.shape
    assert n == 6 and batch.sequences_per_example == 3 and batch.num_examples == 2
    longest = max(len(e.prompt_ids) + len(r) for e in examples for r in e.responses)
    assert t == -(-longest // 64) * 64 and t >= longest
    assert batch.example_indices.tolist() == [2, 0]
    order = [(e, s) for s in range(3) for e in examples]  # chosen_0, chosen_1, rejected_0, ...
    for i, (example, s) in enumerate(order):
        ids = list(example.prompt_ids) + list(example.responses[s])
        assert batch.tokens[i, :len(ids)].tolist() == ids
        assert (batch.tokens[i, len(ids):] == pad).all()
        assert batch.loss_mask[i].sum().item() == len(example.responses[s])
        assert (batch.loss_mask[i, len(ids) - 1:] == 0).all()
    assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])
    assert (batch.labels[:, -1] == pad).all()
    assert torch.equal(batch.position_ids, torch.arange(t).expand(n, t))
    assert batch.loss_mask.dtype == torch.float32 and batch.tokens.dtype == torch.long
    chosen, rejected, yref = batch.split(torch.arange(6))
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3] and yref.tolist() == [4, 5]

    fixed = collate_preferences(examples, pad_id=pad, seq_length=200)
    assert fixed.tokens.shape == (6, 200)
    assert torch.equal(fixed.tokens[:, :longest], batch.tokens[:, :longest])
    assert torch.equal(fixed.loss_mask[:, :longest], batch.loss_mask[:, :longest])
    assert fixed.loss_mask[:, longest:].sum() == 0
    with pytest.raises(ValueError, match="> seq_length=8"):
        collate_preferences(examples, pad_id=pad, seq_length=8)


def test_collation_without_yref(tmp_path, tokenizer):
    records = [{k: v for k, v in r.items() if k != "reference_response"} for r in RECORDS]
    dataset = PreferenceDataset.from_file(write_jsonl(tmp_path / "d.jsonl", records), tokenizer,
                                          max_length=256, max_prompt_length=128)
    assert not dataset.has_yref
    batch = collate_preferences(dataset.examples, pad_id=0, pad_to_multiple_of=16)
    assert batch.tokens.shape[0] == 6 and batch.sequences_per_example == 2
    chosen, rejected, yref = batch.split(batch.loss_mask.sum(1))
    assert yref is None
    assert chosen.tolist() == [len(e.chosen_ids) for e in dataset.examples]
    assert rejected.tolist() == [len(e.rejected_ids) for e in dataset.examples]


# --- hashing ----------------------------------------------------------------------------------


def test_row_and_content_hash(tmp_path, tokenizer):
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", RECORDS)).rows
    a = PreferenceDataset.from_rows(rows, tokenizer, max_length=256, max_prompt_length=128)
    b = PreferenceDataset.from_rows(rows, tokenizer, max_length=256, max_prompt_length=128)
    assert a.content_hash() == b.content_hash() and len(a.content_hash()) == 64
    example = a[0]
    changed = example.__class__(**{**example.__dict__,
                                   "chosen_ids": example.chosen_ids[:-1] + (7,)})
    no_yref = example.__class__(**{**example.__dict__, "yref_ids": None})
    hashes = {row_hash(example), row_hash(changed), row_hash(no_yref)}
    assert len(hashes) == 3
    # moving a token from the prompt to a response changes the hash (lengths are hashed)
    moved = example.__class__(**{**example.__dict__, "prompt_ids": example.prompt_ids[:-1],
                                 "chosen_ids": example.prompt_ids[-1:] + example.chosen_ids})
    assert row_hash(moved) != row_hash(example)
    assert content_hash(a.examples[::-1]) != a.content_hash()
    cut = PreferenceDataset.from_rows(rows, tokenizer, max_length=24, max_prompt_length=12)
    assert cut.content_hash() != a.content_hash()


# --- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_dp_shards_are_disjoint_slices_of_each_global_batch(shuffle):
    n, gbs, dp = 37, 8, 2
    samplers = [DistributedBatchSampler(n, gbs, dp_rank=r, dp_size=dp, shuffle=shuffle, seed=3)
                for r in range(dp)]
    order = samplers[0].epoch_order()
    assert sorted(order) == list(range(n))
    assert (order == list(range(n))) == (not shuffle)
    per_rank = [list(s) for s in samplers]
    assert [len(steps) for steps in per_rank] == [4, 4]  # 37 // 8; the tail of 5 is dropped
    for step in range(4):
        shards = [per_rank[r][step] for r in range(dp)]
        assert all(len(s) == gbs // dp for s in shards)
        assert not set(shards[0]) & set(shards[1])
        assert shards[0] + shards[1] == order[step * gbs:(step + 1) * gbs]


def test_sampler_resume_continues_exactly():
    full = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5)
    uninterrupted = list(full)
    assert full.consumed_samples == 40 and len(full) == 0

    first = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5)
    it = iter(first)
    seen = [next(it), next(it)]
    state = first.state_dict()
    assert state["consumed_samples"] == 16
    resumed = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5)
    resumed.load_state_dict(state)
    assert len(resumed) == 3
    assert seen + list(resumed) == uninterrupted
    again = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5, consumed_samples=16)
    assert list(again) == uninterrupted[2:]

    other_epoch = DistributedBatchSampler(40, 8, dp_rank=1, dp_size=2, seed=5, epoch=1)
    assert other_epoch.epoch_order() != full.epoch_order()
    with pytest.raises(ValueError, match="consumed_samples=12 must be a multiple"):
        DistributedBatchSampler(40, 8, consumed_samples=12)
    with pytest.raises(ValueError, match="saved with global_batch_size=8"):
        DistributedBatchSampler(40, 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of the data-parallel size 3"):
        DistributedBatchSampler(40, 8, dp_size=3)
    with pytest.raises(ValueError, match="fewer than train.global_batch_size"):
        DistributedBatchSampler(5, 8)


def test_micro_batches():
    assert micro_batches([4, 9, 1, 7], 2) == [[4, 9], [1, 7]]
    with pytest.raises(ValueError, match="must divide the per-rank batch of 4"):
        micro_batches([4, 9, 1, 7], 3)
