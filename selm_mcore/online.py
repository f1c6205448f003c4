"""The online SELM loop: ``selm run CONFIG`` runs every round, resumably.

For round t = 1..T (one linear loop, one named timer per phase):

    portion   take portion t of the preference data (data.split_rounds)     -> round_t/portion.jsonl
    export    the current policy as an HF folder (round 1: the start folder) -> round_t/policy_hf/
    generate  greedy y_ref for the portion + the held-out prompts (vLLM)      -> round_t/generations.jsonl
    rank      rank [y_ref, y_w, y_l], best/worst -> new pairs + y_ref column  -> round_t/pairs.jsonl
    refpass   reference log-probs of chosen / rejected / y_ref (frozen policy) -> round_t/refpass/
    train     one round of SELM training, saved as a Megatron checkpoint      -> round_t/train/
    report    scores, implicit rewards, win counts, plots, markdown summary   -> round_t/report/

and, after the last round, ``final/export``, ``final/generate``, ``final/rank`` and
``final/report`` score the last policy on the held-out prompts.

vLLM and the ranker run in their own processes (``selm generate`` / ``selm rank``), so each
gets the whole accelerator memory; the Megatron phases run under ``torchrun`` when the world is
larger than one process, else in a plain subprocess. This process imports neither torch nor any
model code.

Resumption. ``WORKDIR/manifest.json`` (written atomically) records every finished phase with a
hash of its output. A phase writes into ``<output>.partial``, which is renamed into place only
after the phase succeeded, and only then recorded; a rerun of ``selm run`` skips recorded phases
(after checking their outputs still hash the same: a changed output is refused, never reused),
removes unrecorded leftovers and resumes at the first unfinished phase. A failed phase stops the
run with its error and a non-zero exit; nothing after it runs on stale data. ``--redo PHASE``
forgets PHASE and everything after it.

Fault hook (tests): ``SELM_FAULT=round1/generate`` SIGKILLs this process inside that phase, after
its work wrote the partial output and before it is published; ``SELM_FAULT=round1/generate:published``
kills it after the rename, before the manifest records the phase.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.config import SelmConfig, add_config_arguments, config_from_args, save_config

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "selm-online/1"
FAULT_ENV = "SELM_FAULT"
FAULT_POINTS = ("work", "published")
# Config keys a resumed run may change: they do not alter what finished phases produced.
RESUME_MUTABLE_KEYS = frozenset({
    "online.rounds", "online.final_eval", "online.phase_timeout_s", "ranking.device",
})


class OnlineError(RuntimeError):
    """A run that cannot go on: a failed phase, a changed output, an inconsistent manifest."""


class PhaseFailed(RuntimeError):
    """A phase's command exited non-zero (or its in-process work raised)."""


# --- output hashing ----------------------------------------------------------------------------


