"""Real commands and their outputs: one writer per output folder, a finished model kept, no
write through a planted link, and a reference cache stored in the model folder still valid.

Every ``selm`` process here (and each Python process it starts) runs with the audit hook of
tests/support/write_audit, which records what it writes under the test's folder and whether a
write went through a symbolic link.

* One run (``scene``: a copy of the tiny Llama, 16 pairs with y_ref): `selm refpass` writes the
  reference cache INTO the model folder, then `selm train` (two step checkpoints and the final
  model) is stopped (SIGSTOP) right after it took its output's lock; a second `selm train` into
  the same folder is refused at once, naming the first one's pid, before reading any data; the
  first, continued, finishes with every metric line and uses the cache (its key ignores the
  cache file in the model folder). A third `selm train` is refused: final/ exists.
* Planted links: from what the first run wrote, the names it created and removed again
  (temporary and swap names), locked or appended to (locks, logs, metrics) are taken, and a
  fresh copy of the scene gets a symbolic link at each (to a file or folder outside it) before
  the same commands run again. Nothing may be written through a link and the links' targets
  must be untouched. The same for `selm convert mcore-to-hf --overwrite` (an export swapped over
  a stale folder) and `selm run` (a round that stops at generate).

The names come from the commands' own writes, not from a list here, so a name added later is
planted as well.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from child_env import child_env
from sentences import sentence

from selm_mcore.runtime.files import hash_path, read_records

TIMEOUT_S = 300
NUM_STEPS = 4
AUDIT_SITE = Path(__file__).resolve().parents[1] / "support" / "write_audit"


def selm_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "selm_mcore.cli", *args]


def audited_env(log: Path, root: Path) -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(AUDIT_SITE), *filter(None, [env.get("PYTHONPATH")])])
    env.update(SELM_TEST_WRITE_LOG=str(log), SELM_TEST_WRITE_ROOT=str(root))
    return env


def run_audited(args: list[str], log: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        selm_argv(*args),
        env=audited_env(log, root),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def derived_names(log: Path, root: Path) -> dict[Path, bool]:
    """{path relative to ``root``: is a folder} of the names a run derived: those it created
    and removed again, locked, or appended to (the outermost of nested ones)."""
    names: dict[Path, bool] = {}
    for event in events(log):
        path, kind = Path(event["path"]), event["event"]
        appended = kind == "open" and event["flags"] & os.O_APPEND
        gone = not os.path.lexists(path)
        if kind == "lock" or appended or gone:
            rel = path.relative_to(root)
            names[rel] = names.get(rel, False) or kind in ("mkdir", "mkdtemp")
    return {p: d for p, d in names.items() if not any(a in names for a in p.parents)}


def locked_names(log: Path, root: Path) -> set[Path]:
    """The files a run locked (``fcntl.flock``), relative to ``root``."""
    return {Path(e["path"]).relative_to(root) for e in events(log) if e["event"] == "lock"}


def write_victims(root: Path) -> Path:
    victims = root / "victims"
    (victims / "dir").mkdir(parents=True)
    (victims / "dir" / "keep.txt").write_text("keep\n")
    (victims / "file.txt").write_text("precious\n")
    return victims


def plant_links(names: dict[Path, bool], root: Path, victims: Path) -> list[Path]:
    planted = []
    for rel, is_dir in sorted(names.items()):
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(victims / "dir" if is_dir else victims / "file.txt")
        planted.append(link)
    return planted


def assert_no_write_through_a_link(log: Path) -> None:
    followed = [e for e in events(log) if e["through_link"]]
    assert followed == [], followed[:5]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def make_scene(root: Path, tiny_llama_dir: Path, write_jsonl, write_config, preference_row):
    """A tiny Llama copied to root/model, 16 pairs with y_ref, a config whose reference cache
    lives in the model folder and whose output is root/run."""
    shutil.copytree(tiny_llama_dir, root / "model")
    rng = random.Random(0)
    rows = [
        preference_row(
            sentence(rng, 3, 12) + "?",
            sentence(rng, 1, 10),
            sentence(rng, 1, 10),
            reference_response=sentence(rng, 1, 10),
        )
        for _ in range(16)
    ]
    write_jsonl(root / "pairs.jsonl", rows)
    return write_config(
        root / "config.yaml",
        model={"hf_dir": str(root / "model")},
        data={"train_path": str(root / "pairs.jsonl"), "max_length": 64, "max_prompt_length": 32},
        loss={"beta": 0.1, "alpha": 0.5},
        optim={"lr": 1.0e-3},
        train={
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": NUM_STEPS,
            "save_interval": 2,
            "tensorboard": False,
            "ref_cache": str(root / "model" / "ref_logps.safetensors"),
            "output_dir": str(root / "run"),
        },
    )


def lock_of(target: Path) -> Path:
    """Where a command keeps the lock of output ``target``: ``.NAME.lock`` beside it."""
    return target.with_name(f".{target.name}.lock")


def wait_for_lock(target: Path, proc: subprocess.Popen) -> bool:
    """Whether ``proc`` took the lock of ``target`` (False: it exited or never did)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        lock = lock_of(target)
        if lock.is_file() and lock.read_text().startswith(f"{proc.pid} "):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, write_jsonl, write_config, preference_row):
    """The first run (module doc): refpass, train A stopped while it holds the lock, train B
    refused meanwhile, A continued to the end, then train C after it."""
    base = tmp_path_factory.mktemp("output_safety")
    root = base / "scene1"
    root.mkdir()
    config = make_scene(root, tiny_llama_dir, write_jsonl, write_config, preference_row)
    log = base / "scene1.writes.jsonl"
    refpass = run_audited(["refpass", str(config)], log, root)
    assert refpass.returncode == 0, refpass.stderr[-3000:]
    first_err = base / "train_a.err"
    with open(first_err, "w") as err:
        first = subprocess.Popen(
            selm_argv("train", str(config)),
            env=audited_env(log, root),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            held = wait_for_lock(root / "run", first)
            if held:  # the first run waits, holding its lock, while the second one tries
                os.kill(first.pid, signal.SIGSTOP)
            try:
                second = run_audited(["train", str(config)], log, root)
            finally:
                if held:
                    os.kill(first.pid, signal.SIGCONT)
            first.wait(timeout=TIMEOUT_S)
        finally:
            if first.poll() is None:
                first.kill()
    final_hash = hash_path(root / "run" / "final") if (root / "run" / "final").is_dir() else ""
    third = run_audited(["train", str(config)], base / "scene1.third.jsonl", root)
    return {
        "base": base,
        "root": root,
        "config": config,
        "log": log,
        "first": first,
        "first_stderr": first_err.read_text(),
        "second": second,
        "third": third,
        "final_hash": final_hash,
    }


def test_a_reference_cache_in_the_model_folder_stays_valid(trained):
    root = trained["root"]
    assert trained["first"].returncode == 0, trained["first_stderr"][-3000:]
    assert (root / "model" / "ref_logps.safetensors").is_file()
    assert "stale" not in trained["first_stderr"]
    assert (root / "run" / "final" / "selm_checkpoint.json").is_file()


def test_a_second_train_into_one_folder_is_refused_at_once_naming_the_pid(trained):
    root, first, second = trained["root"], trained["first"], trained["second"]
    assert second.returncode == 1, second.stderr[-3000:]
    (line,) = error_lines(second.stderr)
    assert line.startswith(
        f"selm train: error: train.output_dir={root / 'run'} is being written by another "
        f"process (pid {first.pid}: selm train; lock {root / '.run.lock'})"
    )
    assert "Traceback" not in second.stderr
    assert "preference rows" not in second.stderr  # refused before reading any data
    # The first run, stopped meanwhile, finished with every step's metrics, in order.
    assert first.returncode == 0, trained["first_stderr"][-3000:]
    steps = [r["step"] for r in read_records(root / "run" / "metrics.jsonl")]
    assert steps == list(range(1, NUM_STEPS + 1))
    assert not os.path.lexists(lock_of(root / "run"))  # released


def test_a_finished_model_is_not_replaced_without_overwrite(trained):
    root, third = trained["root"], trained["third"]
    assert third.returncode == 1, third.stderr[-3000:]
    (line,) = error_lines(third.stderr)
    assert f"{root / 'run' / 'final'} already holds a trained model (train.output_dir)" in line
    assert "Pass --overwrite to replace it, or choose a new train.output_dir" in line
    assert hash_path(root / "run" / "final") == trained["final_hash"]
    assert len(read_records(root / "run" / "metrics.jsonl")) == NUM_STEPS


def rerun_with_planted_links(
    names: dict[Path, bool], root: Path, commands: list[list[str]], log: Path
) -> list[subprocess.CompletedProcess]:
    """Plant a link at each name in ``root`` (a fresh scene), run ``commands`` audited; every
    write is checked for going through a link and the links' targets for changes."""
    victims = write_victims(root.parent / f"{root.name}.victims")
    before = hash_path(victims)
    planted = plant_links(names, root, victims)
    assert planted, "the first run derived no name"
    results = [run_audited(command, log, root) for command in commands]
    assert_no_write_through_a_link(log)
    assert hash_path(victims) == before
    return results


def test_links_planted_at_every_name_train_and_refpass_derive_are_not_followed(
    trained, tiny_llama_dir, write_jsonl, write_config, preference_row
):
    names = derived_names(trained["log"], trained["root"])
    root = trained["base"] / "scene2"
    root.mkdir()
    config = make_scene(root, tiny_llama_dir, write_jsonl, write_config, preference_row)
    refpass, train = rerun_with_planted_links(
        names,
        root,
        [["refpass", str(config)], ["train", str(config)]],
        trained["base"] / "scene2.writes.jsonl",
    )
    assert refpass.returncode == 0, refpass.stderr[-3000:]
    assert train.returncode == 0, train.stderr[-3000:]
    assert len(read_records(root / "run" / "metrics.jsonl")) == NUM_STEPS
    # Among the planted names: the output's and the cache's locks, the appended metrics.
    locks = locked_names(trained["log"], trained["root"])
    assert len(locks) >= 2 and locks <= set(names), sorted(names)
    assert Path("run/metrics.jsonl") in names


def test_links_planted_at_every_name_an_export_derives_are_not_followed(trained):
    base, final = trained["base"], trained["root"] / "run" / "final"
    logs = []
    for scene in ("export1", "export2"):
        root = base / scene
        (root / "hf").mkdir(parents=True)
        (root / "hf" / "model-00001-of-00002.safetensors").write_text("stale\n")
        logs.append(base / f"{scene}.writes.jsonl")
    command = ["convert", "mcore-to-hf", "--mcore-dir", str(final)]
    command += ["--out-dir", "OUT", "--overwrite"]

    def export(root: Path, log: Path, planted: dict[Path, bool] | None = None):
        argv = [str(root / "hf") if a == "OUT" else a for a in command]
        if planted is None:
            return run_audited(argv, log, root)
        return rerun_with_planted_links(planted, root, [argv], log)[0]

    first = export(base / "export1", logs[0])
    assert first.returncode == 0, first.stderr[-3000:]
    names = derived_names(logs[0], base / "export1")
    assert [n for n, is_dir in names.items() if is_dir], sorted(names)  # the export folder
    second = export(base / "export2", logs[1], names)
    assert second.returncode == 0, second.stderr[-3000:]
    locks = locked_names(logs[0], base / "export1")
    assert locks and locks <= set(names), sorted(names)
    assert sorted(p.name for p in (base / "export2" / "hf").iterdir()) == sorted(
        p.name for p in (base / "export1" / "hf").iterdir()
    )


def test_links_planted_at_every_name_selm_run_derives_are_not_followed(
    tmp_path, write_jsonl, write_config, preference_row, tiny_llama_dir
):
    """`selm run` up to a generate phase that fails at once, inside its lock (the model folder's
    checksum list names a file that is missing): the workdir lock, the portion's partial
    output, the manifest, the logs, the generate command's lock."""
    from selm_mcore.runtime.files import CHECKSUM_ALGORITHM, write_checksums

    def scene(root: Path) -> Path:
        shutil.copytree(tiny_llama_dir, root / "not_a_model")
        write_checksums(
            root / "not_a_model", {"lost.safetensors": {"size": 1, CHECKSUM_ALGORITHM: "0" * 64}}
        )
        data = write_jsonl(
            root / "train.jsonl",
            [preference_row(f"q{i}", "a", "b", prompt_id=f"p{i}") for i in range(4)],
        )
        return write_config(
            root / "run.yaml",
            model={"hf_dir": str(root / "not_a_model")},
            data={"train_path": str(data)},
            ranking={"kind": "verifiable"},
            generation={"max_model_len": 1024, "max_tokens": 64},  # the tiny model's context
            train={"global_batch_size": 2},
            online={"rounds": 1, "final_eval": False, "workdir": str(root / "run")},
        )

    first_root, second_root = tmp_path / "run1", tmp_path / "run2"
    first = run_audited(["run", str(scene(first_root))], tmp_path / "run1.jsonl", first_root)
    assert first.returncode == 1 and "round1/generate failed" in first.stderr, first.stderr
    names = derived_names(tmp_path / "run1.jsonl", first_root)
    assert Path("run/round_1/portion.jsonl.partial") in names
    config = scene(second_root)
    (second,) = rerun_with_planted_links(
        names, second_root, [["run", str(config)]], tmp_path / "run2.jsonl"
    )
    assert second.returncode == 1 and "round1/generate failed" in second.stderr, second.stderr
    assert (second_root / "run" / "round_1" / "portion.jsonl").is_file()
    locks = locked_names(tmp_path / "run1.jsonl", first_root)  # the workdir's, generate's
    assert len(locks) >= 2 and locks <= set(names), sorted(names)
