"""Worker of test_overlap_optimizer_state.py: overlapped DP communication and optimizer-state
round trips on a tiny random Llama (run on every rank by ``run_distributed``).

    python tests/dist/optimizer_worker.py OUT_DIR MODE [MODE ...]

Modes:
* ``overlap:TP:PP:VPP`` (VPP ``none`` for plain 1F1B): three optimizer steps of four
  micro-batches with the DP reduce-scatter / all-gather synchronous, then overlapped (bucketed,
  Megatron's schedule hooks); emits per step the last stage's losses and the grad norm, each
  rank's weight checksum right after the last step (before ``sync_params``) and after it, the
  number of gradient buckets and which hooks were installed.
* ``state:KIND:FORMAT`` (KIND ``torch`` = torch AdamW with the kernels ``build_optimizer``
  picks (foreach on CPU), ``torch-fused`` = torch AdamW forced to its fused kernel, ``fused`` =
  FusedAdamLike with Megatron's TE-optimizer branches switched on; FORMAT dp_reshardable /
  fully_reshardable): two steps, save the optimizer state, one more step; then a fresh model
  with the weights of step 2 loads the state and takes the same third step. Emits both third
  steps' loss, grad norm and weight checksum, the loaded state's step bookkeeping, its largest
  difference from the saved exp_avg / exp_avg_sq, and the AdamW kernel flags before the save
  and after the load (torch AdamW saves with the other kernel's flags in its param groups: the
  load must keep the loading run's).
* ``plan``: packed micro-batches through a forward and backward of the real schedule with full
  recompute; counts the attention plans built and which plan each layer's attention read.
"""

import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from launch import emit

VOCAB = 256
SEQ = 16


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def micro_batches(step: int, dp_rank: int, count: int = 4) -> list:
    """Deterministic token batches [2, SEQ] per (step, DP rank); labels are the next tokens."""
    generator = torch.Generator().manual_seed(1000 * step + dp_rank)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
        batch = SimpleNamespace(
            tokens=tokens,
            position_ids=torch.arange(SEQ).expand(2, SEQ),
            labels=tokens.roll(-1, dims=1),
        )
        out.append(SimpleNamespace(batch=batch, packed=False))
    return out


def build(ctx, *, overlap: bool, kind: str = "torch"):
    from fused_adam_like import swap_in_fused_adam_like

    from selm_mcore.config.schema import OptimConfig
    from selm_mcore.mcore.model import build_model
    from selm_mcore.mcore.optim import build_optimizer, wrap_ddp

    models = build_model(tiny_config(), ctx)
    # Small buckets: several per chunk, so the overlapped path dispatches bucket by bucket.
    ddp_models = wrap_ddp(models, overlap=overlap, bucket_size=20_000)
    optimizer = build_optimizer(
        ddp_models,
        OptimConfig(lr=1e-2, weight_decay=0.01),
        peak_lr=1e-2,
        params_dtype=torch.float32,
    )
    if kind == "fused":
        swap_in_fused_adam_like(optimizer)
    elif kind == "torch-fused":
        from selm_mcore.mcore.optim import use_adam_implementation

        use_adam_implementation(optimizer, fused=True)  # torch's fused AdamW kernel (CPU too)
    return models, ddp_models, optimizer


def adam_kernels(optimizer) -> list:
    """The (fused, foreach) flags of every torch AdamW param group."""
    from selm_mcore.mcore.optim import distributed_optimizers

    return sorted(
        {
            (g.get("fused"), g.get("foreach"))
            for d in distributed_optimizers(optimizer)
            for g in d.optimizer.param_groups
        }
    )


def adam_moments(optimizer) -> list:
    """exp_avg and exp_avg_sq of every parameter in param-group order (clones)."""
    from selm_mcore.mcore.optim import distributed_optimizers

    return [
        inner.state[param][key].detach().clone()
        for inner in (d.optimizer for d in distributed_optimizers(optimizer))
        for group in inner.param_groups
        for param in group["params"]
        for key in ("exp_avg", "exp_avg_sq")
    ]


