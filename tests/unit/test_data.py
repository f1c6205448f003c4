"""selm_mcore.data.rows: reading + validation of preference / prompt rows, the round portions
(selm_mcore.data.portions), and the one rule for which conversation a row asks the policy to
continue (``prompt_conversation``).

Tokenisation is in test_dataset.py, collation and sampling in test_batches.py; ``sample_rows``
(tests/unit/conftest.py) are two single-turn rows and a multi-turn row with a system turn.
"""

from __future__ import annotations

import json
import logging

import pytest

from selm_mcore.data.portions import file_portion, split_rounds
from selm_mcore.data.rows import (
    DataError,
    prompt_conversation,
    raw_prompt,
    read_rows,
    write_rows,
)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --- reading and validation -------------------------------------------------------------------


def test_reads_preference_rows(tmp_path, write_jsonl, sample_rows):
    loaded = read_rows(write_jsonl(tmp_path / "d.jsonl", sample_rows))
    assert loaded.kind == "preference" and loaded.num_skipped == 0
    first, _, multi = loaded.rows
    assert first.prompt == "What is 2 plus 3?" and first.prompt_id == "p0"
    assert first.chosen == "The answer is 5." and first.rejected == "It is 6."
    assert first.reference_response == "5."
    assert first.prompt_messages == ({"role": "user", "content": "What is 2 plus 3?"},)
    assert [m["role"] for m in multi.prompt_messages] == ["system", "user", "assistant", "user"]
    assert multi.prompt_id is None
    assert first.source == f"{tmp_path / 'd.jsonl'}:1"


def test_reads_prompt_only_rows(tmp_path, write_jsonl, sample_rows):
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "Hi there.", "prompt_id": 7}, {"prompt": "What is 4?"}],
    )
    loaded = read_rows(path)
    assert loaded.kind == "prompt"
    assert [r.prompt for r in loaded.rows] == ["Hi there.", "What is 4?"]
    assert loaded.rows[0].prompt_id == "7" and not loaded.rows[0].has_pair
    assert loaded.rows[1].prompt_messages == ({"role": "user", "content": "What is 4?"},)
    # a preference file read as prompts keeps its prompts
    pref = read_rows(write_jsonl(tmp_path / "d.jsonl", sample_rows), kind="prompt")
    assert [r.prompt for r in pref.rows] == [r["prompt"] for r in sample_rows]


def test_write_rows_round_trip(tmp_path, write_jsonl, sample_rows):
    rows = read_rows(write_jsonl(tmp_path / "d.jsonl", sample_rows)).rows
    write_rows(rows, tmp_path / "out" / "again.jsonl")
    assert read_rows(tmp_path / "out" / "again.jsonl").rows == [
        r.__class__(**{**r.__dict__, "source": f"{tmp_path / 'out' / 'again.jsonl'}:{i + 1}"})
        for i, r in enumerate(rows)
    ]


BAD_CASES = [
    "missing field",
    "missing prompt",
    "wrong role order",
    "two user turns",
    "unknown role",
    "empty response",
    "different history",
    "not utf-8 surrogate",
    "wrong type",
]


def bad_record(pair, name):
    """(a row that breaks one rule, the rule as the error names it); ``pair`` builds rows."""
    good = pair("What is 2 plus 3?", "5.", "6.")
    user = {"role": "user", "content": "What is 2 plus 3?"}
    cases = {
        "missing field": (
            {k: v for k, v in good.items() if k != "rejected"},
            "missing field 'rejected'",
        ),
        "missing prompt": (
            {k: v for k, v in good.items() if k != "prompt"},
            "missing field 'prompt'",
        ),
        "wrong role order": (
            {**good, "chosen": [{"role": "assistant", "content": "5."}, user]},
            "chosen has role order \\['assistant', 'user'\\]",
        ),
        "two user turns": (
            {**good, "rejected": [user, user, {"role": "assistant", "content": "6."}]},
            "rejected has role order",
        ),
        "unknown role": (
            {**good, "chosen": [{"role": "bot", "content": "x"}, user]},
            "chosen\\[0\\] has role 'bot'",
        ),
        "empty response": (
            {**good, "rejected": [user, {"role": "assistant", "content": "  "}]},
            "rejected has an empty final assistant response",
        ),
        "different history": (
            {
                **good,
                "rejected": [
                    {"role": "user", "content": "Other?"},
                    {"role": "assistant", "content": "6."},
                ],
            },
            "chosen and rejected differ before their final assistant turn",
        ),
        "not utf-8 surrogate": ({**good, "prompt": "bad \ud800 text"}, "prompt is not valid UTF-8"),
        "wrong type": ({**good, "prompt": 12}, "prompt must be a string, got int"),
    }
    return cases[name]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_row_error_names_file_row_rule_and_fix(
    tmp_path, write_jsonl, preference_row, sample_rows, case
):
    record, rule = bad_record(preference_row, case)
    path = write_jsonl(tmp_path / "bad.jsonl", [sample_rows[0], record, sample_rows[1]])
    with pytest.raises(DataError, match=rf"bad\.jsonl row 2: {rule}.*Fix: ") as info:
        read_rows(path)
    assert info.value.row == 2 and info.value.path == str(path)


