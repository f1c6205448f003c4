"""The whole-round estimate (``selm plan --round``, selm_mcore.plan.round) and the ranker
benchmark's model (``selm bench ranker``, selm_mcore.bench.ranker): the PairRM FLOP formula
against torch's FLOP counter on a real DebertaV2Model, PairRM's truncation, the phases of a
round and how they scale, and the benchmark's transformers path doing llm-blender's work (the
same pairs and the same input tokens per batch)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from selm_mcore.bench.ranker import (
    blender_ranker,
    count_tokens,
    deberta_config,
    synthetic_items,
    transformers_ranker,
)
from selm_mcore.cli import main as selm
from selm_mcore.plan import round as R


@pytest.mark.parametrize("tokens", [64, 700])
def test_pairrm_flops_equal_torchs_count(tokens):
    from transformers import DebertaV2Model

    cfg = deberta_config("tiny", 300)
    model = DebertaV2Model(cfg).eval()
    ids = torch.randint(5, 300, (2, tokens))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    span = 2 * cfg.position_buckets
    formula = 2 * R.pairrm_forward_flops(tokens, layers=2, hidden=32, ffn=64, span=span)
    # + the relative embeddings' query and key projections, once per forward (not counted)
    assert counter.get_total_flops() == formula + 2 * (2 * 2 * span * 32 * 32)


def test_the_large_shape_is_pairrms_backbone():
    cfg = deberta_config("deberta-v3-large", 128_100)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (
        R.RANKER_LAYERS,
        R.RANKER_HIDDEN,
        R.RANKER_FFN,
    )
    assert 2 * cfg.position_buckets == R.RANKER_SPAN
    # PairRM's truncation: the prompt to 1224 tokens, a candidate to 412 + half the unused room
    assert R.pairrm_input_tokens(2000, 1000) == 1224 + 2 * 412 + 6
    assert R.pairrm_input_tokens(256, 400) == 256 + 2 * 400 + 6
    assert R.pairrm_input_tokens(224, 1000) == 224 + 2 * (412 + 500) + 6


def test_selm_plan_round(capsys):
    args = ["plan", "--round", "--model", "meta-llama/Meta-Llama-3-8B-Instruct", "--gpus", "8"]
    assert selm(args) == 0
    out = capsys.readouterr().out
    assert "round estimate (nothing measured): --prompts 20378" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line[:1].isalpha()}
    for phase in ("generate", "rank", "refpass", "train", "export", "round"):
        assert phase in lines, out
    minutes = [
        float(lines[p].split()[1]) for p in ("generate", "rank", "refpass", "train", "export")
    ]
    assert float(lines["round"].split()[1]) == pytest.approx(sum(minutes), abs=0.26)  # rounded
    assert "tp2 pp1 dp4" in lines["train"]  # the example config's layout


def test_rank_and_generate_scale_with_gpus_and_engines():
    from selm_mcore.config.io import from_dict
    from selm_mcore.plan import known
    from selm_mcore.plan.layouts import Hardware, Workload

    model = R.ModelShape.from_hf_config(known.KNOWN_MODELS["meta-llama/Meta-Llama-3-8B"][0])
    cfg = from_dict(dict(known.EXAMPLE_SETTINGS["selm_llama3_8b.yaml"]))
    workload, hw = Workload.from_config(cfg), Hardware()
    row = SimpleNamespace(step_s=2.0, layout=SimpleNamespace(label=lambda: "tp2 pp1 dp4"))
    a = R.RoundAssumptions(ranker_start_s=0.0, engine_start_s=0.0)
    on8 = {p.phase: p.seconds for p in R.estimate_round(model, cfg, workload, 8, hw, row, a)}
    on64 = {p.phase: p.seconds for p in R.estimate_round(model, cfg, workload, 64, hw, row, a)}
    assert on8["rank"] == pytest.approx(8 * on64["rank"])  # every GPU ranks
    cfg.generation.num_engines = 16
    more = {p.phase: p.seconds for p in R.estimate_round(model, cfg, workload, 8, hw, row, a)}
    load = 2 * model.num_params() / 2e9
    assert more["generate"] - load == pytest.approx((on8["generate"] - load) / 2, rel=0.01)


def test_ranker_bench_transformers_path_does_llm_blenders_work():
    if importlib.util.find_spec("llm_blender") is None:  # imported with its fixes by the bench
        pytest.skip("llm-blender is not installed")
    from selm_mcore.testing.assets import tiny_deberta_tokenizer

    args = SimpleNamespace(
        prompts=6, source_tokens=20, candidate_tokens=30, jitter=0.5, seed=0, batch_size=3
    )
    items = synthetic_items(args)
    batches = [items[:3], items[3:]]
    tokenizer = tiny_deberta_tokenizer()
    counts = {}
    for name, make in (("blender", blender_ranker), ("transformers", transformers_ranker)):
        config = deberta_config("tiny", len(tokenizer))
        run = make(config, tokenizer, torch.device("cpu"), torch.float32)
        counts[name] = count_tokens(run, batches)
    assert counts["blender"] == counts["transformers"]
    assert counts["blender"]["pairs"] == 6 * 6  # 6 ordered pairs per prompt
