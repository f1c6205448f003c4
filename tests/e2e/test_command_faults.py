"""Faults a user meets at the command line, each run as a user would (``python -m selm_mcore.cli``):

* ``selm run`` whose manifest was deleted between runs: refused, naming the workdir and the
  outputs, nothing deleted; ``--fresh`` starts over on request;
* a full disk: ``selm run`` on a full tmpfs names the file it could not write and the free
  space; ``selm convert`` into a tmpfs too small for the model is refused before converting
  (the space needed and free named); one just big enough for the pre-flight estimate but not
  for the checkpoint's extra files fails inside Megatron's writer and still names the folder;
* under torchrun, a user error is printed once (rank 0), not once per rank.

The tmpfs cases run the command in its own user and mount namespace (``unshare -rm``, no root
needed where user namespaces are allowed) and are skipped where that is not possible.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from child_env import child_env

from selm_mcore.runtime.files import hash_path

TIMEOUT_S = 300


def selm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selm_mcore.cli", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def selm_on_tmpfs(mount_point: Path, size_bytes: int, fill_bytes: int, *args: str):
    """``selm ARGS`` with a fresh tmpfs of ``size_bytes`` at ``mount_point`` (``fill_bytes`` of
    it taken by a file), in a private mount namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    mount_point.mkdir(parents=True, exist_ok=True)
    script = (
        f"mount -t tmpfs -o size={size_bytes} tmpfs {shlex.quote(str(mount_point))} || "
        "exit 77; "
        + (
            f"head -c {fill_bytes} /dev/zero > {shlex.quote(str(mount_point / 'fill'))}; "
            if fill_bytes
            else ""
        )
        + shlex.join([sys.executable, "-m", "selm_mcore.cli", *args])
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if result.returncode == 77 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {result.stderr[-300:]}")
    return result


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


@pytest.fixture
def broken_run(tmp_path, write_jsonl, write_config, preference_row):
    """A run whose generate phase fails at once (the model folder holds a config.json, which
    `selm run` checks first, but no weights or tokenizer), so `selm run` gets as far as a
    finished round-1 portion in seconds."""
    model = tmp_path / "not_a_model"
    model.mkdir()
    dims = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=512)
    config = dict(model_type="llama", num_attention_heads=4, max_position_embeddings=4096)
    (model / "config.json").write_text(json.dumps({**dims, **config}))
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [preference_row(f"q{i}", "a", "b", prompt_id=f"p{i}") for i in range(4)],
    )
    workdir = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        model={"hf_dir": str(model)},
        data={"train_path": str(data)},
        ranking={"kind": "verifiable"},
        train={"global_batch_size": 2},
        online={"rounds": 1, "final_eval": False, "workdir": str(workdir)},
    )
    return config, workdir


def test_deleted_manifest_is_refused_and_fresh_starts_over(broken_run):
    config, workdir = broken_run
    first = selm("run", str(config))
    assert first.returncode == 1 and "round1/generate failed" in first.stderr, first.stderr
    portion = workdir / "round_1" / "portion.jsonl"
    assert portion.is_file()
    (portion.parent / "rank").mkdir()  # a finished later output too (e.g. copied back)
    (portion.parent / "rank" / "pairs.jsonl").write_text("{}\n")
    before = hash_path(workdir / "round_1")
    (workdir / "manifest.json").unlink()

    refused = selm("run", str(config))
    assert refused.returncode == 1
    (line,) = error_lines(refused.stderr)
    assert f"{workdir} holds finished outputs" in line
    assert "round_1/portion.jsonl (round1/portion), round_1/rank (round1/rank)" in line
    assert "--redo round1/portion" in line and "--fresh" in line
    assert "Traceback" not in refused.stderr
    assert hash_path(workdir / "round_1") == before  # nothing deleted

    fresh = selm("run", str(config), "--fresh")
    assert fresh.returncode == 1 and "round1/generate failed" in fresh.stderr
    assert f"--fresh: deleting {portion}" in fresh.stderr
    assert not (portion.parent / "rank").exists()
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert list(manifest["phases"]) == ["round1/portion"]


def test_selm_run_on_a_full_disk_names_the_file(broken_run, tmp_path):
    config, workdir = broken_run
    result = selm_on_tmpfs(workdir, 64 << 10, 64 << 10, "run", str(config))
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"selm run: error: no space left on the device while writing {workdir}/")
    assert "; 0 B free. Fix: " in line and "Traceback" not in result.stderr


def test_convert_checks_the_space_first_and_names_a_full_disk(tiny_llama_dir, tmp_path):
    from selm_mcore.runtime.preflight import model_bytes

    needed = model_bytes(tiny_llama_dir, "fp32")
    small = tmp_path / "small"
    refused = selm_on_tmpfs(
        small,
        needed // 2,
        0,
        "convert",
        "hf-to-mcore",
        "--hf-dir",
        str(tiny_llama_dir),
        "--out-dir",
        str(small / "ckpt"),
    )
    assert refused.returncode == 1, refused.stderr[-3000:]
    (line,) = error_lines(refused.stderr)
    assert f"not enough free space in {small} (--out-dir)" in line
    assert "needs about" in line and "free. Fix:" in line
    assert "hf_to_mcore" not in refused.stderr  # no conversion rank ran

    # Room for the estimate (the weights) but not for the tokenizer and metadata as well: the
    # write fails inside Megatron's checkpoint writer, and the error still names the folder.
    tight = selm_on_tmpfs(
        small,
        needed + (16 << 10),
        0,
        "convert",
        "hf-to-mcore",
        "--hf-dir",
        str(tiny_llama_dir),
        "--out-dir",
        str(small / "ckpt"),
    )
    assert tight.returncode == 1, tight.stderr[-3000:]
    (line,) = [line for line in error_lines(tight.stderr) if line.startswith("selm convert")]
    # The checkpoint is written beside its target first (a fresh temporary folder).
    written = re.search(rf"writing {small}/\.ckpt\.[a-z0-9_]{{8}}\.tmp/model failed", line)
    assert written, tight.stderr[-3000:]
    assert "the disk is full" in line and "; 0 B free. Fix: " in line


@pytest.mark.timeout(300)
def test_under_torchrun_a_user_error_is_printed_once(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("loss:\n  beta: 0\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "selm_mcore.cli",
            "generate",
            str(config),
            "--prompts",
            "p.jsonl",
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("loss.beta=0.0 must be a finite number > 0") == 1, output[-3000:]
    assert "selm generate: error: " in output
    assert "selm_mcore/config/schema.py" not in output  # no rank printed a traceback of our code
