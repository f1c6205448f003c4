"""selm_mcore.runtime.launch.run_local_ranks (behind tests/dist/launch.py): torchrun's environment
per rank, every rank's stderr on failure, a hard timeout that kills all ranks, and helpers a killed
rank leaves behind."""

import json

import pytest

from selm_mcore.runtime.launch import LaunchError, free_port, run_local_ranks

ENV_PROBE = (
    "import json, os; print(json.dumps({k: os.environ[k] for k in ('RANK', 'LOCAL_RANK', "
    "'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'OMP_NUM_THREADS', "
    "'EXTRA')}))"
)


def test_ranks_get_torchrun_environment():
    outs = run_local_ranks(["-c", ENV_PROBE], 3, timeout_s=60, env={"EXTRA": "x"})
    envs = [json.loads(out) for out in outs]
    assert [e["RANK"] for e in envs] == ["0", "1", "2"] == [e["LOCAL_RANK"] for e in envs]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"} == {e["LOCAL_WORLD_SIZE"] for e in envs}
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and envs[0]["MASTER_ADDR"] == "127.0.0.1"
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"1"} and envs[0]["EXTRA"] == "x"


def test_failure_reports_every_rank():
    script = (
        "import os, sys, time\n"
        "if os.environ['RANK'] == '1':\n"
        "    sys.stderr.write('rank one broke\\n'); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(LaunchError) as info:
        run_local_ranks(["-c", script], 2, timeout_s=120)
    message = str(info.value)
    assert "failed" in message and "rank 1 exit code 3" in message and "rank one broke" in message
    assert "--- rank 0 exit code -9" in message  # the sleeping rank was killed, not waited for


def test_timeout_kills_all_ranks():
    with pytest.raises(LaunchError, match="timed out after 2 s") as info:
        run_local_ranks(["-c", "import time; time.sleep(60)"], 2, timeout_s=2)
    assert str(info.value).count("exit code -9") == 2


def test_helpers_left_by_a_killed_rank_are_cleared(tmp_path):
    """A rank that dies without cleanup (SIGKILL) can leave helper processes behind, as Megatron's
    checkpoint writers do; the launcher clears each rank's process group."""
    import os
    import time

    pid_file = tmp_path / "helper.pid"
    script = (
        "import os, signal, subprocess\n"
        "helper = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(helper.pid))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    with pytest.raises(LaunchError):
        run_local_ranks(["-c", script], 1, timeout_s=60)
    helper_pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(helper_pid, 0)
        except ProcessLookupError:
            break
        try:  # reaped by init once killed; a zombie still answers kill(0)
            with open(f"/proc/{helper_pid}/stat") as stat:
                if stat.read().split(")")[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"helper process {helper_pid} left running after its rank was killed")


def test_free_port_can_be_bound():
    import socket

    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_ranks_get_cuda_hidden(monkeypatch):
    """run_distributed hides CUDA from every rank, even when the caller sees a device."""
    from launch import rank_environment, run_distributed

    assert rank_environment()["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in rank_environment(cuda=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    outs = run_distributed(
        "-c",
        2,
        timeout_s=60,
        module=False,
        args=["import json, os; print(json.dumps(os.environ.get('CUDA_VISIBLE_DEVICES')))"],
    )
    assert [json.loads(out) for out in outs] == ["", ""]


def test_dist_tests_run_with_cuda_hidden():
    import os

    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""  # tests/dist/conftest.py


def test_rank_with_a_visible_cuda_variable_uses_gloo(monkeypatch):
    """A caller with CUDA_VISIBLE_DEVICES=0 (a 1-GPU box): the ranks still set up gloo on CPU."""
    from pathlib import Path

    from launch import results, run_distributed

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    outs = run_distributed(Path(__file__).resolve().parent / "backend_worker.py", 2, timeout_s=180)
    for (rank,) in results(outs):
        assert rank == {"backend": "gloo", "device": "cpu", "cuda_available": False, "visible": ""}