def _raw_lines(tmp_path, rows, middle: bytes):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(
        json.dumps(rows[0]).encode() + b"\n" + middle + b"\n" + json.dumps(rows[1]).encode() + b"\n"
    )
    return path


def test_invalid_utf8_bytes_name_the_line(tmp_path, preference_row, sample_rows):
    line = (
        json.dumps(preference_row("What is 2 plus 3?", "5.", "6."))
        .encode()
        .replace(b"5.", b"5\xff.")
    )
    with pytest.raises(DataError, match=r"raw\.jsonl row 2: the line is not valid UTF-8.*Fix: "):
        read_rows(_raw_lines(tmp_path, sample_rows, line))


def test_bad_json_names_the_line(tmp_path, sample_rows):
    with pytest.raises(DataError, match=r"raw\.jsonl row 2: invalid JSON .*Fix: one|Fix: write"):
        read_rows(_raw_lines(tmp_path, sample_rows, b'{"prompt": "x", "chosen": [}'))
    with pytest.raises(DataError, match=r"row 2: a row must be a JSON object, got list"):
        read_rows(_raw_lines(tmp_path, sample_rows, b"[1, 2]"))


def test_mixed_reference_response_is_an_error(tmp_path, write_jsonl, preference_row, sample_rows):
    no_yref = preference_row("What is 2 plus 3?", "5.", "6.")
    with pytest.raises(DataError, match=r"row 2: reference_response is missing but earlier rows"):
        read_rows(write_jsonl(tmp_path / "d.jsonl", [sample_rows[0], no_yref]))


