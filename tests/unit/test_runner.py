"""selm_mcore.loop.runner in this process: the manifest, resume and failure rules, with fake phases.

A fake phase writes deterministic content derived from its inputs, so "the final outputs equal
an uninterrupted run" is checked byte for byte, and call counts show which phases re-ran. The
fault hook's SIGKILL is replaced by an exception (``os.kill`` of this very process is patched);
the real SIGKILL, child processes and timeouts are in tests/e2e/test_runner_processes.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from selm_mcore.config.schema import SelmConfig
from selm_mcore.loop.online import RESUME_MUTABLE_KEYS
from selm_mcore.loop.runner import (
    Manifest,
    OnlineError,
    Phase,
    PhaseFailed,
    clear_outputs,
    parse_fault,
    redo_from,
    run_phases,
    workdir_lock,
)
from selm_mcore.runtime.files import DataError, hash_path
from selm_mcore.runtime.outputs import OutputBusyError

NAMES = ["round1/portion", "round1/generate", "round1/train", "round2/generate", "round2/train"]


class SimulatedKill(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in run_phases may catch it."""


@pytest.fixture
def simulated_kill(monkeypatch):
    """The fault hook's SIGKILL of this process raises SimulatedKill instead."""
    real_kill = os.kill

    def kill(pid, sig):
        if pid == os.getpid() and sig == signal.SIGKILL:
            raise SimulatedKill(f"SIGKILL of {pid}")
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)


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
    return {
        name.replace("/", "_"): hash_path(workdir / p.output)
        for name, p in zip(NAMES, make_phases(workdir, []))
    }


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
def test_kill_inside_each_phase_resumes_to_identical_outputs(
    tmp_path, simulated_kill, killed, point
):
    reference_dir = tmp_path / "reference"
    run_phases(make_phases(reference_dir, []), reference_dir, fresh_manifest(reference_dir))

    workdir = tmp_path / "run"
    calls: list[str] = []
    with pytest.raises(SimulatedKill):
        run_phases(
            make_phases(workdir, calls),
            workdir,
            fresh_manifest(workdir),
            fault=parse_fault(f"{killed}:{point}"),
        )
    assert calls == NAMES[: NAMES.index(killed) + 1]
    recorded = list(json.loads((workdir / "manifest.json").read_text())["phases"])
    assert recorded == NAMES[: NAMES.index(killed)]  # the killed phase is not recorded

    calls.clear()
    run_phases(make_phases(workdir, calls), workdir, fresh_manifest(workdir))
    # Resumed at the first unfinished phase; an output killed after its rename (announced in
    # the manifest) is adopted, not recomputed.
    first = NAMES.index(killed) + (point == "published")
    assert calls == NAMES[first:]
    assert snapshot(workdir) == snapshot(reference_dir)
    assert not list(workdir.glob("*.partial"))
    assert "publishing" not in json.loads((workdir / "manifest.json").read_text())


def test_failed_phase_stops_the_run_and_records_the_error(tmp_path):
    calls: list[str] = []
    with pytest.raises(OnlineError, match="round1/train failed: fake failure in round1/train"):
        run_phases(
            make_phases(tmp_path, calls, fail="round1/train"), tmp_path, fresh_manifest(tmp_path)
        )
    assert calls == NAMES[:3]  # nothing after the failed phase ran
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert list(data["phases"]) == NAMES[:2]
    assert data["last_error"]["phase"] == "round1/train"
    assert not (tmp_path / "round1_train").exists()

    calls.clear()
    run_phases(make_phases(tmp_path, calls), tmp_path, fresh_manifest(tmp_path))
    assert calls == NAMES[2:]
    assert "last_error" not in json.loads((tmp_path / "manifest.json").read_text())


