"""Progress of the long jobs (generate, rank): done/total, rate and ETA, logged at least every
30 s, by rank 0 only, summed over every process and node that works on the job.

    counter = ProgressCounter(path)             # where the work happens (a worker process)
    counter.add(1)                               # one prompt done; published to ``path``
    reporter = job_reporter("generate", total, "prompts", out_path=OUT, num_nodes=N, node_rank=k)
    reporter.add_source(counter)                 # in this process, or read_count of a file
    with reporter:                               # a thread logs every PROGRESS_INTERVAL_S
        ...                                      # and a last line when the job is done

A line reads ``generate: 1,200/20,378 prompts (5.9%), 41.3 prompts/s, ETA 7m44s, 29 s
elapsed``. The counts come from sources: callables returning how many items are done, either
a ``ProgressCounter`` in this process or a file a worker publishes its count to (``read_count``;
a worker's counter rewrites its file at most once a second and at the end). Across nodes (one
``selm generate`` / ``selm rank`` per node), every node's reporter publishes the sum of its own
workers to a hidden file next to the node's output (``node_progress_path``), and node 0 adds
those of the other nodes to its own: only node 0 logs (rank 0 of the job), with the total of the
whole job. The node files are removed when the node outputs are merged
(``remove_node_progress``).

``counting_tqdm(counter)`` is what vLLM's ``LLM.generate(use_tqdm=...)`` takes: a progress-bar
class that writes nothing and counts the finished requests (vLLM updates its bar once per
finished request).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selm_mcore.runtime.outputs import new_temp_file

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 30.0  # a line at least this often
POLL_S = 1.0  # how often the reporter reads its sources and publishes its sum
PUBLISH_EVERY_S = 1.0  # a counter rewrites its file at most this often (and at the end)
STALE_SLACK_S = 60.0  # a count file older than its reader by more than this is stale


def format_duration(seconds: float) -> str:
    """``4m18s``, ``1h02m``, ``12s``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(what: str, done: int, total: int, unit: str, elapsed_s: float) -> str:
    """One progress line: done/total, percent, rate, ETA, elapsed."""
    percent = 100.0 * done / total if total else 100.0
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if done >= total:
        eta = "done"
    elif rate > 0:
        eta = "ETA " + format_duration((total - done) / rate)
    else:
        eta = "ETA -"
    return (
        f"{what}: {done:,}/{total:,} {unit} ({percent:.1f}%), {rate:.1f} {unit}/s, {eta}, "
        f"{format_duration(elapsed_s)} elapsed"
    )


