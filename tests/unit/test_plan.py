"""The layout planner (selm_mcore.plan): layout enumeration, Megatron's buffer arithmetic, the
activation inventory and the step-time terms against numbers worked out by hand for a small
model, the CLI (the table, --check's error), the example settings the package ships against
examples/configs/, and the planner of a package installed without the repository. The
comparison with real tensors of a training run is tests/dist/test_plan_memory.py."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import selm_mcore
from selm_mcore.cli import main as cli_main
from selm_mcore.config.io import from_dict, load_config
from selm_mcore.modelspec import ModelShape, packed_forward_flops
from selm_mcore.plan import KNOWN_MODELS, PlanError, resolve_model
from selm_mcore.plan import layouts as L
from selm_mcore.plan import memory as M
from selm_mcore.plan.known import EXAMPLE_SETTINGS

REPO = Path(__file__).resolve().parents[2]
# hidden 128, FFN 256, 4 heads / 2 groups of 32, 4 layers, vocabulary 500 (padded to 512 at tp1,
# to 512 at tp2: a multiple of 256), untied: the tiny Llama's numbers.
SMALL = ModelShape(
    name="small",
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=256,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    vocab_size=500,
    tied_embeddings=False,
)


def small_workload(**overrides) -> L.Workload:
    values = dict(
        packing="shared_prompt",
        sequences=2,
        global_batch=8,
        prompt_tokens=48,
        response_tokens=40,
        budget=512,
        param_bytes=4,
    )
    values.update(overrides)
    return L.Workload(**values)


def test_enumeration_keeps_exactly_the_layouts_that_divide():
    layouts = L.enumerate_layouts(
        SMALL, small_workload(), gpus=8, gpus_per_node=4, impl="local", recompute=("none",)
    )
    got = sorted((x.tp, x.pp, x.vpp or 0, x.dp) for x in layouts)
    # tp: divides 4 heads, 2 groups, FFN 256 and the padded vocabulary, and fits a node of 4
    # -> 1, 2 (4 fails the 2 groups); pp divides 4 layers -> 1, 2, 4; vpp: pp*vpp | 4, pp >= 2
    # -> (pp2, vpp2); dp = 8 / (tp*pp) must divide the global batch of 8.
    assert got == [
        (1, 1, 0, 8),
        (1, 2, 0, 4),
        (1, 2, 2, 4),
        (1, 4, 0, 2),
        (2, 1, 0, 4),
        (2, 2, 0, 2),
        (2, 2, 2, 2),
        (2, 4, 0, 1),
    ]
    # a batch of 6 pairs does not split over dp 4 or 8; tp beyond a node of 1 GPU is refused
    odd = L.enumerate_layouts(
        SMALL, small_workload(global_batch=6), 8, 4, impl="local", recompute=("none",)
    )
    assert {x.dp for x in odd} == {2, 1}
    assert {x.tp for x in L.enumerate_layouts(SMALL, small_workload(), 8, 1, impl="local")} == {1}
    # sequence parallelism only on TE and with tp > 1; every recompute choice is priced
    te = L.enumerate_layouts(SMALL, small_workload(), 2, 2, impl="te")
    assert {(x.tp, x.sequence_parallel) for x in te} == {(1, False), (2, True)}
    assert {x.recompute for x in te} == {"none", "selective", "full"}


def test_buffer_padding_and_optimizer_shards_by_hand():
    # reversed order: 64 elements at [0, 64), then 100 at [64, 164); the bucket ends on a
    # multiple of lcm(dp=2, 128) = 128 -> 256; each DP rank owns 128 of it
    ranges, buckets = M.buffer_layout([(100, False), (64, False)], dp=2, bucket_size=None)
    assert ranges == [(0, 64, 0), (64, 164, 0)] and buckets == [(0, 256)]
    assert M.shard_numels(ranges, buckets, 2) == [(128, 2), (36, 1)]
    # a parameter start is padded to 64 elements; an own-bucket (tied embedding) parameter
    # closes the bucket before and after it
    ranges, buckets = M.buffer_layout(
        [(300, True), (10, False), (70, False)], dp=1, bucket_size=None
    )
    assert ranges == [(0, 70, 0), (128, 138, 0), (256, 556, 1)]
    assert buckets == [(0, 256), (256, 640)]


def test_static_bytes_by_hand():
    layout = M.Layout(tp=1, pp=1, vpp=None, dp=1)
    # embedding and head 512 x 128 each; per layer 2 norms of 128, q/o 128 x 128,
    # qkv (128 + 2 x 64) x 128, fc1 2 x 256 x 128, fc2 256 x 128 (all multiples of 64)
    layer = 2 * 128 + 128 * 128 + 256 * 128 + 2 * 256 * 128 + 256 * 128
    numel = 2 * 512 * 128 + 4 * layer + 128
    assert numel == 722048 and numel % 128 == 0
    fp32 = M.static_bytes(SMALL, layout, 0, param_bytes=4, bucket_size=None)
    assert (fp32["params"], fp32["grads"]) == (4 * numel, 4 * numel)
    steps = 6 * 4 + 3  # one step tensor per parameter
    assert fp32["optimizer"] == 8 * numel + 4 * steps  # Adam m, v; no master copy
    bf16 = M.static_bytes(SMALL, layout, 0, param_bytes=2, bucket_size=None)
    assert bf16["params"] == 2 * numel and bf16["optimizer"] == 12 * numel + 4 * steps
    # the local spec's fp32 norms: a buffer of their own (9 norms of 128), no master copy
    split = M.static_bytes(SMALL, layout, 0, param_bytes=2, bucket_size=None, fp32_norms=True)
    norms = 9 * 128
    assert split["params"] == 2 * (numel - norms) + 4 * norms
    assert split["optimizer"] == 12 * (numel - norms) + 8 * norms + 4 * steps
    # dp 2 halves the optimizer; tp 2 halves the matrices (not the norms)
    half = M.static_bytes(
        SMALL, M.Layout(tp=1, pp=1, vpp=None, dp=2), 0, param_bytes=4, bucket_size=None
    )
    assert half["optimizer"] <= 8 * numel // 2 + 4 * steps and half["params"] == 4 * numel
    tp2 = M.static_bytes(
        SMALL, M.Layout(tp=2, pp=1, vpp=None, dp=1), 0, param_bytes=4, bucket_size=None
    )
    assert tp2["params"] == 4 * ((numel - 9 * 128) // 2 + 9 * 128)


def test_tied_embedding_copy_on_the_last_stage():
    tied = dataclasses.replace(SMALL, tied_embeddings=True)
    pp1 = M.chunk_parameters(tied, M.Layout(1, 1, None, 1), 0, 0)
    # one embedding (its own bucket), the layers, the final norm, and no separate head
    assert pp1[0] == (512 * 128, True, False) and pp1[-1] == (128, False, True)
    assert len(pp1) == 1 + 4 * 6 + 1
    last = M.chunk_parameters(tied, M.Layout(1, 2, None, 1), 1, 0)
    assert last[-1] == (512 * 128, True, False)  # the shared copy
    assert M.chunk_parameters(SMALL, M.Layout(1, 2, None, 1), 1, 0)[-1] == (512 * 128, False, False)


def test_activation_inventory_by_hand():
    """Packed shared-prompt row of 4 pairs (prompt 40, two responses of 30) through a layer on
    CPU in fp32: the tensors torch and Megatron save, counted one by one."""
    model = ModelShape(
        name="m",
        num_layers=2,
        hidden_size=256,
        ffn_hidden_size=768,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        vocab_size=1000,
    )
    mb = M.MicroBatch(
        rows=1,
        row_length=400,
        head_positions=240,
        groups=tuple(M.Group(40, (30, 30)) for _ in range(4)),
    )
    n, h, f = 400, 256, 768
    norms = 2 * n * (4 * h + 4 + 4 * h)  # x and x/rms in fp32, rstd
    linear_inputs = 3 * n * h * 4  # qkv, proj (q = 256), fc1
    mlp = n * (2 * f + f + f + f) * 4  # fc1 out, silu, gate input copy, fc2 input
    rope = 4 * n * 32 * 4  # cos, sin for q and k
    # math SDPA per call, fp32: q [8, L, 32], k^T, v [8, S, 32] (expanded), probs [8, L, S]
    call = lambda length, span: 4 * 8 * (length * 32 + 2 * span * 32 + length * span)  # noqa
    attention = (
        4 * (call(40, 40) + 2 * call(30, 70))
        + 4 * 256 * (160 + 240)
        + 8 * (160 + 240 + 4 * (2 * 40 + 60))
    )  # the gathered q and the int64 indices
    layout = M.Layout(1, 1, None, 1)
    assert M.attention_bytes(model, layout, "cpu", mb, 4) == attention
    assert (
        M.layer_bytes(model, layout, "cpu", mb, 4) == norms + linear_inputs + mlp + rope + attention
    )
    # full recompute keeps the layer input only; the LM head: final norm, the head's input
    # (and its int64 index), the logits [240, 1024] and 8 bytes of kernel statistics
    assert M.layer_bytes(model, layout, "cpu", mb, 4, "full") == n * h * 4
    assert (
        M.head_bytes(model, layout, "cpu", mb, 4)
        == n * (8 * h + 4) + 240 * (h * 4 + 8) + 240 * 1024 * 4 + 8 * 240
    )
    # GPU (flash): q, k, v, out of both varlen calls, fp32 log-sum-exp; TE + sequence
    # parallelism divides the norm inputs / linear inputs by tp
    flash = 2 * (2 * 256 * 400 + 2 * 64 * (160 + 560)) + 4 * 8 * 400 + 8 * (160 + 240 + 560)
    assert M.attention_bytes(model, layout, "local", mb, 2) == flash
    sp = M.Layout(2, 1, None, 1, sequence_parallel=True)
    assert (
        M.layer_bytes(model, sp, "te", mb, 2) - M.attention_bytes(model, sp, "te", mb, 2)
        == n * (2 * (2 * h * 2 + 4) // 2 + 128 * 2 + 3 * 384 * 2) + 4 * 32 * 2 * 400
    )


def test_pipeline_in_flight_micro_batches():
    one_f_one_b = M.Layout(tp=1, pp=4, vpp=None, dp=1)
    assert [M.in_flight_chunks(one_f_one_b, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert M.in_flight_chunks(one_f_one_b, 2, 0) == 2
    interleaved = M.Layout(tp=1, pp=2, vpp=2, dp=1)
    # warm-up (pp - rank - 1) * 2 + (vpp - 1) * pp chunk-forwards, plus one
    assert [M.in_flight_chunks(interleaved, 4, r) for r in range(2)] == [5, 3]
    assert M.in_flight_chunks(M.Layout(1, 1, None, 1), 8, 0) == 1


def test_workload_of_the_8b_example():
    cfg = load_config(REPO / "examples/configs/selm_llama3_8b.yaml")
    workload = L.Workload.from_config(cfg)
    # y_ref (alpha > 0): 3 sequences; pack_tokens 0 -> the longest possible pair 3 x 1024
    assert (workload.sequences, workload.budget) == (3, 3072)
    assert workload.pair_tokens() == 256 + 3 * 256 and workload.pairs_per_micro_batch() == 3
    assert workload.micro_batches_per_step(dp=4) == 11  # ceil(128 / 4 / 3)
    mb = workload.micro_batch()
    assert (mb.tokens, mb.head_positions, len(mb.groups)) == (3072, 3 * 3 * 256, 3)


def test_flops_agree_with_the_metrics_formula():
    mb = small_workload().micro_batch()
    dense, attention = L.layer_forward_flops(SMALL, mb)
    segments = [[0, 0, g.prompt, *g.responses, 0] for g in mb.groups]
    expected = packed_forward_flops(SMALL, segments, mb.head_positions)
    head = 2 * SMALL.hidden_size * SMALL.vocab_size * mb.head_positions
    # packed_forward_flops counts every row token; the row here is full of pairs (4 x 128)
    assert SMALL.num_layers * (dense + attention) + head == pytest.approx(expected)


def test_step_time_terms():
    hw = L.Hardware()
    workload = small_workload()
    single = L.step_time(SMALL, M.Layout(1, 1, None, 1), workload, hw, params_per_rank=722048)
    assert single["tp_comm"] == single["pp_comm"] == single["bubble"] == single["dp_comm"] == 0
    assert single["micro_batches"] == 2  # 8 pairs, 4 per 512-token row
    piped = L.step_time(SMALL, M.Layout(2, 2, None, 2), workload, hw, params_per_rank=722048)
    assert piped["tp_comm"] > 0 and piped["pp_comm"] > 0 and piped["dp_comm"] > 0
    # bubble = (pp - 1) micro-batch times
    per_mb = (piped["compute"] + piped["tp_comm"] + piped["pp_comm"]) / piped["micro_batches"]
    assert piped["bubble"] == pytest.approx(per_mb)
    assert piped["step"] == pytest.approx(
        piped["compute"]
        + piped["tp_comm"]
        + piped["pp_comm"]
        + piped["bubble"]
        + piped["dp_comm"]
        + piped["optimizer"]
    )


def test_known_models_and_hf_folders(tiny_llama_dir):
    model, example = resolve_model("meta-llama/Meta-Llama-3-70B-Instruct")
    assert example == "selm_llama3_70b.yaml" and 70.5e9 < model.num_params() < 70.6e9
    model, _ = resolve_model("META-LLAMA/Meta-Llama-3-8B")
    assert 8.0e9 < model.num_params() < 8.1e9 and len(KNOWN_MODELS) == 9
    model, example = resolve_model(str(tiny_llama_dir))
    assert (model.hidden_size, model.num_layers, example) == (128, 4, "")
    with pytest.raises(PlanError, match="neither an HF folder"):
        resolve_model("no/such-model")


def test_cli_table_marks_the_config_layout(capsys):
    assert (
        cli_main(
            ["plan", "--model", "meta-llama/Meta-Llama-3-8B-Instruct", "--gpus", "8", "--top", "3"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "selm_llama3_8b.yaml" in out and "<- selm_llama3_8b.yaml" in out
    assert re.search(r"tp2 pp1 dp4 sp\s+none", out)  # the example's layout
    assert "NVLink 360 GB/s" in out and "40% MFU" in out


def test_check_refuses_a_layout_that_does_not_fit(capsys):
    config = str(REPO / "examples/configs/selm_llama3_8b.yaml")
    code = cli_main(
        [
            "plan",
            "--check",
            config,
            "--model",
            "meta-llama/Meta-Llama-3-8B",
            "--set",
            "parallel.tp=1",
            "--set",
            "model.recompute=false",
            "--gpu-mem",
            "40",
        ]
    )
    err = capsys.readouterr().err  # through the one handler of every command (selm_mcore.cli)
    assert code == 1 and err.startswith("selm plan: error: ")
    assert "parallel.tp=1 pp=1" in err and "is predicted to need" in err and "Fix:" in err
    assert cli_main(["plan", "--check", config, "--model", "meta-llama/Meta-Llama-3-8B"]) == 0
    assert "is predicted to fit" in capsys.readouterr().out


@pytest.mark.parametrize("example", sorted(EXAMPLE_SETTINGS))
def test_packaged_example_settings_equal_the_example_configs(example):
    """What the planner reads from an example config, as the package ships it, equals the file
    in examples/configs/ (every key the workload, the layout and the vocabulary padding use)."""
    from_file = load_config(REPO / "examples" / "configs" / example)
    packaged = from_dict(copy.deepcopy(EXAMPLE_SETTINGS[example]))
    keys = {
        "model": ("dtype", "recompute", "make_vocab_size_divisible_by"),
        "parallel": ("tp", "pp", "vpp"),
        "data": ("packing", "pack_tokens", "max_length", "max_prompt_length", "pad_to_multiple_of"),
        "loss": ("alpha",),
        "train": ("global_batch_size", "micro_batch_size", "save_interval", "epochs"),
        "generation": ("num_engines", "tensor_parallel_size", "max_tokens", "n"),
        "ranking": ("kind", "batch_size"),
        "online": ("max_eval_prompts", "nproc_per_node", "export_tp"),
    }
    for section, names in keys.items():
        for name in names:
            expected = getattr(getattr(from_file, section), name)
            assert getattr(getattr(packaged, section), name) == expected, f"{section}.{name}"
    assert L.Workload.from_config(packaged) == L.Workload.from_config(from_file)


def test_an_installed_package_plans_without_the_repository(tmp_path, capsys):
    """The package alone (no examples/ or tools/ beside it), run from another folder, prices a
    known model with its example's settings: the same table as in the repository."""
    site = tmp_path / "site"
    shutil.copytree(
        Path(selm_mcore.__file__).parent,
        site / "selm_mcore",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    argv = ["plan", "--model", "meta-llama/Meta-Llama-3-8B-Instruct", "--gpus", "8", "--top", "3"]
    script = (
        "import sys, selm_mcore; from pathlib import Path; "
        f"assert Path(selm_mcore.__file__).is_relative_to({str(site)!r}), selm_mcore.__file__; "
        f"from selm_mcore.cli import main; sys.exit(main({argv!r}))"
    )
    installed = subprocess.run(
        [sys.executable, "-P", "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    assert cli_main(argv) == 0
    in_repo = capsys.readouterr().out
    assert "config examples/configs/selm_llama3_8b.yaml" in in_repo
    assert installed.stdout == in_repo