def _hash_file(path: Path, digest: Any, full_hash_max_bytes: int) -> None:
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    chunk = 1 << 20
    with open(path, "rb") as f:
        if size <= full_hash_max_bytes:
            while block := f.read(chunk):
                digest.update(block)
        else:
            # Multi-GB weights / optimizer shards: size + head + middle + tail is enough to catch
            # truncation, replacement and partial writes without reading terabytes per resume.
            for offset in (0, size // 2 - chunk // 2, size - chunk):
                f.seek(max(offset, 0))
                digest.update(f.read(chunk))


def hash_path(path: str | os.PathLike, full_hash_max_bytes: int = 64 << 20) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, size, content) entries.

    Files larger than ``full_hash_max_bytes`` are fingerprinted by size and three 1 MiB windows.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest, full_hash_max_bytes)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path).as_posix()).encode() + b"\0")
            _hash_file(file, digest, full_hash_max_bytes)
    else:
        raise FileNotFoundError(f"{path} does not exist")
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and rename (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- manifest ----------------------------------------------------------------------------------


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Manifest:
    """The record of finished phases, ``WORKDIR/manifest.json``; every change is written atomically.

    Layout: ``{"format", "config", "phases": {name: {"output", "sha256", "seconds",
    "finished_at"}}, "last_error"}``; ``phases`` keeps insertion (= execution) order.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any]):
        self.path = Path(path)
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise OnlineError(
                    f"{self.path} is not valid JSON ({exc}); it is only ever replaced atomically, "
                    "so it was edited by hand: fix it or start a new online.workdir") from None
            if data.get("format") != MANIFEST_FORMAT:
                raise OnlineError(
                    f"{self.path}: format {data.get('format')!r} is not {MANIFEST_FORMAT!r}; "
                    "use a new online.workdir")
            self._check_config(data.get("config", {}), config)
            data["config"] = config
            self.data = data
        else:
            self.data = {"format": MANIFEST_FORMAT, "config": config, "phases": {}}

    def _check_config(self, recorded: dict[str, Any], current: dict[str, Any]) -> None:
        old, new = _flatten(recorded), _flatten(current)
        changed = sorted(k for k in old.keys() | new.keys()
                         if k not in RESUME_MUTABLE_KEYS and old.get(k) != new.get(k))
        if changed:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
            raise OnlineError(
                f"{self.path}: the config differs from the one this run started with ({details}). "
                "Finished phases were produced with the old values, so resuming would mix them. "
                "Fix: restore the old values, start a new online.workdir, or rerun with "
                "--redo PHASE to recompute from the first affected phase.")

    @property
    def phases(self) -> dict[str, dict[str, Any]]:
        return self.data["phases"]

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def record(self, name: str, output: str, sha256: str, seconds: float) -> None:
        self.phases[name] = {
            "output": output,
            "sha256": sha256,
            "seconds": round(seconds, 3),
            "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        self.data.pop("last_error", None)
        self.save()

    def record_error(self, name: str, message: str) -> None:
        self.data["last_error"] = {"phase": name, "message": message[-4000:]}
        self.save()

    def forget_from(self, names: list[str], first: str) -> list[str]:
        """Drop the records of ``first`` and every phase after it in ``names``; return them."""
        if first not in names:
            raise OnlineError(f"--redo {first}: no such phase; phases are: {', '.join(names)}")
        dropped = [n for n in names[names.index(first):] if n in self.phases]
        for name in dropped:
            del self.phases[name]
        self.save()
        return dropped


# --- the phase runner --------------------------------------------------------------------------


@dataclass
class Phase:
    """One resumable step: ``run(partial)`` must create ``partial`` (a file or a folder)."""

    name: str                          # "round1/generate"
    output: str                        # relative to the workdir: "round_1/generations.jsonl"
    run: Callable[[Path], None]


def parse_fault(value: str | None) -> tuple[str, str] | None:
    """``"round1/train"`` -> ("round1/train", "work"); ``"x:published"`` -> ("x", "published")."""
    if not value:
        return None
    name, _, point = value.partition(":")
    point = point or "work"
    if point not in FAULT_POINTS:
        raise OnlineError(f"{FAULT_ENV}={value!r}: point {point!r} is not one of {FAULT_POINTS}")
    return name, point


def _kill_self(name: str, point: str) -> None:
    logger.warning("%s: fault hook %s=%s:%s fires, killing this process", name, FAULT_ENV, name, point)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def run_phases(phases: list[Phase], workdir: Path, manifest: Manifest, *,
               full_hash_max_bytes: int = 64 << 20, fault: tuple[str, str] | None = None,
               on_phase_done: Callable[[Phase, float], None] | None = None) -> dict[str, float]:
    """Run ``phases`` in order, skipping recorded ones; return {phase name: seconds run now}.

    Raises OnlineError when a recorded output changed or a phase failed (the error is also
    written to the manifest's ``last_error``).
    """
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate phase names in {names}")
    unknown = [n for n in manifest.phases if n not in names]
    if unknown:
        logger.info("manifest lists phases this config does not run (kept): %s", ", ".join(unknown))
    workdir.mkdir(parents=True, exist_ok=True)
    manifest.save()
    timings: dict[str, float] = {}
    for index, phase in enumerate(phases):
        output = workdir / phase.output
        record = manifest.phases.get(phase.name)
        tag = f"[{index + 1}/{len(phases)}] {phase.name}"
        if record is not None:
            if not output.exists():
                raise OnlineError(
                    f"{phase.name}: its output {output} is missing but the manifest {manifest.path} "
                    f"records it as finished. Fix: restore it, or rerun with --redo {phase.name}.")
            digest = hash_path(output, full_hash_max_bytes)
            if digest != record["sha256"]:
                raise OnlineError(
                    f"{phase.name}: output {output} changed since the manifest recorded it "
                    f"(sha256 {record['sha256'][:12]}… now {digest[:12]}…); later phases may have "
                    f"used the old content, so it is refused. Fix: restore it, or rerun with "
                    f"--redo {phase.name} to recompute it and everything after it.")
            logger.info("%s: done earlier (%.1f s), output verified, skipping", tag, record["seconds"])
            continue
        # Phases after an unfinished one depend on it: their records (if any) are stale.
        later = [n for n in names[index + 1:] if n in manifest.phases]
        if later:
            logger.warning("%s: forgetting later records that depend on it: %s", tag, ", ".join(later))
            manifest.forget_from(names, names[index + 1])
        partial = output.with_name(output.name + ".partial")
        for leftover in (partial, output):
            if leftover.exists() or leftover.is_symlink():
                logger.info("%s: removing unrecorded leftover %s", tag, leftover)
                _remove(leftover)
        output.parent.mkdir(parents=True, exist_ok=True)
        logger.info("%s: started", tag)
        start = time.perf_counter()
        try:
            phase.run(partial)
        except PhaseFailed as exc:
            message = f"{phase.name} failed: {exc}"
            manifest.record_error(phase.name, message)
            raise OnlineError(message) from None
        except Exception as exc:
            message = f"{phase.name} failed: {type(exc).__name__}: {exc}"
            manifest.record_error(phase.name, message)
            raise OnlineError(message) from exc
        if fault == (phase.name, "work"):
            _kill_self(phase.name, "work")
        if not (partial.exists() or partial.is_symlink()):
            message = f"{phase.name} finished without writing its output {partial}"
            manifest.record_error(phase.name, message)
            raise OnlineError(message)
        os.replace(partial, output)
        if fault == (phase.name, "published"):
            _kill_self(phase.name, "published")
        seconds = time.perf_counter() - start
        manifest.record(phase.name, phase.output, hash_path(output, full_hash_max_bytes), seconds)
        timings[phase.name] = seconds
        logger.info("%s: done in %.1f s", tag, seconds)
        if on_phase_done is not None:
            on_phase_done(phase, seconds)
    return timings


# --- subprocesses ------------------------------------------------------------------------------


def run_command(cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                timeout_s: float | None = None, tail_lines: int = 30) -> None:
    """Run ``cmd``, teeing its output to our stdout and ``log_path``; raise PhaseFailed on rc != 0.

    The error names the command, the exit status, the log file and the last lines of output.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s", shlex.join(cmd))
    tail: list[bytes] = []
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        deadline = None if not timeout_s else time.monotonic() + timeout_s
        pending = b""
        try:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                tail = (tail + lines)[-tail_lines:]
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    raise PhaseFailed(f"`{shlex.join(cmd)}` ran longer than {timeout_s} s; "
                                      f"killed (log: {log_path})")
        finally:
            proc.stdout.close()
            returncode = proc.wait()
    if returncode != 0:
        tail = (tail + ([pending] if pending else []))[-tail_lines:]
        text = "\n".join(line.decode(errors="replace").rstrip("\r") for line in tail)
        how = (f"was killed by signal {-returncode}" if returncode < 0
               else f"exited with status {returncode}")
        raise PhaseFailed(f"`{shlex.join(cmd)}` {how} (full log: {log_path}); last output:\n{text}")


def selm_command(subcommand: str, *args: str) -> list[str]:
    """``python -m selm_mcore.cli SUBCOMMAND ARGS`` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "selm_mcore.cli", subcommand, *args]


def megatron_command(cfg: SelmConfig, subcommand: str, *args: str) -> list[str]:
    """The command for a Megatron phase: plain when the world is 1 process, else torchrun.

    ``online.launcher`` (e.g. ``srun --ntasks-per-node=1``) is prepended for multi-node runs;
    torchrun then rendezvouses over ``online.rdzv_endpoint``.
    """
    online = cfg.online
    world = online.nproc_per_node * online.nnodes
    if world == 1 and not online.launcher:
        return selm_command(subcommand, *args)
    torchrun = [sys.executable, "-m", "torch.distributed.run",
                f"--nproc-per-node={online.nproc_per_node}", f"--nnodes={online.nnodes}"]
    if online.nnodes > 1:
        torchrun += ["--rdzv-backend=c10d", f"--rdzv-endpoint={online.rdzv_endpoint}",
                     f"--rdzv-id={online.rdzv_id}"]
    else:
        torchrun += ["--standalone"]
    return [*shlex.split(online.launcher), *torchrun, "-m", "selm_mcore.cli", subcommand, *args]


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the workdir, refusing a second ``selm run`` on the same one."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OnlineError(
                f"another `selm run` holds {workdir}/.lock; wait for it to finish or use another "
                "online.workdir") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
