"""The orchestrator's manifest / resume / failure logic, with fake phases (fast, no models).

A fake phase writes deterministic content derived from its inputs, so "the final outputs equal
an uninterrupted run" is checked byte for byte, and call counts show which phases re-ran.
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

from selm_mcore import online
from selm_mcore.config import SelmConfig, load_config
from selm_mcore.online import (Manifest, OnlineError, Phase, PhaseFailed, hash_path,
                               megatron_command, parse_fault, run_command, run_phases)

NAMES = ["round1/portion", "round1/generate", "round1/train", "round2/generate", "round2/train"]


class SimulatedKill(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in run_phases may catch it."""


def make_phases(workdir: Path, calls: list[str], fail: str | None = None) -> list[Phase]:
    """A chain of phases; each output hashes the previous output, like real data dependencies."""
    phases = []
    previous: Path | None = None
    for name in NAMES:
        is_dir = name.endswith("train")
        output = name.replace("/", "_") + ("" if is_dir else ".txt")

        def run(partial: Path, name=name, previous=previous, is_dir=is_dir) -> None:
            calls.append(name)
            if name == fail:
                raise PhaseFailed(f"fake failure in {name}")
            upstream = hash_path(previous) if previous is not None else "start"
            text = f"{name} from {upstream}\n"
            if is_dir:
                partial.mkdir()
                (partial / "weights.bin").write_text(text * 3)
                (partial / "sub").mkdir()
                (partial / "sub" / "meta.json").write_text(json.dumps({"name": name}))
            else:
                partial.write_text(text)

        phases.append(Phase(name, output, run))
        previous = workdir / output
    return phases


def snapshot(workdir: Path) -> dict[str, str]:
    return {name.replace("/", "_"): hash_path(workdir / p.output)
            for name, p in zip(NAMES, make_phases(workdir, []))}


def fresh_manifest(workdir: Path, config: dict | None = None) -> Manifest:
    return Manifest(workdir / "manifest.json", config or {"online": {"rounds": 2}})


def test_fresh_run_records_every_phase_in_order(tmp_path):
    calls: list[str] = []
    manifest = fresh_manifest(tmp_path)
    timings = run_phases(make_phases(tmp_path, calls), tmp_path, manifest)
    assert calls == NAMES and list(timings) == NAMES
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert list(on_disk["phases"]) == NAMES
    for name, phase in zip(NAMES, make_phases(tmp_path, [])):
        assert on_disk["phases"][name]["sha256"] == hash_path(tmp_path / phase.output)
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.tmp"))

    # A second run does nothing.
    calls.clear()
    run_phases(make_phases(tmp_path, calls), tmp_path, fresh_manifest(tmp_path))
    assert calls == []


@pytest.mark.parametrize("point", ["work", "published"])
@pytest.mark.parametrize("killed", NAMES)
def test_kill_inside_each_phase_resumes_to_identical_outputs(tmp_path, monkeypatch, killed, point):
    reference_dir = tmp_path / "reference"
    run_phases(make_phases(reference_dir, []), reference_dir, fresh_manifest(reference_dir))

    def kill(name, where):
        raise SimulatedKill(f"{name}:{where}")

    monkeypatch.setattr(online, "_kill_self", kill)
    workdir = tmp_path / "run"
    calls: list[str] = []
    with pytest.raises(SimulatedKill):
        run_phases(make_phases(workdir, calls), workdir, fresh_manifest(workdir),
                   fault=parse_fault(f"{killed}:{point}"))
    assert calls == NAMES[: NAMES.index(killed) + 1]
    recorded = list(json.loads((workdir / "manifest.json").read_text())["phases"])
    assert recorded == NAMES[: NAMES.index(killed)]  # the killed phase is not recorded

    calls.clear()
    run_phases(make_phases(workdir, calls), workdir, fresh_manifest(workdir))
    assert calls == NAMES[NAMES.index(killed):]  # resumed at the first unfinished phase
    assert snapshot(workdir) == snapshot(reference_dir)
    assert not list(workdir.glob("*.partial"))


