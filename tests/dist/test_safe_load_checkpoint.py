"""Real Megatron checkpoints load without unrestricted unpickling (selm_mcore.mcore.safe_load).

In one worker process (this file re-run as ``python <this file> --worker ROOT HF``, started by
tests/dist/launch.py; Megatron saves need the ``__main__`` guard): a tiny Llama plus its
distributed optimizer is saved with ``mcore.step_checkpoints.save_checkpoint``; the model loads
through ``mcore.checkpoint.load_model_checkpoint`` and the optimizer through
``mcore.step_checkpoints.load_training_state`` with tensors identical to those before the save;
tampered copies (malicious ``.metadata`` for model and optimizer; a real-looking ``.metadata``
that turns a weight into a bytes entry pointing at a malicious pickle), whose checksum lists the
attacker rewrote too, are refused with no file created, while Megatron's default loader does
run the bytes payload (the control).

The metadata reader alone, in the pytest process: tests/unit/test_safe_load.py.
"""

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

# This file is also run as a worker script: the shared payload lives in tests/support.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from payloads import FORBIDDEN, TouchOnUnpickle, write_pickle  # noqa: E402

WORKER_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny_llama_dir):
    from launch import run_distributed

    root = tmp_path_factory.mktemp("safe_load")
    run_distributed(
        Path(__file__).resolve(), 1, ["--worker", root, tiny_llama_dir], timeout_s=WORKER_TIMEOUT_S
    )
    return root, json.loads((root / "results.json").read_text())


def test_real_checkpoint_holds_only_allowed_globals_and_tensors(worker):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from selm_mcore.mcore.safe_load import read_dcp_metadata

    root, _ = worker
    for sub in ("model", "train/optimizer"):
        metadata = read_dcp_metadata(root / "ckpt" / "step_0000001" / sub / ".metadata")
        kinds = {type(v) for v in metadata.state_dict_metadata.values()}
        assert kinds == {TensorStorageMetadata}, (sub, kinds)  # no bytes (pickled) entries
        assert not [k for k in metadata.state_dict_metadata if "_extra_state" in k]


def test_model_loads_through_safe_path_identically(worker):
    _, results = worker
    model = results["model"]
    # embedding, 6 per layer (2 norms, qkv, proj, fc1, fc2), final norm, output layer (untied)
    assert model["num_tensors"] == 6 * model["num_layers"] + 3
    assert model["differed_before_load"]  # the fresh model had other weights
    assert model["mismatched"] == []


def test_optimizer_resumes_through_safe_path_identically(worker):
    _, results = worker
    opt = results["optimizer"]
    assert opt["num_tensors"] > 0 and opt["mismatched"] == []
    assert opt["step"] == 1


@pytest.mark.parametrize("case", ["model_metadata", "optimizer_metadata", "model_bytes_entry"])
def test_tampered_checkpoint_is_refused(worker, case):
    _, results = worker
    outcome = results["tampered"][case]
    assert outcome["error_type"] == "UnsafeCheckpointError", outcome
    assert outcome["file"] in outcome["message"], outcome
    assert FORBIDDEN in outcome["message"], outcome
    assert not outcome["marker_created"]


def test_default_megatron_loader_runs_the_bytes_payload(worker):
    """The control: the bytes-entry attack is real against dist_checkpointing.load's default."""
    _, results = worker
    assert results["tampered"]["control_default_loader"]["marker_created"]


# --- worker ----------------------------------------------------------------------------------


def _adam_states(optimizer) -> list[torch.Tensor]:
    from selm_mcore.mcore.optim import distributed_optimizers

    tensors = []
    for dist_opt in distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                tensors += [state["exp_avg"], state["exp_avg_sq"]]
    return tensors