def swap_adam_kernel_flags(optimizer) -> None:
    """Give each torch AdamW group the other kernel's flags (foreach <-> single-tensor loop on
    CPU: the same numbers), as a checkpoint from another kind of run would carry them."""
    from selm_mcore.mcore.optim import distributed_optimizers

    for d in distributed_optimizers(optimizer):
        for group in d.optimizer.param_groups:
            if not group.get("fused"):
                group["foreach"] = not group.get("foreach")


def train_step(ctx, ddp_models, optimizer, step: int) -> dict:
    from selm_mcore.mcore.forward import run_micro_batches
    from selm_mcore.train.logprobs import vocab_parallel_logprobs

    tp_group = ctx.tp_group if ctx.tp > 1 else None

    def loss_fn(micro_batch, logits):
        token_logps, _ = vocab_parallel_logprobs(
            logits,
            micro_batch.batch.labels.to(logits.device),
            None,
            tp_group=tp_group,
            vocab_size=VOCAB,
            inplace_backward=True,
            check_labels=False,
        )
        loss = -token_logps.mean()
        return loss, {"loss": loss.detach().clone()}

    for model in ddp_models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    reduced = run_micro_batches(
        ddp_models, micro_batches(step, ctx.dp_rank), loss_fn, forward_only=False
    )
    ok, grad_norm, _ = optimizer.step()
    assert ok
    return {"losses": [float(r["loss"]) for r in reduced], "grad_norm": float(grad_norm)}


def checksum(models) -> float:
    return sum(float(p.detach().double().sum()) for m in models for p in m.parameters())


def overlap_mode(tp: int, pp: int, vpp) -> dict:
    from selm_mcore.mcore.optim import sync_params
    from selm_mcore.mcore.parallel import init_parallel

    out = {}
    for overlap in (False, True):
        ctx = init_parallel(tp=tp, pp=pp, vpp=vpp, seed=11)
        models, ddp_models, optimizer = build(ctx, overlap=overlap)
        config = models[0].config
        steps = [train_step(ctx, ddp_models, optimizer, step) for step in range(3)]
        stale = checksum(models)
        sync_params(ddp_models)
        out["on" if overlap else "off"] = {
            "steps": steps,
            "stale_checksum": stale,
            "checksum": checksum(models),
            "buckets": sum(len(m.bucket_groups) for m in ddp_models),
            "hooks": {
                name: getattr(config, name) is not None
                for name in ("no_sync_func", "grad_sync_func", "param_sync_func")
            },
        }
    return out


@contextlib.contextmanager
def optimizer_branches(kind: str):
    """Megatron's DistributedOptimizer as it runs with TE's FusedAdam importable (``fused``;
    its module flags are the availability probes) or without (``torch``)."""
    from megatron.core.optimizer import distrib_optimizer

    saved = distrib_optimizer.HAVE_APEX_OR_TE, distrib_optimizer.USING_TE_OPTIMIZER
    if kind == "fused":
        distrib_optimizer.HAVE_APEX_OR_TE = distrib_optimizer.USING_TE_OPTIMIZER = True
    try:
        yield
    finally:
        distrib_optimizer.HAVE_APEX_OR_TE, distrib_optimizer.USING_TE_OPTIMIZER = saved


