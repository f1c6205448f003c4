"""Children die with their parent: real processes SIGKILLed, then no process of their tree left.

* ``selm train`` killed after its first step checkpoint: it started no spawned server for its
  checkpoint writers' results (Megatron's multiprocessing manager, which outlived a SIGKILLed
  rank, is replaced by a queue of the rank's own), and any forked writer dies with it;
* the torchrun parent of a 2-rank ``selm train`` killed: both ranks (each in its own session,
  so a process-group kill would miss them) and their helpers die;
* ``selm run`` killed while its ``selm generate`` phase runs: the phase's process tree dies;
* ``selm generate`` killed while its data-parallel vLLM engine processes start: they die;
* ``run_local_ranks`` and ``run_command`` (the same mechanism as ``selm run``: a death signal
  set between fork and exec) checked through a plain parent that is killed.

Each test captures the whole process tree (walking /proc) before the kill, then waits up to
``GRACE_S`` seconds for every captured process to be gone (zombies count as gone). Linux only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from child_env import child_env

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal is Linux-only"
)

GRACE_S = 5.0
START_TIMEOUT_S = 300


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid``, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1])


def descendants(root: int) -> set[int]:
    """Every live process under ``root`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_until(condition, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            out = Path(proc.args_log).read_text(errors="replace")
            pytest.fail(f"the process exited ({proc.returncode}) before {what}:\n{out[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def kill_and_check_tree(proc: subprocess.Popen, tree: set[int]) -> None:
    """SIGKILL ``proc`` alone; every process of ``tree`` must be gone within GRACE_S."""
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and any(alive(pid) for pid in tree):
            time.sleep(0.1)
        left = {pid: cmdline(pid)[:200] for pid in tree if alive(pid)}
        assert not left, f"alive {GRACE_S} s after the parent's SIGKILL: {left}"
    finally:
        for pid in tree:  # never leave strays behind for the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` with its output in ``log`` (a pipe nobody reads could block it)."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=handle, stderr=subprocess.STDOUT)
    proc.args_log = str(log)
    return proc


@pytest.fixture
def train_config(tmp_path, tiny_llama_dir, write_jsonl, write_config, preference_row):
    """A round that would train for a long time, saving a step checkpoint every step."""
    rows = [
        preference_row(
            f"What is {i} plus {i + 1}?", f"It is {2 * i + 1}.", "I do not know.", prompt_id=f"p{i}"
        )
        for i in range(64)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "train.yaml",
        model={"hf_dir": str(tiny_llama_dir)},
        data={
            "train_path": str(data),
            "max_length": 64,
            "max_prompt_length": 32,
            "pad_to_multiple_of": 8,
        },
        loss={"alpha": 0.0},
        train={
            "global_batch_size": 2,
            "max_steps": 10_000,
            "save_interval": 1,
            "keep_checkpoints": 1,
            "reference_mode": "onthefly",
            "tensorboard": False,
            "output_dir": str(out),
        },
        online={"rounds": 1, "final_eval": False, "workdir": str(tmp_path / "run")},
        ranking={"kind": "verifiable"},
        generation={
            "max_tokens": 16,
            "max_model_len": 256,
            "enforce_eager": True,
            "kv_cache_memory_gb": 0.25,
            "dtype": "float32",
        },
    )
    return config, out


@pytest.mark.timeout(600)
def test_sigkilled_selm_train_leaves_no_checkpoint_writer(train_config):
    config, out = train_config
    proc = _start(
        [sys.executable, "-m", "selm_mcore.cli", "train", str(config)], out.parent / "train.log"
    )
    wait_until(
        lambda: (out / "checkpoints" / "latest").is_file(),
        START_TIMEOUT_S,
        "the first step checkpoint",
        proc,
    )
    tree = descendants(proc.pid)  # the writers of a save in progress, if any
    servers = [cmdline(pid)[:200] for pid in tree if "spawn_main" in cmdline(pid)]
    assert not servers, f"a spawned helper server under `selm train`: {servers}"
    kill_and_check_tree(proc, tree)


@pytest.mark.timeout(600)
def test_sigkilled_torchrun_parent_leaves_no_rank(train_config):
    config, out = train_config
    proc = _start(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "selm_mcore.cli",
            "train",
            str(config),
        ],
        out.parent / "torchrun.log",
    )
    wait_until(
        lambda: (out / "checkpoints" / "latest").is_file(),
        START_TIMEOUT_S,
        "the first step checkpoint",
        proc,
    )
    tree = descendants(proc.pid)
    ranks = [pid for pid in tree if "selm_mcore.cli train" in cmdline(pid)]
    assert len(ranks) >= 2, {pid: cmdline(pid) for pid in tree}
    kill_and_check_tree(proc, tree)


@pytest.mark.timeout(600)
def test_sigkilled_selm_run_leaves_no_phase_process(train_config):
    config, out = train_config
    proc = _start(
        [sys.executable, "-m", "selm_mcore.cli", "run", str(config)], out.parent / "run.log"
    )

    def generate_started() -> bool:
        return any("selm_mcore.cli generate" in cmdline(pid) for pid in descendants(proc.pid))

    wait_until(generate_started, START_TIMEOUT_S, "the generate phase's process", proc)
    kill_and_check_tree(proc, descendants(proc.pid))


# A parent that starts children through our launchers and then waits to be killed.
LAUNCHER_PARENT = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    from selm_mcore.runtime.launch import run_local_ranks
    from selm_mcore.loop.runner import run_command

    if __name__ == "__main__":
        sleeper = ["-c", "import time; time.sleep(120)"]
        if sys.argv[1] == "ranks":
            run_local_ranks(sleeper, 2, timeout_s=300)
        else:
            run_command([sys.executable, *sleeper], Path(tempfile.mkdtemp()) / "log")
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher", ["ranks", "command"])
def test_children_of_our_launchers_die_with_the_launcher(tmp_path, launcher):
    script = tmp_path / "parent.py"
    script.write_text(LAUNCHER_PARENT)
    proc = _start([sys.executable, str(script), launcher], tmp_path / "parent.log")
    expected = 2 if launcher == "ranks" else 1
    wait_until(lambda: len(descendants(proc.pid)) >= expected, 60, "the children", proc)
    kill_and_check_tree(proc, descendants(proc.pid))


@pytest.mark.timeout(300)
def test_sigkilled_selm_generate_leaves_no_engine(train_config, tmp_path, tiny_llama_dir):
    """Data-parallel vLLM engines (``selm _worker engine``) die with ``selm generate``."""
    config, _ = train_config
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(f'{{"prompt_id": "p{i}", "prompt": "What is {i} plus 1?"}}\n' for i in range(4))
    )
    proc = _start(
        [
            sys.executable,
            "-m",
            "selm_mcore.cli",
            "generate",
            str(config),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "gen.jsonl"),
            "--model-dir",
            str(tiny_llama_dir),
            "--set",
            "generation.num_engines=2",
        ],
        tmp_path / "generate.log",
    )

    def engines() -> list[int]:
        return [pid for pid in descendants(proc.pid) if "_worker engine" in cmdline(pid)]

    wait_until(lambda: len(engines()) == 2, START_TIMEOUT_S, "two engine processes", proc)
    kill_and_check_tree(proc, descendants(proc.pid))
