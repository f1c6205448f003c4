"""The reference log-prob cache: key, staleness errors, batch order, DP sharding of the pass.

The cache's values against HF transformers and the precomputed == on-the-fly equality are in
tests/dist/test_train_parallel.py (they need Megatron processes).
"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from selm_mcore.config.io import load_config
from selm_mcore.data.batches import collate_preferences
from selm_mcore.data.tokenize import PreferenceDataset
from selm_mcore.train.refpass import (
    ReferenceLogps,
    StaleReferenceCacheError,
    load_reference_cache,
    reference_key,
    shard_for_rank,
)

# (prompt, chosen, rejected, y_ref)
PAIRS = [
    ("What is 2 plus 3?", "5.", "6.", "The answer is 5."),
    ("Name a color.", "Blue.", "Seven.", "Red."),
    ("Say hello.", "Hello!", "Bye.", "Hello there."),
    ("What is the sum of 4 and 4?", "8", "9", "It is 8."),
]


def rows_of(preference_row, pairs):
    return [preference_row(p, c, r, reference_response=y) for p, c, r, y in pairs]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, write_jsonl, preference_row):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("refpass")
    model = tiny_llama_dir  # read-only here: the stale-key cases change copies of it
    pairs = write_jsonl(root / "pairs.jsonl", rows_of(preference_row, PAIRS))
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    dataset = PreferenceDataset.from_file(pairs, tokenizer, max_length=64, max_prompt_length=32)
    key = reference_key(dataset, model, max_length=64, max_prompt_length=32)
    n = len(dataset)
    logps = ReferenceLogps(
        chosen=-torch.arange(n, dtype=torch.float32),
        rejected=-100 - torch.arange(n, dtype=torch.float32),
        yref=-200 - torch.arange(n, dtype=torch.float32),
    )
    cache = root / "ref_logps.safetensors"
    logps.save(cache, key)
    return SimpleNamespace(
        root=root,
        model=model,
        pairs=pairs,
        tokenizer=tokenizer,
        dataset=dataset,
        key=key,
        cache=cache,
        write_jsonl=write_jsonl,
        preference_row=preference_row,
    )


def test_cache_roundtrip_in_batch_order(setup):
    logps = load_reference_cache(setup.cache, setup.key)
    batch = collate_preferences([setup.dataset[2], setup.dataset[0]], pad_id=0)
    assert logps.for_batch(batch).tolist() == [-2.0, -0.0, -102.0, -100.0, -202.0, -200.0]


def _stale_key(setup, what):
    root, model = setup.root, setup.model
    if what == "data.max_length":
        return reference_key(setup.dataset, model, max_length=96, max_prompt_length=32)
    if what == "data rows":
        pairs = list(PAIRS)
        pairs[1] = ("Name a color.", "Green.", "Seven.", "Red.")
        rows = rows_of(setup.preference_row, pairs)
        dataset = PreferenceDataset.from_file(
            setup.write_jsonl(root / "pairs2.jsonl", rows),
            setup.tokenizer,
            max_length=64,
            max_prompt_length=32,
        )
        return reference_key(dataset, model, max_length=64, max_prompt_length=32)
    if what == "reference checkpoint":
        from safetensors.torch import load_file, save_file

        other = root / "trained"
        shutil.copytree(model, other, dirs_exist_ok=True)
        weights = load_file(str(other / "model.safetensors"))
        weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
        save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
        return reference_key(setup.dataset, other, max_length=64, max_prompt_length=32)
    if what == "tokenizer files":
        other = root / "retokenized"
        shutil.copytree(model, other, dirs_exist_ok=True)
        config = json.loads((other / "tokenizer_config.json").read_text())
        config["model_max_length"] = 123
        (other / "tokenizer_config.json").write_text(json.dumps(config))
        return reference_key(setup.dataset, other, max_length=64, max_prompt_length=32)
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what", ["data.max_length", "data rows", "reference checkpoint", "tokenizer files"]
)
def test_stale_cache_is_refused_naming_what_changed(setup, what):
    stale = _stale_key(setup, what)
    assert stale.digest != setup.key.digest
    with pytest.raises(StaleReferenceCacheError) as err:
        load_reference_cache(setup.cache, stale)
    message = str(err.value)
    assert what in message and "selm refpass" in message and str(setup.cache) in message


def _tensor_data_offset(path) -> int:
    """Where the tensor bytes of a safetensors file start (8-byte length + JSON header)."""
    import struct

    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cache_is_refused_naming_the_file(setup, tmp_path, damage):
    from selm_mcore.runtime.files import ChecksumError

    cache = tmp_path / "ref_logps.safetensors"
    shutil.copyfile(setup.cache, cache)
    data = bytearray(cache.read_bytes())
    if damage == "flip":  # one bit of a stored log-prob: still a valid float, a wrong value
        data[_tensor_data_offset(cache) + 5] ^= 0x01
        problem = "the log-probs differ from the tensors_sha256"
    else:
        data = data[:-3]
        problem = "not a readable safetensors file .*truncated or corrupt"
    cache.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=rf"{cache}: {problem}.*Fix: rerun `selm refpass"):
        load_reference_cache(cache, setup.key)


def test_missing_or_foreign_cache_is_refused(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="selm refpass"):
        load_reference_cache(tmp_path / "none.safetensors", setup.key)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(StaleReferenceCacheError, match="not a reference cache"):
        load_reference_cache(foreign, setup.key)


def test_train_refuses_a_stale_cache_before_starting_processes(setup, tmp_path):
    import torch.distributed as dist

    from selm_mcore.train.trainer import train_round

    cfg = load_config(
        None,
        [
            f"model.hf_dir={setup.model}",
            f"data.train_path={setup.pairs}",
            "data.max_length=96",
            "data.max_prompt_length=32",
            "train.global_batch_size=2",
            f"train.ref_cache={setup.cache}",
            f"train.output_dir={tmp_path / 'out'}",
        ],
    )
    with pytest.raises(StaleReferenceCacheError, match="data.max_length"):
        train_round(cfg)
    assert not dist.is_initialized()
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("num_examples,dp,micro", [(16, 2, 2), (7, 3, 2), (2, 4, 1), (5, 1, 3)])
def test_refpass_shards_cover_every_example_once(setup, num_examples, dp, micro):
    examples = [setup.dataset[i % len(setup.dataset)] for i in range(num_examples)]
    from dataclasses import replace

    dataset = PreferenceDataset([replace(e, index=i) for i, e in enumerate(examples)])
    shards = [shard_for_rank(dataset, SimpleNamespace(dp=dp, dp_rank=r), micro) for r in range(dp)]
    owned = [o for _, o in shards]
    assert sorted(i for o in owned for i in o) == list(range(num_examples))  # disjoint, complete
    # Every rank runs the same number of equal micro-batches (pipelines stay in lock step).
    assert len({len(groups) for groups, _ in shards}) == 1
    assert {len(g) for groups, _ in shards for g in groups} == {micro}


def test_example_tiny_cpu_config_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu.yaml"
    cfg = load_config(path, ["parallel.tp=2", "parallel.pp=2"])
    assert cfg.train.reference_mode == "precomputed" and cfg.train.save_interval > 0
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_refpass_and_train_check_their_output_folder_before_any_work(setup, tmp_path, capsys):
    import torch.distributed as dist

    from selm_mcore import cli
    from selm_mcore.runtime.errors import InputError
    from selm_mcore.train.trainer import train_round

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"hf_dir": str(setup.model)},
                "data": {"train_path": str(setup.pairs), "max_length": 64, "max_prompt_length": 32},
                "train": {"global_batch_size": 2, "ref_cache": str(blocker / "ref.safetensors")},
            }
        )
    )
    assert cli.main(["refpass", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"train.ref_cache: {blocker} is a file, not a folder" in err[0]
    assert not dist.is_initialized()  # refused before any process group or model

    cfg = load_config(config, [f"train.output_dir={blocker}", f"train.ref_cache={setup.cache}"])
    with pytest.raises(InputError, match=f"train.output_dir: {blocker} is a file"):
        train_round(cfg)
    assert not dist.is_initialized()


def test_train_warns_about_duplicates_with_counts(setup, tmp_path, caplog):
    import logging

    from selm_mcore.train.trainer import train_round

    rows = rows_of(setup.preference_row, PAIRS + PAIRS[:1] + [("Q?", "A.", "A.", "A.")])
    pairs = setup.write_jsonl(tmp_path / "dup.jsonl", rows)
    cfg = load_config(
        None,
        [
            f"model.hf_dir={setup.model}",
            f"data.train_path={pairs}",
            "data.max_length=64",
            "data.max_prompt_length=32",
            "train.global_batch_size=2",
            f"train.ref_cache={setup.cache}",
            f"train.output_dir={tmp_path / 'out'}",
        ],
    )
    with caplog.at_level(logging.WARNING), pytest.raises(StaleReferenceCacheError):
        train_round(cfg)  # the cache is for other data: stops after loading and counting it
    assert "1 rows repeat an earlier row (e.g. row 5 repeats row 1)" in caplog.text
    assert "1 rows have chosen == rejected" in caplog.text


def test_a_cache_stored_in_the_model_folder_leaves_the_reference_key_alone(setup, tmp_path):
    """The reference fingerprint covers the model's own files only: a reference cache (or any
    other file) stored in model.hf_dir does not make every cache there stale. The model's
    weights still count, also when they are not named model.safetensors."""
    import shutil

    from selm_mcore.train.refkey import reference_fingerprint

    model = tmp_path / "model"
    shutil.copytree(setup.model, model)
    key = reference_key(setup.dataset, model, max_length=64, max_prompt_length=32)
    assert key == setup.key  # the same model files in another folder
    cache = model / "ref_logps.safetensors"
    ReferenceLogps(
        chosen=torch.zeros(len(setup.dataset)), rejected=torch.zeros(len(setup.dataset)), yref=None
    ).save(cache, key)
    (model / "notes.txt").write_text("trained for the demo\n")
    again = reference_key(setup.dataset, model, max_length=64, max_prompt_length=32)
    assert again == key
    load_reference_cache(cache, again)  # not stale

    # A folder whose weights have another name: they count, the cache beside them does not.
    (model / "model.safetensors").rename(model / "weights.safetensors")
    with_cache = reference_fingerprint(model)
    cache.unlink()
    assert reference_fingerprint(model) == with_cache
    weights = bytearray((model / "weights.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (model / "weights.safetensors").write_bytes(bytes(weights))
    assert reference_fingerprint(model) != with_cache
