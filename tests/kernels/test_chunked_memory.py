"""Peak extra CPU memory of the chunked torch path: <= 10% of the logits' size.

Method: this file re-runs itself as a fresh child process (`python -P <this file>`) that
imports torch, warms every code path up on a small input, allocates large logits and then
measures each call with selm_mcore.kernels.bench_logprobs.peak_extra_memory: the growth of the
process' peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) over the resident
set just before the call, with glibc told to mmap blocks above 64 KiB so freed tensors leave
the resident set at once. This sees every byte torch allocates (tracemalloc does not), at page
granularity, plus anything else the process touches; a fresh process keeps the pytest process
out of it. The same meter must report >= 1x the logits for the naive path (fp32 log-softmax),
which shows it is not blind.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BATCH, SEQ, VOCAB = 2, 1024, 32000  # fp32 logits: 250 MiB


def _probe() -> dict:
    import torch

    from selm_mcore.kernels.bench_logprobs import peak_extra_memory
    from selm_mcore.kernels.torch_logprobs import (
        chunked_vocab_parallel_logprobs,
        reference_vocab_parallel_logprobs,
    )

    def run(fn, logits, labels, backward, inplace=False):
        x = logits.detach().requires_grad_()

        def call():
            kwargs = dict(inplace_backward=True) if inplace else {}
            out = fn(x, labels, None, **kwargs)
            if backward:
                return torch.autograd.grad(out, x, torch.ones_like(out))[0]
            return out

        return peak_extra_memory(call, torch.device("cpu"))[1]

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        small = torch.randn(2, 64, 512).to(dtype)
        small_labels = torch.randint(0, 512, (2, 64))
        for backward, inplace in [(False, False), (True, True)]:  # warm-up: code pages, allocator
            run(chunked_vocab_parallel_logprobs, small.clone(), small_labels, backward, inplace)
        run(reference_vocab_parallel_logprobs, small, small_labels, False)
        logits = torch.randn(BATCH, SEQ, VOCAB).to(dtype)
        labels = torch.randint(0, VOCAB, (BATCH, SEQ))
        name = str(dtype).replace("torch.", "")
        results[name] = dict(
            logits_bytes=logits.numel() * logits.element_size(),
            chunked_fwd=run(chunked_vocab_parallel_logprobs, logits, labels, False),
            chunked_fwd_bwd_inplace=run(
                chunked_vocab_parallel_logprobs, logits, labels, True, True
            ),
            naive_fwd=run(reference_vocab_parallel_logprobs, logits, labels, False),
        )
        del logits
    return results


@pytest.mark.timeout(600)
def test_chunked_path_peak_extra_memory_within_10_percent_of_logits():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-P", str(Path(__file__).resolve()), "--probe"],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for dtype, r in results.items():
        size = r["logits_bytes"]
        report = {k: f"{v / size:.3f}x logits" for k, v in r.items() if k != "logits_bytes"}
        print(dtype, report)
        assert r["naive_fwd"] >= 0.95 * size, (dtype, report)  # the meter sees torch tensors
        assert r["chunked_fwd"] <= 0.10 * size, (dtype, report)
        assert r["chunked_fwd_bwd_inplace"] <= 0.10 * size, (dtype, report)


if __name__ == "__main__" and sys.argv[1:] == ["--probe"]:
    print(json.dumps(_probe()))
