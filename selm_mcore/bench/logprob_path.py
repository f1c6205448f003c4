"""``selm bench logprob-path``: training steps with the fused log-prob kernel against
Megatron's vocab-parallel cross entropy (the logprob part of tools/gpu_check.sh on a GPU)."""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

from selm_mcore.bench.common import format_table, peak_rss_mb
from selm_mcore.modelspec import ModelShape, training_flops
from selm_mcore.train.metrics import device_peak

LLAMA3_8B_SHAPE = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)


def random_examples(
    num_examples: int,
    prompt_tokens: int,
    response_tokens: int,
    vocab_size: int,
    seed: int,
    *,
    with_yref: bool = False,
) -> list:
    """Tokenised pairs of random ids, every prompt and response of the given length."""
    import torch

    from selm_mcore.data.tokenize import TokenizedExample

    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, vocab_size, (n,), generator=generator).tolist())

    return [
        TokenizedExample(
            index=i,
            prompt_ids=ids(prompt_tokens),
            chosen_ids=ids(response_tokens),
            rejected_ids=ids(response_tokens),
            yref_ids=ids(response_tokens) if with_yref else None,
        )
        for i in range(num_examples)
    ]


def _model_config(args):
    """(HF config, its name in the table): --hf-dir's config or Llama-3-8B's shape, --layers."""
    from transformers import LlamaConfig

    from selm_mcore.mcore.model import load_hf_config

    if args.hf_dir:
        hf_config, name = load_hf_config(args.hf_dir), args.hf_dir
    else:
        hf_config, name = LlamaConfig(**LLAMA3_8B_SHAPE), "Llama-3-8B shape"
    if args.layers:
        hf_config.num_hidden_layers = args.layers
        name += f", {args.layers} of its layers"
    return hf_config, name


def _time_steps(step, warmup_steps: int, steps: int) -> tuple[list[float], int]:
    """(seconds of each measured step, tokens over them); ``step(i)`` returns its tokens.
    Resets the CUDA peak-memory counter first and synchronises around every timed step."""
    import torch

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup_steps):
        step(i)
    times, tokens = [], 0
    for i in range(warmup_steps, warmup_steps + steps):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens += step(i)
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, tokens


def _print_table(rows: list[dict[str, Any]], args, shape_name: str, peak: dict) -> None:
    print(
        f"one DPO training step, {shape_name}, {args.dtype}, TP1, "
        f"{args.global_batch_size} pairs x 2 sequences x {args.seq_length} tokens per step "
        f"(micro-batch {args.micro_batch_size} pairs), AdamW, median of {args.steps} steps after "
        f"{args.warmup_steps} warm-up; peak: {peak['source']}"
    )
    print(
        format_table(
            rows,
            [
                ("path", "log-prob path", ""),
                ("step_time_s", "step s", ".3f"),
                ("tokens_per_s", "tokens/s", ".0f"),
                ("tflops", "TFLOP/s", ".3g"),
                ("mfu", "MFU", ".3f"),
                ("peak_memory_gib", "peak GiB", ".2f"),
            ],
        )
    )


def _dpo_step(args, ctx, models, optimizer, dataset, paths_fn, step_index: int) -> int:
    """One optimizer step of DPO over the ``step_index``-th global batch with the log-prob path
    ``paths_fn(output, batch) -> sequence log-probs``; the tokens it trained on."""
    import torch

    from selm_mcore.mcore.forward import collate_micro_batches, run_micro_batches
    from selm_mcore.train.loss import selm_loss

    first = step_index * args.global_batch_size
    mbs = args.micro_batch_size
    groups = [
        list(range(first + i, first + i + mbs)) for i in range(0, args.global_batch_size, mbs)
    ]
    micro_batches = collate_micro_batches(
        dataset, groups, pad_id=0, pad_to_multiple_of=1, device=ctx.device
    )

    def loss_fn(micro_batch, output):
        seq = paths_fn(output, micro_batch.batch)
        chosen, rejected, _ = micro_batch.batch.split(seq)
        zeros = torch.zeros_like(chosen)
        loss, _ = selm_loss(chosen, rejected, zeros, zeros, beta=0.1, alpha=0.0)
        return loss.sum() / args.global_batch_size, {"loss": loss.detach().sum()}

    optimizer.zero_grad(set_to_none=True)
    run_micro_batches(models, micro_batches, loss_fn, forward_only=False)
    optimizer.step()
    return sum(mb.num_tokens for mb in micro_batches)


def run_logprob_path(args) -> dict[str, Any]:
    """DPO training steps of one model with each log-prob path; tokens/s, MFU, peak memory."""
    import torch

    from selm_mcore.data.tokenize import PreferenceDataset
    from selm_mcore.mcore.forward import megatron_ce_sequence_logps, sequence_logps
    from selm_mcore.mcore.model import build_model
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(args.threads)
    hf_config, shape_name = _model_config(args)
    on_gpu = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    ctx = init_parallel(tp=1, pp=1, seed=1234)
    try:
        models = build_model(hf_config, ctx, params_dtype=dtype)
        vocab_size = hf_config.vocab_size
        shape = ModelShape.from_hf_config(hf_config)
        params = [p for m in models for p in m.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-7, fused=on_gpu)
        seq_len = args.seq_length
        prompt_tokens = seq_len // 2
        examples = random_examples(
            args.global_batch_size * (args.warmup_steps + args.steps),
            prompt_tokens,
            seq_len - prompt_tokens,
            vocab_size,
            seed=0,
        )
        dataset = PreferenceDataset(examples)
        peak = device_peak("cuda" if on_gpu else "cpu", args.threads)
        paths = {
            "fused": lambda out, batch: sequence_logps(
                out, batch, tp_group=None, vocab_size=vocab_size
            ),
            "megatron-ce": megatron_ce_sequence_logps,
        }
        flops = training_flops(
            shape, [seq_len] * (2 * args.global_batch_size), reference_forward=False
        )["policy"]
        rows = []
        for name in args.paths:
            step = functools.partial(_dpo_step, args, ctx, models, optimizer, dataset, paths[name])
            times, tokens = _time_steps(step, args.warmup_steps, args.steps)
            step_time = statistics.median(times)
            rows.append(
                {
                    "path": name,
                    "step_time_s": step_time,
                    "tokens_per_s": tokens / args.steps / step_time,
                    "tflops": flops / step_time / 1e12,
                    "mfu": flops / step_time / peak["flops"],
                    "peak_memory_gib": (
                        torch.cuda.max_memory_allocated() / 2**30
                        if on_gpu
                        else peak_rss_mb() / 1024
                    ),
                }
            )
    finally:
        destroy_parallel()
    _print_table(rows, args, shape_name, peak)
    return {
        "mode": "logprob-path",
        "shape": shape_name,
        "dtype": args.dtype,
        "layers": hf_config.num_hidden_layers,
        "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "peak": peak,
        "rows": rows,
    }
