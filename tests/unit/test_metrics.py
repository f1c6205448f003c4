"""selm_mcore.train.metrics: per-step records (JSONL, the log line, resume truncation,
TensorBoard). The FLOP formula behind MFU: tests/unit/test_modelspec.py."""

import logging
import math

from selm_mcore.runtime.files import read_records
from selm_mcore.train.metrics import StepMetricsWriter, format_step_line

# --- step records -----------------------------------------------------------------------------


def test_jsonl_log_line_and_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="selm_mcore.train.metrics")
    writer = StepMetricsWriter(tmp_path, total_steps=4, enabled=True, progress_bar=False)
    for step in (1, 2, 3):
        writer.log(
            step,
            {
                "loss": [0.69, 0.68, 0.67][step - 1],
                "lr": 1e-6,
                "grad_norm": 2.0,
                "rewards/accuracies": 0.5,
                "mfu": 0.1234,
                "not_finite": float("nan"),
                "overflow": float("inf"),
            },
        )
    writer.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    # Non-finite values are kept (as NaN / Infinity), not dropped: a diverging run shows it.
    assert math.isnan(records[0]["not_finite"]) and records[0]["overflow"] == math.inf
    assert (
        "step 3/4 | loss 0.670000 | acc 0.500 | gnorm 2 | lr 1.000e-06 | MFU 0.123" in caplog.text
    )

    # A run resumed from the step-2 checkpoint drops the interrupted run's step 3.
    writer = StepMetricsWriter(
        tmp_path, total_steps=4, enabled=True, resume_step=2, progress_bar=False
    )
    writer.log(3, {"loss": 0.5})
    writer.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.69), (2, 0.68), (3, 0.5)]
    assert math.isnan(records[1]["not_finite"])  # kept through the resume rewrite too


def test_disabled_writer_writes_nothing(tmp_path):
    writer = StepMetricsWriter(tmp_path / "out", total_steps=2, enabled=False, tensorboard=True)
    writer.log(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "out").exists()


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = StepMetricsWriter(
        tmp_path, total_steps=2, enabled=True, tensorboard=True, progress_bar=False
    )
    writer.log(1, {"loss": 0.25, "rewards/margins": 0.5})
    writer.log(2, {"loss": 0.125, "rewards/margins": 1.0})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.25), (2, 0.125)]
    assert [e.value for e in events.Scalars("rewards/margins")] == [0.5, 1.0]


def test_format_step_line_skips_missing_fields():
    assert format_step_line(1, 10, {"loss": 0.5}) == "step 1/10 | loss 0.500000"
    assert (
        format_step_line(2, 10, {"loss": 0.5, "mfu": None, "tokens_per_s": 1234.4})
        == "step 2/10 | loss 0.500000 | 1234 tok/s"
    )
