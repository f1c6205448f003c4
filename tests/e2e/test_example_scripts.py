"""The GPU example scripts stop before any download or phase when `selm plan --check` predicts
that their layout does not fit the GPUs (SELM_GPU_MEM_GIB stands in for nvidia-smi here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(script: str, tmp_path: Path, *args: str, **env: str):
    # this environment's python first on PATH, as an activated environment has it
    path = f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    full_env = {**os.environ, "PATH": path, **env}
    return subprocess.run(
        ["bash", str(REPO / "examples" / script), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_8b_script_stops_early_when_the_layout_does_not_fit(tmp_path):
    proc = run_script(
        "selm_llama3_8b.sh",
        tmp_path,
        "--set",
        "parallel.tp=1",
        "--set",
        "model.recompute=false",
        SELM_GPU_MEM_GIB="40",
        SELM_DOWNLOADS=str(tmp_path / "downloads"),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "parallel.tp=1 pp=1" in proc.stderr and "is predicted to need" in proc.stderr
    assert "downloading" not in proc.stdout + proc.stderr
    assert not (tmp_path / "downloads").exists()


def test_70b_script_checks_the_node_count_it_gets(tmp_path):
    from selm_mcore.plan import KNOWN_MODELS

    downloads = tmp_path / "downloads"
    model = downloads / "Meta-Llama-3-70B-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text(
        json.dumps(KNOWN_MODELS["meta-llama/Meta-Llama-3-70B-Instruct"][0])
    )
    for folder in ("ultrafeedback_binarized/data", "PairRM", "deberta-v3-large"):
        (downloads / folder).mkdir(parents=True)
    (downloads / "PairRM" / "config.json").write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # Slurm's node list, as the batch step sees it
    scontrol.write_text("#!/bin/sh\necho node0\necho node1\n")
    scontrol.chmod(0o755)
    # 2 nodes = 16 GPUs at TP8 x PP2: DP1 holds the whole optimizer state per GPU
    proc = run_script(
        "selm_llama3_70b.sh",
        tmp_path,
        SELM_DOWNLOADS=str(downloads),
        SLURM_NNODES="2",
        SLURM_CPUS_PER_TASK="8",
        SELM_GPU_MEM_GIB="80",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "(dp=1)" in proc.stderr and "on 16 GPUs is predicted to need" in proc.stderr
    assert "2 node(s), 8 CPUs per node task" in proc.stdout


def test_zephyr_script_checks_the_layout_for_8_gpus_before_any_download(tmp_path):
    """8 x 80 GB: the layout is predicted to fit and the script goes on to its first download
    (a stand-in `hf` that fails); 8 x 40 GB: it stops before downloading anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "hf"
    stand_in.write_text('#!/bin/sh\necho "hf $*"\nexit 3\n')
    stand_in.chmod(0o755)
    downloads = str(tmp_path / "downloads")
    proc = run_script(
        "selm_zephyr_7b.sh", tmp_path, SELM_GPU_MEM_GIB="80", SELM_DOWNLOADS=downloads
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "selm_zephyr_7b.yaml: tp2 pp1 dp4 recompute=none is predicted to fit" in proc.stdout
    assert "global batch 256 pairs" in proc.stdout
    assert "hf download HuggingFaceH4/mistral-7b-sft-beta" in proc.stdout
    proc = run_script(
        "selm_zephyr_7b.sh", tmp_path, SELM_GPU_MEM_GIB="40", SELM_DOWNLOADS=downloads
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "is predicted to need" in proc.stderr and "hf download" not in proc.stdout