def test_in_process_errors_user_error_wrapped_bug_kept_with_its_traceback(tmp_path):
    def bad_data(partial):
        raise DataError(tmp_path / "train.jsonl", 3, "prompt is empty", "fill it")

    with pytest.raises(OnlineError, match="round1/portion failed: DataError: .*row 3"):
        run_phases(
            [Phase("round1/portion", "p.jsonl", bad_data)], tmp_path, fresh_manifest(tmp_path)
        )

    def bug(partial):
        raise KeyError("prompt_id")

    with pytest.raises(KeyError, match="prompt_id"):  # a bug: not turned into a message
        run_phases(
            [Phase("round1/rank", "pairs.jsonl", bug)],
            tmp_path / "b",
            fresh_manifest(tmp_path / "b"),
        )
    last_error = json.loads((tmp_path / "b" / "manifest.json").read_text())["last_error"]
    assert last_error["message"].startswith("round1/rank failed: KeyError")


def test_phase_that_writes_nothing_fails(tmp_path):
    with pytest.raises(OnlineError, match="without writing its output"):
        run_phases(
            [Phase("round1/rank", "pairs.jsonl", lambda partial: None)],
            tmp_path,
            fresh_manifest(tmp_path),
        )


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
    redo_from(make_phases(tmp_path, []), tmp_path, manifest, changed)  # --redo CHANGED
    run_phases(make_phases(tmp_path, calls), tmp_path, manifest)
    assert calls == NAMES[NAMES.index(changed) :]
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
    before = snapshot(tmp_path)
    calls: list[str] = []
    # Its output and the later ones are finished work the manifest no longer vouches for.
    with pytest.raises(OnlineError, match="round1_train \\(round1/train\\), round2_generate.txt"):
        run_phases(make_phases(tmp_path, calls), tmp_path, fresh_manifest(tmp_path))
    assert calls == [] and snapshot(tmp_path) == before
    manifest = fresh_manifest(tmp_path)
    redo_from(make_phases(tmp_path, []), tmp_path, manifest, "round1/train")
    run_phases(make_phases(tmp_path, calls), tmp_path, manifest)
    assert calls == NAMES[2:]  # everything after the hole re-ran
    assert snapshot(tmp_path) == before