def _write_count(path: Path, value: int) -> None:
    """Replace ``path`` with ``value`` (a fresh temporary file + rename: a reader never sees
    half, and a link planted beside ``path`` is never written through)."""
    fd, partial = new_temp_file(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(str(value))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def read_count(path: str | os.PathLike, since: float = 0.0) -> int:
    """The count a counter published to ``path``; 0 when it is missing, unreadable or older
    than ``since`` (a time.time(): a file left by an earlier attempt does not count)."""
    try:
        if os.stat(path).st_mtime < since:
            return 0
        return int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


class ProgressCounter:
    """Items done in this process; with ``path``, published there for another process."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.done = 0
        self._lock = threading.Lock()
        self._published_at = 0.0
        if self.path is not None:
            self.publish()

    def add(self, count: int = 1) -> None:
        with self._lock:
            self.done += count
            due = time.monotonic() - self._published_at >= PUBLISH_EVERY_S
        if due:
            self.publish()

    def publish(self) -> None:
        """Write the count to ``path`` now (a worker calls this once more at its end)."""
        if self.path is not None:
            with self._lock:
                _write_count(self.path, self.done)
                self._published_at = time.monotonic()

    def __call__(self) -> int:
        return self.done


def is_rank_zero() -> bool:
    """Rank 0 of a launcher that sets RANK (torchrun), or a process started without one."""
    return os.environ.get("RANK", "0") == "0"


class ProgressReporter:
    """Logs ``progress_line`` every ``interval_s`` (when ``enabled``) from a thread, and once
    more when the ``with`` block ends without an error; publishes the sum of its sources to
    ``publish_to`` every ``poll_s`` (for node 0's reporter)."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        sources: list[Callable[[], int]] | None = None,
        *,
        enabled: bool = True,
        publish_to: str | os.PathLike | None = None,
        interval_s: float = PROGRESS_INTERVAL_S,
        poll_s: float = POLL_S,
        log: Callable[[str], Any] | None = None,
    ):
        self.what, self.total, self.unit = what, total, unit
        self.sources = list(sources or [])
        self.enabled = enabled
        self.publish_to = Path(publish_to) if publish_to else None
        self.interval_s = interval_s
        self.poll_s = min(poll_s, interval_s)
        self.log = log or logger.info
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._last_line = self.started
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add_source(self, source: Callable[[], int]) -> None:
        self.sources.append(source)

    def add_file(self, path: str | os.PathLike) -> None:
        """Count what a worker publishes to ``path`` (a file last written well before this
        reporter started, by an earlier attempt, counts 0; the slack allows for clock skew
        between nodes on a shared filesystem)."""
        since = self.started_wall - STALE_SLACK_S
        self.add_source(lambda: read_count(path, since))

    def done(self) -> int:
        return min(self.total, sum(source() for source in self.sources))

    def tick(self, *, final: bool = False) -> str | None:
        """Read the sources, publish the sum, and log a line when one is due; returns it."""
        done = self.done()
        if self.publish_to is not None:
            _write_count(self.publish_to, done)
        now = time.monotonic()
        if not self.enabled or not (final or now - self._last_line >= self.interval_s):
            return None
        self._last_line = now
        line = progress_line(self.what, done, self.total, self.unit, now - self.started)
        self.log(line)
        return line

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.tick()

    def __enter__(self) -> ProgressReporter:
        self.started = self._last_line = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="selm-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is None:
            self.tick(final=True)


def node_progress_path(out_path: str | os.PathLike, node_rank: int) -> Path:
    """Where node ``node_rank`` publishes its count for node 0: a hidden file next to the
    job's output."""
    out_path = Path(out_path)
    return out_path.with_name(f".{out_path.stem}.node{node_rank}.progress")


def remove_node_progress(out_path: str | os.PathLike, num_nodes: int) -> None:
    for rank in range(num_nodes):
        node_progress_path(out_path, rank).unlink(missing_ok=True)


def job_reporter(
    what: str,
    total: int,
    unit: str,
    *,
    out_path: str | os.PathLike,
    num_nodes: int = 1,
    node_rank: int = 0,
    interval_s: float = PROGRESS_INTERVAL_S,
) -> ProgressReporter:
    """The reporter of a job whose ``total`` items are spread over ``num_nodes`` nodes (one
    process each, writing ``out_path``'s node files): node 0 logs (when it is rank 0) and also
    counts what the other nodes publish; every other node publishes its own sum."""
    if num_nodes <= 1:
        return ProgressReporter(what, total, unit, enabled=is_rank_zero(), interval_s=interval_s)
    if node_rank != 0:
        return ProgressReporter(
            what,
            total,
            unit,
            enabled=False,
            publish_to=node_progress_path(out_path, node_rank),
            interval_s=interval_s,
        )
    reporter = ProgressReporter(what, total, unit, enabled=is_rank_zero(), interval_s=interval_s)
    for rank in range(1, num_nodes):
        reporter.add_file(node_progress_path(out_path, rank))
    return reporter


def counting_tqdm(counter: ProgressCounter) -> Callable[..., Any]:
    """A ``use_tqdm`` callable for vLLM's ``LLM.generate``: the bar it makes writes nothing and
    adds 1 to ``counter`` per ``update`` call (vLLM calls it once per finished request);
    iterables (vLLM's prompt rendering) are returned as they are."""
    from tqdm import tqdm

    class CountingBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            self._null = open(os.devnull, "w")  # closed in close()
            kwargs.update(file=self._null, disable=False)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            counter.add(1)
            return super().update(n)

        def close(self) -> None:
            super().close()
            self._null.close()

    def make(*args: Any, **kwargs: Any) -> Any:
        if args:  # wrapping an iterable: leave it alone
            return args[0]
        return CountingBar(**kwargs)

    return make