def _mismatched(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def _model_tensors(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if torch.is_tensor(v) and not k.endswith("_extra_state")
    }


def _attempt(load, marker: Path, file: Path) -> dict:
    try:
        load()
        error_type, message = None, ""
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        error_type, message = type(exc).__name__, str(exc)
    return {
        "error_type": error_type,
        "message": message,
        "file": str(file),
        "marker_created": marker.exists(),
    }


def _bytes_entry_copy(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of model checkpoint ``src`` whose first weight is a bytes entry with a payload."""
    import io

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from selm_mcore.mcore.safe_load import read_dcp_metadata

    shutil.copytree(src, dst)
    metadata = read_dcp_metadata(dst / "model" / ".metadata")  # our own, trusted file
    key = sorted(metadata.state_dict_metadata)[0]
    entry = BytesStorageMetadata()
    entry.size = metadata.state_dict_metadata[key].size  # passes Megatron's shape check
    metadata.state_dict_metadata[key] = entry
    buffer = io.BytesIO()
    torch.save(TouchOnUnpickle(marker), buffer)
    evil = dst / "model" / "__evil.distcp"
    evil.write_bytes(buffer.getvalue())
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo(evil.name, 0, len(buffer.getvalue()))
    (dst / "model" / ".metadata").write_bytes(pickle.dumps(metadata))
    return evil


def _forge_checksums(folder: Path) -> None:
    """Whoever can write checkpoint files can rewrite their checksum list: recompute it, so the
    loads below reach the unpickler."""
    from selm_mcore.runtime.files import checksum_files, read_checksums, write_checksums

    write_checksums(folder, checksum_files(folder, read_checksums(folder, fix="")))


def _worker(root: Path, hf_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    from selm_mcore.config.schema import OptimConfig
    from selm_mcore.mcore.checkpoint import load_model_checkpoint
    from selm_mcore.mcore.model import build_model, load_hf_config
    from selm_mcore.mcore.optim import (
        build_lr_scheduler,
        build_optimizer,
        load_optimizer_state,
        model_sharded_state_dict,
        prefill_adam_state,
        wrap_ddp,
    )
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel
    from selm_mcore.mcore.step_checkpoints import load_training_state, save_checkpoint

    ctx = init_parallel(tp=1, pp=1)
    hf_config = load_hf_config(hf_dir)
    models = build_model(hf_config, ctx)
    optimizer = build_optimizer(
        wrap_ddp(models), OptimConfig(), peak_lr=1e-3, params_dtype=torch.float32
    )
    scheduler = build_lr_scheduler(optimizer, OptimConfig(), peak_lr=1e-3, total_steps=10)
    prefill_adam_state(optimizer)
    generator = torch.Generator().manual_seed(7)
    for tensor in _adam_states(optimizer):
        tensor.copy_(torch.rand(tensor.shape, generator=generator))
    saved_model = _model_tensors(models[0])
    saved_adam = [t.clone() for t in _adam_states(optimizer)]
    ckpt = save_checkpoint(
        root / "ckpt",
        1,
        models=models,
        optimizer=optimizer,
        scheduler=scheduler,
        data_state={"consumed_samples": 8},
        ctx=ctx,
        hf_config=hf_config,
        tokenizer_dir=hf_dir,
    )
    results = {}

    fresh = build_model(hf_config, ctx)
    differed = bool(_mismatched(saved_model, _model_tensors(fresh[0])))
    load_model_checkpoint(fresh, ctx, ckpt)
    loaded = _model_tensors(fresh[0])
    results["model"] = {
        "num_tensors": len(saved_model),
        "differed_before_load": differed,
        "num_layers": hf_config.num_hidden_layers,
        "mismatched": _mismatched(saved_model, loaded),
    }

    for tensor in _adam_states(optimizer):
        tensor.zero_()
    state = load_training_state(
        ckpt, models=models, optimizer=optimizer, scheduler=scheduler, ctx=ctx
    )
    after = _adam_states(optimizer)
    results["optimizer"] = {
        "num_tensors": len(after),
        "step": state.step,
        "mismatched": [
            i for i, (a, b) in enumerate(zip(saved_adam, after)) if not torch.equal(a, b)
        ],
    }

    tampered = {}
    marker = root / "pwned_model_metadata"
    copy = root / "tampered_model"
    shutil.copytree(ckpt, copy)
    bad = write_pickle(copy / "model" / ".metadata", TouchOnUnpickle(marker))
    _forge_checksums(copy)
    tampered["model_metadata"] = _attempt(
        lambda: load_model_checkpoint(fresh, ctx, copy), marker, bad
    )

    marker = root / "pwned_optimizer_metadata"
    copy = root / "tampered_optimizer"
    shutil.copytree(ckpt, copy)
    bad = write_pickle(copy / "train" / "optimizer" / ".metadata", TouchOnUnpickle(marker))
    _forge_checksums(copy / "train")
    tampered["optimizer_metadata"] = _attempt(
        lambda: load_optimizer_state(optimizer, models, copy / "train" / "optimizer"), marker, bad
    )

    marker = root / "pwned_bytes_entry"
    evil = _bytes_entry_copy(ckpt, root / "tampered_bytes", marker)
    _forge_checksums(root / "tampered_bytes")
    tampered["model_bytes_entry"] = _attempt(
        lambda: load_model_checkpoint(fresh, ctx, root / "tampered_bytes"), marker, evil
    )

    marker = root / "pwned_control"
    _bytes_entry_copy(ckpt, root / "tampered_control", marker)
    # The model's sharded state dict as the checkpoint holds it (no "_extra_state" entries).
    sharded = {
        chunk: {k: v for k, v in entries.items() if not k.endswith("_extra_state")}
        for chunk, entries in model_sharded_state_dict(fresh).items()
    }
    tampered["control_default_loader"] = _attempt(
        lambda: dist_checkpointing.load(sharded, str(root / "tampered_control" / "model")),
        marker,
        root / "tampered_control",
    )
    results["tampered"] = tampered
    (root / "results.json").write_text(json.dumps(results, indent=2))
    destroy_parallel()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]), Path(sys.argv[3]))
