"""``selm bench attention``: packed attention backends against the dense masked reference.

    selm bench attention                    # CUDA: bf16, Llama-3-8B's heads, ~4k-token rows
    selm bench attention --json out.json    # CPU: a small fp32 run (the per-sequence SDPA path)

One packed row of synthetic shared-prompt pairs (``--layout pack``: every sequence on its own):
``--pairs`` pairs of a ``--prompt-tokens`` prompt and 3 responses of about ``--response-tokens``
(seeded, odd lengths), random q/k/v of ``--heads`` query and ``--kv-heads`` key/value heads of
``--head-dim``. Each backend ``PackedAttention`` can use here runs the row's attention plan
(``selm_mcore.mcore.attention``: ``varlen`` = torch's varlen_attn, ``flash`` = flash-attn,
``sdpa`` = the per-sequence SDPA loop), and ``dense`` = one SDPA call with the [T, T] boolean
mask written out from the row's groups (the reference layout, not a packed path). Per backend:
the forward and the forward + backward time (median of ``--repeats`` after ``--warmup``), and
the largest absolute error of the output and of the q/k/v gradients against the dense masked
attention computed in fp32.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from selm_mcore.bench.common import format_table

DEFAULTS = {  # (CUDA, CPU)
    "dtype": ("bf16", "fp32"),
    "heads": (32, 4),
    "kv_heads": (8, 2),
    "head_dim": (128, 16),
    "pairs": (4, 3),
    "prompt_tokens": (512, 23),
    "response_tokens": (256, 13),
}


def add_arguments(parser) -> None:
    parser.add_argument("--layout", choices=("shared_prompt", "pack"), default="shared_prompt")
    for name in DEFAULTS:
        option = "--" + name.replace("_", "-")
        if name == "dtype":
            parser.add_argument(option, choices=("bf16", "fp32"), default=None)
        else:
            parser.add_argument(option, type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def _settings(args, on_gpu: bool) -> dict[str, Any]:
    """Every size and the dtype: given, else the device's default (``DEFAULTS``)."""
    return {
        name: getattr(args, name) if getattr(args, name) is not None else pair[0 if on_gpu else 1]
        for name, pair in DEFAULTS.items()
    }