def test_manifest_deleted_between_runs_refuses_and_deletes_nothing(tmp_path):
    """The finished outputs of earlier phases (a trained model among them) stay untouched; the
    error names the folder, the outputs and both explicit ways on."""
    run_phases(make_phases(tmp_path, []), tmp_path, fresh_manifest(tmp_path))
    before = snapshot(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "round2_train.partial").mkdir()  # an unfinished leftover as well
    calls: list[str] = []
    with pytest.raises(OnlineError) as info:
        run_phases(make_phases(tmp_path, calls), tmp_path, fresh_manifest(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "does not exist" in message
    assert "round1_portion.txt (round1/portion)" in message and "round1_train (" in message
    assert "--redo round1/portion" in message and "--fresh" in message
    assert calls == [] and snapshot(tmp_path) == before
    assert (tmp_path / "round2_train.partial").is_dir()

    # --fresh: every output deleted on request, then a full run from scratch.
    phases = make_phases(tmp_path, calls)
    removed = clear_outputs(phases, tmp_path)
    assert len(removed) == len(NAMES) + 1
    assert not any((tmp_path / p.output).exists() for p in phases)
    run_phases(phases, tmp_path, fresh_manifest(tmp_path))
    assert calls == NAMES and snapshot(tmp_path) == before


def test_redo_deletes_the_outputs_it_recomputes(tmp_path):
    run_phases(make_phases(tmp_path, []), tmp_path, fresh_manifest(tmp_path))
    (tmp_path / "manifest.json").unlink()
    manifest = fresh_manifest(tmp_path)
    redo_from(make_phases(tmp_path, []), tmp_path, manifest, "round1/portion")
    assert not any((tmp_path / p.output).exists() for p in make_phases(tmp_path, []))
    calls: list[str] = []
    run_phases(make_phases(tmp_path, calls), tmp_path, manifest)
    assert calls == NAMES


def test_published_output_with_changed_content_is_refused(tmp_path, simulated_kill):
    with pytest.raises(SimulatedKill):
        run_phases(
            make_phases(tmp_path, []),
            tmp_path,
            fresh_manifest(tmp_path),
            fault=("round1/generate", "published"),
        )
    (tmp_path / "round1_generate.txt").write_text("edited after the kill\n")
    with pytest.raises(OnlineError, match="round1/generate: output .* was being published"):
        run_phases(make_phases(tmp_path, []), tmp_path, fresh_manifest(tmp_path))
    assert (tmp_path / "round1_generate.txt").read_text() == "edited after the kill\n"


def test_config_change_is_refused_but_listed_keys_may_change(tmp_path):
    cfg = SelmConfig().to_dict()
    Manifest(tmp_path / "manifest.json", cfg).save()
    new_allocation = json.loads(json.dumps(cfg))
    new_allocation["online"]["rdzv_endpoint"] = "node7:29500"  # a new Slurm allocation
    # The generic runner lets no key change unless told; `selm run` passes the online loop's
    # RESUME_MUTABLE_KEYS, which hold the launch details.
    with pytest.raises(OnlineError, match=r"online.rdzv_endpoint: '' -> 'node7:29500'"):
        Manifest(tmp_path / "manifest.json", new_allocation)
    assert "online.rdzv_endpoint" in RESUME_MUTABLE_KEYS
    Manifest(
        tmp_path / "manifest.json", new_allocation, mutable_keys=RESUME_MUTABLE_KEYS
    )  # accepted
    other_beta = json.loads(json.dumps(cfg))
    other_beta["loss"]["beta"] = 0.1
    with pytest.raises(OnlineError, match=r"loss.beta: 0.01 -> 0.1"):
        Manifest(tmp_path / "manifest.json", other_beta, mutable_keys=RESUME_MUTABLE_KEYS)
    warmup = json.loads(json.dumps(cfg))
    warmup["online"]["warmup_dpo_round"] = True  # changes how the data is split: refused
    with pytest.raises(OnlineError, match=r"online.warmup_dpo_round: False -> True"):
        Manifest(tmp_path / "manifest.json", warmup, mutable_keys=RESUME_MUTABLE_KEYS)
    # More rounds and another layout pass the manifest; their rules (a started round keeps
    # its rows) are selm_mcore.loop.resume_changes' (tests/unit/test_resume_changes.py).
    more_rounds = json.loads(json.dumps(cfg))
    more_rounds["online"]["rounds"] = 5
    more_rounds["online"]["nproc_per_node"] = 8
    Manifest(tmp_path / "manifest.json", more_rounds, mutable_keys=RESUME_MUTABLE_KEYS)


def test_a_key_added_since_the_run_started_counts_as_unchanged_at_its_default(tmp_path):
    cfg = SelmConfig().to_dict()
    older = json.loads(json.dumps(cfg))
    del older["data"]["packing"]  # a run started by a version without this key
    Manifest(tmp_path / "manifest.json", older).save()
    defaults = SelmConfig().to_dict()
    Manifest(tmp_path / "manifest.json", cfg, defaults=defaults)  # accepted: still the default
    changed = json.loads(json.dumps(cfg))
    changed["data"]["packing"] = "none"
    with pytest.raises(OnlineError, match=r"data.packing: 'shared_prompt' -> 'none'"):
        Manifest(tmp_path / "manifest.json", changed, defaults=defaults)
    with pytest.raises(OnlineError, match=r"data.packing: None -> 'shared_prompt'"):
        Manifest(tmp_path / "manifest.json", cfg)  # without defaults: a difference


def test_corrupt_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(OnlineError, match="not valid JSON"):
        fresh_manifest(tmp_path)


def test_redo_of_unknown_phase_names_the_phases(tmp_path):
    with pytest.raises(OnlineError, match="round1/portion"):
        fresh_manifest(tmp_path).forget_from(NAMES, "round9/train")


def test_parse_fault():
    assert parse_fault(None) is None and parse_fault("") is None
    assert parse_fault("round2/refpass") == ("round2/refpass", "work")
    assert parse_fault("round2/refpass:published") == ("round2/refpass", "published")
    with pytest.raises(OnlineError, match="point"):
        parse_fault("round2/refpass:later")


def test_workdir_lock_refuses_a_second_run(tmp_path):
    workdir = tmp_path / "run"
    with workdir_lock(workdir):
        with pytest.raises(
            OutputBusyError,
            match=rf"online.workdir={workdir} is being written by another process "
            rf"\(pid {os.getpid()}: selm run;",
        ):
            with workdir_lock(workdir):
                pass
    with workdir_lock(workdir):  # released
        pass
    assert list(tmp_path.iterdir()) == []  # the lock file is gone


def test_changed_inputs_refused_only_once_their_reader_finished(tmp_path):
    manifest = fresh_manifest(tmp_path)
    manifest.check_inputs(
        {"data.train_path": ("aaa", "round1/portion"), "ranking.model_path": ("rrr", "round1/rank")}
    )
    manifest.record("round1/portion", "p.txt", "x", 1.0)
    # The ranker's weights were broken and got fixed before its phase finished: accepted.
    manifest.check_inputs(
        {
            "data.train_path": ("aaa", "round1/portion"),
            "ranking.model_path": ("fixed", "round1/rank"),
        }
    )
    assert json.loads((tmp_path / "manifest.json").read_text())["inputs"] == {
        "data.train_path": "aaa",
        "ranking.model_path": "fixed",
    }
    # The data changed under a finished portion: refused, naming the phase to redo.
    with pytest.raises(
        OnlineError, match="data.train_path changed since round1/portion.*--redo round1/portion"
    ):
        fresh_manifest(tmp_path).check_inputs({"data.train_path": ("bbb", "round1/portion")})


def _resumable_chain(workdir: Path, calls: list[str], seen_partials: list[bool]) -> list[Phase]:
    phases = make_phases(workdir, calls)[:2]

    def resumable_run(partial: Path) -> None:
        seen_partials.append((partial / "step1").exists())
        partial.mkdir(exist_ok=True)
        (partial / "step1").write_text("half done")
        (partial / "final").write_text("done")

    return phases + [Phase("round1/train", "round1_train", resumable_run, resumable=True)]


def test_resumable_phase_continues_its_partial_only_with_unchanged_inputs(tmp_path, simulated_kill):
    calls: list[str] = []
    seen: list[bool] = []
    with pytest.raises(SimulatedKill):
        run_phases(
            _resumable_chain(tmp_path, calls, seen),
            tmp_path,
            fresh_manifest(tmp_path),
            fault=("round1/train", "work"),
        )
    assert seen == [False] and (tmp_path / "round1_train.partial" / "step1").exists()
    with pytest.raises(SimulatedKill):  # inputs unchanged: the partial is continued
        run_phases(
            _resumable_chain(tmp_path, calls, seen),
            tmp_path,
            fresh_manifest(tmp_path),
            fault=("round1/train", "work"),
        )
    assert seen == [False, True]

    manifest = fresh_manifest(tmp_path)
    redo_from(_resumable_chain(tmp_path, [], []), tmp_path, manifest, "round1/generate")
    assert not (tmp_path / "round1_train.partial").exists()  # --redo drops later partials
    run_phases(_resumable_chain(tmp_path, calls, seen), tmp_path, manifest)
    assert seen == [False, True, False]
    assert (tmp_path / "round1_train" / "final").read_text() == "done"
    assert not (tmp_path / "round1_train.partial.inputs").exists()


def test_resumable_partial_from_other_inputs_is_dropped(tmp_path, simulated_kill):
    seen: list[bool] = []
    with pytest.raises(SimulatedKill):
        run_phases(
            _resumable_chain(tmp_path, [], seen),
            tmp_path,
            fresh_manifest(tmp_path),
            fault=("round1/train", "work"),
        )
    inputs = tmp_path / "round1_train.partial.inputs"
    inputs.write_text(json.dumps({"round1/portion": "other"}))  # started from other inputs
    run_phases(_resumable_chain(tmp_path, [], seen), tmp_path, fresh_manifest(tmp_path))
    assert seen == [False, False]
