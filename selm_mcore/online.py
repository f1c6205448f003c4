"""The online SELM loop: ``selm run CONFIG`` runs every round, resumably.

    selm run CONFIG [--set a.b=v ...] [--redo PHASE] [--list-phases]

One linear loop; for round t = 1..T each phase writes one output under ``WORKDIR/round_t/``:

    portion   portion t of data.train_path (data.split_rounds)               portion.jsonl
    export    the policy trained in round t-1 as an HF folder for vLLM        policy_hf/
              (round 1 generates from model.hf_dir itself)
    generate  greedy y_ref for the portion and the held-out prompts (vLLM)    generate/
    rank      rank [y_ref, y_w, y_l]: best/worst -> new pairs with a
              reference_response column; held-out scores (one ranker load)  rank/
    refpass   reference log-probs of chosen / rejected / y_ref                refpass/
    train     one round of SELM training -> Megatron checkpoint train/final   train/
    report    held-out score distribution, implicit rewards, win counts       report/

then ``final/export``, ``final/generate``, ``final/rank`` and ``final/report`` score the last
policy on the held-out prompts (online.final_eval). The round's starting policy and frozen
reference is round t-1's ``train/final`` (round 1: model.hf_dir). At the end a table with one row
per policy is printed (``reports.format_round_table``).

Processes: vLLM (``selm generate``) and the ranker (``python -m selm_mcore.online
--rank-worker``) run in their own processes, so each has the accelerators to itself; the
Megatron phases (``selm refpass``, ``selm train``, ``selm convert``) run in a plain subprocess, or
under torchrun when online.nproc_per_node * online.nnodes > 1 (multi-node: online.launcher, e.g.
srun, starts one torchrun per node). This process never loads a model. Every child's output is
shown and kept in ``WORKDIR/logs/<phase>.log``.

Resumption. ``WORKDIR/manifest.json`` (always replaced atomically) records each finished phase
with a hash of its output, the resolved config and content hashes of the inputs (data files,
start model, ranker). A phase writes ``<output>.partial``, renamed into place only after it
succeeded, and only then recorded. A rerun skips recorded phases after checking their outputs
still hash the same (a changed output, a changed config or an input changed under a finished
phase is refused, never reused), removes unrecorded leftovers and resumes at the first
unfinished phase; training continues from its own step checkpoints when its inputs are
unchanged. A failed phase stops the run with its error (exit status 1); nothing after it runs on
stale data. ``--redo PHASE`` forgets PHASE and everything after it.

Fault hook (tests): ``SELM_FAULT=round1/generate`` SIGKILLs this process inside that phase, after
its work wrote the partial output and before it is published;
``SELM_FAULT=round1/generate:published`` kills it after the rename, before the manifest records
the phase.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import select
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

from selm_mcore.config import (ConfigError, SelmConfig, add_config_arguments, config_from_args,
                               save_config)

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "selm-online/1"
# Children (and torchrun's workers) never get the working directory on sys.path: from the
# repository root it would make the folder kernels/ importable as a top-level package.
SAFE_PATH_ENV = {"PYTHONSAFEPATH": "1"}
FAULT_ENV = "SELM_FAULT"
FAULT_POINTS = ("work", "published")
# Config keys a resumed run may change: they do not alter what finished phases produced.
# (Not online.rounds: it changes how the data is split into portions.)
RESUME_MUTABLE_KEYS = frozenset({
    "online.workdir", "online.final_eval", "online.phase_timeout_s", "online.launcher",
    "online.rdzv_endpoint", "online.rdzv_id", "ranking.device", "ranking.batch_size",
    "train.log_interval", "train.tensorboard", "generation.engine_timeout_s",
    "generation.reload_timeout_s", "generation.gpu_memory_utilization",
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
            data.setdefault("inputs", {})
            self.data = data
        else:
            self.data = {"format": MANIFEST_FORMAT, "config": config, "inputs": {}, "phases": {}}

    def check_inputs(self, current: dict[str, tuple[str, str]]) -> None:
        """Refuse an input (data file, start model, ranker) whose content changed after a phase
        that reads it finished; then record the current hashes.

        ``current``: {input name: (content hash, first phase that reads it)}. A changed input
        whose first reader has not finished yet (e.g. ranker weights fixed after a failed rank
        phase) is accepted.
        """
        recorded = self.data["inputs"]
        for key, (digest, first_reader) in sorted(current.items()):
            if key in recorded and recorded[key] != digest and first_reader in self.phases:
                raise OnlineError(
                    f"{self.path}: the content of {key} changed since {first_reader} (and the "
                    "phases after it) used it; resuming would mix old and new data. Fix: restore "
                    f"the old content, rerun with --redo {first_reader} to recompute from there, "
                    "or start a new online.workdir.")
        self.data["inputs"] = {key: digest for key, (digest, _) in current.items()}
        self.save()

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
    """One step of the loop: ``run(partial)`` must create ``partial`` (a file or a folder).

    ``resumable``: the phase continues its own leftover ``partial`` after a kill (the trainer
    resumes from its step checkpoints) instead of starting over. The leftover is kept only when
    the recorded outputs of every earlier phase are those it was started with.
    """

    name: str                          # "round1/generate"
    output: str                        # relative to the workdir: "round_1/generate"
    run: Callable[[Path], None]
    resumable: bool = False


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
    logger.warning("%s: fault hook %s=%s:%s fires, killing this process", name, FAULT_ENV, name,
                   point)
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
                    f"{phase.name}: its output {output} is missing but the manifest "
                    f"{manifest.path} records it as finished. Fix: restore it, or rerun with "
                    f"--redo {phase.name}.")
            digest = hash_path(output, full_hash_max_bytes)
            if digest != record["sha256"]:
                raise OnlineError(
                    f"{phase.name}: output {output} changed since the manifest recorded it "
                    f"(sha256 {record['sha256'][:12]}... now {digest[:12]}...); later phases may "
                    f"have used the old content, so it is refused. Fix: restore it, or rerun with "
                    f"--redo {phase.name} to recompute it and everything after it.")
            logger.info("%s: done earlier (%.1f s), output verified, skipping", tag,
                        record["seconds"])
            continue
        # Phases after an unfinished one depend on it: their records (if any) are stale.
        later = [n for n in names[index + 1:] if n in manifest.phases]
        if later:
            logger.warning("%s: forgetting later records that depend on it: %s", tag,
                           ", ".join(later))
            manifest.forget_from(names, names[index + 1])
        partial = output.with_name(output.name + ".partial")
        inputs_file = output.with_name(output.name + ".partial.inputs")
        inputs = {n: manifest.phases[n]["sha256"] for n in names[:index] if n in manifest.phases}
        keep_partial = (phase.resumable and partial.is_dir() and inputs_file.is_file()
                        and json.loads(inputs_file.read_text()) == inputs)
        for leftover in ((output,) if keep_partial else (partial, output)):
            if leftover.exists() or leftover.is_symlink():
                logger.info("%s: removing unrecorded leftover %s", tag, leftover)
                _remove(leftover)
        if keep_partial:
            logger.info("%s: continuing the interrupted %s", tag, partial)
        output.parent.mkdir(parents=True, exist_ok=True)
        if phase.resumable:
            write_json_atomic(inputs_file, inputs)
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
        if inputs_file.exists():
            inputs_file.unlink()
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


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a child's whole process group (torchrun ranks, vLLM engine processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(cmd: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                timeout_s: float | None = None, tail_lines: int = 30) -> None:
    """Run ``cmd``, teeing its output to our stdout and ``log_path``; raise PhaseFailed on rc != 0.

    The child runs in its own process group, which is killed when the timeout passes or this
    process is interrupted, and cleared of stragglers when the child exits. The error names the
    command, the exit status, the log file and the last lines of output.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s", shlex.join(cmd))
    tail: list[bytes] = []
    pending = b""
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **SAFE_PATH_ENV, **(env or {})},
                                start_new_session=True)
        deadline = None if not timeout_s else time.monotonic() + timeout_s
        fd = proc.stdout.fileno()
        try:
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    raise PhaseFailed(f"`{shlex.join(cmd)}` ran longer than "
                                      f"online.phase_timeout_s={timeout_s} s and was killed "
                                      f"(log: {log_path})")
                ready, _, _ = select.select([fd], [], [], 1.0)
                if not ready:
                    # A child killed without cleanup can leave helpers (checkpoint writers)
                    # that hold the pipe open: the child's exit ends the phase, not EOF.
                    if proc.poll() is not None:
                        break
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                tail = (tail + lines)[-tail_lines:]
        finally:
            _kill_group(proc)
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


