"""Vocab-parallel log-probs at TP=2 over gloo equal TP=1, for every backend.

Two ranks (this file re-run as `python <this file> --worker OUT`, started by
selm_mcore.runtime.launch.run_local_ranks with a hard timeout) each hold half of the vocabulary as a
non-contiguous view of the same logits; labels fall on both halves, vocab_size=4000 of 4096
leaves padded columns on rank 1. Each rank runs the chunked torch path, the Triton kernel (in
the interpreter: the ranks get TRITON_INTERPRET=1 in their own environment only) and the
torch reference, forward and backward, and counts its collectives. The parent compares the
token and sequence log-probs and the concatenated gradients against TP=1 computed here with
the chunked and reference paths, and checks the collective count: one all-gather in forward,
none in backward.
"""

import sys
from pathlib import Path

import pytest
import torch

BATCH, SEQ, VOCAB, VOCAB_SIZE, TP = 4, 16, 4096, 4000, 2
BACKENDS = ("chunked", "triton", "torch")
DTYPES = (torch.float32, torch.bfloat16)


def make_inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    logits = (4 * torch.randn(BATCH, SEQ, VOCAB, generator=gen)).to(dtype)
    labels = torch.randint(0, VOCAB_SIZE, (BATCH, SEQ), generator=gen)
    labels[0, :4] = torch.tensor([0, VOCAB // 2 - 1, VOCAB // 2, VOCAB_SIZE - 1])  # slice edges
    labels[1, 0] = -100
    loss_mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.2).float()
    loss_mask[0, :4] = 1.0
    loss_mask[-1] = 0.0  # a fully masked sequence
    upstream = torch.randn(BATCH, SEQ, generator=gen)
    return logits, labels, loss_mask, upstream


def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// from run_local_ranks
    from selm_mcore.train.logprobs import vocab_parallel_logprobs

    calls = {"n": 0}
    for name in (
        "all_gather_into_tensor",
        "all_gather",
        "all_reduce",
        "reduce_scatter_tensor",
        "broadcast",
    ):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    rank = dist.get_rank()
    local = VOCAB // TP
    results = {}
    for dtype in DTYPES:
        logits, labels, loss_mask, upstream = make_inputs(dtype)
        for backend in BACKENDS:
            x = logits[..., rank * local : (rank + 1) * local].detach().requires_grad_()
            calls["n"] = 0
            token_logps, seq_logps = vocab_parallel_logprobs(
                x,
                labels,
                loss_mask,
                tp_group=dist.group.WORLD,
                vocab_size=VOCAB_SIZE,
                backend=backend,
            )
            fwd_calls = calls["n"]
            (grad,) = torch.autograd.grad((token_logps * upstream).sum(), x)
            results[(str(dtype), backend)] = dict(
                token_logps=token_logps.detach(),
                seq_logps=seq_logps.detach(),
                grad=grad,
                fwd_collectives=fwd_calls,
                bwd_collectives=calls["n"] - fwd_calls,
            )
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    from selm_mcore.runtime.launch import run_local_ranks

    out_dir = tmp_path_factory.mktemp("logprobs_tp2")
    run_local_ranks(
        [str(Path(__file__).resolve()), "--worker", str(out_dir)],
        TP,
        timeout_s=400,
        env={"TRITON_INTERPRET": "1"},
    )
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(TP)]


@pytest.mark.timeout(500)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tp2_equals_tp1(tp2_results, backend, dtype):
    from selm_mcore.train.logprobs import vocab_parallel_logprobs

    logits, labels, loss_mask, upstream = make_inputs(dtype)
    for tp1_backend in ("chunked", "torch"):
        x = logits.detach().requires_grad_()
        token_logps, seq_logps = vocab_parallel_logprobs(
            x, labels, loss_mask, vocab_size=VOCAB_SIZE, backend=tp1_backend
        )
        (grad,) = torch.autograd.grad((token_logps * upstream).sum(), x)
        ranks = [r[(str(dtype), backend)] for r in tp2_results]
        for r in ranks:  # the log-probs are replicated on every TP rank
            torch.testing.assert_close(r["token_logps"], token_logps, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["seq_logps"], seq_logps, rtol=1e-5, atol=1e-4)
        tp2_grad = torch.cat([r["grad"] for r in ranks], dim=-1)
        if dtype == torch.bfloat16:  # each side rounds its fp32 gradient to bf16 once
            torch.testing.assert_close(tp2_grad.float(), grad.float(), rtol=2**-6, atol=1e-30)
        else:
            torch.testing.assert_close(tp2_grad, grad, rtol=1e-5, atol=1e-5)
        assert (tp2_grad[..., VOCAB_SIZE:] == 0).all() and (tp2_grad[loss_mask == 0] == 0).all()
    if backend != "torch":  # the reference gathers the logits instead
        assert [r["fwd_collectives"] for r in ranks] == [1] * TP
        assert [r["bwd_collectives"] for r in ranks] == [0] * TP


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
