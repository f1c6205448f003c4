"""A resumable runner of phases: the manifest, the phase loop, subprocesses, the workdir lock.

Knows nothing of SELM (``selm_mcore.loop.online`` builds the phase list). A ``Phase`` writes one
output (a file or a folder) under the workdir (files it names ``unhashed``, e.g. a model card a
later phase completes, are left out of its hash); ``run_phases`` runs the phases in order:

* a phase writes ``<output>.partial``, renamed into place only after it succeeded, and only
  then recorded in ``WORKDIR/manifest.json`` (always replaced atomically) with a hash of its
  output and the time it took;
* a rerun skips recorded phases after checking their outputs still hash the same (a changed
  output, a changed config or a changed input under a finished phase is refused, never
  reused) and resumes at the first unfinished phase, clearing that phase's ``.partial`` (by
  definition unfinished); a ``resumable`` phase keeps its own leftover partial output (the
  trainer resumes from its step checkpoints) when the phases before it are unchanged;
* finished work is never deleted silently: an output (without ``.partial``) of a phase that
  is about to run but that the manifest does not record (the manifest was deleted, replaced
  or edited, or outputs were copied in) is refused before anything runs, naming the folder
  and offering ``--redo PHASE`` / ``--fresh``, which delete explicitly (``redo_from``,
  ``clear_outputs``). The one exception is the output the manifest announced as being published
  (``publishing``: a kill between the rename and the record) whose content still hashes as
  announced: it is adopted, not recomputed;
* a failed phase stops the run with its error, also written to the manifest's ``last_error``
  (a bug inside an in-process phase keeps its own exception and traceback).

``run_command`` runs a phase's child process through the one supervisor
(``selm_mcore.runtime.procs``): its own process group, its output teed to the console and a log
file, the group killed on a timeout, an interrupt or its exit.

Fault hook (tests): ``SELM_FAULT=round1/generate`` SIGKILLs this process inside that phase, after
its work wrote the partial output and before it is published;
``SELM_FAULT=round1/generate:published`` kills it after the rename, before the manifest records
the phase.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.loop.manifest_shape import manifest_problem
from selm_mcore.runtime.errors import UserError, short_repr, user_message
from selm_mcore.runtime.files import hash_path, write_json_atomic
from selm_mcore.runtime.outputs import is_plain_file, output_locks, remove_path
from selm_mcore.runtime.procs import CommandFailed, run_logged

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "selm-online/1"
# Children (and torchrun's workers) never get the working directory on sys.path: from the
# repository root it would make the folder kernels/ importable as a top-level package.
SAFE_PATH_ENV = {"PYTHONSAFEPATH": "1"}
FAULT_ENV = "SELM_FAULT"
FAULT_POINTS = ("work", "published")


class OnlineError(UserError, RuntimeError):
    """A run that cannot go on: a failed phase, a changed output, an inconsistent manifest."""


class PhaseFailed(RuntimeError):
    """A phase's command exited non-zero (or its in-process work raised)."""


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

    def __init__(
        self,
        path: str | os.PathLike,
        config: dict[str, Any],
        *,
        mutable_keys: frozenset[str] = frozenset(),
        defaults: dict[str, Any] | None = None,
    ):
        """``mutable_keys``: flattened config keys (``a.b``) a resumed run may change.
        ``defaults``: the config's default values; a key the recorded config lacks (a run
        started by a version without it) counts as unchanged while it keeps its default."""
        self.path = Path(path)
        self.mutable_keys = mutable_keys
        self.defaults = _flatten(defaults or {})
        if self.path.exists():
            edited = (
                "it is only ever replaced atomically, so it was edited by hand: fix it or start "
                "a new online.workdir"
            )
            try:
                data = json.loads(self.path.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                reason = str(exc).splitlines()[0][:200]
                raise OnlineError(f"{self.path} is not valid JSON ({reason}); {edited}") from None
            problem = manifest_problem(data)
            if problem is not None:
                raise OnlineError(f"{self.path}: {problem}; {edited}")
            if data.get("format") != MANIFEST_FORMAT:
                raise OnlineError(
                    f"{self.path}: format {data.get('format')!r} is not {MANIFEST_FORMAT!r}; "
                    "use a new online.workdir"
                )
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
                    "or start a new online.workdir."
                )
        self.data["inputs"] = {key: digest for key, (digest, _) in current.items()}
        self.save()

    def _check_config(self, recorded: dict[str, Any], current: dict[str, Any]) -> None:
        old, new = _flatten(recorded), _flatten(current)
        old.update({k: v for k, v in self.defaults.items() if k not in old})
        changed = sorted(
            k
            for k in old.keys() | new.keys()
            if k not in self.mutable_keys and old.get(k) != new.get(k)
        )
        if changed:
            details = "; ".join(
                f"{k}: {short_repr(old.get(k))} -> {short_repr(new.get(k))}" for k in changed[:8]
            )
            raise OnlineError(
                f"{self.path}: the config differs from the one this run started with ({details}). "
                "Finished phases were produced with the old values, so resuming would mix them. "
                "Fix: restore the old values, start a new online.workdir, or rerun with "
                "--redo PHASE to recompute from the first affected phase."
            )

    @property
    def phases(self) -> dict[str, dict[str, Any]]:
        return self.data["phases"]

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def announce(self, name: str, output: str, sha256: str, seconds: float) -> None:
        """Say that ``output`` (with this hash) is about to be renamed into place for ``name``,
        so a kill between the rename and ``record`` leaves an output a rerun can adopt."""
        self.data["publishing"] = {
            "phase": name,
            "output": output,
            "sha256": sha256,
            "seconds": round(seconds, 3),
        }
        self.save()

    def record(self, name: str, output: str, sha256: str, seconds: float) -> None:
        self.data.pop("publishing", None)
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
        dropped = [n for n in names[names.index(first) :] if n in self.phases]
        for name in dropped:
            del self.phases[name]
        if (self.data.get("publishing") or {}).get("phase") in names[names.index(first) :]:
            self.data.pop("publishing")  # an announced output of a forgotten phase
        self.save()
        return dropped