def redo_from(phases: list[Phase], workdir: Path, manifest: Manifest, first: str) -> list[str]:
    """``--redo FIRST``: forget FIRST and every later phase, and drop their partial outputs."""
    names = [p.name for p in phases]
    dropped = manifest.forget_from(names, first)
    for phase in phases[names.index(first):]:
        output = workdir / phase.output
        for leftover in (output.with_name(output.name + ".partial"),
                         output.with_name(output.name + ".partial.inputs")):
            if leftover.exists() or leftover.is_symlink():
                _remove(leftover)
    return dropped


# --- the SELM round's phases -------------------------------------------------------------------

EVAL_ID_PREFIX = "eval::"


@dataclass
class RunPaths:
    """Where everything of one run lives (absolute paths)."""

    workdir: Path

    @property
    def manifest(self) -> Path:
        return self.workdir / "manifest.json"

    @property
    def config(self) -> Path:
        return self.workdir / "config.yaml"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def round_dir(self, t: int) -> Path:
        return self.workdir / f"round_{t}"

    @property
    def final_dir(self) -> Path:
        return self.workdir / "final"

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.workdir))

    def log(self, phase_name: str) -> Path:
        return self.logs / (phase_name.replace("/", "_") + ".log")


def _read_records(path: Path) -> dict[int, dict[str, Any]]:
    """Raw rows of a JSONL or Parquet file by 1-based row (JSONL: line) number, as
    data.read_rows numbers them in ``PreferenceRow.source`` (validation is its job)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(
                "reading Parquet needs pyarrow: pip install 'selm-mcore[data]'") from exc
        return dict(enumerate(pq.read_table(path).to_pylist(), start=1))
    with open(path, encoding="utf-8") as handle:
        return {number: json.loads(line) for number, line in enumerate(handle, start=1)
                if line.strip()}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from selm_mcore.generation import write_jsonl_atomic

    write_jsonl_atomic(path, rows)


def write_portion(cfg: SelmConfig, round_index: int, out_path: Path) -> int:
    """Portion ``round_index`` of data.train_path (data.split_rounds), capped at
    online.max_prompts_per_round, as validated rows in the file schema plus the ranking's answer
    column; rows without a prompt_id get ``row-<file row>``. Returns the row count."""
    from selm_mcore.data import read_rows, split_rounds

    train_path = Path(cfg.data.train_path)
    if not cfg.data.train_path:
        raise ValueError("data.train_path is empty: point it at the preference (or prompt) rows")
    loaded = read_rows(train_path, skip_bad_rows=cfg.data.skip_bad_rows)
    # Only the verifiable ranker reads a column beyond the file schema (its answers).
    raw = _read_records(train_path) if cfg.ranking.kind == "verifiable" else {}
    portion = split_rounds(loaded.rows, cfg.online.rounds)[round_index - 1]
    if cfg.online.max_prompts_per_round:
        portion = portion[:cfg.online.max_prompts_per_round]
    records, seen = [], {}
    for row in portion:
        file_row = int(row.source.rsplit(":", 1)[1])
        record = row.to_record()
        record.setdefault("prompt_id", f"row-{file_row}")
        answer = raw.get(file_row, {}).get(cfg.ranking.answer_key)
        if answer is not None:
            record[cfg.ranking.answer_key] = answer
        if record["prompt_id"] in seen:
            raise ValueError(
                f"{train_path} row {file_row}: prompt_id {record['prompt_id']!r} repeats row "
                f"{seen[record['prompt_id']]}; prompt ids key generations to rows, make them "
                "unique")
        seen[record["prompt_id"]] = file_row
        records.append(record)
    _write_jsonl(out_path, records)
    logger.info("round %d: %d rows (portion %d of %d of %s)", round_index, len(records),
                round_index, cfg.online.rounds, train_path)
    return len(records)


def read_eval_rows(cfg: SelmConfig) -> list[dict[str, Any]]:
    """The held-out rows (the first online.max_eval_prompts), [] without data.eval_prompts_path."""
    if not cfg.data.eval_prompts_path:
        return []
    path = Path(cfg.data.eval_prompts_path)
    if not path.is_file():
        raise FileNotFoundError(f"data.eval_prompts_path={path} does not exist")
    rows = list(_read_records(path).values())
    if cfg.online.max_eval_prompts:
        rows = rows[:cfg.online.max_eval_prompts]
    for index, row in enumerate(rows):
        if row.get("prompt_id") is None:
            row["prompt_id"] = f"row-{index + 1}"
    return rows


def _prompt_only(row: dict[str, Any], prompt_id: str) -> dict[str, Any]:
    """A generation input row: prompt_id + the conversation before the compared response."""
    if isinstance(row.get("chosen"), list):
        return {"prompt_id": prompt_id, "messages": row["chosen"][:-1]}
    if isinstance(row.get("prompt"), str):
        return {"prompt_id": prompt_id, "prompt": row["prompt"]}
    return {"prompt_id": prompt_id, "messages": row.get("messages") or []}


def eval_anchor(row: dict[str, Any]) -> str | None:
    """The reference response a pairwise ranker compares a held-out response against: the
    row's chosen response (UltraFeedback test_prefs rows have one), else None."""
    chosen = row.get("chosen")
    if isinstance(chosen, list) and chosen and chosen[-1].get("role") == "assistant":
        return chosen[-1]["content"]
    return None


