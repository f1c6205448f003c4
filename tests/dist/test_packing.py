"""Packed micro-batches (data.packing pack / shared_prompt) equal the unpacked layout.

One tiny random Llama (4 layers, head_dim 32) and 12 pairs with y_ref of varied lengths; one
pair is much longer than the others, so with the automatic budget (the longest pair) it fills a
micro-batch alone and its packed length is exactly the budget.

* Sequence log-probs of chosen, rejected and y_ref (the reference pass, forward only) from
  ``pack`` and ``shared_prompt`` equal the unpacked ones (``none`` at TP1) at TP1, TP2, PP2 with
  VPP2 (interleaved; the micro-batch count is padded with empty rows) and TP2xPP2: one launch
  of 4 ranks, so TP1 runs as DP4, TP2 and PP2 as DP2.
* Five training steps (the real ``selm train`` CLI): losses and grad norms of ``pack`` and
  ``shared_prompt`` equal ``none`` at TP1 and TP2xPP2, within 1e-5 relative.
* ``selm refpass`` under ``pack`` / ``shared_prompt`` writes a cache with the unpacked one's key
  and log-probs (within 1e-5), so a cache serves every packing.
* Resume with packing on: ``shared_prompt`` killed after step 3 (checkpoint at step 2) and
  resumed ends with weights bit-identical to the uninterrupted run.

Tolerance: 1e-5 relative (fp32; sums of ~40 token log-probs of magnitude ~6).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from checkpoints import checkpoint_tensors
from launch import results, run_distributed
from sentences import random_pairs, sentence

from selm_mcore.runtime.files import read_records

DIST_DIR = Path(__file__).resolve().parent
NUM_STEPS = 5
RTOL = 1e-5


def pair_rows(preference_row, num_rows: int = 12, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = random_pairs(preference_row, rng, num_rows - 1, (2, 12), (1, 10))
    # The long pair: alone in its micro-batch, exactly the automatic budget.
    rows.insert(
        5,
        preference_row(
            sentence(rng, 20, 20) + "?",
            sentence(rng, 30, 30),
            sentence(rng, 25, 25),
            reference_response=sentence(rng, 28, 28),
        ),
    )
    return rows


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama_dir, write_jsonl, write_config, preference_row):
    root = tmp_path_factory.mktemp("packing")
    pairs = write_jsonl(root / "pairs.jsonl", pair_rows(preference_row))
    config = write_config(
        root / "config.yaml",
        model={"hf_dir": str(tiny_llama_dir)},
        data={
            "train_path": str(pairs),
            "max_length": 96,
            "max_prompt_length": 48,
            "pad_to_multiple_of": 1,
        },
        loss={"beta": 0.1, "alpha": 0.5},
        optim={"lr": 2.0e-4, "warmup_ratio": 0.2, "clip_grad": 1.0},
        train={
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": NUM_STEPS,
            "ref_cache": str(root / "ref_logps.safetensors"),
            "tensorboard": False,
            "keep_checkpoints": 0,
            "seed": 7,
        },
    )
    return {"root": root, "model": tiny_llama_dir, "pairs": pairs, "config": config}


def _budget(ws) -> int:
    from transformers import AutoTokenizer

    from selm_mcore.data.packing import auto_budget
    from selm_mcore.data.tokenize import PreferenceDataset

    tokenizer = AutoTokenizer.from_pretrained(str(ws["model"]))
    dataset = PreferenceDataset.from_file(
        ws["pairs"], tokenizer, max_length=96, max_prompt_length=48
    )
    return auto_budget(dataset.examples, True, 1), auto_budget(dataset.examples, False, 1)


@pytest.mark.timeout(900)
def test_packed_log_probs_equal_unpacked_at_every_layout(ws):
    shared_budget, pack_budget = _budget(ws)
    budget = max(shared_budget, pack_budget)
    # One launch of 4 ranks runs the layouts in turn (the ranks left over are DP replicas).
    layouts = ["1x1", "2x1", "1x2v2", "2x2"]
    outs = run_distributed(
        DIST_DIR / "packing_worker.py",
        4,
        [ws["model"], ws["pairs"], budget, *layouts],
        timeout_s=600,
    )
    values = results(outs)[0]
    assert [(v["layout"], v["dp"]) for v in values] == [
        ("1x1", 4),
        ("2x1", 2),
        ("1x2v2", 2),
        ("2x2", 1),
    ]
    baseline = None
    for value in values:
        got = {k: torch.tensor(v, dtype=torch.float64) for k, v in value["logps"].items()}
        if baseline is None:
            baseline = got["none"]
            assert baseline.abs().min() > 1  # real sums, not empty sequences
        for packing in ("none", "pack", "shared_prompt"):
            torch.testing.assert_close(
                got[packing],
                baseline,
                rtol=RTOL,
                atol=1e-6,
                msg=f"layout {value['layout']} {packing}",
            )
        # The long pair fills a micro-batch alone: more rows than a perfect fill would need.
        assert value["micro_batches"]["pack"] >= 2


@pytest.mark.timeout(900)
def test_exact_budget_pair_fits_and_one_token_less_is_refused(ws):
    from transformers import AutoTokenizer

    from selm_mcore.data.packing import PackingError, check_budget, pack_examples, pair_tokens
    from selm_mcore.data.tokenize import PreferenceDataset

    shared_budget, _ = _budget(ws)
    tokenizer = AutoTokenizer.from_pretrained(str(ws["model"]))
    dataset = PreferenceDataset.from_file(
        ws["pairs"], tokenizer, max_length=96, max_prompt_length=48
    )
    bins = pack_examples(dataset.examples, shared_budget, True)
    long_pair = max(dataset.examples, key=lambda e: pair_tokens(e, True))
    alone = [b for b in bins if long_pair in b]
    assert alone == [[long_pair]] and pair_tokens(long_pair, True) == shared_budget
    with pytest.raises(PackingError, match=f"data.pack_tokens >= {shared_budget}"):
        check_budget(dataset.examples, shared_budget - 1, True)


def _train(ws, name: str, nprocs: int, *overrides: str, killed_after: int | None = None):
    from selm_mcore.runtime.launch import LaunchError, run_local_ranks

    out = ws["root"] / name
    args = ["-m", "selm_mcore.cli", "train", str(ws["config"]), "--set", f"train.output_dir={out}"]
    for item in overrides:
        args += ["--set", item]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if killed_after is None:
        run_local_ranks(args, nprocs, timeout_s=300, env=env)
    else:
        env["SELM_TRAIN_KILL_AFTER_STEP"] = str(killed_after)
        with pytest.raises(LaunchError, match="signal 9|exit code -9"):
            run_local_ranks(args, nprocs, timeout_s=300, env=env)
    return read_records(out / "metrics.jsonl")


def _assert_close_steps(records, baseline, what: str) -> None:
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1)), what
    for got, want in zip(records, baseline):
        for key in ("loss", "grad_norm"):
            assert abs(got[key] - want[key]) <= RTOL * abs(want[key]), (
                what,
                got["step"],
                key,
                got[key],
                want[key],
            )


@pytest.fixture(scope="module")
def trained(ws):
    from selm_mcore.runtime.launch import run_local_ranks

    run_local_ranks(
        [
            "-m",
            "selm_mcore.cli",
            "refpass",
            str(ws["config"]),
            "--set",
            "data.packing=none",
            "--set",
            f"train.output_dir={ws['root'] / 'ref'}",
        ],
        1,
        timeout_s=300,
        env={"HF_HUB_OFFLINE": "1"},
    )
    runs = {"none": _train(ws, "none", 1, "data.packing=none")}
    for packing in ("pack", "shared_prompt"):
        runs[packing] = _train(ws, packing, 1, f"data.packing={packing}", "train.save_interval=2")
    return runs


@pytest.mark.timeout(1200)
def test_packed_training_equals_unpacked_at_tp1_and_tp2pp2(ws, trained):
    baseline = trained["none"]
    assert abs(baseline[0]["loss/preference"] - 0.6931471805599453) < 1e-6
    assert baseline[-1]["loss"] != pytest.approx(baseline[0]["loss"], abs=1e-3)  # it trains
    for packing in ("pack", "shared_prompt"):
        _assert_close_steps(trained[packing], baseline, f"{packing} tp1")
        # Packing computes (almost) only real tokens; the unpacked layout pads.
        assert trained[packing][0]["packing_efficiency"] > baseline[0]["packing_efficiency"]
        records = _train(
            ws, f"{packing}_tp2pp2", 4, f"data.packing={packing}", "parallel.tp=2", "parallel.pp=2"
        )
        _assert_close_steps(records, baseline, f"{packing} tp2pp2")


@pytest.mark.timeout(600)
def test_packed_reference_pass_writes_the_same_cache(ws, trained):
    """``selm refpass`` under each packing: the same key (any cache serves any packing) and the
    same log-probs as the unpacked pass the training runs above used."""
    from safetensors import safe_open

    from selm_mcore.runtime.launch import run_local_ranks

    def read(path):
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata()["key"], {k: handle.get_tensor(k) for k in handle.keys()}

    want_key, want = read(ws["root"] / "ref_logps.safetensors")
    assert sorted(want) == ["ref_chosen_logps", "ref_rejected_logps", "ref_yref_logps"]
    for packing in ("pack", "shared_prompt"):
        cache = ws["root"] / f"ref_{packing}.safetensors"
        run_local_ranks(
            [
                "-m",
                "selm_mcore.cli",
                "refpass",
                str(ws["config"]),
                "--set",
                f"data.packing={packing}",
                "--set",
                f"train.ref_cache={cache}",
                "--set",
                f"train.output_dir={ws['root'] / ('ref_' + packing)}",
            ],
            1,
            timeout_s=300,
            env={"HF_HUB_OFFLINE": "1"},
        )
        key, got = read(cache)
        assert key == want_key, packing
        assert sorted(got) == sorted(want), packing
        for name in want:
            torch.testing.assert_close(
                got[name], want[name], rtol=RTOL, atol=1e-6, msg=f"{packing} {name}"
            )


@pytest.mark.timeout(1200)
def test_packed_resume_after_kill_is_bit_identical(ws, trained):
    partial = _train(
        ws, "resumed", 1, "data.packing=shared_prompt", "train.save_interval=2", killed_after=3
    )
    assert [r["step"] for r in partial] == [1, 2, 3]
    resumed = _train(ws, "resumed", 1, "data.packing=shared_prompt", "train.save_interval=2")
    uninterrupted = trained["shared_prompt"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in uninterrupted]
    # The weights, read with torch's DCP reader (no Megatron process needed).
    resumed_weights = checkpoint_tensors(
        ws["root"] / "resumed" / "final", ws["root"] / "resumed_final.pt"
    )
    uninterrupted_weights = checkpoint_tensors(
        ws["root"] / "shared_prompt" / "final", ws["root"] / "shared_prompt_final.pt"
    )
    assert resumed_weights.keys() == uninterrupted_weights.keys()
    # every weight: the embedding, the layers (stacked over layers) and the final norm
    assert "embedding.word_embeddings.weight" in resumed_weights
    assert "decoder.final_layernorm.weight" in resumed_weights
    assert any(name.startswith("decoder.layers.") for name in resumed_weights)
    different = sorted(
        name
        for name in resumed_weights
        if not torch.equal(resumed_weights[name], uninterrupted_weights[name])
    )
    assert different == []
