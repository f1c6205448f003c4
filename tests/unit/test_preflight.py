"""Pre-flight checks (selm_mcore.runtime.preflight): output folders writable, with room, and the
size estimates they compare against (parameter counts checked against transformers' own model);
the model's config.json, the lengths against its context and the memory a run needs, through the
commands (`selm refpass` with its memory capped: without the check it would allocate until
stopped)."""

from __future__ import annotations

import json
import shutil

import pytest
from child_env import run_selm_limited

from selm_mcore import cli
from selm_mcore.runtime.errors import DiskFullError, InputError, format_bytes
from selm_mcore.runtime.preflight import (
    check_output_dir,
    memory_needed,
    model_bytes,
    num_params,
    step_checkpoint_bytes,
)


def test_a_writable_folder_passes_and_is_created(tmp_path):
    folder = check_output_dir(tmp_path / "a" / "b", what="train.output_dir")
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe file is gone


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("x")
    with pytest.raises(
        InputError,
        match=f"train.output_dir: {blocker} is a file, not a folder; "
        "point train.output_dir somewhere you can write",
    ):
        check_output_dir(blocker, what="train.output_dir")
    with pytest.raises(InputError, match=f"--out: cannot write into {blocker / 'sub'} "):
        check_output_dir(blocker / "sub", what="--out")


def test_a_read_only_filesystem_is_refused():
    with pytest.raises(InputError, match="--out-dir: cannot write into /proc/selm-out"):
        check_output_dir("/proc/selm-out", what="--out-dir")


def test_too_little_free_space_names_the_folder_needed_and_free(tmp_path):
    needed = shutil.disk_usage(tmp_path).free + (1 << 40)
    with pytest.raises(DiskFullError) as info:
        check_output_dir(tmp_path, needed_bytes=needed, what="train.output_dir")
    message = str(info.value)
    assert message.startswith(
        f"not enough free space in {tmp_path} (train.output_dir); "
        f"needs about {format_bytes(needed)}; "
    )
    assert f"{format_bytes(info.value.free)} free. Fix:" in message
    check_output_dir(tmp_path, needed_bytes=1 << 20)  # a megabyte fits


@pytest.mark.parametrize("tied", [False, True])
def test_model_size_estimates_count_the_parameters(tmp_path, tied):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=tied,
    )
    config.save_pretrained(tmp_path)
    model = LlamaForCausalLM(config)
    expected = sum(p.numel() for p in model.parameters())  # a tied weight once
    assert num_params(tmp_path) == expected
    assert model_bytes(tmp_path, "bf16") == 2 * expected
    assert model_bytes(tmp_path) == expected * torch.finfo(torch.float32).bits // 8
    assert step_checkpoint_bytes(tmp_path, "fp32") == expected * (4 + 8)
    assert step_checkpoint_bytes(tmp_path, "bf16") == expected * (2 + 8 + 4)


def _model_with(tmp_path, tiny_llama_dir, **config_changes):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **config_changes}))
    return model


def _config(tmp_path, write_config, write_jsonl, preference_row, model, **data):
    rows = write_jsonl(tmp_path / "rows.jsonl", [preference_row("Q?", "A.", "B.")] * 2)
    return write_config(
        tmp_path / "config.yaml",
        model={"hf_dir": str(model)},
        data={"train_path": str(rows), **data},
        loss={"alpha": 0.0},
        train={
            "global_batch_size": 2,
            "output_dir": str(tmp_path / "out"),
            "ref_cache": str(tmp_path / "cache.safetensors"),
            "tensorboard": False,
        },
        generation={"max_model_len": 512, "max_tokens": 16},
    )


@pytest.mark.parametrize("fault", ["ten_million_layers", "max_length_past_the_context"])
def test_selm_refpass_refuses_a_run_that_cannot_fit_at_once(
    tmp_path, tiny_llama_dir, write_config, write_jsonl, preference_row, fault
):
    """A config.json of 10^7 layers, and data.max_length far past the model's context with
    pad-to-max: one line before any process group, model or batch (the child's address space
    is capped at 3 GiB: without the check it grows until it is stopped)."""
    if fault == "ten_million_layers":
        model = _model_with(tmp_path, tiny_llama_dir, num_hidden_layers=10**7)
        data = {}
        expected = (
            "selm refpass: error: the model (10000000 layers, hidden 128, 1.48e+12 "
            "parameters) needs at least 5.4 TiB per process (weights 5.4 TiB) but"
        )
    else:
        model = tiny_llama_dir
        data = {"max_length": 10**7, "pad_to_max_length": True}
        expected = (
            "selm refpass: error: data.max_length=10000000 is longer than the model's context: "
            f"{model}/config.json has max_position_embeddings=1024. Fix: set data.max_length "
            "<= 1024"
        )
    config = _config(tmp_path, write_config, write_jsonl, preference_row, model, **data)
    result = run_selm_limited("refpass", str(config), memory_bytes=3 << 30, timeout_s=240)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(expected), lines[0]