def score_eval_responses(ranker, eval_rows: list[dict[str, Any]],
                         generations: dict[str, list[str]], answer_key: str) -> list[dict]:
    """The ranker's score of the policy's (first) response to each held-out prompt.

    Pairwise rankers (PairRM) score it against the row's chosen response (``eval_anchor``);
    the others score it alone. Returns rows {prompt_id, response, score}.
    """
    from selm_mcore.ranking import PairRMRanker

    prompts, candidates, answers = [], [], []
    for row in eval_rows:
        key = EVAL_ID_PREFIX + str(row["prompt_id"])
        if key not in generations:
            raise KeyError(f"held-out prompt {row['prompt_id']!r} has no generated response")
        response = generations[key][0]
        messages = _prompt_only(row, key)
        prompts.append(row["prompt"] if isinstance(row.get("prompt"), str)
                       else messages["messages"][-1]["content"])
        if isinstance(ranker, PairRMRanker):
            anchor = eval_anchor(row)
            if anchor is None:
                raise ValueError(f"held-out prompt {row['prompt_id']!r} has no chosen response "
                                 "to compare against (PairRM scores pairs)")
            candidates.append([response, anchor])
        else:
            candidates.append([response])
        answers.append(row.get(answer_key))
    scores = ranker.scores(prompts, candidates, answers=answers) if prompts else []
    return [{"prompt_id": row["prompt_id"], "response": cands[0], "score": float(score[0])}
            for row, cands, score in zip(eval_rows, candidates, scores)]


