"""selm_mcore.train.guards without processes: the run identity a resume must match (every key that
defines the run refused by name, nothing layout-dependent in it) and the NaN fault hook.

The real refusals (`selm train` resumed with another model or loss, a NaN mid-training) are in
tests/dist/test_reliability_train.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from selm_mcore.config.io import load_config
from selm_mcore.mcore.checkpoint import ResumeError
from selm_mcore.train.guards import NAN_AT_STEP_ENV, check_resume, loss_fn_for_step, run_identity


def identity(*overrides, start_model="a" * 64, data_hash="b" * 64, steps=10):
    return run_identity(
        load_config(None, list(overrides)),
        start_model=start_model,
        data_hash=data_hash,
        steps=steps,
    )


def test_the_same_run_resumes_at_any_layout():
    saved = identity("loss.beta=0.1")
    check_resume("ckpt", saved, identity("loss.beta=0.1"))
    # Layout, packing and where the reference comes from do not define the run.
    check_resume(
        "ckpt",
        saved,
        identity(
            "loss.beta=0.1",
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.vpp=2",
            "data.packing=none",
            "data.pack_tokens=512",
            "train.micro_batch_size=2",
            "train.reference_mode=onthefly",
            "train.save_interval=5",
            "model.recompute=true",
        ),
    )


@pytest.mark.parametrize(
    "override,named",
    [
        ("loss.beta=0.2", "loss.beta: checkpoint 0.01, this run 0.2"),
        ("loss.alpha=0", "loss.alpha: checkpoint 0.0001, this run 0.0"),
        ("loss.loss_type=ipo", "loss.loss_type: checkpoint 'sigmoid', this run 'ipo'"),
        ("loss.sft_weight=0.5", "loss.sft_weight: checkpoint 0.0, this run 0.5"),
        ("optim.lr=1e-6", r"the peak learning rate \(optim.lr, .*checkpoint 5e-07, this run 1e-06"),
        ("optim.lr_per_round=[1.0e-6]", r"the peak learning rate .*this run 1e-06"),
        ("train.round_index=2", "train.round_index: checkpoint 1, this run 2"),
        ("optim.min_lr=1e-8", "optim.min_lr: checkpoint 0.0, this run 1e-08"),
        ("optim.weight_decay=0.1", "optim.weight_decay"),
        ("optim.adam_beta1=0.8", "optim.adam_beta1"),
        ("optim.adam_beta2=0.99", "optim.adam_beta2"),
        ("optim.adam_eps=1e-6", "optim.adam_eps"),
        ("optim.schedule=linear", "optim.schedule: checkpoint 'cosine', this run 'linear'"),
        ("optim.warmup_ratio=0.2", "optim.warmup_ratio"),
        ("optim.clip_grad=0", "optim.clip_grad"),
        ("train.global_batch_size=64", "train.global_batch_size"),
        ("train.seed=1", "train.seed"),
        ("data.shuffle=false", "data.shuffle"),
        ("model.dtype=bf16", "model.dtype: checkpoint 'fp32', this run 'bf16'"),
    ],
)
def test_a_resume_into_another_run_is_refused_naming_the_key(override, named):
    with pytest.raises(
        ResumeError,
        match=rf"cannot resume from ckpt: this run differs .*{named}"
        r".*train.resume=false or another train.output_dir",
    ):
        check_resume("ckpt", identity(), identity(override))


def test_another_start_model_data_or_step_count_is_refused():
    saved = identity()
    with pytest.raises(
        ResumeError,
        match=r"the start model \(train.init_from / model.hf_dir; "
        r"its weights' fingerprint\): checkpoint aaaaaaaaaaaa"
        r"\.\.\., this run cccccccccccc\.\.\.",
    ):
        check_resume("ckpt", saved, identity(start_model="c" * 64))
    with pytest.raises(ResumeError, match=r"the training data .*checkpoint bbbbbbbbbbbb"):
        check_resume("ckpt", saved, identity(data_hash="d" * 64))
    with pytest.raises(ResumeError, match=r"the number of steps .*checkpoint 10, this run 12"):
        check_resume("ckpt", saved, identity(steps=12))
    with pytest.raises(ResumeError, match=r"loss.beta: .*; the start model"):  # all named
        check_resume("ckpt", saved, identity("loss.beta=0.5", start_model="c" * 64))


def test_a_checkpoint_without_identity_is_refused():
    with pytest.raises(
        ResumeError, match="does not record what defines its run .*train.resume=false"
    ):
        check_resume("ckpt", None, identity())


def test_the_nan_hook_poisons_only_the_chosen_step(monkeypatch):
    def loss_fn(x):
        return x.sum(), {"loss": x.sum().detach(), "num_examples": torch.tensor(1.0)}

    x = torch.ones(3, requires_grad=True)
    monkeypatch.delenv(NAN_AT_STEP_ENV, raising=False)
    assert loss_fn_for_step(loss_fn, 3) is loss_fn
    monkeypatch.setenv(NAN_AT_STEP_ENV, "3")
    assert loss_fn_for_step(loss_fn, 2) is loss_fn
    loss, sums = loss_fn_for_step(loss_fn, 3)(x)
    loss.backward()
    assert math.isnan(loss.item()) and math.isnan(sums["loss"].item())
    assert sums["num_examples"].item() == 1.0
    assert torch.isnan(x.grad).all()  # the gradients are poisoned too
