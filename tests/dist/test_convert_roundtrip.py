"""HF -> Megatron (TP2, PP2) -> HF round trip through the converters.

1. ``tools/convert_hf/hf_to_mcore.py --tp 2 --pp 2`` (4 gloo ranks, started by the CLI itself)
   converts a tiny random Llama (GQA, untied, llama3 rope scaling).
2. One rank (this file re-run as ``python <this file> --worker M H2``, via tests/dist/launch.py)
   loads the checkpoint at TP1 (another layout than it was saved at) and saves its logits,
   checks that loading it into a model of another vocabulary size raises one clear
   CheckpointError, then exports it to H2 in sharded safetensors (mcore_to_hf in-process).
3. Here: every tensor of H2 equals the original bit for bit, transformers loads H2 with
   identical logits, tokenizer / chat template / generation config are there, and the TP1
   Megatron logits match HF.

The slow SmolLM2 test does the same for a real tied model through both CLIs and prints the
converters' peak memory.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CLI_DIR = REPO / "tools" / "convert_hf"
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _run_cli(script: str, *args, timeout_s: float) -> str:
    from launch import OFFLINE_ENV

    proc = subprocess.run(
        [sys.executable, str(CLI_DIR / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=str(REPO),
        env={**os.environ, **OFFLINE_ENV},
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-6000:]}"
    return proc.stderr


def _peak_rss_mb(log: str) -> list[int]:
    """Per-rank peak RSS (MB) that the converter logs at its end."""
    match = re.search(r"peak RSS per rank ([\d ]+) MB", log)
    assert match, f"no peak RSS line in the converter log:\n{log[-3000:]}"
    return [int(v) for v in match.group(1).split()]


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    assert files, f"no safetensors in {hf_dir}"
    tensors = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return tensors


def _assert_bit_exact(original: Path, exported: Path) -> int:
    a, b = _hf_tensors(original), _hf_tensors(exported)
    tied = json.loads((original / "config.json").read_text()).get("tie_word_embeddings", False)
    if tied:
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    return len(a)


def _assert_same_hf_model(original: Path, exported: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    m1 = AutoModelForCausalLM.from_pretrained(str(original), dtype=torch.float32).eval()
    m2 = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    assert m2.dtype == torch.float32
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, m1.config.vocab_size, (2, 40), generator=gen)
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
    c1, c2 = m1.config.to_dict(), m2.config.to_dict()
    for key in ("_name_or_path", "dtype", "transformers_version", "architectures"):
        c1.pop(key, None)
        c2.pop(key, None)
    assert c1 == c2
    t1 = AutoTokenizer.from_pretrained(str(original))
    t2 = AutoTokenizer.from_pretrained(str(exported))
    assert t1.chat_template and t1.chat_template == t2.chat_template
    text = "hello world, what is 2 plus 2?"
    assert t1(text)["input_ids"] == t2(text)["input_ids"]
    assert GenerationConfig.from_pretrained(str(exported)).eos_token_id == m1.config.eos_token_id


def _worker(mcore_dir: str, out_dir: str) -> None:
    from launch import emit

    from selm_mcore.mcore.checkpoint import (
        CheckpointError,
        build_model_from_checkpoint,
        load_model_checkpoint,
    )
    from selm_mcore.mcore.convert import mcore_to_hf
    from selm_mcore.mcore.model import build_model, load_hf_config
    from selm_mcore.mcore.parallel import init_parallel

    ctx = init_parallel(tp=1, pp=1)
    models, hf_config, meta = build_model_from_checkpoint(mcore_dir, ctx)
    ids = torch.load(Path(out_dir) / "input_ids.pt")
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        torch.save(models[0](ids, positions, None), Path(out_dir) / "mcore_tp1_logits.pt")

    other = load_hf_config(Path(mcore_dir) / "hf")
    other.vocab_size = hf_config.vocab_size + 600
    try:
        load_model_checkpoint(build_model(other, ctx, init_weights=False), ctx, mcore_dir)
        emit({"vocab_error": None})
    except CheckpointError as exc:
        emit({"vocab_error": str(exc)})
    # WORLD_SIZE=1 here: mcore_to_hf runs in this process (and ends the process group).
    mcore_to_hf(mcore_dir, Path(out_dir) / "hf_export", max_shard_bytes=1 << 20)


@pytest.mark.timeout(420)
def test_roundtrip_tp2_pp2_bit_exact(tmp_path):
    from launch import results, run_distributed
    from transformers import AutoModelForCausalLM

    from selm_mcore.testing.assets import build_tiny_llama

    hf_dir, mcore_dir, out_dir = tmp_path / "hf", tmp_path / "mcore", tmp_path / "out"
    build_tiny_llama(
        hf_dir,
        rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        seed=5,
    )
    log = _run_cli(
        "hf_to_mcore.py",
        "--hf-dir",
        hf_dir,
        "--out-dir",
        mcore_dir,
        "--tp",
        2,
        "--pp",
        2,
        timeout_s=300,
    )
    meta = json.loads((mcore_dir / "selm_checkpoint.json").read_text())
    assert (meta["tp"], meta["pp"], meta["vocab_size"], meta["padded_vocab_size"]) == (
        2,
        2,
        500,
        512,
    )
    assert len(_peak_rss_mb(log)) == 4  # one report per rank

    out_dir.mkdir()
    ids = torch.randint(0, 500, (2, 80), generator=torch.Generator().manual_seed(2))
    torch.save(ids, out_dir / "input_ids.pt")
    outs = run_distributed(
        Path(__file__).resolve(), 1, ["--worker", mcore_dir, out_dir], timeout_s=240
    )
    (report,) = results(outs)[0]
    message = report["vocab_error"]
    assert message and "vocab_size=500" in message and "vocab_size=1100" in message
    assert "padded_vocab=512" in message  # names the fix

    exported = out_dir / "hf_export"
    assert (exported / "model.safetensors.index.json").is_file()  # 1 MiB shards
    assert len(list(exported.glob("model-*-of-*.safetensors"))) > 1
    assert _assert_bit_exact(hf_dir, exported) == 4 * 9 + 3
    _assert_same_hf_model(hf_dir, exported)

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(ids).logits
    mcore_logits = torch.load(out_dir / "mcore_tp1_logits.pt")
    diff = (mcore_logits[..., :500] - reference).abs().max().item()
    print(f"checkpoint saved at TP2xPP2, loaded at TP1: max abs logit diff vs HF {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_roundtrip_and_peak_memory(tmp_path):
    from selm_mcore.testing.assets import smollm2_dir

    hf_dir = smollm2_dir()
    mcore_dir, exported = tmp_path / "mcore", tmp_path / "hf"
    log_in = _run_cli("hf_to_mcore.py", "--hf-dir", hf_dir, "--out-dir", mcore_dir, timeout_s=600)
    log_out = _run_cli(
        "mcore_to_hf.py", "--mcore-dir", mcore_dir, "--out-dir", exported, timeout_s=600
    )
    print(
        f"SmolLM2-135M fp32 (538 MB of weights): hf_to_mcore peak RSS "
        f"{_peak_rss_mb(log_in)} MB, mcore_to_hf peak RSS {_peak_rss_mb(log_out)} MB"
    )
    assert _assert_bit_exact(hf_dir, exported) == 30 * 9 + 2  # tied: no lm_head
    _assert_same_hf_model(hf_dir, exported)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3])
