"""Trainer checkpoint bookkeeping that needs no processes: `latest`, the state file, refusals.

Saving, resuming and resharding real checkpoints is tested in tests/dist/test_train_parallel.py;
the run identity a resume must match in tests/unit/test_guards.py.
"""

import json

import pytest

from selm_mcore.mcore.checkpoint import ResumeError
from selm_mcore.mcore.step_checkpoints import TRAIN_STATE_FORMAT, find_latest, read_train_state

SCHEDULE = {
    "max_lr": 5e-7,
    "min_lr": 0.0,
    "lr_warmup_steps": 48,
    "lr_decay_steps": 478,
    "lr_decay_style": "cosine",
    "num_steps": 40,
}


def write_state(path, step=40, fmt=TRAIN_STATE_FORMAT):
    (path / "train").mkdir(parents=True)
    (path / "train" / "state.json").write_text(
        json.dumps(
            {
                "format": fmt,
                "step": step,
                "data": {"consumed_samples": 5120},
                "scheduler": SCHEDULE,
                "layout": {"tp": 2, "pp": 2},
                "extra": {"data_hash": "ab"},
            }
        )
    )


def test_latest_names_the_newest_complete_checkpoint(tmp_path):
    assert find_latest(tmp_path) is None
    write_state(tmp_path / "step_0000040")
    (tmp_path / "latest").write_text("step_0000040\n")
    assert find_latest(tmp_path) == tmp_path / "step_0000040"
    state = read_train_state(tmp_path / "step_0000040")
    assert (state.step, state.data["consumed_samples"]) == (40, 5120)
    assert state.extra == {"data_hash": "ab", "layout": {"tp": 2, "pp": 2}}


def test_latest_pointing_at_an_incomplete_folder_is_refused(tmp_path):
    (tmp_path / "step_0000080" / "model").mkdir(parents=True)
    (tmp_path / "latest").write_text("step_0000080\n")
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        find_latest(tmp_path)


def test_state_of_another_format_is_refused(tmp_path):
    write_state(tmp_path / "old", fmt="selm-train-state/0")
    with pytest.raises(ResumeError, match="format 'selm-train-state/0'"):
        read_train_state(tmp_path / "old")


def test_corruption_fix_offers_the_previous_kept_checkpoint(tmp_path):
    from selm_mcore.mcore.checkpoint import corruption_fix

    for step in (20, 40, 60):
        write_state(tmp_path / f"step_00000{step}", step=step)
    (tmp_path / "step_0000050").mkdir()  # incomplete: never offered
    (tmp_path / "latest").write_text("step_0000060\n")
    fix = corruption_fix(tmp_path / "step_0000060")
    assert fix.startswith(f"resume from the previous kept checkpoint {tmp_path / 'step_0000040'}")
    assert f"`echo step_0000040 > {tmp_path / 'latest'}`" in fix
    assert f"`rm -r {tmp_path / 'step_0000060'}`" in fix
    assert "no earlier checkpoint is kept" in corruption_fix(tmp_path / "step_0000020")
    assert corruption_fix(tmp_path / "final").startswith(f"re-create {tmp_path / 'final'}")


@pytest.mark.parametrize(
    "pointer", ["../elsewhere", "/tmp", "step_0000040/../../x", "a/b", "..", ""]
)
def test_latest_must_name_a_folder_inside_the_checkpoint_folder(tmp_path, pointer):
    root = tmp_path / "checkpoints"
    write_state(root / "step_0000040")
    write_state(tmp_path / "elsewhere")  # a complete checkpoint outside: never read
    (root / "latest").write_text(pointer + "\n")
    with pytest.raises(ResumeError, match=f"{root / 'latest'} names .*only a plain folder name"):
        find_latest(root)


def test_latest_may_not_lead_out_through_a_symlink(tmp_path):
    root = tmp_path / "checkpoints"
    write_state(tmp_path / "elsewhere")
    root.mkdir()
    (root / "step_0000050").symlink_to(tmp_path / "elsewhere")
    (root / "latest").write_text("step_0000050\n")
    with pytest.raises(ResumeError, match="a link leading out of"):
        find_latest(root)
    (root / "latest").unlink()
    (root / "latest").symlink_to(tmp_path / "pointer")
    (tmp_path / "pointer").write_text("step_0000050\n")
    with pytest.raises(ResumeError, match="latest is a symlink"):
        find_latest(root)


def test_unreadable_state_and_rng_files_name_the_file(tmp_path):
    from selm_mcore.mcore.step_checkpoints import load_rng_file

    write_state(tmp_path / "step_0000040")
    state = tmp_path / "step_0000040" / "train" / "state.json"
    state.write_text('{"format": "selm-train-state/1", "step": 4')  # cut short
    with pytest.raises(ResumeError, match=f"cannot read {state}: .*resume from an older"):
        read_train_state(tmp_path / "step_0000040")
    rng = tmp_path / "rank_00000.safetensors"
    rng.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ResumeError, match=f"cannot read RNG file {rng}: "):
        load_rng_file(rng)