def drop_empty_responses(pairs: list[dict], stats: list[dict]) -> list[dict]:
    """Pairs whose chosen, rejected and y_ref are all non-empty; marks the others in ``stats``.

    A policy may answer a prompt with EOS alone (an empty y_ref), and the ranker may then pick
    it; data.read_rows refuses empty responses (they usually mean broken data), so such rows
    leave this round's training data, with a warning and ``dropped_empty`` in the stats.
    """
    kept = []
    for pair, stat in zip(pairs, stats):
        texts = (pair["chosen"][-1]["content"], pair["rejected"][-1]["content"],
                 pair["reference_response"])
        stat["dropped_empty"] = not all(text.strip() for text in texts)
        if not stat["dropped_empty"]:
            kept.append(pair)
    if len(kept) < len(pairs):
        logger.warning("dropped %d of %d new pairs with an empty chosen, rejected or y_ref "
                       "response (the policy answered with EOS alone)", len(pairs) - len(kept),
                       len(pairs))
    return kept


def rank_worker(spec_path: str) -> int:
    """Entry of the ranking process (``python -m selm_mcore.online --rank-worker SPEC``).

    One ranker load serves both jobs of a round: new pairs from [y_ref, y_w, y_l]
    (``ranking.build_pairs``) and the held-out scores for the report.
    """
    from selm_mcore.cli import setup_logging
    from selm_mcore.config import load_config
    from selm_mcore.generation import read_jsonl
    from selm_mcore.ranking import build_pairs, build_ranker, load_generations, summarize_stats

    setup_logging()
    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config(spec["config"], spec["overrides"])
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    generations = load_generations(spec["generations"])
    ranker = build_ranker(cfg.ranking, trust_remote_code=cfg.model.trust_remote_code)
    if spec.get("rows"):
        rows = read_jsonl(spec["rows"])
        new_rows, stats = build_pairs(rows, generations, ranker, answer_key=cfg.ranking.answer_key)
        logger.info("ranked %d rows with %s: %s", len(rows), ranker.name,
                    json.dumps(summarize_stats(stats)))
        kept = drop_empty_responses(new_rows, stats)
        if not kept:
            raise ValueError(f"every one of the {len(new_rows)} new pairs has an empty chosen, "
                             "rejected or y_ref response; check the generations "
                             f"({spec['generations']})")
        _write_jsonl(out_dir / "pairs.jsonl", kept)
        _write_jsonl(out_dir / "stats.jsonl", stats)
    eval_rows = read_jsonl(spec["eval_rows"]) if spec.get("eval_rows") else []
    if eval_rows:
        scored = score_eval_responses(ranker, eval_rows, generations, cfg.ranking.answer_key)
        _write_jsonl(out_dir / "eval_scores.jsonl", scored)
        logger.info("held-out: %d responses, mean score %.4f", len(scored),
                    sum(r["score"] for r in scored) / len(scored))
    return 0


