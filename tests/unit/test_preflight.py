"""Pre-flight checks of output folders (selm_mcore.runtime.preflight): writable, with room, and the
size estimates they compare against (parameter counts checked against transformers' own model)."""

from __future__ import annotations

import shutil

import pytest

from selm_mcore.runtime.errors import DiskFullError, InputError, format_bytes
from selm_mcore.runtime.preflight import (
    check_output_dir,
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