def synthetic_batch(settings: dict[str, Any], shared: bool, seed: int):
    """One packed row (``PackedBatch``) of synthetic pairs: 3 responses of seeded lengths."""
    import torch

    from selm_mcore.data.packing import collate_packed
    from selm_mcore.data.tokenize import TokenizedExample

    generator = torch.Generator().manual_seed(seed)
    response = settings["response_tokens"]

    def ids(n: int) -> tuple[int, ...]:
        return (1,) * n

    def length() -> int:
        return int(torch.randint(max(1, response // 2), response + 1, (1,), generator=generator))

    examples = [
        TokenizedExample(
            index=i,
            prompt_ids=ids(settings["prompt_tokens"] + i),
            chosen_ids=ids(length()),
            rejected_ids=ids(length()),
            yref_ids=ids(length()),
        )
        for i in range(settings["pairs"])
    ]
    return collate_packed(
        examples, pad_id=0, shared_prompt=shared, has_yref=True, pad_to_multiple_of=64
    )


def dense_mask(segments, row_length: int):
    """[T, T] bool: query i may attend to key j (the packed layout written out token by token:
    same group, j <= i, and j in the prompt or in i's own response); a padding position attends
    to itself only (its output is ignored)."""
    import torch

    group = torch.full((row_length,), -1, dtype=torch.long)
    part = torch.full((row_length,), -1, dtype=torch.long)
    for g, (_, start, prompt, *responses) in enumerate(segments.tolist()):
        group[start : start + prompt], part[start : start + prompt] = g, 0
        offset = start + prompt
        for k, length in enumerate(responses, start=1):
            group[offset : offset + length], part[offset : offset + length] = g, k
            offset += length
    position = torch.arange(row_length)
    allowed = (
        (group[:, None] == group[None, :])
        & (group[:, None] >= 0)
        & (position[None, :] <= position[:, None])
        & ((part[None, :] == 0) | (part[None, :] == part[:, None]))
    )
    padding = group < 0
    allowed[padding, padding] = True  # the diagonal of padding rows
    return allowed


def _dense_attend(q, k, v, mask, scale):
    """[T, h, d] attention of one row under ``mask`` (SDPA with a boolean mask)."""
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def _timed(fn, device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn()`` (synchronised on CUDA)."""
    import torch

    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure(name, run, inputs, upstream, reference, device, args) -> dict[str, Any]:
    """Times and errors of one backend; ``run(q, k, v)`` -> context [T, h, d]."""
    import torch

    def forward():
        with torch.no_grad():
            run(*inputs)

    def forward_backward():
        for x in inputs:
            x.grad = None
        (run(*inputs).float() * upstream).sum().backward()

    for x in inputs:
        x.grad = None
    out = run(*inputs)
    (out.float() * upstream).sum().backward()
    grads = [x.grad.float() for x in inputs]
    want_out, want_grads = reference
    return {
        "backend": name,
        "forward_ms": 1e3 * _timed(forward, device, args.repeats, args.warmup),
        "forward_backward_ms": 1e3 * _timed(forward_backward, device, args.repeats, args.warmup),
        "max_abs_error_out": float((out.detach().float() - want_out).abs().max()),
        "max_abs_error_grad": max(float((g - w).abs().max()) for g, w in zip(grads, want_grads)),
    }


def _reference(q, k, v, mask, scale, padding, upstream):
    """fp32 dense masked attention: (output, q/k/v gradients); padding rows zeroed."""
    inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out = _dense_attend(*inputs, mask, scale).masked_fill(padding[:, None, None], 0.0)
    (out * upstream).sum().backward()
    return out.detach(), [x.grad for x in inputs]


COLUMNS = (
    ("backend", "backend", ""),
    ("forward_ms", "fwd ms", ".3f"),
    ("forward_backward_ms", "fwd+bwd ms", ".3f"),
    ("max_abs_error_out", "max |err| out", ".2e"),
    ("max_abs_error_grad", "max |err| dq,dk,dv", ".2e"),
)


def _backends(on_gpu: bool, dtype) -> tuple[list[str], dict[str, str]]:
    """(the backends to run here, the others with the reason they do not)."""
    from selm_mcore.mcore.attention import (
        FLASH_DTYPES,
        flash_attn_installed,
        torch_varlen_function,
    )

    skipped = {}
    if not on_gpu:
        skipped = {"varlen": "needs CUDA", "flash": "needs CUDA"}
    elif dtype not in FLASH_DTYPES:
        skipped = {"varlen": "needs bf16 or fp16", "flash": "needs bf16 or fp16"}
    else:
        if torch_varlen_function() is None:
            skipped["varlen"] = "this torch has no torch.nn.attention.varlen"
        if not flash_attn_installed():
            skipped["flash"] = "flash-attn is not installed"
    names = [n for n in ("varlen", "flash") if n not in skipped] + ["sdpa", "dense"]
    return names, skipped


def _runner(name: str, plan, mask, padding, scale: float):
    """``run(q, k, v)`` -> context [T, h, d] of backend ``name`` (``dense``: the masked SDPA
    call, padding rows zeroed as the packed paths leave them)."""
    from selm_mcore.mcore.attention import backend_attend, varlen_attention

    if name == "dense":
        return lambda q, k, v: _dense_attend(q, k, v, mask, scale).masked_fill(
            padding[:, None, None], 0
        )
    attend = backend_attend(name)
    return lambda q, k, v: varlen_attention(q, k, v, plan, scale, attend)


def run_attention(args) -> dict[str, Any]:
    """The mode's entry (module docstring)."""
    import torch

    torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    settings = _settings(args, on_gpu)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[settings["dtype"]]
    batch = synthetic_batch(settings, args.layout == "shared_prompt", args.seed)
    row_length, dim = batch.tokens.shape[1], settings["head_dim"]
    plan = batch.attention_plan.to(device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    inputs = [
        torch.randn(row_length, heads, dim, generator=generator).to(device, dtype).requires_grad_()
        for heads in (settings["heads"], settings["kv_heads"], settings["kv_heads"])
    ]
    upstream = torch.randn(row_length, settings["heads"], dim, generator=generator).to(device)
    scale = dim**-0.5
    mask = dense_mask(batch.segments, row_length).to(device)
    padding = (torch.arange(row_length) >= batch.num_tokens).to(device)
    q, k, v = inputs
    reference = _reference(q, k, v, mask, scale, padding, upstream)
    names, skipped = _backends(on_gpu, dtype)
    rows = []
    for name in names:
        run = _runner(name, plan, mask, padding, scale)
        rows.append(_measure(name, run, inputs, upstream, reference, device, args))
    result = {
        "mode": "attention",
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "torch": torch.__version__,
        "layout": args.layout,
        **settings,
        "row_tokens": row_length,
        "tokens": batch.num_tokens,
        "groups": int(batch.segments.shape[0]),
        "rows": rows,
        "skipped": skipped,
    }
    print(
        f"packed attention, {result['device']}, {settings['dtype']}: one row of "
        f"{batch.num_tokens} tokens ({row_length} with padding), {result['groups']} groups "
        f"({args.layout}), {settings['heads']} query / {settings['kv_heads']} key-value heads "
        f"of {dim}; median of {args.repeats} after {args.warmup} warm-up; errors against "
        "dense masked attention in fp32"
    )
    print(format_table(rows, COLUMNS))
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})")
    return result