class RoundPhases:
    """Builds the phase list of a run from its config; each phase is a small method."""

    def __init__(self, cfg: SelmConfig, paths: RunPaths, timeout_s: float | None = None):
        self.cfg = cfg
        self.paths = paths
        self.timeout_s = timeout_s or None
        self.eval_rows = read_eval_rows(cfg)
        if cfg.ranking.kind == "pairrm":
            missing = [r["prompt_id"] for r in self.eval_rows if eval_anchor(r) is None]
            if missing:
                raise OnlineError(
                    f"data.eval_prompts_path={cfg.data.eval_prompts_path}: held-out prompt "
                    f"{missing[0]!r} (and {len(missing) - 1} more) has no 'chosen' conversation; "
                    "PairRM only compares responses, so the held-out score is PairRM's preference "
                    "of the policy's response over that chosen response. Fix: use rows with "
                    "chosen responses (e.g. UltraFeedback test_prefs), or set "
                    "data.eval_prompts_path='' to skip the held-out scores")

    # Policy of round t: what it generates from (HF) and what training starts from.
    def policy_hf(self, t: int) -> Path:
        """HF folder vLLM serves in round t (round 1: model.hf_dir)."""
        if t == 1:
            return Path(self.cfg.model.hf_dir).absolute()
        return self.paths.round_dir(t) / "policy_hf"

    def policy_start(self, t: int) -> Path:
        """The round's starting policy and frozen reference (Megatron checkpoint for t > 1)."""
        if t == 1:
            return Path(self.cfg.model.hf_dir).absolute()
        return self.paths.round_dir(t - 1) / "train" / "final"

    def _run(self, name: str, cmd: list[str]) -> None:
        run_command(cmd, self.paths.log(name), timeout_s=self.timeout_s)

    def _overrides(self, **values: Any) -> list[str]:
        args = []
        for key, value in values.items():
            args += ["--set", f"{key.replace('__', '.')}={value}"]
        return args

    # --- phases ---
    def portion(self, t: int) -> Phase:
        return Phase(f"round{t}/portion", self.paths.rel(self.paths.round_dir(t) / "portion.jsonl"),
                     lambda partial: write_portion(self.cfg, t, partial))

    def export(self, name: str, checkpoint: Path, out: Path) -> Phase:
        def run(partial: Path) -> None:
            cmd = selm_command("convert", "mcore-to-hf", "--mcore-dir", str(checkpoint),
                               "--out-dir", str(partial), "--tp", str(self.cfg.online.export_tp))
            self._run(name, cmd)

        return Phase(name, self.paths.rel(out), run)

    def generate(self, name: str, policy_hf: Path, out: Path, rows_path: Path | None) -> Phase:
        def run(partial: Path) -> None:
            partial.mkdir()
            inputs = []
            if rows_path is not None:
                from selm_mcore.generation import read_jsonl

                inputs += [_prompt_only(r, str(r["prompt_id"])) for r in read_jsonl(rows_path)]
            inputs += [_prompt_only(r, EVAL_ID_PREFIX + str(r["prompt_id"]))
                       for r in self.eval_rows]
            _write_jsonl(partial / "prompts.jsonl", inputs)
            _write_jsonl(partial / "eval_rows.jsonl", self.eval_rows)
            cmd = selm_command("generate", str(self.paths.config), "--prompts",
                               str(partial / "prompts.jsonl"), "--out",
                               str(partial / "generations.jsonl"), "--model-dir", str(policy_hf))
            self._run(name, cmd)

        return Phase(name, self.paths.rel(out), run)

    def rank(self, name: str, generate_dir: Path, out: Path, rows_path: Path | None) -> Phase:
        def run(partial: Path) -> None:
            partial.mkdir()
            spec = {"config": str(self.paths.config), "overrides": [],
                    "rows": str(rows_path) if rows_path is not None else None,
                    "generations": str(generate_dir / "generations.jsonl"),
                    "eval_rows": str(generate_dir / "eval_rows.jsonl") if self.eval_rows else None,
                    "out_dir": str(partial)}
            spec_path = partial / "spec.json"
            spec_path.write_text(json.dumps(spec, indent=2))
            self._run(name, [sys.executable, "-m", "selm_mcore.online", "--rank-worker",
                             str(spec_path)])

        return Phase(name, self.paths.rel(out), run)

    def refpass(self, t: int) -> Phase:
        name = f"round{t}/refpass"
        round_dir = self.paths.round_dir(t)

        def run(partial: Path) -> None:
            partial.mkdir()
            cmd = megatron_command(self.cfg, "refpass", str(self.paths.config), *self._overrides(
                train__init_from=self.policy_start(t),
                data__train_path=round_dir / "rank" / "pairs.jsonl",
                train__ref_cache=partial / "ref_logps.safetensors",
                train__output_dir=partial, train__round_index=t))
            self._run(name, cmd)

        return Phase(name, self.paths.rel(round_dir / "refpass"), run)

    def train(self, t: int) -> Phase:
        name = f"round{t}/train"
        round_dir = self.paths.round_dir(t)

        def run(partial: Path) -> None:
            partial.mkdir(exist_ok=True)
            overrides = dict(train__init_from=self.policy_start(t),
                             data__train_path=round_dir / "rank" / "pairs.jsonl",
                             train__output_dir=partial, train__round_index=t)
            if self.cfg.train.reference_mode == "precomputed":
                overrides["train__ref_cache"] = round_dir / "refpass" / "ref_logps.safetensors"
            self._run(name, megatron_command(self.cfg, "train", str(self.paths.config),
                                             *self._overrides(**overrides)))
            # The optimizer is fresh every round: step checkpoints (model + optimizer state,
            # terabytes at 70B) are only good for resuming this phase, which is now done.
            if (partial / "checkpoints").exists():
                shutil.rmtree(partial / "checkpoints")

        return Phase(name, self.paths.rel(round_dir / "train"), run, resumable=True)

    def report(self, name: str, round_index: int, generator: str, rank_dir: Path,
               train_dir: Path | None, out: Path, history_dirs: list[Path],
               manifest: Manifest) -> Phase:
        def run(partial: Path) -> None:
            write_report(partial, round_index=round_index, generator=generator,
                         rank_dir=rank_dir, train_dir=train_dir, history_dirs=history_dirs,
                         phase_seconds=_round_seconds(manifest, name.split("/")[0]))

        return Phase(name, self.paths.rel(out), run)

    def build(self, manifest: Manifest) -> list[Phase]:
        """Every phase of the run, in order."""
        phases: list[Phase] = []
        reports: list[Path] = []
        rounds = self.cfg.online.rounds
        for t in range(1, rounds + 1):
            round_dir = self.paths.round_dir(t)
            portion = round_dir / "portion.jsonl"
            phases.append(self.portion(t))
            if t > 1:
                phases.append(self.export(f"round{t}/export", self.policy_start(t),
                                          self.policy_hf(t)))
            phases.append(self.generate(f"round{t}/generate", self.policy_hf(t),
                                        round_dir / "generate", portion))
            phases.append(self.rank(f"round{t}/rank", round_dir / "generate", round_dir / "rank",
                                    portion))
            if self.cfg.train.reference_mode == "precomputed":
                phases.append(self.refpass(t))
            phases.append(self.train(t))
            generator = "start" if t == 1 else f"round {t - 1} policy"
            phases.append(self.report(f"round{t}/report", t, generator, round_dir / "rank",
                                      round_dir / "train", round_dir / "report", list(reports),
                                      manifest))
            reports.append(round_dir / "report")
        if self.cfg.online.final_eval and self.eval_rows:
            final = self.paths.final_dir
            last_policy = self.paths.round_dir(rounds) / "train" / "final"
            phases.append(self.export("final/export", last_policy, final / "policy_hf"))
            phases.append(self.generate("final/generate", final / "policy_hf", final / "generate",
                                        None))
            phases.append(self.rank("final/rank", final / "generate", final / "rank", None))
            phases.append(self.report("final/report", 0, f"round {rounds} policy",
                                      final / "rank", None, final / "report", list(reports),
                                      manifest))
        return phases