@dataclass
class Phase:
    """One step of the loop: ``run(partial)`` must create ``partial`` (a file or a folder).

    ``resumable``: the phase continues its own leftover ``partial`` after a kill (the trainer
    resumes from its step checkpoints) instead of starting over. The leftover is kept only when
    the recorded outputs of every earlier phase are those it was started with.
    """

    name: str  # "round1/generate"
    output: str  # relative to the workdir: "round_1/generate"
    run: Callable[[Path], object]
    resumable: bool = False
    # Files of a folder output that later phases rewrite (a model card): left out of its hash.
    unhashed: tuple[str, ...] = ()

    def digest(self, path: Path, full_hash_max_bytes: int) -> str:
        return hash_path(path, full_hash_max_bytes, skip=self.unhashed)


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
    logger.warning(
        "%s: fault hook %s=%s:%s fires, killing this process", name, FAULT_ENV, name, point
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _verify_recorded(
    phase: Phase, output: Path, record: dict[str, Any], manifest: Manifest, full_hash_max_bytes: int
) -> None:
    """A recorded phase's output must still be there, with the content that was recorded."""
    if not output.exists():
        raise OnlineError(
            f"{phase.name}: its output {output} is missing but the manifest {manifest.path} "
            f"records it as finished. Fix: restore it, or rerun with --redo {phase.name}."
        )
    digest = phase.digest(output, full_hash_max_bytes)
    if digest != record["sha256"]:
        raise OnlineError(
            f"{phase.name}: output {output} changed since the manifest recorded it "
            f"(sha256 {record['sha256'][:12]}... now {digest[:12]}...); later phases may have "
            f"used the old content, so it is refused. Fix: restore it, or rerun with "
            f"--redo {phase.name} to recompute it and everything after it."
        )


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _partial_of(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _adoptable(phase: Phase, manifest: Manifest) -> bool:
    """The manifest announced this phase's output as being published (a kill came before the
    record)."""
    publishing = manifest.data.get("publishing") or {}
    return publishing.get("phase") == phase.name and publishing.get("output") == phase.output


def check_unrecorded_outputs(phases: list[Phase], workdir: Path, manifest: Manifest) -> None:
    """Refuse to run when a phase that would run has a finished output the manifest does not
    record: running would delete or overwrite it. Nothing is changed on disk."""
    first = next((i for i, p in enumerate(phases) if p.name not in manifest.phases), None)
    if first is None:
        return
    found = [
        phase
        for index, phase in enumerate(phases[first:], start=first)
        if _exists(workdir / phase.output) and not (index == first and _adoptable(phase, manifest))
    ]
    if not found:
        return
    listing = ", ".join(f"{p.output} ({p.name})" for p in found[:6])
    more = f" and {len(found) - 6} more" if len(found) > 6 else ""
    state = (
        "does not exist"
        if not manifest.path.exists() or not manifest.phases
        else "does not record them"
    )
    raise OnlineError(
        f"{workdir} holds finished outputs of phases that would run now: {listing}{more}; the "
        f"manifest {manifest.path} {state} (deleted, replaced or edited by hand, or the outputs "
        "were copied in), so whether they belong to this config cannot be checked. They are "
        f"never deleted silently. Fix: restore the manifest; or rerun with --redo "
        f"{phases[first].name} to delete them and recompute from there; or rerun with --fresh "
        "to delete every output of this run and start over; or use another online.workdir."
    )


def _adopt_published(
    phase: Phase, output: Path, manifest: Manifest, full_hash_max_bytes: int, tag: str
) -> bool:
    """Record the output a kill left between its rename and its record; False if there is
    none. An output whose content differs from the announced hash is refused."""
    if not (_adoptable(phase, manifest) and _exists(output)):
        return False
    publishing = manifest.data["publishing"]
    digest = phase.digest(output, full_hash_max_bytes)
    if digest != publishing["sha256"]:
        raise OnlineError(
            f"{phase.name}: output {output} was being published when the run stopped, but its "
            f"content changed since (sha256 {publishing['sha256'][:12]}... now "
            f"{digest[:12]}...). Fix: rerun with --redo {phase.name} to recompute it."
        )
    manifest.record(phase.name, phase.output, digest, publishing["seconds"])
    logger.info("%s: adopting %s, published before the run stopped (content verified)", tag, output)
    return True


def _prepare_partial(phase: Phase, output: Path, inputs: dict[str, str], tag: str) -> Path:
    """Clear the partial output an interrupted attempt left (keeping a resumable phase's when
    the phases before it are unchanged); returns the partial output path to write.

    The finished ``output`` itself was refused earlier (``check_unrecorded_outputs``) if there
    was one, so only ``.partial`` leftovers, unfinished by definition, are removed here.
    """
    partial = _partial_of(output)
    inputs_file = output.with_name(output.name + ".partial.inputs")
    keep_partial = (  # never a link: a planted one is removed below, not followed
        phase.resumable
        and partial.is_dir()
        and not partial.is_symlink()
        and is_plain_file(inputs_file)
        and json.loads(inputs_file.read_text()) == inputs
    )
    if _exists(output):
        raise OnlineError(
            f"{phase.name}: {output} exists but is not recorded; rerun with "
            f"--redo {phase.name} to recompute it"
        )
    if not keep_partial and _exists(partial):
        logger.info("%s: removing the unfinished %s", tag, partial)
        remove_path(partial)
    if keep_partial:
        logger.info("%s: continuing the interrupted %s", tag, partial)
    output.parent.mkdir(parents=True, exist_ok=True)
    if phase.resumable:
        write_json_atomic(inputs_file, inputs)
    return partial


def _run_and_publish(
    phase: Phase,
    partial: Path,
    output: Path,
    manifest: Manifest,
    fault: tuple[str, str] | None,
    full_hash_max_bytes: int,
) -> tuple[str, float]:
    """Run the phase into ``partial``, announce it and rename it to ``output`` (errors go to
    the manifest); returns the output's hash and the seconds the phase took."""
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
        if user_message(exc) is None:
            raise  # a bug: its own traceback says more than a message
        raise OnlineError(message) from exc
    if fault == (phase.name, "work"):
        _kill_self(phase.name, "work")
    if not _exists(partial):
        message = f"{phase.name} finished without writing its output {partial}"
        manifest.record_error(phase.name, message)
        raise OnlineError(message)
    digest, seconds = phase.digest(partial, full_hash_max_bytes), time.perf_counter() - start
    manifest.announce(phase.name, phase.output, digest, seconds)
    os.replace(partial, output)
    output.with_name(output.name + ".partial.inputs").unlink(missing_ok=True)
    if fault == (phase.name, "published"):
        _kill_self(phase.name, "published")
    return digest, seconds


def run_phases(
    phases: list[Phase],
    workdir: Path,
    manifest: Manifest,
    *,
    full_hash_max_bytes: int = 64 << 20,
    fault: tuple[str, str] | None = None,
    on_phase_done: Callable[[Phase, float], None] | None = None,
) -> dict[str, float]:
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
    check_unrecorded_outputs(phases, workdir, manifest)
    workdir.mkdir(parents=True, exist_ok=True)
    manifest.save()
    timings: dict[str, float] = {}
    for index, phase in enumerate(phases):
        output = workdir / phase.output
        record = manifest.phases.get(phase.name)
        tag = f"[{index + 1}/{len(phases)}] {phase.name}"
        if record is None and _adopt_published(phase, output, manifest, full_hash_max_bytes, tag):
            continue
        if record is not None:
            _verify_recorded(phase, output, record, manifest, full_hash_max_bytes)
            logger.info(
                "%s: done earlier (%.1f s), output verified, skipping", tag, record["seconds"]
            )
            continue
        # Phases after an unfinished one depend on it: their records (if any) are stale.
        later = [n for n in names[index + 1 :] if n in manifest.phases]
        if later:
            logger.warning(
                "%s: forgetting later records that depend on it: %s", tag, ", ".join(later)
            )
            manifest.forget_from(names, names[index + 1])
        inputs = {n: manifest.phases[n]["sha256"] for n in names[:index] if n in manifest.phases}
        partial = _prepare_partial(phase, output, inputs, tag)
        logger.info("%s: started", tag)
        digest, seconds = _run_and_publish(
            phase, partial, output, manifest, fault, full_hash_max_bytes
        )
        manifest.record(phase.name, phase.output, digest, seconds)
        timings[phase.name] = seconds
        logger.info("%s: done in %.1f s", tag, seconds)
        if on_phase_done is not None:
            on_phase_done(phase, seconds)
    return timings


def run_command(
    cmd: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    tail_lines: int = 30,
) -> None:
    """Run a phase's command (``selm_mcore.runtime.procs.run_logged``: its own process group,
    output teed to our stdout and ``log_path``, the group killed on a timeout, an interrupt or
    its exit) with PYTHONSAFEPATH set; PhaseFailed names the command, the exit status, the log
    file and the last lines of output."""
    try:
        run_logged(
            cmd,
            log_path,
            env={**SAFE_PATH_ENV, **(env or {})},
            timeout_s=timeout_s,
            timeout_setting="online.phase_timeout_s",
            tail_lines=tail_lines,
        )
    except CommandFailed as exc:
        raise PhaseFailed(str(exc)) from None


def selm_command(subcommand: str, *args: str) -> list[str]:
    """``python -P -m selm_mcore.cli SUBCOMMAND ARGS`` with this interpreter (no PATH lookup;
    -P keeps the working folder off sys.path, so a checkout's kernels/ never shadows
    selm_mcore.kernels or the PyPI package of that name)."""
    return [sys.executable, "-P", "-m", "selm_mcore.cli", subcommand, *args]


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold the workdir's lock (``runtime.outputs.output_locks``: ``.NAME.lock`` beside it),
    refusing a second ``selm run`` (or any other writer) of the same workdir at once."""
    with output_locks({workdir: "online.workdir"}, command="selm run"):
        yield


def _remove_outputs(phases: list[Phase], workdir: Path, why: str) -> list[str]:
    """Delete each phase's output, partial output and partial inputs; the paths removed."""
    removed = []
    for phase in phases:
        output = workdir / phase.output
        for path in (
            output,
            _partial_of(output),
            output.with_name(output.name + ".partial.inputs"),
        ):
            if _exists(path):
                logger.warning("%s: deleting %s", why, path)
                remove_path(path)
                removed.append(str(path))
    return removed


def redo_from(phases: list[Phase], workdir: Path, manifest: Manifest, first: str) -> list[str]:
    """``--redo FIRST``: forget FIRST and every later phase, and delete their outputs (the
    explicit request to recompute them); returns the forgotten phase names."""
    names = [p.name for p in phases]
    dropped = manifest.forget_from(names, first)
    _remove_outputs(phases[names.index(first) :], workdir, f"--redo {first}")
    return dropped


def clear_outputs(phases: list[Phase], workdir: Path) -> list[str]:
    """``--fresh``: delete every phase's output (finished or partial) so the run starts over;
    returns the paths deleted. The caller deletes the manifest; logs and the lock stay."""
    return _remove_outputs(phases, workdir, "--fresh")
