"""Progress of generate and rank (selm_mcore.runtime.progress): the line (done/total, rate,
ETA), a line at least every interval from the reporter's thread and one at the end, counts
summed over worker files and nodes, only rank 0 / node 0 logging, and the counting bar vLLM's
``LLM.generate(use_tqdm=...)`` drives (driven here the way vLLM 0.32's ``_run_engine`` does)."""

from __future__ import annotations

import threading
import time

from selm_mcore.runtime.progress import (
    ProgressCounter,
    ProgressReporter,
    counting_tqdm,
    format_duration,
    job_reporter,
    node_progress_path,
    progress_line,
    read_count,
    remove_node_progress,
)


def test_progress_line():
    assert format_duration(7) == "7s"
    assert format_duration(258) == "4m18s"
    assert format_duration(3720) == "1h02m"
    # 50 of 200 in 10 s: 5 per second, 150 left -> 30 s
    assert progress_line("rank", 50, 200, "prompts", 10.0) == (
        "rank: 50/200 prompts (25.0%), 5.0 prompts/s, ETA 30s, 10s elapsed"
    )
    assert progress_line("generate", 0, 20_378, "prompts", 3.0).endswith("ETA -, 3s elapsed")
    assert "20,378/20,378 prompts (100.0%)" in progress_line(
        "generate", 20_378, 20_378, "prompts", 9
    )
    assert ", done," in progress_line("generate", 4, 4, "prompts", 2.0)


def test_reporter_logs_every_interval_and_at_the_end():
    lines: list[str] = []
    counter = ProgressCounter()
    reporter = ProgressReporter(
        "generate", 40, "prompts", [counter], interval_s=0.05, poll_s=0.01, log=lines.append
    )
    with reporter:
        for _ in range(40):
            counter.add()
            time.sleep(0.005)
    assert len(lines) >= 3  # ~0.2 s of work at a 0.05 s interval, plus the last line
    assert lines[-1].startswith("generate: 40/40 prompts (100.0%)")
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert done == sorted(done) and done[0] < 40


def test_counts_summed_over_workers_and_nodes_node0_logs(tmp_path):
    out = tmp_path / "pairs.jsonl"
    # node 1: two workers publish to files; its reporter publishes their sum, logs nothing
    workers = [ProgressCounter(tmp_path / f"worker{k}.progress") for k in range(2)]
    node1_lines: list[str] = []
    node1 = job_reporter("rank", 10, "prompts", out_path=out, num_nodes=2, node_rank=1)
    node1.log = node1_lines.append
    for worker in workers:
        node1.add_file(worker.path)
    workers[0].add(2)
    workers[1].add(3)
    for worker in workers:
        worker.publish()
    node1.tick(final=True)
    assert node1_lines == []
    assert read_count(node_progress_path(out, 1)) == 5
    # node 0: its own 4 plus node 1's 5, of the whole job's 10
    node0_lines: list[str] = []
    node0 = job_reporter("rank", 10, "prompts", out_path=out, num_nodes=2, node_rank=0)
    node0.log = node0_lines.append
    mine = ProgressCounter()
    node0.add_source(mine)
    mine.add(4)
    assert node0.tick(final=True).startswith("rank: 9/10 prompts (90.0%)")
    assert len(node0_lines) == 1
    # a count file from an earlier attempt does not count
    assert read_count(node_progress_path(out, 1), since=time.time() + 120) == 0
    remove_node_progress(out, 2)
    assert not node_progress_path(out, 1).exists()


def test_only_rank_zero_logs(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "3")
    assert not job_reporter("generate", 5, "prompts", out_path=tmp_path / "o.jsonl").enabled
    monkeypatch.setenv("RANK", "0")
    assert job_reporter("generate", 5, "prompts", out_path=tmp_path / "o.jsonl").enabled


def test_counting_bar_as_vllm_drives_it():
    counter = ProgressCounter()
    make = counting_tqdm(counter)
    prompts = ["a", "b", "c"]
    assert make(prompts, desc="Rendering prompts") is prompts  # iterables pass through
    bar = make(total=3, desc="Processed prompts", dynamic_ncols=True, postfix="est. speed")
    seen = []

    def finish_requests():
        for n in (2, 2, 2):  # n samples per finished request: one update call each
            elapsed = bar.format_dict["elapsed"]
            bar.postfix = f"est. speed input: {1 / max(elapsed, 1e-9):.2f} toks/s"
            bar.update(n)
            seen.append(counter.done)
        bar.close()

    thread = threading.Thread(target=finish_requests)
    thread.start()
    thread.join()
    assert seen == [1, 2, 3]