@pytest.mark.parametrize("sequence_parallel", ["auto", "true", "false"])
def test_the_layer_inputs_bound_is_split_over_tp_unless_sequence_parallelism_is_off(
    tiny_llama_dir, sequence_parallel
):
    """The activations part of the memory bound: the layer inputs of one fixed-length
    micro-batch (chosen + rejected, 1024 tokens each, hidden 128, fp32) on every layer of the
    stage, 1/tp of them per process when sequence parallelism may be on (a lower bound)."""
    from selm_mcore.config.io import load_config
    from selm_mcore.modelspec import ModelShape

    cfg = load_config(
        None,
        [
            "parallel.tp=2",
            f"parallel.sequence_parallel={sequence_parallel}",
            "data.max_length=1024",
            "data.pad_to_max_length=true",
            "data.packing=none",
            "train.micro_batch_size=1",
        ],
    )
    shape = ModelShape.from_dir(tiny_llama_dir)
    split = 1 if sequence_parallel == "false" else 2
    per_layer = 2 * 1024 * 128 * 4
    assert memory_needed(shape, cfg, "train", "fp32")["activations"] == 4 * per_layer // split
    assert memory_needed(shape, cfg, "refpass", "fp32")["activations"] == per_layer // split


CONFIG_FAULTS = {
    "zero_heads": (
        {"num_attention_heads": 0},
        [],
        "config.json: num_attention_heads=0 must be a whole number >= 1",
    ),
    "negative_layers": (
        {"num_hidden_layers": -1},
        [],
        "config.json: num_hidden_layers=-1 must be a whole number >= 1",
    ),
    "vocab_divisible_by_0": (
        {},
        ["model.make_vocab_size_divisible_by=0"],
        "model.make_vocab_size_divisible_by=0 must be >= 1",
    ),
    "vocab_divisible_by_negative": (
        {},
        ["model.make_vocab_size_divisible_by=-64"],
        "model.make_vocab_size_divisible_by=-64 must be >= 1",
    ),
}


@pytest.mark.parametrize("command", ["train", "refpass", "generate", "convert"])
@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_a_config_that_describes_no_model_is_one_line_in_every_command(
    tmp_path, tiny_llama_dir, write_config, write_jsonl, preference_row, capsys, fault, command
):
    changes, overrides, expected = CONFIG_FAULTS[fault]
    if command == "convert" and overrides:
        pytest.skip("selm convert takes no config: it pads the vocabulary by the default")
    model = _model_with(tmp_path, tiny_llama_dir, **changes)
    config = _config(tmp_path, write_config, write_jsonl, preference_row, model)
    sets = [arg for item in overrides for arg in ("--set", item)]
    argv = {
        "train": ["train", str(config), *sets],
        "refpass": ["refpass", str(config), *sets],
        "generate": [
            "generate",
            str(config),
            *sets,
            "--prompts",
            str(tmp_path / "rows.jsonl"),
            "--out",
            str(tmp_path / "g.jsonl"),
        ],
        "convert": [
            "convert",
            "hf-to-mcore",
            "--hf-dir",
            str(model),
            "--out-dir",
            str(tmp_path / "m"),
        ],
    }[command]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_selm_generate_refuses_a_context_longer_than_the_model(
    tmp_path, tiny_llama_dir, write_config, write_jsonl, preference_row, capsys
):
    config = _config(tmp_path, write_config, write_jsonl, preference_row, tiny_llama_dir)
    argv = ["generate", str(config), "--prompts", str(tmp_path / "rows.jsonl")]
    argv += ["--out", str(tmp_path / "g.jsonl"), "--set", "generation.max_model_len=4096"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "selm generate: error: generation.max_model_len=4096 is longer than the model's context: "
        f"{tiny_llama_dir}/config.json has max_position_embeddings=1024. Fix: set "
        "generation.max_model_len <= 1024"
    ]