def test_skip_bad_rows_counts_logs_and_returns(
    tmp_path, caplog, write_jsonl, preference_row, sample_rows
):
    bad = [bad_record(preference_row, case)[0] | {"reference_response": "x."} for case in BAD_CASES]
    path = write_jsonl(tmp_path / "mixed.jsonl", [sample_rows[0]] + bad + [sample_rows[1]])
    with open(path, "ab") as f:
        f.write(
            b"{not json\n" + json.dumps(sample_rows[2]).encode().replace(b"It", b"\xfe") + b"\n"
        )
    with caplog.at_level(logging.WARNING, logger="selm_mcore.data.rows"):
        loaded = read_rows(path, skip_bad_rows=True)
    expected_skips = len(BAD_CASES) + 2
    assert loaded.num_skipped == expected_skips == len(loaded.skipped)
    assert [r.prompt for r in loaded.rows] == [sample_rows[0]["prompt"], sample_rows[1]["prompt"]]
    assert f"skipped {expected_skips} of {expected_skips + 2} rows" in caplog.text
    assert [e.row for e in loaded.skipped] == list(range(2, 2 + len(BAD_CASES))) + [
        len(BAD_CASES) + 3,
        len(BAD_CASES) + 4,
    ]
    with pytest.raises(DataError, match="all 1 rows are invalid"):
        read_rows(
            write_jsonl(tmp_path / "one.jsonl", [bad_record(preference_row, "missing field")[0]]),
            skip_bad_rows=True,
        )


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        read_rows(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no rows"):
        read_rows(tmp_path / "empty.jsonl")


def test_parquet_reads_like_jsonl_and_null_ids_are_absent(tmp_path, write_jsonl, sample_rows):
    # one row lacks prompt_id: Parquet stores a null there, which must read as absent
    rows = [
        sample_rows[0],
        {k: v for k, v in sample_rows[1].items() if k != "prompt_id"},
        sample_rows[2],
    ]
    from_jsonl = read_rows(write_jsonl(tmp_path / "d.jsonl", rows)).rows
    from_parquet = read_rows(write_parquet(tmp_path / "d.parquet", rows)).rows
    assert [r.__dict__ | {"source": ""} for r in from_parquet] == [
        r.__dict__ | {"source": ""} for r in from_jsonl
    ]
    assert [r.prompt_id for r in from_parquet] == ["p0", None, None]
    assert from_parquet[2].source == f"{tmp_path / 'd.parquet'}:3"


def test_parquet_bad_row_names_the_row(tmp_path, preference_row, sample_rows):
    empty = (
        preference_row("Q?", "", "x")
        | sample_rows[0]
        | {
            "rejected": [
                {"role": "user", "content": "What is 2 plus 3?"},
                {"role": "assistant", "content": ""},
            ]
        }
    )
    path = write_parquet(tmp_path / "d.parquet", [sample_rows[0], sample_rows[1], empty])
    with pytest.raises(DataError, match=r"d\.parquet row 3: rejected has an empty final"):
        read_rows(path)


def test_parquet_invalid_utf8_names_the_row(tmp_path, sample_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [sample_rows[0], sample_rows[1], sample_rows[0]]
    table = pa.Table.from_pylist(rows)
    # bytes that are not UTF-8 inside a string column (pyarrow itself refuses to write them, other
    # writers do not), and in a binary column
    prompts = pa.array([r["prompt"].encode() for r in rows[:2]] + [b"bad \xff"], type=pa.binary())
    for name, column in (("string", prompts.view(pa.string())), ("binary", prompts)):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(
            table.set_column(table.schema.get_field_index("prompt"), "prompt", column), path
        )
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


def test_file_portions_split_the_original_rows_and_skip_inside(tmp_path, preference_row):
    """Bad rows are skipped inside their portion; the boundaries are those of the whole file
    (12 records -> rows 1-4, 5-8, 9-12), as the reference slices train_prefs[a:b]."""
    lines = [json.dumps(preference_row(f"q{i}", f"a{i}", f"b{i}")) for i in range(12)]
    lines[0] = json.dumps(preference_row("q0", "a0", "  "))  # an empty response
    lines[1] = "{not json"
    lines[6] = json.dumps({"prompt": "q6"})  # no pair in a preference file
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is not a row
    loaded = read_rows(path, skip_bad_rows=True)
    assert loaded.num_skipped == 3 and loaded.record_rows == list(range(1, 13))
    portions = [file_portion(loaded, 3, k) for k in (1, 2, 3)]
    assert [[r.prompt for r in p.rows] for p in portions] == [
        ["q2", "q3"],
        ["q4", "q5", "q7"],
        ["q8", "q9", "q10", "q11"],
    ]
    assert [(p.first_row, p.last_row, p.num_records) for p in portions] == [
        (1, 4, 4),
        (5, 8, 4),
        (9, 12, 4),
    ]
    assert [[e.row for e in p.skipped] for p in portions] == [[1, 2], [7], []]
    # quarters of the same file (the Zephyr split), the remainder unused
    assert [(p.first_row, p.last_row) for p in (file_portion(loaded, 5, k) for k in (1, 5))] == [
        (1, 2),
        (9, 10),
    ]
    with pytest.raises(ValueError, match="portion 4 does not exist"):
        file_portion(loaded, 3, 4)


# --- which conversation a row continues -------------------------------------------------------


def test_prompt_conversation_of_each_row_shape(sample_rows):
    multi = sample_rows[2]
    # A preference row continues its whole prompt conversation (system turn and earlier turns),
    # not just its `prompt` text; the raw prompt (what a ranker sees) is still `prompt`.
    conversation = prompt_conversation(multi)
    assert conversation == multi["chosen"][:-1] and conversation[0] == SYSTEM
    assert raw_prompt(multi, conversation) == "Explain briefly."
    # prompt-only rows: one user turn
    assert prompt_conversation({"prompt": "Hi"}) == [{"role": "user", "content": "Hi"}]
    # `messages` (UltraFeedback keeps the chosen reply there): trailing assistant turns dropped;
    # without `prompt` the raw prompt is the last user turn
    row = {
        "messages": [
            SYSTEM,
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ]
    }
    assert prompt_conversation(row) == row["messages"][:4]
    assert raw_prompt(row, prompt_conversation(row)) == "Q2"
    # the returned turns are copies: editing them leaves the row alone
    prompt_conversation(multi)[0]["content"] = "changed"
    assert multi["chosen"][0] == SYSTEM


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "Q", "chosen": [{"role": "user", "content": "Q"}]},
            "'chosen' must be a message list ending with an assistant turn",
        ),
        ({"prompt": "Q", "chosen": []}, "'chosen' must be a message list"),
        ({"messages": [{"role": "assistant", "content": "A"}]}, "needs 'prompt'"),
        ({"prompt_id": "x"}, "needs 'prompt'"),
    ],
)
def test_prompt_conversation_refuses_rows_without_a_prompt(row, message):
    with pytest.raises(ValueError, match=rf"prompts\.jsonl row 3: {message}"):
        prompt_conversation(row, "prompts.jsonl row 3")