def _round_seconds(manifest: Manifest, prefix: str) -> dict[str, float]:
    return {name.split("/", 1)[1]: record["seconds"] for name, record in manifest.phases.items()
            if name.startswith(prefix + "/")}


def write_report(out_dir: Path, *, round_index: int, generator: str, rank_dir: Path,
                 train_dir: Path | None, history_dirs: list[Path],
                 phase_seconds: dict[str, float]) -> None:
    """The report of one round (or of the final evaluation, round_index 0)."""
    from selm_mcore import reports
    from selm_mcore.generation import read_jsonl
    from selm_mcore.metrics import read_jsonl as read_metrics

    summary = reports.RoundSummary(round=round_index, generator=generator,
                                   phase_seconds=phase_seconds)
    if (rank_dir / "eval_scores.jsonl").is_file():
        scores = [row["score"] for row in read_jsonl(rank_dir / "eval_scores.jsonl")]
        summary.eval_score_values = scores
        summary.eval_scores = reports.ScoreStats.of(scores)
    if (rank_dir / "stats.jsonl").is_file():
        stats = read_jsonl(rank_dir / "stats.jsonl")
        summary.wins = reports.WinCounts.of(
            [(row["chosen_index"], row["rejected_index"]) for row in stats])
        summary.wins.dropped_empty = sum(bool(row.get("dropped_empty")) for row in stats)
    records = []
    if train_dir is not None:
        records = read_metrics(train_dir / "metrics.jsonl")
        summary.train = reports.TrainStats.of(records)
    history = [reports.read_summary(d) for d in history_dirs]
    reports.write_round_report(out_dir, summary, history, records)


