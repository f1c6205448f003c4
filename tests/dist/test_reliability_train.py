"""Fault injection on real runs: `selm train` and `selm convert` through the CLI (one process,
real Megatron, real files), and one worker process that damages each kind of checkpoint file.

One run trains a tiny Llama with a step checkpoint after every step and the loss of step 3
poisoned (``SELM_TRAIN_NAN_AT_STEP=3``); the tests then check, against files read back here:

* NaN mid-training: the run exits with an error naming step 3 and the last good checkpoint;
  ``latest`` still names step 2, no step-3 checkpoint or final model exists, metrics.jsonl logs
  the NaN; the step-2 model, exported to HF, is finite (read with safetensors here).
* a resume with another start model (another random tiny Llama) is refused naming it, and
  nothing is written;
* a flipped byte in the step-2 model shard makes `selm train` refuse the resume naming the file
  and the previous kept checkpoint; following the offered fix resumes from step 1, whose
  replayed step 2 equals the first run's step 2 (loss and grad norm, exactly);
  the same resume drops a torn last line of metrics.jsonl (a kill while it was written);
* export: into a non-empty folder refused before any process starts; with --overwrite the stale
  shards and index are gone and the folder holds exactly the new export with its checksums;
* every kind of checkpoint file (model and optimizer .distcp, RNG safetensors, state.json,
  selm_checkpoint.json, hf/config.json, the dist checkpoint's .metadata), a truncated shard and
  a flipped byte in an exported HF folder, each loaded by the function the trainer uses for it
  (in the worker): ``ChecksumError`` naming that file; the intact copies load;
* the trainer's non-finite checks on real DDP gradient buffers and parameters find one bad
  value (and no false alarm on huge finite gradients).

The reference cache (a flipped log-prob, a truncated file) is covered in
tests/unit/test_refpass.py; the checksum list itself in tests/unit/test_files.py.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

# This file is also run as a worker script: the shared sentence maker lives in tests/support.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from sentences import random_pairs  # noqa: E402

NUM_STEPS = 4
LAUNCH_TIMEOUT_S = 240
WORKER_TIMEOUT_S = 300


def launch(subcommand: list[str], *overrides: str, env: dict | None = None) -> None:
    from selm_mcore.runtime.launch import run_local_ranks

    args = ["-m", "selm_mcore.cli", *subcommand]
    for item in overrides:
        args += ["--set", item]
    run_local_ranks(
        args,
        1,
        timeout_s=LAUNCH_TIMEOUT_S,
        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )


def launch_failing(subcommand: list[str], *overrides: str, env: dict | None = None) -> str:
    """Run a command that must fail; return its error output."""
    from selm_mcore.runtime.launch import LaunchError

    with pytest.raises(LaunchError) as info:
        launch(subcommand, *overrides, env=env)
    return str(info.value)


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def flip_last_digit(path: Path) -> None:
    """Flip the low bit of the last ASCII digit: a digit stays a digit, the JSON stays valid."""
    data = bytearray(path.read_bytes())
    index = max(i for i, b in enumerate(data) if 0x30 <= b <= 0x39)
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


def safetensors_data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama_dir, write_jsonl, write_config, preference_row):
    """The poisoned run: steps 1-2 checkpointed, step 3 NaN."""
    root = tmp_path_factory.mktemp("reliability")
    rng = random.Random(0)
    rows = random_pairs(preference_row, rng, 16, (3, 12), (1, 10))
    pairs = write_jsonl(root / "pairs.jsonl", rows)
    config = write_config(
        root / "config.yaml",
        model={"hf_dir": str(tiny_llama_dir)},
        data={
            "train_path": str(pairs),
            "max_length": 64,
            "max_prompt_length": 32,
            "pad_to_multiple_of": 8,
        },
        loss={"beta": 0.1, "alpha": 0.5},
        optim={"lr": 1.0e-3, "warmup_ratio": 0.25},
        train={
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "max_steps": NUM_STEPS,
            "save_interval": 1,
            "keep_checkpoints": 0,
            "reference_mode": "onthefly",
            "tensorboard": False,
            "output_dir": str(root / "run"),
        },
    )
    error = launch_failing(["train", str(config)], env={"SELM_TRAIN_NAN_AT_STEP": "3"})
    return {
        "root": root,
        "config": config,
        "run": root / "run",
        "error": error,
        "checkpoints": root / "run" / "checkpoints",
    }


def copy_run(ws: dict, name: str) -> Path:
    out = ws["root"] / name
    shutil.copytree(ws["run"], out)
    return out


@pytest.mark.timeout(600)
def test_nan_mid_training_stops_with_the_last_good_checkpoint_as_latest(ws):
    from selm_mcore.runtime.files import read_records

    checkpoints = ws["checkpoints"]
    assert "training stopped at step 3: the loss is nan" in ws["error"]
    assert "its update was not applied" in ws["error"]
    assert f"the last good checkpoint {checkpoints / 'step_0000002'} stays `latest`" in ws["error"]
    assert "optim.lr" in ws["error"]  # what to try
    assert (checkpoints / "latest").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest",
        "step_0000001",
        "step_0000002",
    ]  # no step-3 checkpoint, no temp folder
    assert not (ws["run"] / "final").exists()
    assert not list(ws["run"].glob(".final*"))
    records = read_records(ws["run"] / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records[:2])
    assert math.isnan(records[2]["loss"])  # logged as NaN, not dropped


@pytest.fixture(scope="module")
def exported(ws):
    """The step-2 model exported with --overwrite over a folder holding a stale sharded export."""
    out = ws["root"] / "hf_step2"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    launch(
        [
            "convert",
            "mcore-to-hf",
            "--mcore-dir",
            str(ws["checkpoints"] / "step_0000002"),
            "--out-dir",
            str(out),
            "--overwrite",
        ]
    )
    return out


@pytest.mark.timeout(600)
def test_the_last_good_checkpoint_is_finite(exported):
    from safetensors.torch import load_file

    weights = load_file(str(exported / "model.safetensors"))
    assert len(weights) > 10
    assert all(bool(t.isfinite().all()) for t in weights.values())


@pytest.mark.timeout(600)
def test_export_with_overwrite_replaces_the_folder_whole(ws, exported):
    from selm_mcore.runtime.files import CHECKSUM_FILE, list_files, verify_checksums

    names = list_files(exported)
    assert "model-00001-of-00002.safetensors" not in names
    assert "model.safetensors.index.json" not in names
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    manifest = json.loads((exported / CHECKSUM_FILE).read_text())
    assert sorted(manifest["files"]) == names  # every file listed, nothing else
    assert verify_checksums(exported, fix="x") == sum((exported / n).stat().st_size for n in names)
    assert sorted(p.name for p in exported.parent.glob(".hf_step2*")) == []  # no temp folder


@pytest.mark.timeout(600)
def test_export_into_a_non_empty_folder_is_refused_before_any_process(ws, tmp_path):
    from selm_mcore.mcore.convert import ExportTargetError, mcore_to_hf

    target = tmp_path / "hf"
    target.mkdir()
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old")
    with pytest.raises(
        ExportTargetError,
        match=rf"--out-dir {target} is not empty \(1 entries: "
        r"model-00001-of-00002.safetensors\).*--overwrite",
    ):
        mcore_to_hf(ws["checkpoints"] / "step_0000002", target, timeout_s=5)
    assert [p.name for p in target.iterdir()] == ["model-00001-of-00002.safetensors"]


@pytest.mark.timeout(600)
def test_resume_with_another_start_model_is_refused(ws, tmp_path):
    from selm_mcore.testing.assets import build_tiny_llama

    other = tmp_path / "other_llama"
    build_tiny_llama(other, seed=1)
    run = copy_run(ws, "run_other_model")
    error = launch_failing(
        ["train", str(ws["config"])], f"train.output_dir={run}", f"model.hf_dir={other}"
    )
    assert f"cannot resume from {run / 'checkpoints' / 'step_0000002'}" in error
    assert "the start model (train.init_from / model.hf_dir; its weights' fingerprint)" in error
    assert "train.resume=false or another train.output_dir" in error
    assert "loss.beta" not in error  # only what differs is named
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest",
        "step_0000001",
        "step_0000002",
    ]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.timeout(900)
def test_corrupt_checkpoint_names_the_file_and_the_fix_resumes(ws):
    """A flipped byte in the newest model shard is named with the fix; the fixed run resumes
    from step 1 and replays step 2 exactly. The same resume also meets a torn last line in
    metrics.jsonl (a kill while it was written): dropped, no "fix your JSON" about a file the
    trainer wrote itself."""
    from selm_mcore.runtime.files import read_records

    run = copy_run(ws, "run_corrupt")
    checkpoints = run / "checkpoints"
    shard = sorted((checkpoints / "step_0000002" / "model").glob("*.distcp"))[0]
    flip_byte(shard)
    error = launch_failing(["train", str(ws["config"])], f"train.output_dir={run}")
    assert f"{shard}: the content differs from the sha256 recorded" in error
    fix = (
        f"resume from the previous kept checkpoint {checkpoints / 'step_0000001'}: run "
        f"`echo step_0000001 > {checkpoints / 'latest'}` and `rm -r "
        f"{checkpoints / 'step_0000002'}`"
    )
    assert fix in error
    (checkpoints / "latest").write_text("step_0000001\n")
    shutil.rmtree(checkpoints / "step_0000002")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # step 3, torn
    launch(["train", str(ws["config"])], f"train.output_dir={run}")
    records = read_records(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    first = read_records(ws["run"] / "metrics.jsonl")
    for key in ("loss", "grad_norm"):  # the replayed step 2 is the first run's step 2
        assert records[1][key] == first[1][key], key
    assert (run / "final" / "checksums.json").is_file()


@pytest.fixture(scope="module")
def damaged(ws, exported, tiny_llama_dir):
    """Each kind of damaged file loaded in one worker process (real Megatron)."""
    from launch import run_distributed

    out = ws["root"] / "damaged"
    out.mkdir()
    run_distributed(
        Path(__file__).resolve(),
        1,
        ["--worker", ws["checkpoints"], exported, out, tiny_llama_dir],
        timeout_s=WORKER_TIMEOUT_S,
    )
    return json.loads((out / "results.json").read_text())


CASES = (
    "model_distcp",
    "model_truncated",
    "model_metadata",
    "optimizer_distcp",
    "rng",
    "state_json",
    "selm_checkpoint_json",
    "hf_config",
    "exported_hf",
)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES)
def test_each_damaged_checkpoint_file_is_named(damaged, case):
    outcome = damaged[case]
    assert outcome["error_type"] == "ChecksumError", outcome
    assert outcome["message"].startswith(f"{outcome['file']}: "), outcome
    problem = "truncated" if case == "model_truncated" else "the content differs"
    assert problem in outcome["message"], outcome
    if case == "exported_hf":
        assert "selm convert mcore-to-hf --overwrite" in outcome["message"]
    else:
        assert "resume from the previous kept checkpoint" in outcome["message"]
        assert outcome["message"].rstrip().endswith("then start the same command again"), outcome


@pytest.mark.timeout(600)
def test_intact_checkpoint_files_load(damaged):
    assert damaged["intact"] == {"model": "loaded", "training_state": 2, "exported_hf": "loaded"}


@pytest.mark.timeout(600)
def test_the_trainer_finds_one_non_finite_gradient_or_parameter(damaged):
    assert damaged["finite_checks"] == {
        "grads_zero": True,
        "grads_one_inf": False,
        "grads_huge_finite": True,
        "params_loaded": True,
        "params_one_nan": False,
    }


@pytest.mark.timeout(600)
def test_generate_refuses_a_damaged_export_before_starting_vllm(exported, tmp_path, monkeypatch):
    from selm_mcore.config.schema import GenerationConfig
    from selm_mcore.rollout.generate import generate_file
    from selm_mcore.runtime.files import ChecksumError

    copy = tmp_path / "hf"
    shutil.copytree(exported, copy)
    weights = copy / "model.safetensors"
    flip_byte(weights, safetensors_data_offset(weights) + 100)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "p0", "prompt": "Hi?"}) + "\n")
    # Any import of vllm now fails, so the checksum error can only come from a check that runs
    # before the engine is touched (whatever other tests of this process imported earlier).
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ChecksumError, match=rf"{weights}: the content differs"):
        generate_file(copy, prompts, tmp_path / "out.jsonl", GenerationConfig(max_tokens=4))


# --- worker -----------------------------------------------------------------------------------


def _attempt(load, file: Path) -> dict:
    try:
        load()
        error_type, message = None, ""
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
        error_type, message = type(exc).__name__, str(exc)
    return {"error_type": error_type, "message": message, "file": str(file)}


def _damage(checkpoints: Path, root: Path, case: str):
    """A copy of the checkpoints folder with one file of step 2 damaged: (step dir, file)."""
    copy = root / case
    shutil.copytree(checkpoints, copy)
    step = copy / "step_0000002"
    if case in ("model_distcp", "model_truncated"):
        file = sorted((step / "model").glob("*.distcp"))[0]
        if case == "model_truncated":
            file.write_bytes(file.read_bytes()[:-1])
        else:
            flip_byte(file)
    elif case == "model_metadata":
        file = step / "model" / ".metadata"
        flip_byte(file)
    elif case == "optimizer_distcp":
        file = sorted((step / "train" / "optimizer").glob("*.distcp"))[0]
        flip_byte(file)
    elif case == "rng":
        file = step / "train" / "rng" / "rank_00000.safetensors"
        flip_byte(file, safetensors_data_offset(file) + 3)
    else:
        file = {
            "state_json": step / "train" / "state.json",
            "selm_checkpoint_json": step / "selm_checkpoint.json",
            "hf_config": step / "hf" / "config.json",
        }[case]
        flip_last_digit(file)
    return step, file


def _finite_checks(models, ddp_models, ctx) -> dict:
    """The trainer's checks on real DDP gradient buffers and parameters, one bad value each."""
    from selm_mcore.mcore.optim import grads_are_finite, params_are_finite

    out = {}
    for model in ddp_models:
        model.zero_grad_buffer()
    out["grads_zero"] = grads_are_finite(ddp_models, ctx)
    buffer = ddp_models[0].buffers[0]
    buffer.grad_data[buffer.grad_data.numel() // 3] = float("inf")
    out["grads_one_inf"] = grads_are_finite(ddp_models, ctx)
    buffer.grad_data.fill_(3.0e38)  # finite, but their sum overflows fp32: still finite
    out["grads_huge_finite"] = grads_are_finite(ddp_models, ctx)
    out["params_loaded"] = params_are_finite(models, ctx)
    param = list(models[0].parameters())[-1]
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    out["params_one_nan"] = params_are_finite(models, ctx)
    return out


def _worker(checkpoints: Path, exported: Path, root: Path, hf_dir: Path) -> None:
    from selm_mcore.config.schema import ModelConfig, OptimConfig
    from selm_mcore.mcore.checkpoint import build_model_from_checkpoint, load_policy
    from selm_mcore.mcore.optim import build_lr_scheduler, build_optimizer, wrap_ddp
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel
    from selm_mcore.mcore.step_checkpoints import load_training_state, read_train_state

    ctx = init_parallel(tp=1, pp=1)
    models, _, _ = build_model_from_checkpoint(checkpoints / "step_0000002", ctx)
    optim_cfg = OptimConfig(lr=1e-3, warmup_ratio=0.25)
    ddp_models = wrap_ddp(models)
    optimizer = build_optimizer(ddp_models, optim_cfg, peak_lr=1e-3, params_dtype=torch.float32)
    scheduler = build_lr_scheduler(optimizer, optim_cfg, peak_lr=1e-3, total_steps=NUM_STEPS)
    state = load_training_state(
        checkpoints / "step_0000002",
        models=models,
        optimizer=optimizer,
        scheduler=scheduler,
        ctx=ctx,
    )
    load_policy(exported, ctx, ModelConfig())
    results = {"intact": {"model": "loaded", "training_state": state.step, "exported_hf": "loaded"}}
    loaders = {
        "model": lambda step: build_model_from_checkpoint(step, ctx),
        "train": lambda step: load_training_state(
            step, models=models, optimizer=optimizer, scheduler=scheduler, ctx=ctx
        ),
        "state": lambda step: read_train_state(step),  # what a resume reads first
    }
    uses = {
        "model_distcp": "model",
        "model_truncated": "model",
        "model_metadata": "model",
        "optimizer_distcp": "train",
        "rng": "train",
        "state_json": "state",
        "selm_checkpoint_json": "model",
        "hf_config": "model",
    }
    for case, loader in uses.items():
        step, file = _damage(checkpoints, root, case)
        results[case] = _attempt(functools.partial(loaders[loader], step), file)
    copy = root / "exported_hf"
    shutil.copytree(exported, copy)
    weights = copy / "model.safetensors"
    flip_byte(weights, safetensors_data_offset(weights) + 100)
    results["exported_hf"] = _attempt(lambda: load_policy(copy, ctx, ModelConfig()), weights)
    results["finite_checks"] = _finite_checks(models, ddp_models, ctx)
    (root / "results.json").write_text(json.dumps(results, indent=2))
    destroy_parallel()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(*(Path(arg) for arg in sys.argv[2:6]))