def state_mode(root: Path, kind: str, sharding: str) -> dict:
    import torch.distributed as dist

    from selm_mcore.mcore.optim import (
        distributed_optimizers,
        load_optimizer_state,
        save_optimizer_state,
        sync_params,
    )
    from selm_mcore.mcore.parallel import init_parallel

    ctx = init_parallel(seed=13)
    models, ddp_models, optimizer = build(ctx, overlap=True, kind=kind)
    built_kernels = adam_kernels(optimizer) if kind != "fused" else []
    for step in range(2):
        train_step(ctx, ddp_models, optimizer, step)
    sync_params(ddp_models)
    if kind == "torch":
        swap_adam_kernel_flags(optimizer)
    saved_moments = adam_moments(optimizer)
    weights = {
        k: v.detach().clone() for k, v in models[0].state_dict().items() if torch.is_tensor(v)
    }
    out_dir = root / f"{kind}_{sharding}"
    if ctx.rank == 0:
        out_dir.mkdir(parents=True)
    dist.barrier()
    save_optimizer_state(optimizer, models, out_dir, sharding=sharding)
    uninterrupted = train_step(ctx, ddp_models, optimizer, 2)
    sync_params(ddp_models)
    uninterrupted["checksum"] = checksum(models)

    fresh, fresh_ddp, fresh_optimizer = build(ctx, overlap=True, kind=kind)
    fresh[0].load_state_dict(weights, strict=False)  # into DDP's parameter buffer
    load_optimizer_state(fresh_optimizer, fresh, out_dir, sharding=sharding)
    inner = [d.optimizer for d in distributed_optimizers(fresh_optimizer)]
    states = [s for opt in inner for s in opt.state.values()]
    loaded_moments = adam_moments(fresh_optimizer)
    bookkeeping = {
        "built_kernels": built_kernels,
        "loaded_kernels": adam_kernels(fresh_optimizer) if kind != "fused" else [],
        "moments_max_diff": max(
            float((a - b).abs().max()) for a, b in zip(saved_moments, loaded_moments, strict=True)
        ),
        "moments_nonzero": all(bool(m.abs().sum() > 0) for m in saved_moments[:2]),
        "inner": sorted({type(opt).__name__ for opt in inner}),
        "state_keys": sorted({key for s in states for key in s}),
        "group_steps": sorted(
            {
                g.get("step")
                for opt in inner
                for g in opt.param_groups
                if g["params"] and not torch.is_tensor(g.get("step"))
            }
        ),
        "per_param_steps": sorted({float(s["step"]) for s in states if "step" in s}),
        "distinct_step_tensors": len({id(s["step"]) for s in states if "step" in s}),
        "num_states": len(states),
    }
    resumed = train_step(ctx, fresh_ddp, fresh_optimizer, 2)
    sync_params(fresh_ddp)
    resumed["checksum"] = checksum(fresh)
    return {"uninterrupted": uninterrupted, "resumed": resumed, "bookkeeping": bookkeeping}


def example_pairs(count: int = 3) -> list:
    """Pairs of random token ids (prompt, chosen, rejected) of different lengths."""
    from selm_mcore.data.tokenize import TokenizedExample

    generator = torch.Generator().manual_seed(5)

    def ids(length):
        return tuple(torch.randint(1, VOCAB, (length,), generator=generator).tolist())

    return [
        TokenizedExample(
            index=i, prompt_ids=ids(4 + i), chosen_ids=ids(3 + 2 * i), rejected_ids=ids(5 - i)
        )
        for i in range(count)
    ]


def recompute_mode() -> dict:
    """Logits and gradients of one forward/backward per recompute choice, unpacked and packed
    (the packed layer spec holds PackedAttention, which selective recompute checkpoints)."""
    from selm_mcore.data.batches import collate_preferences
    from selm_mcore.data.packing import collate_packed
    from selm_mcore.mcore.forward import sequence_logps
    from selm_mcore.mcore.model import build_model
    from selm_mcore.mcore.parallel import init_parallel

    pairs = example_pairs()
    out = {}
    for packed in (False, True):
        batch = (
            collate_packed(pairs, pad_id=0, shared_prompt=True, has_yref=False)
            if packed
            else collate_preferences(pairs, pad_id=0, pad_to_multiple_of=8)
        )
        reference = None
        for recompute in ("none", "selective", "full"):
            ctx = init_parallel(seed=17)
            model = build_model(tiny_config(), ctx, recompute=recompute, packed=packed)[0]
            if packed:
                logits = model(
                    batch.tokens,
                    batch.position_ids,
                    attention_plan=batch.attention_plan,
                    head_index=batch.head_index,
                )
            else:
                logits = model(batch.tokens, batch.position_ids)
            logps = sequence_logps(logits, batch, tp_group=None, vocab_size=VOCAB)
            logps.sum().backward()
            result = torch.cat([logps.detach()] + [p.grad.flatten() for p in model.parameters()])
            if reference is None:
                reference = result
            key = f"{'packed' if packed else 'unpacked'}/{recompute}"
            out[key] = {
                "max_abs_diff": float((result - reference).abs().max()),
                "granularity": model.config.recompute_granularity,
                "checkpoint_core_attention": bool(
                    model.decoder.layers[0].self_attention.checkpoint_core_attention
                ),
            }
    return out