# --- selm run ----------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--redo", metavar="PHASE", default=None,
                        help="forget PHASE (e.g. round2/rank) and every later phase, then run")
    parser.add_argument("--list-phases", action="store_true",
                        help="print the phases and whether each is done, then exit")


def input_hashes(cfg: SelmConfig, full_hash_max_bytes: int) -> dict[str, tuple[str, str]]:
    """{input: (content hash, first phase that reads it)} for what a run reads from outside its
    workdir."""
    inputs = {"data.train_path": (cfg.data.train_path, "round1/portion"),
              "model.hf_dir": (cfg.model.hf_dir, "round1/generate"),
              "data.eval_prompts_path": (cfg.data.eval_prompts_path, "round1/generate")}
    if cfg.ranking.kind != "verifiable" and Path(cfg.ranking.model_path).exists():
        inputs["ranking.model_path"] = (cfg.ranking.model_path, "round1/rank")
        if cfg.ranking.backbone:
            inputs["ranking.backbone"] = (cfg.ranking.backbone, "round1/rank")
    return {key: (hash_path(path, full_hash_max_bytes), first)
            for key, (path, first) in inputs.items() if path}


def collect_summaries(paths: RunPaths, rounds: int):
    from selm_mcore import reports

    dirs = [paths.round_dir(t) / "report" for t in range(1, rounds + 1)]
    dirs.append(paths.final_dir / "report")
    return [reports.read_summary(d) for d in dirs if (d / "summary.json").is_file()]


