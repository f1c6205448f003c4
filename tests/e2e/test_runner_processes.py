"""selm_mcore.loop.runner with real processes: the SELM_FAULT hook's SIGKILL and the resume after
it, and ``run_command`` (output tee, failures, signals, timeouts, helpers a killed child leaves).

The manifest and resume rules themselves are tested in-process in tests/unit/test_runner.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from selm_mcore.loop.runner import FAULT_ENV, PhaseFailed, run_command

NAMES = ["round1/portion", "round1/generate", "round1/train", "round2/generate", "round2/train"]

# A run of five chained fake phases (each output derived from the previous one's content; the
# train phases write folders); prints the phases it ran.
DRIVER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from selm_mcore.runtime.files import hash_path
    from selm_mcore.loop.runner import FAULT_ENV, Manifest, Phase, parse_fault, run_phases

    NAMES = {names!r}

    def make_phases(workdir, calls):
        phases, previous = [], None
        for name in NAMES:
            is_dir = name.endswith("train")
            output = name.replace("/", "_") + ("" if is_dir else ".txt")

            def run(partial, name=name, previous=previous, is_dir=is_dir):
                calls.append(name)
                text = f"{{name}} from {{hash_path(previous) if previous else 'start'}}\\n"
                if is_dir:
                    partial.mkdir()
                    (partial / "weights.bin").write_text(text * 3)
                else:
                    partial.write_text(text)

            phases.append(Phase(name, output, run))
            previous = workdir / output
        return phases

    if __name__ == "__main__":
        workdir = Path(sys.argv[1])
        calls = []
        run_phases(make_phases(workdir, calls), workdir,
                   Manifest(workdir / "manifest.json", {{"online": {{"rounds": 2}}}}),
                   fault=parse_fault(os.environ.get(FAULT_ENV)))
        print("RAN", ",".join(calls))
""").format(names=NAMES)


def run_driver(script: Path, workdir: Path, fault: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, str(script), str(workdir)],
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
    )


def recorded_hashes(workdir: Path) -> dict[str, str]:
    phases = json.loads((workdir / "manifest.json").read_text())["phases"]
    return {name: record["sha256"] for name, record in phases.items()}


@pytest.mark.parametrize("fault", ["round1/train", "round2/generate:published"])
def test_real_sigkill_through_env_hook_then_resume(tmp_path, fault):
    """SELM_FAULT kills the process with SIGKILL inside a phase; a rerun finishes the run with
    the outputs of an uninterrupted one."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    workdir = tmp_path / "run"
    killed = run_driver(script, workdir, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    name, _, point = fault.partition(":")
    output = workdir / (name.replace("/", "_") + ("" if name.endswith("train") else ".txt"))
    if point == "published":  # renamed into place, not yet recorded
        assert output.exists() and name not in recorded_hashes(workdir)
    else:  # killed mid-phase: the partial output is there
        assert (output.parent / (output.name + ".partial") / "weights.bin").exists()
    assert list(recorded_hashes(workdir)) == NAMES[: NAMES.index(name)]

    resumed = run_driver(script, workdir)
    assert resumed.returncode == 0, resumed.stderr
    # An output killed after its rename was announced in the manifest: adopted, not rerun.
    first = NAMES.index(name) + (point == "published")
    assert f"RAN {','.join(NAMES[first:])}" in resumed.stdout

    reference = tmp_path / "reference"
    assert run_driver(script, reference).returncode == 0
    assert recorded_hashes(workdir) == recorded_hashes(reference)
    assert len(set(recorded_hashes(reference).values())) == len(NAMES)


def test_run_command_tees_output_and_reports_failures(tmp_path, capfd):
    log = tmp_path / "logs" / "ok.log"
    run_command([sys.executable, "-c", "print('hello from child')"], log)
    assert "hello from child" in log.read_text()
    assert "hello from child" in capfd.readouterr().out  # shown on our stdout too
    code = (
        "import sys; print('line one'); print('Traceback: model.safetensors missing'); sys.exit(3)"
    )
    with pytest.raises(PhaseFailed) as info:
        run_command([sys.executable, "-c", code], tmp_path / "logs" / "bad.log")
    message = str(info.value)
    assert "exited with status 3" in message and "model.safetensors missing" in message
    assert "bad.log" in message
    with pytest.raises(PhaseFailed, match=r"killed by signal 9 \(SIGKILL\)"):
        run_command(
            [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"],
            tmp_path / "logs" / "sig.log",
        )


def test_run_command_timeout_kills_a_silent_child_and_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    with pytest.raises(PhaseFailed, match="ran longer than online.phase_timeout_s=2"):
        run_command([sys.executable, "-c", code], tmp_path / "slow.log", timeout_s=2)
    grandchild = int(pid_file.read_text())

    def alive(pid: int) -> bool:
        try:  # a killed process may linger as a zombie until init reaps it
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    for _ in range(50):
        if not alive(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} survived the timeout")


@pytest.mark.timeout(60)  # broken, it waits for the helper's 600 s
def test_run_command_returns_when_a_killed_child_leaves_a_helper_behind(tmp_path):
    """A SIGKILLed trainer can leave checkpoint-writer processes that hold its output open: the
    child's exit ends the phase, and the helper, in the child's process group, is killed."""
    code = (
        "import os, subprocess, sys; "
        "h = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print('helper', h.pid, flush=True); os.kill(os.getpid(), 9)"
    )
    log = tmp_path / "lingering.log"
    with pytest.raises(PhaseFailed, match=r"killed by signal 9 \(SIGKILL\)"):
        run_command([sys.executable, "-c", code], log)
    (helper,) = [
        int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("helper ")
    ]
    for _ in range(50):
        try:  # a killed process may linger as a zombie until init reaps it
            if Path(f"/proc/{helper}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"helper {helper} survived its phase")
