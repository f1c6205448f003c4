"""One top-level error handler for every command (selm_mcore.runtime.errors, selm_mcore.cli): a user
error (a ``UserError``) prints one line and exits 1, a bug keeps its traceback; a full disk names
the file and the free space (a real ENOSPC from /dev/full, or a writer that lost the errno but
left less space than it needed); only rank 0 reports a shared user error."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys

import pytest

from selm_mcore import cli
from selm_mcore.config.schema import ConfigError
from selm_mcore.runtime.errors import (
    DiskFullError,
    InputError,
    UserError,
    format_bytes,
    free_bytes,
    naming_write_errors,
    user_message,
)
from selm_mcore.runtime.files import DataError


def test_user_errors_keep_their_other_base():
    """``except ValueError`` around a config load still catches a ConfigError."""
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)
    with pytest.raises(ValueError, match="tp=3"):
        raise ConfigError("parallel.tp=3 must divide 8")


def test_a_user_error_class_is_known_where_it_is_defined(monkeypatch):
    # `selm run` merges node outputs (selm_mcore.rollout.engines) without importing the vLLM module.
    from selm_mcore.rollout.engines import GenerationError

    for vllm_module in ("selm_mcore.rollout.generate", "selm_mcore.rollout.vllm_engine"):
        monkeypatch.delitem(sys.modules, vllm_module, raising=False)
    assert user_message(GenerationError("node 1 left no output")) == "node 1 left no output"


def test_user_errors_and_bugs_are_told_apart(tmp_path):
    assert user_message(ConfigError("parallel.tp=3 must divide 8")) == "parallel.tp=3 must divide 8"
    assert "row 4" in user_message(DataError(tmp_path / "x.jsonl", 4, "prompt is empty", "fill"))
    assert user_message(InputError("--rows and --out go together")) is not None
    with pytest.raises(FileNotFoundError) as info:
        open(tmp_path / "missing.jsonl")
    assert "missing.jsonl" in user_message(info.value)  # an input that is not there
    for bug in (KeyError("prompt_id"), ValueError("shapes differ"), ZeroDivisionError()):
        assert user_message(bug) is None


def test_a_real_full_disk_names_the_file_and_the_free_space(tmp_path):
    target = tmp_path / "out" / "pairs.jsonl"
    target.parent.mkdir()
    with pytest.raises(DiskFullError) as info:
        with naming_write_errors(target), open("/dev/full", "w") as full:
            full.write("x" * 10)
            full.flush()  # the kernel answers ENOSPC
    assert info.value.__cause__.errno == errno.ENOSPC
    message = str(info.value)
    free = shutil.disk_usage(tmp_path).free
    assert f"no space left on the device while writing {target}" in message
    assert abs(info.value.free - free) < 1 << 30  # the free space of the target's filesystem
    assert f"; {format_bytes(info.value.free)} free. Fix: " in message
    assert user_message(info.value) == message
    # A bare ENOSPC deep in a chain (e.g. re-raised by a library) is still a user error.
    try:
        try:
            open("/dev/full", "w").write("x" * 10000)
        except OSError as exc:
            raise RuntimeError("checkpoint save failed") from exc
    except RuntimeError as wrapped:
        assert "no space left on the device" in user_message(wrapped)
    # The words alone, without the errno, are not a full disk: the text could quote anything.
    assert user_message(RuntimeError(f"writer said: {os.strerror(errno.ENOSPC)}")) is None


def test_a_writer_that_lost_the_errno_is_a_full_disk_when_the_space_is_short(tmp_path):
    """torch's checkpoint writer process reports ENOSPC as text ("unexpected pos"): with the
    size of the write known, less free space than that is reported as a full disk."""
    target = tmp_path / "ckpt" / "model"
    free = free_bytes(tmp_path)
    with pytest.raises(DiskFullError) as info:
        with naming_write_errors(target, needed_bytes=free + (1 << 40)):
            raise RuntimeError(
                "Worker failure: [enforce fail at inline_container.cc:672] . "
                "unexpected pos 704 vs 598"
            )
    message = user_message(info.value)
    assert message.startswith(f"writing {target} failed (RuntimeError: Worker failure: ")
    assert "the disk is full" in message and "needs about" in message
    # With room to spare the same failure is a bug and keeps its own exception.
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with naming_write_errors(target, needed_bytes=1):
            raise RuntimeError("unexpected pos 704 vs 598")


def test_report_errors_prints_one_line_for_a_user_error(capsys):
    def fail():
        raise ConfigError("c.yaml: unknown key data.foo")

    assert cli.report_errors("selm train", fail) == 1
    err = capsys.readouterr().err
    assert err == "selm train: error: c.yaml: unknown key data.foo\n"


def test_report_errors_keeps_the_traceback_of_a_bug():
    def bug():
        return {}["missing"]

    with pytest.raises(KeyError):
        cli.report_errors("selm train", bug)


def test_only_rank_0_reports_a_shared_user_error(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert (
        cli.report_errors(
            "selm train", lambda: (_ for _ in ()).throw(ConfigError("loss.beta=0.0 must be > 0"))
        )
        == 1
    )
    assert capsys.readouterr().err == ""
    # A rank's own disk or files: every rank that meets it says so.
    assert (
        cli.report_errors(
            "selm train",
            lambda: (_ for _ in ()).throw(DiskFullError("/local/rng/rank_00001.safetensors")),
        )
        == 1
    )
    assert capsys.readouterr().err.startswith("selm train (rank 1): error: no space left")


def test_a_command_with_a_broken_config_exits_1_with_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("generation:\n  max_tokens: 16\n   n: 2\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "a", "prompt": "hi"}) + "\n")
    args = ["generate", str(config), "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"selm generate: error: {config} line 3")
    config.write_text("generation:\n  max_tokens: 16\n")
    assert cli.main(args + ["--set", "generation.foo=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "selm generate: error: --set generation.foo=1: unknown key generation.foo; known: "
        "generation.temperature, generation.top_p, "
    )
