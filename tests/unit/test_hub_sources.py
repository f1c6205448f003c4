"""Datasets by name (hf://OWNER/NAME[/CONFIG][:SPLIT]) through the real ``datasets`` library,
offline, from parquet shards laid out in a hub cache as the hub serves them
(``selm_mcore.testing.hub_cache``), and the common preference schemas.

The reads run in one child process whose environment points HF_HUB_CACHE / HF_DATASETS_CACHE
at this test's folders with HF_HUB_OFFLINE=1 (the libraries read these at import). Every
result is compared with the rows the test wrote, not with another read of the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from child_env import child_env

from selm_mcore.data.sources import normalize_record, read_source_records
from selm_mcore.testing.hub_cache import write_hub_dataset, write_hub_files

pytest.importorskip("datasets")


def _uf_row(i: int, split: str) -> dict:
    prompt = f"{split} question {i}: what is {i} + {i}?"
    user = {"role": "user", "content": prompt}
    chosen = [user, {"role": "assistant", "content": f"{2 * i}."}]
    return {
        "prompt": prompt,
        "prompt_id": f"{split}-{i:03d}",
        "chosen": chosen,
        "rejected": [user, {"role": "assistant", "content": f"{2 * i + 1}."}],
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


UF_TRAIN = [_uf_row(i, "train") for i in range(12)]
UF_TEST = [_uf_row(i, "test") for i in range(3)]
STRING_PAIRS = [
    {"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"not {w}"} for w in ("a", "b", "c")
]
ALPACA = [
    {"instruction": f"Name a colour ({i}).", "output": "Blue.", "generator": "gpt4_turbo",
     "dataset": "helpful_base"}
    for i in range(4)
]  # fmt: skip

CHILD = r"""
import json, sys
from selm_mcore.config.io import load_config
from selm_mcore.data.hub import HubDatasetError
from selm_mcore.data.portions import portion_records
from selm_mcore.data.rows import read_rows
from selm_mcore.data.sources import read_source_records, source_hash

local = sys.argv[1]
out = {}
out["uf_train"] = read_source_records("hf://acme/uf_binarized:train_prefs")
out["uf_test"] = read_source_records("hf://acme/uf_binarized:test_prefs")
out["strings"] = [
    [r.prompt, r.chosen, r.rejected] for r in read_rows("hf://acme/pairs_strings").rows
]
out["alpaca"] = read_source_records("hf://acme/alpaca_eval/alpaca_eval_gpt4_baseline:eval")
out["hash_stable"] = source_hash("hf://acme/uf_binarized:train_prefs") == source_hash(
    "hf://acme/uf_binarized:train_prefs"
)
out["hash_differs"] = source_hash("hf://acme/uf_binarized:train_prefs") != source_hash(
    "hf://acme/uf_binarized:test_prefs"
)
portions = {}
for name, path in (("hub", "hf://acme/uf_binarized:train_prefs"), ("local", local)):
    cfg = load_config(None, [f"data.train_path={path}", "online.rounds=3"])
    portions[name] = [[r["prompt_id"] for r in portion_records(cfg, t)] for t in (1, 2, 3)]
out["portions"] = portions
errors = {}
for label, spec in (
    ("several_splits", "hf://acme/uf_binarized"),
    ("absent", "hf://acme/not_downloaded:train"),
    ("bad_name", "hf://just-a-name"),
):
    try:
        read_source_records(spec)
        errors[label] = None
    except HubDatasetError as exc:
        errors[label] = str(exc)
out["errors"] = errors
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_reads(tmp_path_factory, write_jsonl):
    root = tmp_path_factory.mktemp("hub_sources")
    hub = root / "hub"
    write_hub_dataset(hub, "acme/uf_binarized", {"train_prefs": UF_TRAIN, "test_prefs": UF_TEST},
                      shards=3)  # fmt: skip
    write_hub_dataset(hub, "acme/pairs_strings", {"train": STRING_PAIRS})
    # tatsu-lab/alpaca_eval's layout: a dataset script plus one JSON list per config.
    write_hub_files(
        hub,
        "acme/alpaca_eval",
        {
            "alpaca_eval.py": "raise SystemExit('a dataset script must never run')\n",
            "alpaca_eval_gpt4_baseline.json": json.dumps(ALPACA, indent=2),
        },
    )
    local = write_jsonl(root / "train.jsonl", UF_TRAIN)
    env = {
        **child_env(),
        "HF_HUB_CACHE": str(hub),
        "HF_DATASETS_CACHE": str(root / "datasets_cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(root / "hf_home"),
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(local)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), root


def test_splits_read_in_order_from_parquet_shards(hub_reads):
    out, _ = hub_reads
    assert out["uf_train"] == UF_TRAIN  # 3 shards, read back in the split's order
    assert out["uf_test"] == UF_TEST
    assert out["hash_stable"] and out["hash_differs"]


def test_portions_of_a_named_split_are_those_of_the_same_rows_in_a_file(hub_reads):
    out, _ = hub_reads
    ids = [r["prompt_id"] for r in UF_TRAIN]
    expected = [ids[0:4], ids[4:8], ids[8:12]]  # contiguous thirds, as the reference slices
    assert out["portions"]["hub"] == out["portions"]["local"] == expected


def test_string_pairs_become_conversations(hub_reads):
    out, _ = hub_reads
    assert out["strings"] == [[r["prompt"], r["chosen"], r["rejected"]] for r in STRING_PAIRS]


def test_a_config_file_of_a_script_dataset_is_read_without_running_the_script(hub_reads):
    out, _ = hub_reads
    assert out["alpaca"] == ALPACA


def test_unreadable_names_are_user_errors_with_a_fix(hub_reads):
    out, _ = hub_reads
    errors = out["errors"]
    assert "several splits (test_prefs, train_prefs)" in errors["several_splits"]
    assert "hf://acme/uf_binarized:test_prefs" in errors["several_splits"]
    assert "not in the datasets cache" in errors["absent"]
    assert "hf download --repo-type dataset acme/not_downloaded" in errors["absent"]
    assert "hf://OWNER/NAME[/CONFIG][:SPLIT]" in errors["bad_name"]


def test_local_json_list_and_string_schema(tmp_path):
    path = tmp_path / "model_outputs.json"
    path.write_text(json.dumps(ALPACA, indent=2))
    assert read_source_records(path) == ALPACA
    record = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away", "extra": 1}
    assert normalize_record(record) == {
        "prompt": "Hi",
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "rejected": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Go away"},
        ],
        "extra": 1,
    }
    already = {"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}]}
    assert normalize_record(already) is already


def test_a_json_list_no_parser_reads_is_one_error_naming_the_file(tmp_path):
    from selm_mcore.runtime.files import DataError

    cases = {
        "huge_int.json": '[{"prompt": "Hi", "n": ' + "9" * 5000 + "}]",
        "deep.json": "[" + "[" * 100_000 + "]" * 100_000 + "]",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError, match=name) as caught:
            read_source_records(path)
        assert "cannot be read" in str(caught.value) or "nested too deeply" in str(caught.value)
