"""Worker of test_overlap_optimizer_state.py: overlapped DP communication and optimizer-state
round trips on a tiny random Llama (run on every rank by ``run_distributed``).

    python tests/dist/optimizer_worker.py OUT_DIR MODE [MODE ...]

Modes:
* ``overlap:TP:PP:VPP`` (VPP ``none`` for plain 1F1B): three optimizer steps of four
  micro-batches with the DP reduce-scatter / all-gather synchronous, then overlapped (bucketed,
  Megatron's schedule hooks); emits per step the last stage's losses and the grad norm, each
  rank's weight checksum right after the last step (before ``sync_params``) and after it, the
  number of gradient buckets and which hooks were installed.
* ``state:KIND:FORMAT`` (KIND ``torch`` = torch AdamW, ``fused`` = FusedAdamLike with
  Megatron's TE-optimizer branches switched on; FORMAT dp_reshardable / fully_reshardable):
  two steps, save the optimizer state, one more step; then a fresh model with the weights of
  step 2 loads the state and takes the same third step. Emits both third steps' loss, grad norm
  and weight checksum, and the loaded state's step bookkeeping.
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
    return models, ddp_models, optimizer


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
    for step in range(2):
        train_step(ctx, ddp_models, optimizer, step)
    sync_params(ddp_models)
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
    bookkeeping = {
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
        else:
            raise SystemExit(f"unknown mode {mode}")
    emit(results)
    destroy_parallel()


if __name__ == "__main__":
    main()
