"""What a resumed run may change (selm_mcore.loop.resume_changes), on a real workdir layout:
more rounds only when the started rounds keep their rows, fewer rounds only before the
dropped ones ran, a tp/pp change not while a round's training is half done. The expected rows
are the file's rows sliced here by hand."""

from __future__ import annotations

import pytest

from selm_mcore.config.io import load_config
from selm_mcore.data.portions import write_portion
from selm_mcore.loop.online import RESUME_MUTABLE_KEYS
from selm_mcore.loop.resume_changes import apply_resume_changes, recorded_config
from selm_mcore.loop.rounds import RoundPhases, RunPaths
from selm_mcore.loop.runner import Manifest, OnlineError
from selm_mcore.runtime.files import hash_path, read_records


@pytest.fixture
def run(tmp_path, write_jsonl, preference_row):
    """A workdir whose run (1 round, 8 rows) finished round1/portion and the final export."""
    rows = [preference_row(f"q{i}", f"a{i}", f"b{i}", prompt_id=f"p{i}") for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    workdir = tmp_path / "run"
    base = [f"data.train_path={train}", f"model.hf_dir={tmp_path}", f"online.workdir={workdir}"]

    def config(*extra: str):
        return load_config(None, base + list(extra))

    old = config("online.rounds=1")
    manifest = Manifest(workdir / "manifest.json", old.to_dict(), mutable_keys=RESUME_MUTABLE_KEYS)
    portion = workdir / "round_1" / "portion.jsonl"
    write_portion(old, 1, portion)
    manifest.record("round1/portion", "round_1/portion.jsonl", hash_path(portion), 0.1)
    (workdir / "final").mkdir()
    (workdir / "final" / "policy_hf").write_text("stands for the link")
    manifest.record("final/export", "final/policy_hf", "x", 0.1)
    return config, workdir, rows


def resume(config_args, config, workdir):
    """What run_online does: the recorded config, the new manifest, the phases, the check."""
    cfg = config(*config_args)
    previous = recorded_config(workdir / "manifest.json")
    manifest = Manifest(workdir / "manifest.json", cfg.to_dict(), mutable_keys=RESUME_MUTABLE_KEYS)
    phases = RoundPhases(cfg, RunPaths(workdir)).build(manifest)
    apply_resume_changes(previous, cfg, workdir, phases, manifest)
    return manifest


def test_more_rounds_that_would_move_a_started_round_are_refused(run):
    config, workdir, rows = run
    # round 1 read all 8 rows; with 2 rounds its portion would be rows 1..4
    with pytest.raises(OnlineError, match="changes the data of round 1, which already started"):
        resume(["online.rounds=2"], config, workdir)
    assert (workdir / "final" / "policy_hf").exists()  # nothing deleted


def test_capped_portions_let_rounds_grow(tmp_path, write_jsonl, preference_row):
    rows = [preference_row(f"q{i}", f"a{i}", f"b{i}", prompt_id=f"p{i}") for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    workdir = tmp_path / "run"
    base = [
        f"data.train_path={train}",
        f"model.hf_dir={tmp_path}",
        f"online.workdir={workdir}",
        "online.max_prompts_per_round=4",
    ]
    old = load_config(None, base + ["online.rounds=1"])
    manifest = Manifest(workdir / "manifest.json", old.to_dict(), mutable_keys=RESUME_MUTABLE_KEYS)
    portion = workdir / "round_1" / "portion.jsonl"
    write_portion(old, 1, portion)
    assert [r["prompt_id"] for r in read_records(portion)] == ["p0", "p1", "p2", "p3"]
    manifest.record("round1/portion", "round_1/portion.jsonl", hash_path(portion), 0.1)
    (workdir / "final" / "policy_hf").mkdir(parents=True)
    manifest.record("final/export", "final/policy_hf", "x", 0.1)

    manifest = resume(
        ["online.rounds=2", "online.nproc_per_node=2"],
        lambda *a: load_config(None, base + list(a)),
        workdir,
    )
    assert "round1/portion" in manifest.phases  # round 1 kept
    assert "final/export" not in manifest.phases  # the old last policy's final phases: redone
    assert not (workdir / "final" / "policy_hf").exists()
    assert manifest.data["config"]["online"]["rounds"] == 2

    # lowering back below a round that ran is refused
    manifest.record("round2/portion", "round_2/portion.jsonl", "x", 0.1)
    with pytest.raises(OnlineError, match="round\\(s\\) after 1 already ran"):
        resume(["online.rounds=1"], lambda *a: load_config(None, base + list(a)), workdir)


def test_tp_change_waits_for_an_interrupted_training_round(run):
    config, workdir, _ = run
    partial = workdir / "round_1" / "train.partial" / "checkpoints"
    partial.mkdir(parents=True)
    with pytest.raises(OnlineError, match="parallel.tp changed while round1/train was interrupted"):
        resume(["online.rounds=1", "parallel.tp=2", "online.nproc_per_node=2"], config, workdir)
    # more processes at the same tp/pp (data parallel): the step checkpoints resume at any dp
    resume(["online.rounds=1", "online.nproc_per_node=2"], config, workdir)
