"""Bad inputs to the converters each raise one clear error, before any rank is started:
a missing shard file, a config with attention bias, tp=3 for 8 query groups, a missing or
misshapen tensor, an HF folder passed as a Megatron checkpoint, a non-empty export target
without overwrite. (A checkpoint loaded into a
model of another vocabulary size needs Megatron ranks: tests/dist/test_convert_roundtrip.py.)"""

import json

import pytest
import torch
from transformers import LlamaConfig

from selm_mcore.mcore.checkpoint import CheckpointError
from selm_mcore.mcore.convert import hf_to_mcore, mcore_to_hf
from selm_mcore.mcore.model import UnsupportedModelError, load_hf_config
from selm_mcore.mcore.parallel import ParallelLayoutError
from selm_mcore.mcore.weights import check_same_architecture
from selm_mcore.runtime.weight_files import SafetensorsReader, WeightsError
from selm_mcore.testing.assets import build_tiny_llama


def test_missing_shard_file(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).save_pretrained(
        str(sharded), max_shard_size="1MB"
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    SafetensorsReader(sharded)  # complete: fine
    (sharded / shards[1]).unlink()
    with pytest.raises(
        WeightsError,
        match=rf"model.safetensors.index.json lists shard file\(s\) "
        rf"\['{shards[1]}'\] that are not in",
    ):
        hf_to_mcore(sharded, tmp_path / "out", tp=1, pp=1)
    assert not (tmp_path / "out").exists()


def test_attention_bias_refused(tmp_path):
    build_tiny_llama(tmp_path / "bias", attention_bias=True)
    with pytest.raises(UnsupportedModelError, match="attention_bias=true is not supported"):
        hf_to_mcore(tmp_path / "bias", tmp_path / "out", tp=1, pp=1)


def test_tp3_for_8_query_groups_refused(tmp_path):
    # Only config.json is needed: the layout is checked before any weight is read.
    LlamaConfig(
        vocab_size=500,
        hidden_size=768,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=24,
        num_key_value_heads=8,
    ).save_pretrained(str(tmp_path))
    with pytest.raises(
        ParallelLayoutError,
        match=r"parallel.tp=3 must divide model.num_key_value_heads "
        r"\(query groups\)=8; choose one of \[1, 2, 4, 8\]",
    ):
        hf_to_mcore(tmp_path, tmp_path / "out", tp=3, pp=1)


def test_missing_and_misshapen_tensors(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(tmp_path)
    with pytest.raises(WeightsError, match="'model.layers.2.mlp.up_proj.weight' is missing"):
        reader.read("model.layers.2.mlp.up_proj.weight", (256, 128))
    with pytest.raises(
        WeightsError,
        match=r"'model.norm.weight' in .*model.safetensors has "
        r"shape \(64,\), config.json implies \(128,\)",
    ):
        reader.read("model.norm.weight", (128,))


def test_no_weights_and_other_architecture(tmp_path, tiny_llama_dir):
    LlamaConfig(vocab_size=500, hidden_size=128, num_attention_heads=4).save_pretrained(
        str(tmp_path)
    )
    with pytest.raises(WeightsError, match="no safetensors weights"):
        SafetensorsReader(tmp_path)
    with pytest.raises(
        WeightsError, match="has hidden_size=128 but the model was built with hidden_size=256"
    ):
        config = load_hf_config(tiny_llama_dir)
        config.hidden_size = 256
        check_same_architecture(config, tiny_llama_dir)


def test_hf_folder_is_not_a_checkpoint(tmp_path, tiny_llama_dir):
    with pytest.raises(CheckpointError, match="selm_checkpoint.json not found.*hf_to_mcore"):
        mcore_to_hf(tiny_llama_dir, tmp_path / "out")


def test_export_target_must_be_empty_unless_overwrite(tmp_path):
    from selm_mcore.mcore.convert import ExportTargetError, check_export_target

    check_export_target(tmp_path / "new", overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty", overwrite=False)
    full = tmp_path / "full"
    full.mkdir()
    for name in ("a", "b", "c", "d", "e"):
        (full / name).touch()
    with pytest.raises(
        ExportTargetError,
        match=r"full is not empty \(5 entries: a, b, c, d, "
        r"\.\.\.\); stale .*Pass --overwrite",
    ):
        check_export_target(full, overwrite=False)
    check_export_target(full, overwrite=True)
    (tmp_path / "file").touch()
    with pytest.raises(ExportTargetError, match="is a file"):
        check_export_target(tmp_path / "file", overwrite=True)
    (tmp_path / "link").symlink_to(full)  # the rename into place would replace the link
    with pytest.raises(ExportTargetError, match=rf"link is a symbolic link \(to {full}\)"):
        check_export_target(tmp_path / "link", overwrite=True)


def test_convert_child_spec_round_trips_through_its_json_file():
    """What ``selm _worker convert SPEC`` reads is what the launching process wrote (the ranks
    themselves run in tests/dist/test_convert_roundtrip.py)."""
    from selm_mcore.mcore.convert import ConvertJob

    jobs = [
        ConvertJob("hf-to-mcore", "/m/hf", "/m/mcore", tp=2, pp=2, dtype="bf16"),
        ConvertJob("mcore-to-hf", "/m/mcore", "/m/hf", 1, 4, max_shard_bytes=1 << 20),
    ]
    for job in jobs:
        text = job.to_json()
        assert ConvertJob.from_json(text) == job
        assert ConvertJob.from_dict(json.loads(text)) == job  # the worker's path (cli reads JSON)
    assert json.loads(jobs[1].to_json())["max_shard_bytes"] == 1 << 20
    with pytest.raises(ValueError, match="unknown conversion job 'defragment'"):
        ConvertJob.from_dict({"job": "defragment"})
    with pytest.raises(TypeError, match="hf_dir"):  # the old dict spec's keys are refused
        ConvertJob.from_dict({"job": "hf-to-mcore", "hf_dir": "/m/hf", "out_dir": "/o"})


def _model_copy(tmp_path, tiny_llama_dir, change: str):
    """The tiny Llama with one fault: a config.json of fewer layers than the weights, an int8
    tensor, a missing tensor, a tensor of another shape, or a safetensors header claiming
    2^62 bytes."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / change
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    if change == "fewer_layers":
        config = json.loads((model / "config.json").read_text())
        config["num_hidden_layers"] = 2
        (model / "config.json").write_text(json.dumps(config))
    elif change == "int8":
        tensors["model.norm.weight"] = torch.ones(128, dtype=torch.int8)
    elif change == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif change == "shape":
        tensors["model.layers.3.self_attn.o_proj.weight"] = torch.zeros(128, 64)
    if change != "huge_header":
        save_file(tensors, str(weights))
    else:
        with open(weights, "r+b") as f:
            f.write((1 << 62).to_bytes(8, "little"))
    return model


WEIGHT_FAULTS = {
    "fewer_layers": "the weights do not match the model its config.json describes: 18 "
    "tensor(s) the model does not read: model.layers.2.input_layernorm.weight, "
    "model.layers.2.mlp.down_proj.weight, model.layers.2.mlp.gate_proj.weight, "
    "model.layers.2.mlp.up_proj.weight, model.layers.2.post_attention_layernorm.weight, ... "
    "(13 more) (config.json: 2 layers)",
    "int8": "1 tensor(s) not floating-point: model.norm.weight (I8); only F32, BF16, F16, F64 "
    "weights load (no quantised format",
    "missing": "1 tensor(s) missing: model.layers.1.mlp.up_proj.weight. Fix: use the "
    "config.json that came with these weights",
    "shape": "1 tensor(s) of another shape: model.layers.3.self_attn.o_proj.weight (128, 64) "
    "(the config implies (128, 128))",
    "huge_header": "model.safetensors: the header claims 4611686018427387904 bytes but the "
    "file has",
}


@pytest.mark.parametrize("change", sorted(WEIGHT_FAULTS))
def test_weights_that_do_not_match_the_config_stop_the_load_naming_them(
    tmp_path, tiny_llama_dir, change, capsys
):
    """`selm convert hf-to-mcore` (the loader every command uses: load_hf_weights) on each
    fault: one line naming the tensors (or the file), before any rank starts; nothing
    written. Before, the fewer-layers folder loaded a subset and the int8 tensor was cast."""
    from selm_mcore import cli

    model = _model_copy(tmp_path, tiny_llama_dir, change)
    out = tmp_path / "out"
    assert cli.main(["convert", "hf-to-mcore", "--hf-dir", str(model), "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"selm convert: error: {model}"), err
    assert WEIGHT_FAULTS[change] in err[0], err[0]
    assert not out.exists()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_the_expected_tensors_are_the_name_map_each_read_once(tmp_path, family, tied):
    """The tensors a load expects come from the name map (``param_table``), each once: exactly
    the tensors transformers itself saves for a tiny model of each supported family (Qwen2's
    q/k/v biases, Phi-3's fused qkv_proj and gate_up_proj), untied and tied."""
    import transformers
    from safetensors import safe_open

    from selm_mcore.mcore.families import FAMILIES
    from selm_mcore.mcore.weights import hf_tensor_plan

    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "phi3"}  # a new family joins this test
    config = transformers.AutoConfig.for_model(
        family,
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    getattr(transformers, FAMILIES[family].architecture)(config).save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert ("lm_head.weight" in saved) is not tied
    assert hf_tensor_plan(load_hf_config(tmp_path)) == saved