def test_real_sigkill_through_env_hook_then_resume(tmp_path):
    """The real hook: SELM_FAULT kills the process with SIGKILL; a rerun finishes the run."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_online_manifest import make_phases, fresh_manifest
        from selm_mcore.online import run_phases, parse_fault, FAULT_ENV
        if __name__ == "__main__":
            workdir = Path(sys.argv[1])
            calls = []
            run_phases(make_phases(workdir, calls), workdir, fresh_manifest(workdir),
                       fault=parse_fault(os.environ.get(FAULT_ENV)))
            print("RAN", ",".join(calls))
    """))
    workdir = tmp_path / "run"
    env = {**os.environ, "SELM_FAULT": "round1/train"}
    killed = subprocess.run([sys.executable, str(script), str(workdir)], env=env, timeout=120,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (workdir / "round1_train.partial" / "weights.bin").exists()  # killed mid-phase
    env.pop("SELM_FAULT")
    resumed = subprocess.run([sys.executable, str(script), str(workdir)], env=env, timeout=120,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "RAN round1/train,round2/generate,round2/train" in resumed.stdout

    reference_dir = tmp_path / "reference"
    run_phases(make_phases(reference_dir, []), reference_dir, fresh_manifest(reference_dir))
    assert snapshot(workdir) == snapshot(reference_dir)


def test_failed_phase_stops_the_run_and_records_the_error(tmp_path):
    calls: list[str] = []
    with pytest.raises(OnlineError, match="round1/train failed: fake failure in round1/train"):
        run_phases(make_phases(tmp_path, calls, fail="round1/train"), tmp_path,
                   fresh_manifest(tmp_path))
    assert calls == NAMES[:3]  # nothing after the failed phase ran
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert list(data["phases"]) == NAMES[:2]
    assert data["last_error"]["phase"] == "round1/train"
    assert not (tmp_path / "round1_train").exists()

    calls.clear()
    run_phases(make_phases(tmp_path, calls), tmp_path, fresh_manifest(tmp_path))
    assert calls == NAMES[2:]
    assert "last_error" not in json.loads((tmp_path / "manifest.json").read_text())


def test_unexpected_exception_is_reported_with_its_type(tmp_path):
    def boom(partial):
        raise KeyError("prompt_id")

    with pytest.raises(OnlineError, match="round1/rank failed: KeyError"):
        run_phases([Phase("round1/rank", "pairs.jsonl", boom)], tmp_path, fresh_manifest(tmp_path))


def test_phase_that_writes_nothing_fails(tmp_path):
    with pytest.raises(OnlineError, match="without writing its output"):
        run_phases([Phase("round1/rank", "pairs.jsonl", lambda partial: None)], tmp_path,
                   fresh_manifest(tmp_path))


@pytest.mark.parametrize("changed", ["round1/generate", "round1/train"])
def test_changed_output_is_refused_and_redo_recomputes(tmp_path, changed):
    run_phases(make_phases(tmp_path, []), tmp_path, fresh_manifest(tmp_path))
    before = snapshot(tmp_path)
    phase = dict(zip(NAMES, make_phases(tmp_path, [])))[changed]
    target = tmp_path / phase.output
    if target.is_dir():
        (target / "sub" / "meta.json").write_text("{}")
    else:
        target.write_text("tampered\n")
    calls: list[str] = []
    with pytest.raises(OnlineError, match=f"{changed}: output .* changed since the manifest"):
        run_phases(make_phases(tmp_path, calls), tmp_path, fresh_manifest(tmp_path))
    assert calls == []

    manifest = fresh_manifest(tmp_path)
    manifest.forget_from(NAMES, changed)  # what --redo does
    run_phases(make_phases(tmp_path, calls), tmp_path, manifest)
    assert calls == NAMES[NAMES.index(changed):]
    assert snapshot(tmp_path) == before


def test_missing_recorded_output_is_refused(tmp_path):
    run_phases(make_phases(tmp_path, []), tmp_path, fresh_manifest(tmp_path))
    (tmp_path / "round1_generate.txt").unlink()
    with pytest.raises(OnlineError, match="round1/generate: its output .* is missing"):
        run_phases(make_phases(tmp_path, []), tmp_path, fresh_manifest(tmp_path))


def test_records_after_an_unfinished_phase_are_forgotten(tmp_path):
    run_phases(make_phases(tmp_path, []), tmp_path, fresh_manifest(tmp_path))
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data["phases"]["round1/train"]  # a hand-edited manifest with a hole in it
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    calls: list[str] = []
    run_phases(make_phases(tmp_path, calls), tmp_path, fresh_manifest(tmp_path))
    assert calls == NAMES[2:]  # everything after the hole re-ran


def test_config_change_is_refused_but_launch_details_may_change(tmp_path):
    cfg = SelmConfig().to_dict()
    Manifest(tmp_path / "manifest.json", cfg).save()
    more_rounds = json.loads(json.dumps(cfg))
    more_rounds["online"]["rdzv_endpoint"] = "node7:29500"  # a new Slurm allocation
    Manifest(tmp_path / "manifest.json", more_rounds)  # accepted
    other_beta = json.loads(json.dumps(cfg))
    other_beta["loss"]["beta"] = 0.1
    with pytest.raises(OnlineError, match=r"loss.beta: 0.01 -> 0.1"):
        Manifest(tmp_path / "manifest.json", other_beta)
    more_rounds = json.loads(json.dumps(cfg))
    more_rounds["online"]["rounds"] = 5  # changes how the data is split: refused
    with pytest.raises(OnlineError, match=r"online.rounds: 3 -> 5"):
        Manifest(tmp_path / "manifest.json", more_rounds)


def test_corrupt_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(OnlineError, match="not valid JSON"):
        fresh_manifest(tmp_path)


def test_redo_of_unknown_phase_names_the_phases(tmp_path):
    with pytest.raises(OnlineError, match="round1/portion"):
        fresh_manifest(tmp_path).forget_from(NAMES, "round9/train")


def test_hash_path_folders_and_large_file_fingerprint(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.bin").write_bytes(b"1" * 100)
    (folder / "y.bin").write_bytes(b"2" * 100)
    base = hash_path(folder)
    (folder / "a" / "x.bin").rename(folder / "a" / "z.bin")
    assert hash_path(folder) != base  # names are part of the hash

    big = tmp_path / "big.bin"
    data = bytearray(os.urandom(5 << 20))
    big.write_bytes(data)
    small_limit = 1 << 20
    fingerprint = hash_path(big, full_hash_max_bytes=small_limit)
    assert fingerprint != hash_path(big)  # fingerprint mode is used above the limit
    for offset in (0, len(data) // 2, len(data) - 1):  # head, middle, tail windows
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        big.write_bytes(changed)
        assert hash_path(big, full_hash_max_bytes=small_limit) != fingerprint
    big.write_bytes(data[:-1])  # truncation
    assert hash_path(big, full_hash_max_bytes=small_limit) != fingerprint
    with pytest.raises(FileNotFoundError):
        hash_path(tmp_path / "nope")


def test_run_command_tees_output_and_reports_failures(tmp_path):
    log = tmp_path / "logs" / "ok.log"
    run_command([sys.executable, "-c", "print('hello from child')"], log)
    assert "hello from child" in log.read_text()
    code = "import sys; print('line one'); print('Traceback: model.safetensors missing'); sys.exit(3)"
    with pytest.raises(PhaseFailed) as info:
        run_command([sys.executable, "-c", code], tmp_path / "logs" / "bad.log")
    message = str(info.value)
    assert "exited with status 3" in message and "model.safetensors missing" in message
    assert "bad.log" in message
    with pytest.raises(PhaseFailed, match="killed by signal 9"):
        run_command([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"],
                    tmp_path / "logs" / "sig.log")


def test_parse_fault():
    assert parse_fault(None) is None and parse_fault("") is None
    assert parse_fault("round2/refpass") == ("round2/refpass", "work")
    assert parse_fault("round2/refpass:published") == ("round2/refpass", "published")
    with pytest.raises(OnlineError, match="point"):
        parse_fault("round2/refpass:later")


def test_megatron_command_plain_torchrun_and_multinode():
    cfg = SelmConfig()
    plain = megatron_command(cfg, "train", "c.yaml")
    assert plain[1:] == ["-m", "selm_mcore.cli", "train", "c.yaml"]
    cfg.online.nproc_per_node = 8
    single = megatron_command(cfg, "refpass", "c.yaml")
    assert single[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=8"]
    assert "--standalone" in single
    assert single[-4:] == ["-m", "selm_mcore.cli", "refpass", "c.yaml"]
    cfg.online.nnodes = 4
    cfg.online.rdzv_endpoint = "node0:29500"
    cfg.online.launcher = "srun --nodes=4 --ntasks-per-node=1"
    multi = megatron_command(cfg, "train", "c.yaml")
    assert multi[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", sys.executable]
    assert "--nnodes=4" in multi and "--rdzv-endpoint=node0:29500" in multi
    assert "--standalone" not in multi


def test_online_config_validation(tmp_path):
    from selm_mcore.config import ConfigError
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        load_config(None, ["online.nnodes=2"])
    with pytest.raises(ConfigError, match="online.rounds"):
        load_config(None, ["online.rounds=0"])


def test_workdir_lock_refuses_a_second_run(tmp_path):
    with online.workdir_lock(tmp_path):
        with pytest.raises(OnlineError, match="another `selm run`"):
            with online.workdir_lock(tmp_path):
                pass
    with online.workdir_lock(tmp_path):  # released
        pass


def test_changed_inputs_refused_only_once_their_reader_finished(tmp_path):
    manifest = fresh_manifest(tmp_path)
    manifest.check_inputs({"data.train_path": ("aaa", "round1/portion"),
                           "ranking.model_path": ("rrr", "round1/rank")})
    manifest.record("round1/portion", "p.txt", "x", 1.0)
    # The ranker's weights were broken and got fixed before its phase finished: accepted.
    manifest.check_inputs({"data.train_path": ("aaa", "round1/portion"),
                           "ranking.model_path": ("fixed", "round1/rank")})
    assert json.loads((tmp_path / "manifest.json").read_text())["inputs"] == {
        "data.train_path": "aaa", "ranking.model_path": "fixed"}
    # The data changed under a finished portion: refused, naming the phase to redo.
    with pytest.raises(OnlineError, match="data.train_path changed since round1/portion.*"
                                          "--redo round1/portion"):
        fresh_manifest(tmp_path).check_inputs({"data.train_path": ("bbb", "round1/portion")})


def _resumable_chain(workdir: Path, calls: list[str], seen_partials: list[bool]) -> list[Phase]:
    phases = make_phases(workdir, calls)[:2]

    def resumable_run(partial: Path) -> None:
        seen_partials.append((partial / "step1").exists())
        partial.mkdir(exist_ok=True)
        (partial / "step1").write_text("half done")
        (partial / "final").write_text("done")

    return phases + [Phase("round1/train", "round1_train", resumable_run, resumable=True)]


def test_resumable_phase_continues_its_partial_only_with_unchanged_inputs(tmp_path, monkeypatch):
    def kill(name, where):
        raise SimulatedKill(name)

    monkeypatch.setattr(online, "_kill_self", kill)
    calls: list[str] = []
    seen: list[bool] = []
    with pytest.raises(SimulatedKill):
        run_phases(_resumable_chain(tmp_path, calls, seen), tmp_path, fresh_manifest(tmp_path),
                   fault=("round1/train", "work"))
    assert seen == [False] and (tmp_path / "round1_train.partial" / "step1").exists()
    with pytest.raises(SimulatedKill):  # inputs unchanged: the partial is continued
        run_phases(_resumable_chain(tmp_path, calls, seen), tmp_path, fresh_manifest(tmp_path),
                   fault=("round1/train", "work"))
    assert seen == [False, True]

    manifest = fresh_manifest(tmp_path)
    online.redo_from(_resumable_chain(tmp_path, [], []), tmp_path, manifest, "round1/generate")
    assert not (tmp_path / "round1_train.partial").exists()  # --redo drops later partials
    run_phases(_resumable_chain(tmp_path, calls, seen), tmp_path, manifest)
    assert seen == [False, True, False]
    assert (tmp_path / "round1_train" / "final").read_text() == "done"
    assert not (tmp_path / "round1_train.partial.inputs").exists()


def test_resumable_partial_from_other_inputs_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(online, "_kill_self", lambda name, where: (_ for _ in ()).throw(SimulatedKill()))
    seen: list[bool] = []
    with pytest.raises(SimulatedKill):
        run_phases(_resumable_chain(tmp_path, [], seen), tmp_path, fresh_manifest(tmp_path),
                   fault=("round1/train", "work"))
    inputs = tmp_path / "round1_train.partial.inputs"
    inputs.write_text(json.dumps({"round1/portion": "other"}))  # started from other inputs
    run_phases(_resumable_chain(tmp_path, [], seen), tmp_path, fresh_manifest(tmp_path))
    assert seen == [False, False]


def test_run_command_timeout_kills_a_silent_child_and_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
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
def test_run_command_returns_when_a_killed_child_leaves_a_helper_holding_the_pipe(tmp_path):
    """A SIGKILLed trainer can leave checkpoint-writer processes with our pipe open."""
    code = ("import os, subprocess, sys; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print('parent dies now', flush=True); os.kill(os.getpid(), 9)")
    with pytest.raises(PhaseFailed, match="killed by signal 9"):
        run_command([sys.executable, "-c", code], tmp_path / "lingering.log")