def test_generation_prompt_rows_follow_prompt_conversation(sample_rows):
    """`selm generate` renders exactly the conversation prompt_conversation names (a preference
    row's system and earlier turns included) and reports the raw prompt text."""
    from selm_mcore.rollout.generate import prompt_row

    prompt = prompt_row({**sample_rows[2], "prompt_id": "m"}, "row 0")
    assert prompt.prompt_id == "m" and prompt.prompt == "Explain briefly."
    assert prompt.messages == sample_rows[2]["chosen"][:-1]
    with pytest.raises(ValueError, match="row 1: missing 'prompt_id'"):
        prompt_row({"prompt": "Q"}, "row 1")


# --- row size and duplicates ------------------------------------------------------------------


def test_a_row_over_max_row_bytes_is_refused_or_skipped_before_tokenisation(
    tmp_path, write_jsonl, preference_row
):
    huge = "é" * 600_000  # 1.2 MB of UTF-8 in 600k characters: bytes are counted, not chars
    rows = [
        preference_row("q0", "a", "b"),
        preference_row("q1", huge, "b"),
        preference_row("q2", "a", "b"),
    ]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"big.jsonl row 2: the row holds 1200\d+ bytes of text .*"
        r"over data.max_row_bytes=1000000. Fix: .*skip_bad_rows",
    ):
        read_rows(path, max_row_bytes=1_000_000)
    loaded = read_rows(path, max_row_bytes=1_000_000, skip_bad_rows=True)
    assert [r.prompt for r in loaded.rows] == ["q0", "q2"] and loaded.num_skipped == 1
    assert len(read_rows(path, max_row_bytes=0).rows) == 3  # 0 = no limit
    assert len(read_rows(path, max_row_bytes=1_300_000).rows) == 3


def test_duplicates_are_counted_and_named(tmp_path, caplog, write_jsonl, preference_row):
    rows = [
        preference_row("q0", "a", "b", prompt_id="p0"),
        preference_row("q1", "c", "d", prompt_id="p1"),
        preference_row("q0", "a", "b", prompt_id="p0"),  # repeats row 1 (and its id)
        preference_row("q2", "same", "same", prompt_id="p1"),  # id of row 2, no preference
        preference_row("q3", "e", "f", prompt_id="p3"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="selm_mcore.data.rows"):
        loaded = read_rows(path)
    report = loaded.duplicates
    assert (report.repeated_rows, report.repeated_prompt_ids, report.chosen_equals_rejected) == (
        1,
        2,
        1,
    )
    assert "1 rows repeat an earlier row (e.g. row 3 repeats row 1)" in caplog.text
    assert (
        "2 rows repeat an earlier row's prompt_id (e.g. row 3 repeats prompt_id 'p0' of "
        "row 1; row 4 repeats prompt_id 'p1' of row 2)"
    ) in caplog.text
    assert "1 rows have chosen == rejected" in caplog.text and "(e.g. row 4)" in caplog.text
    assert len(loaded.rows) == 5  # counted and reported, not dropped
    caplog.clear()
    clean = read_rows(write_jsonl(tmp_path / "c.jsonl", rows[:2]))
    assert not clean.duplicates.any() and "repeat" not in caplog.text