def validate_run(cfg: SelmConfig) -> None:
    """Checks across sections that would otherwise fail rounds later, in a subprocess."""
    if not cfg.model.hf_dir or not Path(cfg.model.hf_dir).is_dir():
        raise ConfigError(f"model.hf_dir={cfg.model.hf_dir!r} is not a folder: point it at the "
                          "starting policy (an HF model folder)")
    if not cfg.data.train_path or not Path(cfg.data.train_path).is_file():
        raise ConfigError(f"data.train_path={cfg.data.train_path!r} is not a file: point it at "
                          "the preference rows (JSONL or Parquet)")
    world = cfg.online.nproc_per_node * cfg.online.nnodes
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if world % model_parallel:
        raise ConfigError(
            f"online.nproc_per_node * online.nnodes = {world} processes must be a multiple of "
            f"parallel.tp * parallel.pp = {model_parallel}; change either")
    dp = world // model_parallel
    if cfg.train.global_batch_size % (dp * cfg.train.micro_batch_size):
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of the "
            f"data-parallel size {dp} (= {world} processes / tp*pp {model_parallel}) times "
            f"train.micro_batch_size={cfg.train.micro_batch_size}")


def run_online(cfg: SelmConfig, *, redo: str | None = None, list_only: bool = False) -> int:
    """Run (or resume) every phase of ``cfg``; print the per-round table. Returns an exit code."""
    from selm_mcore import reports

    validate_run(cfg)
    paths = RunPaths(Path(cfg.online.workdir).absolute())
    fault = parse_fault(os.environ.get(FAULT_ENV))
    start = time.perf_counter()
    with workdir_lock(paths.workdir):
        manifest = Manifest(paths.manifest, cfg.to_dict())
        save_config(cfg, paths.config)
        phases = RoundPhases(cfg, paths, cfg.online.phase_timeout_s).build(manifest)
        if fault is not None and fault[0] not in {p.name for p in phases}:
            raise OnlineError(f"{FAULT_ENV}={fault[0]!r} names no phase of this run")
        if list_only:
            for phase in phases:
                done = "done" if phase.name in manifest.phases else "todo"
                print(f"{done}  {phase.name:<20} {phase.output}")
            return 0
        if redo:
            dropped = redo_from(phases, paths.workdir, manifest, redo)
            logger.info("--redo %s: forgot %s", redo, ", ".join(dropped) or "nothing")
        manifest.check_inputs(input_hashes(cfg, cfg.online.full_hash_max_mb << 20))
        timings = run_phases(phases, paths.workdir, manifest,
                             full_hash_max_bytes=cfg.online.full_hash_max_mb << 20, fault=fault)
    print()
    print(f"SELM run {paths.workdir}: {cfg.online.rounds} round(s), "
          f"{len(timings)} phase(s) run now in {time.perf_counter() - start:.0f} s")
    print(reports.format_round_table(collect_summaries(paths, cfg.online.rounds)))
    print()
    print("Phase times (s), as recorded when each phase ran:")
    print(reports.format_phase_times(
        {name: record["seconds"] for name, record in manifest.phases.items()}))
    final_report = paths.final_dir / "report" / "report.md"
    print(f"reports: {paths.workdir}/round_*/report/report.md"
          + (f", {final_report}" if final_report.exists() else ""))
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds run_command, which kills the running phase


def main(args) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # e.g. Slurm's time limit
    try:
        cfg = config_from_args(args)
        return run_online(cfg, redo=args.redo, list_only=args.list_phases)
    except (OnlineError, ConfigError) as exc:
        logger.error("%s", exc)
        logger.error("selm run stopped (exit status 1). Fix the cause and rerun the same command: "
                     "it resumes at the first unfinished phase.")
        return 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rank-worker":
        # Through the package import, so the worker logs as selm_mcore.online, not __main__.
        from selm_mcore.online import rank_worker as _rank_worker

        sys.exit(_rank_worker(sys.argv[2]))
    sys.exit("usage: python -m selm_mcore.online --rank-worker SPEC.json "
             "(internal; use `selm run`)")
