"""What commands write next to their outputs (selm_mcore/runtime/outputs.py): locks, the
overwrite rule, temporary, swap and log names that never follow a planted link.

* the source: every temporary, lock and swap name, every append and every ``os.open`` is made
  in runtime/outputs.py (an AST scan of the package finds any other), so its rules cover a
  name added later; the helpers' users are listed from the same scan;
* the helpers, with links planted at the names they use (the lock, a log, a name tempfile
  tries first, the leftovers of an interrupted attempt, a swap target): never followed, the
  link's target untouched;
* every command through ``selm`` (in this process): refused at once while another process
  holds its output's lock, naming that pid; a finished output is not replaced without
  ``--overwrite``, whose name the refusal gives.

Real runs with links planted at the names discovered from what the commands wrote:
tests/e2e/test_output_safety.py.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import selm_mcore
from selm_mcore.runtime.files import hash_path, replace_dir

PACKAGE = Path(selm_mcore.__file__).resolve().parent
HELPER_MODULE = PACKAGE / "runtime" / "outputs.py"
HELD_LOCKS_ENV = "SELM_HELD_LOCKS"
FILE_MODE = re.compile(r"^[rwxabt+]{1,4}$")
# A name derived from another by a temporary, lock, swap or backup suffix.
DERIVED_NAME = re.compile(r"\.(tmp|temp|lock|old|bak|swap|partial\.tmp)(\b|$)|-tmp\b")
HELPERS = ("new_temp_file", "new_temp_dir", "temp_folder", "temp_path_for", "output_locks")
HELPERS += ("open_log",)


def package_sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _docstrings(tree: ast.Module) -> set[int]:
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }


def _mode_strings(call: ast.Call) -> list[str]:
    """The file-mode strings among an open call's first two arguments and ``mode=``
    (``open(path, "ab")``, ``path.open("a")``, ``os.fdopen(fd, "a" if x else "w")``)."""
    args = call.args[:2] + [k.value for k in call.keywords if k.arg == "mode"]
    return [
        n.value
        for a in args
        for n in ast.walk(a)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and FILE_MODE.match(n.value)
    ]


def _findings(path: Path, tree: ast.Module) -> list[str]:
    """Places in one module that make a derived name, a lock, an append or a raw open."""
    found, docstrings = [], _docstrings(tree)
    where = f"{path.relative_to(PACKAGE.parent)}"
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            for name in names:
                if name.split(".")[0] in ("tempfile", "fcntl"):
                    found.append(f"{where}:{node.lineno} imports {name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and DERIVED_NAME.search(node.value):
                found.append(f"{where}:{node.lineno} builds the name {node.value!r}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            if (owner, name) == ("os", "open"):
                found.append(f"{where}:{node.lineno} calls os.open")
            if name in ("open", "fdopen") and any("a" in m for m in _mode_strings(node)):
                found.append(f"{where}:{node.lineno} opens a file to append")
    return found


def test_every_temporary_lock_swap_and_append_name_is_made_by_runtime_outputs():
    sources = package_sources()
    outside = [f for path, tree in sources if path != HELPER_MODULE for f in _findings(path, tree)]
    assert outside == [], "\n".join(
        ["made outside selm_mcore/runtime/outputs.py (route it through its helpers):", *outside]
    )
    # The scan sees what it looks for: the helper module itself is full of it.
    assert len(_findings(HELPER_MODULE, ast.parse(HELPER_MODULE.read_text()))) >= 4
    # The helpers' users, listed from the source: every writing command is among them.
    users: dict[str, set[str]] = {helper: set() for helper in HELPERS}
    for path, tree in sources:
        module = path.relative_to(PACKAGE).with_suffix("").as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in users and path != HELPER_MODULE:
                    users[name].add(module)
    assert all(users.values()), {h: sorted(u) for h, u in users.items()}
    locking = users["output_locks"]
    for command in ("train/trainer", "train/refpass", "rollout/generate", "rollout/pairs"):
        assert command in locking
    assert {"mcore/convert", "loop/runner", "bench/__init__"} <= locking


# --- the helpers with planted links ---------------------------------------------------------


@pytest.fixture
def victims(tmp_path):
    """A file and a folder a planted link points at; ``unchanged()`` compares their content."""
    root = tmp_path / "victims"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "keep.txt").write_text("keep\n")
    (root / "file.txt").write_text("precious\n")
    before = hash_path(root)

    class Victims:
        file, folder = root / "file.txt", root / "dir"

        @staticmethod
        def unchanged() -> bool:
            return hash_path(root) == before and sorted(p.name for p in root.rglob("*")) == [
                "dir",
                "file.txt",
                "keep.txt",
            ]

    return Victims


def test_a_link_at_a_lock_name_is_removed_never_followed(tmp_path, victims):
    from selm_mcore.runtime.outputs import lock_path, output_locks

    target = tmp_path / "out"
    lock = lock_path(target)
    assert lock == tmp_path / ".out.lock"
    lock.symlink_to(victims.file)
    with output_locks({target: "train.output_dir"}, command="selm test"):
        assert not lock.is_symlink() and lock.read_text() == f"{os.getpid()} selm test\n"
    assert not os.path.lexists(lock)  # released: removed
    assert victims.unchanged()


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    from selm_mcore.runtime.outputs import OutputBusyError, output_locks

    target = tmp_path / "out"
    code = (
        "import sys\n"
        "from selm_mcore.runtime.outputs import output_locks\n"
        f"with output_locks({{{str(target)!r}: 'x'}}, command='selm child'):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != HELD_LOCKS_ENV}
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout.readline() == b"held\n"
        with pytest.raises(
            OutputBusyError,
            match=rf"train.output_dir={target} is being written by another process "
            rf"\(pid {child.pid}: selm child; lock {tmp_path}/\.out\.lock\).*Wait for pid "
            rf"{child.pid} to finish, or choose another train.output_dir",
        ):
            with output_locks({target: "train.output_dir"}, command="selm train"):
                pass
    finally:
        child.communicate(b"\n", timeout=30)
    with output_locks({target: "train.output_dir"}, command="selm train"):  # free again
        pass


def test_a_process_the_holder_starts_may_write_its_output(tmp_path):
    """The holder's own helpers (a benchmark's child runs) inherit its lock; others do not."""
    from selm_mcore.runtime.outputs import output_locks

    target = tmp_path / "work"
    code = (
        "from selm_mcore.runtime.outputs import output_locks\n"
        f"with output_locks({{{str(target)!r}: '--workdir'}}, command='child'):\n"
        "    print('ok')\n"
    )
    with output_locks({target: "--workdir"}, command="selm bench"):
        inherited = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        env = {k: v for k, v in os.environ.items() if k != HELD_LOCKS_ENV}
        stranger = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env
        )
    assert inherited.returncode == 0 and inherited.stdout == "ok\n", inherited.stderr
    assert stranger.returncode != 0
    assert f"pid {os.getpid()}: selm bench" in stranger.stderr


def test_a_name_tempfile_tries_first_is_skipped_when_a_link_is_there(
    tmp_path, victims, monkeypatch
):
    """O_EXCL / mkdir fail on a planted link at the chosen name; tempfile moves on to the next
    name (the names are made predictable here to plant the link at the first one)."""
    from selm_mcore.runtime.outputs import new_temp_dir, new_temp_file

    target = tmp_path / "out"
    planted_file = tmp_path / ".out.first111.tmp"
    planted_dir = tmp_path / ".out.first222.export"
    planted_file.symlink_to(victims.file)
    planted_dir.symlink_to(victims.folder)
    for first, make in (("first111", new_temp_file), ("first222", new_temp_dir)):
        names = iter([first, "second99"])
        monkeypatch.setattr(tempfile, "_get_candidate_names", lambda names=names: names)
        made = make(target) if make is new_temp_file else make(target, "export")
        path = made[1] if isinstance(made, tuple) else made
        assert path.name in (".out.second99.tmp", ".out.second99.export")
        assert not path.is_symlink()
    assert planted_file.is_symlink() and planted_dir.is_symlink()
    assert victims.unchanged()


def test_leftovers_of_an_interrupted_attempt_are_removed_links_unlinked(tmp_path, victims):
    from selm_mcore.runtime.outputs import new_temp_dir, stale_temps

    target = tmp_path / "final"
    leftover_dir = tmp_path / ".final.abcd1234.tmp"
    (leftover_dir / "model").mkdir(parents=True)
    (tmp_path / ".final.linkdir_.tmp").symlink_to(victims.folder)
    (tmp_path / ".final.linkfil_.tmp").symlink_to(victims.file)
    (tmp_path / ".other.abcd1234.tmp").mkdir()  # another target's: kept
    assert len(stale_temps(target)) == 3
    fresh = new_temp_dir(target, clear_stale=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.abcd1234.tmp", fresh.name, "victims"]
    )
    assert victims.unchanged()


def test_an_appended_log_never_lands_in_a_links_target(tmp_path, victims):
    from selm_mcore.runtime.outputs import open_log

    log = tmp_path / "logs" / "round1_generate.log"
    log.parent.mkdir()
    log.symlink_to(victims.file)
    with open_log(log, binary=True) as handle:
        handle.write(b"$ selm generate\n")
    with open_log(log) as handle:
        handle.write("second line\n")
    assert not log.is_symlink() and log.read_text() == "$ selm generate\nsecond line\n"
    assert victims.unchanged()


def test_a_folder_is_never_swapped_in_through_a_link(tmp_path, victims, monkeypatch):
    new = tmp_path / "new"
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    link = tmp_path / "out"
    link.symlink_to(victims.folder)
    with pytest.raises(FileExistsError, match=rf"{link} is a symbolic link"):
        replace_dir(new, link)
    assert victims.unchanged() and (new / "model.safetensors").is_file()
    # Without renameat2 the old folder goes aside to a fresh name first, then is deleted.
    from selm_mcore.runtime import files

    old = tmp_path / "old"
    old.mkdir()
    (old / "stale.bin").write_text("stale")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    replace_dir(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "out", "victims"]
    assert [p.name for p in old.iterdir()] == ["model.safetensors"]


# --- every command: one writer per output, finished outputs kept ------------------------------


@pytest.fixture
def command_outputs(tmp_path, write_config, write_jsonl, preference_row, tiny_llama_dir):
    """Each writing command with a config whose output is ``out/<command>``; the command line
    and that output path (and the setting naming it)."""
    out = tmp_path / "out"
    out.mkdir()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [preference_row("Q?", "A.", "B.")])
    config = write_config(
        tmp_path / "c.yaml",
        model={"hf_dir": str(tiny_llama_dir)},
        data={"train_path": str(pairs)},
        ranking={"kind": "verifiable"},
        generation={"max_model_len": 1024, "max_tokens": 64},  # within the tiny model's context
        train={
            "global_batch_size": 2,
            "output_dir": str(out / "train"),
            "ref_cache": str(out / "refpass.safetensors"),
        },
        online={"workdir": str(out / "run")},
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_id": "p1", "prompt": "Hi?"}\n')
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"prompt_id": "p1", "prompt": "Hi?", "responses": ["a", "b"]}\n')
    c = str(config)
    return {
        "train": (["train", c], out / "train", "train.output_dir"),
        "refpass": (["refpass", c], out / "refpass.safetensors", "train.ref_cache"),
        "generate": (
            ["generate", c, "--prompts", str(prompts), "--out", str(out / "gen.jsonl")],
            out / "gen.jsonl",
            "--out",
        ),
        "rank": (
            ["rank", c, "--generations", str(gen), "--rows", str(prompts)]
            + ["--out", str(out / "pairs.jsonl")],
            out / "pairs.jsonl",
            "--out",
        ),
        "convert hf-to-mcore": (
            ["convert", "hf-to-mcore", "--hf-dir", str(tiny_llama_dir)]
            + ["--out-dir", str(out / "mcore")],
            out / "mcore",
            "--out-dir",
        ),
        "convert mcore-to-hf": (
            ["convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "m")]
            + ["--out-dir", str(out / "hf")],
            out / "hf",
            "--out-dir",
        ),
        "run": (["run", c], out / "run", "online.workdir"),
        "bench train": (
            ["bench", "train", c, "--workdir", str(out / "bench")],
            out / "bench",
            "--workdir",
        ),
    }


COMMANDS = [
    "train",
    "refpass",
    "generate",
    "rank",
    "convert hf-to-mcore",
    "convert mcore-to-hf",
    "run",
    "bench train",
]


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_second_writer_of_its_output(command, command_outputs, capsys):
    from selm_mcore import cli
    from selm_mcore.runtime.outputs import output_locks

    argv, output, setting = command_outputs[command]
    before = sorted(p.name for p in output.parent.iterdir())
    with output_locks({output: setting}, command="selm holder"):
        assert cli.main(argv) == 1
    line = error_line(capsys)
    assert line.startswith(f"selm {argv[0]}: error: {setting}={output} is being written by ")
    assert f"(pid {os.getpid()}: selm holder;" in line
    assert sorted(p.name for p in output.parent.iterdir()) == before  # nothing written


FINISHED = {  # command -> (what a finished output is, the words the refusal uses)
    "train": ("final", "already holds a trained model (train.output_dir)"),
    "refpass": ("", "already holds a reference cache (train.ref_cache)"),
    "generate": ("", "already holds generations (--out)"),
    "rank": ("", "already holds ranking results (--out)"),
    "convert hf-to-mcore": ("model/x.distcp", "is not empty (1 entries: model)"),
}


@pytest.mark.parametrize("command", sorted(FINISHED))
def test_a_finished_output_is_not_replaced_without_overwrite(command, command_outputs, capsys):
    from selm_mcore import cli

    argv, output, setting = command_outputs[command]
    inner, words = FINISHED[command]
    finished = output / inner if inner else output
    finished.parent.mkdir(parents=True, exist_ok=True)
    if inner == "final":
        finished.mkdir()
        (finished / "selm_checkpoint.json").write_text("{}\n")
    else:
        finished.write_text("finished\n")
    before = hash_path(output)
    assert cli.main(argv) == 1
    line = error_line(capsys)
    assert words in line and "--overwrite" in line, line
    assert hash_path(output) == before