def plan_mode() -> dict:
    """Attention plans of packed micro-batches through the real schedule's forward and backward
    (4 layers, full recompute): how many were built, at collation and in the schedule, and how
    often each layer's attention read each of them."""
    from collections import Counter

    import selm_mcore.data.packing as packing
    from selm_mcore.data.tokenize import PreferenceDataset
    from selm_mcore.mcore.attention import PackedAttention
    from selm_mcore.mcore.forward import pack_micro_batches, run_micro_batches, sequence_logps
    from selm_mcore.mcore.model import build_model
    from selm_mcore.mcore.optim import wrap_ddp
    from selm_mcore.mcore.parallel import init_parallel

    ctx = init_parallel(seed=19)
    models = build_model(tiny_config(), ctx, recompute="full", packed=True)
    ddp_models = wrap_ddp(models)
    dataset = PreferenceDataset(example_pairs(5))  # 12 + 2i tokens each: 3 rows of 32
    built, seen = [], Counter()
    build_plan, attention_forward = packing.attention_plan, PackedAttention.forward

    def counting_build(*args, **kwargs):
        built.append(build_plan(*args, **kwargs))
        return built[-1]

    def recording_forward(self, *args, packed_seq_params=None, **kwargs):
        seen[id(packed_seq_params.plan)] += 1
        return attention_forward(self, *args, packed_seq_params=packed_seq_params, **kwargs)

    def loss_fn(micro_batch, logits):
        logps = sequence_logps(logits, micro_batch.batch, tp_group=None, vocab_size=VOCAB)
        loss = -logps.sum() * micro_batch.loss_scale
        return loss, {"loss": loss.detach().clone()}

    packing.attention_plan, PackedAttention.forward = counting_build, recording_forward
    try:
        micro = pack_micro_batches(
            dataset,
            range(len(dataset)),
            budget=32,
            shared_prompt=True,
            pad_id=0,
            pad_to_multiple_of=1,
            fixed_length=False,
            examples_per_step=len(dataset),
        )
        micro = [mb.to(ctx.device) for mb in micro]
        at_collation = len(built)
        run_micro_batches(ddp_models, micro, loss_fn, forward_only=False)
    finally:
        packing.attention_plan, PackedAttention.forward = build_plan, attention_forward
    plans = [id(mb.batch.attention_plan) for mb in micro]
    return {
        "micro_batches": len(micro),
        "layers": len(models[0].decoder.layers),
        "built_at_collation": at_collation,
        "built_in_schedule": len(built) - at_collation,
        "reads_per_plan": [seen[plan] for plan in plans],
        "reads_of_other_plans": sum(n for plan, n in seen.items() if plan not in plans),
        "gradient_norm": float(
            sum(float(p.main_grad.double().pow(2).sum()) for p in models[0].parameters()) ** 0.5
        ),
    }


def main() -> None:
    from selm_mcore.mcore.parallel import destroy_parallel

    root = Path(sys.argv[1])
    results = {}
    for mode in sys.argv[2:]:
        name, *args = mode.split(":")
        if name == "overlap":
            tp, pp, vpp = args
            results[mode] = overlap_mode(int(tp), int(pp), None if vpp == "none" else int(vpp))
        elif name == "state":
            kind, sharding = args
            with optimizer_branches(kind):
                results[mode] = state_mode(root, kind, sharding)
        elif name == "recompute":
            results[mode] = recompute_mode()
        elif name == "plan":
            results[mode] = plan_mode()
        else:
            raise SystemExit(f"unknown mode {mode}")
    emit(results)
    destroy_parallel()


if __name__ == "__main__":
    main()
