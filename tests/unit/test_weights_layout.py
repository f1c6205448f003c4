"""HF <-> Megatron tensor layouts of selm_mcore.mcore.weights, single process, against references
written out here with explicit per-head loops: QKV interleaved per query group, fc1 = [gate;
up] per TP shard, row-parallel columns, padded vocabulary rows; export re-joins them exactly;
the streaming safetensors writer (selm_mcore.runtime.weight_files) produces files safetensors and
the reader read back, also from (name, tensor) pairs of mixed dtypes (the vLLM weight reload)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from selm_mcore.mcore.model import padded_vocab_size
from selm_mcore.mcore.weights import export_plan, param_table, read_local_shard, split_full
from selm_mcore.runtime.weight_files import (
    HF_INDEX_FILE,
    SafetensorsReader,
    StreamingSafetensorsWriter,
    write_safetensors,
)

CONFIG = LlamaConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def hf_tensors(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in export_plan(CONFIG)}
    folder = tmp_path_factory.mktemp("hf")
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, tensors


def reference_qkv(q, k, v, groups, heads, hd):
    """[q heads of group 0; k_0; v_0; q heads of group 1; ...] built head by head."""
    per_group = heads // groups
    rows = []
    for g in range(groups):
        for j in range(per_group):
            head = g * per_group + j
            rows.append(q[head * hd : (head + 1) * hd])
        rows.append(k[g * hd : (g + 1) * hd])
        rows.append(v[g * hd : (g + 1) * hd])
    return torch.cat(rows)


def reference_shard(spec, tensors, tp, rank, padded):
    t = [tensors[n] for n in spec.hf_names]
    if spec.kind == "replicated":
        return t[0]
    if spec.kind == "row":
        return t[0].chunk(tp, dim=1)[rank]
    if spec.kind == "fc1":
        return torch.cat([t[0].chunk(tp)[rank], t[1].chunk(tp)[rank]])
    if spec.kind == "vocab":
        full = torch.cat([t[0], torch.zeros(padded - t[0].shape[0], t[0].shape[1])])
        return full.chunk(tp)[rank]
    if spec.kind == "qkv":
        full = reference_qkv(*t, CONFIG.num_key_value_heads, CONFIG.num_attention_heads, 16)
        return full.chunk(tp)[rank]
    raise AssertionError(spec.kind)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_match_reference_and_rejoin_exactly(hf_tensors, tp):
    folder, tensors = hf_tensors
    reader = SafetensorsReader(folder)
    padded = padded_vocab_size(CONFIG.vocab_size, tp)
    table = param_table(CONFIG, pp=1, num_chunks=1)
    assert sorted(n for s in table for n in s.hf_names) == sorted(tensors)
    for spec in table:
        shapes = [reference_shard(spec, tensors, tp, r, padded).shape for r in range(tp)]
        shards = [
            read_local_shard(reader, spec, CONFIG, tp, r, torch.full(shape, float("nan")))
            for r, shape in enumerate(shapes)
        ]
        for rank, shard in enumerate(shards):
            assert torch.equal(shard, reference_shard(spec, tensors, tp, rank, padded)), (
                spec.part,
                rank,
            )
        for name, full in zip(spec.hf_names, split_full(spec, shards, CONFIG)):
            assert torch.equal(full, tensors[name]), name


def test_param_table_owners_follow_megatron_interleaved_split():
    config = LlamaConfig(num_hidden_layers=8, tie_word_embeddings=True)
    table = param_table(config, pp=2, num_chunks=2)
    owner = {s.layer: (s.pp_rank, s.chunk) for s in table if s.layer is not None}
    # 8 layers / (pp 2 * vpp 2): chunk 0 of stage 0 = 0-1, stage 1 = 2-3, chunk 1: 4-5, 6-7.
    assert [owner[i] for i in range(8)] == [
        (0, 0),
        (0, 0),
        (1, 0),
        (1, 0),
        (0, 1),
        (0, 1),
        (1, 1),
        (1, 1),
    ]
    assert table[0].part == "embedding" and (table[0].pp_rank, table[0].chunk) == (0, 0)
    assert table[-1].part == "final_norm" and (table[-1].pp_rank, table[-1].chunk) == (1, 1)
    assert "lm_head.weight" not in [n for s in table for n in s.hf_names]  # tied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_writer_shards_and_reads_back(tmp_path, hf_tensors, dtype):
    _, tensors = hf_tensors
    plan = export_plan(CONFIG)
    writer = StreamingSafetensorsWriter(
        tmp_path, [(name, shape, dtype) for name, shape in plan], max_shard_bytes=40_000
    )
    for name, _ in plan:
        writer.write(name, tensors[name])
    writer.close()
    assert len(writer.files) > 2
    index = json.loads((tmp_path / HF_INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert sorted(set(index["weight_map"].values())) == sorted(writer.files)
    loaded = {}
    for file_name in writer.files:
        loaded.update(load_file(str(tmp_path / file_name)))  # the real safetensors parser
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in loaded.values()
    )
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name], tensor.to(dtype)), name
    reader = SafetensorsReader(tmp_path)
    name, shape = plan[3]
    assert torch.equal(reader.read(name, shape), tensors[name].to(dtype))


def test_streaming_writer_single_file_and_order_check(tmp_path, hf_tensors):
    _, tensors = hf_tensors
    plan = export_plan(CONFIG)
    writer = StreamingSafetensorsWriter(
        tmp_path, [(name, shape, torch.float32) for name, shape in plan]
    )
    assert writer.files == ["model.safetensors"]
    with pytest.raises(RuntimeError, match="export order"):
        writer.write(plan[1][0], tensors[plan[1][0]])
    writer.write(plan[0][0], tensors[plan[0][0]])
    with pytest.raises(RuntimeError, match="export incomplete"):
        writer.close()


def test_named_tensors_keep_their_dtypes_in_shards_and_one_file(tmp_path):
    """``write_safetensors``: what the vLLM reload writes for a multi-process engine."""
    torch.manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 32) for i in range(5)}  # 8 KiB each
    tensors["view.weight"] = torch.randn(32, 64).t()  # non-contiguous
    tensors["half.weight"] = torch.randn(16, 8).to(torch.bfloat16)
    tensors["steps"] = torch.arange(7)
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    sharded.mkdir()
    single.mkdir()
    files = write_safetensors(tensors.items(), sharded, max_shard_bytes=20_000)
    assert [p.name for p in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((sharded / HF_INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert write_safetensors(tensors.items(), single) == [single / "model.safetensors"]
    assert not (single / HF_INDEX_FILE).exists()
    for paths in (files, [single / "model.safetensors"]):
        loaded = {}
        for path in paths:
            loaded.update(load_file(str(path)))  # the real safetensors parser
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
