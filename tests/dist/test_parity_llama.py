"""Logit (and gradient) parity: HF LlamaForCausalLM vs the Megatron model of selm_mcore.

The parent (pytest) computes the references with transformers and writes the inputs and a job
list; the ranks (this file re-run as ``python <this file> --worker OUT``, started by
tests/dist/launch.py with a timeout) run the jobs of OUT/jobs.json in turn in the same
processes (re-initialising only Megatron's groups): build the model at the job's layout, load
the HF weights (each rank reads only its slices) or a checkpoint, run Megatron's own pipeline
schedule, all-gather the vocab-parallel logits over TP and save them (or the gradients,
exported in HF layout through iter_hf_weights); the parent compares them with HF.

* tiny random Llama (head_dim 32, GQA 4/2, untied, llama3 rope scaling whose
  original_max_position_embeddings (64) is shorter than the inputs (96 tokens), so the scaled
  band matters), fp32 logits at TP1, TP2, PP2, TP2xPP2 and interleaved PP2xVPP2; gradients
  with activation recompute at TP2xPP2 and PP2xVPP2; bf16 at TP2xPP2; a checkpoint saved at
  PP2xVPP2 and loaded at TP2; a tied tiny Llama at PP2 and TP2xPP2 (the last stage's copy of
  the embedding). One launch of 4 ranks.
* SmolLM2-135M-Instruct (tied embeddings), fp32 logits at TP1 and TP3 on 3 ranks. The issue
  asked for TP2, which no Megatron layout allows: 9 attention heads and 3 query groups are not
  divisible by 2.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

TOL = 1e-4  # fp32 logits, max abs difference
GRAD_RTOL = 1e-4  # gradients: max abs difference relative to the largest gradient
SEQ = 96
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def megatron_logits(models, ctx, input_ids):
    """Full-vocabulary logits [B, T, V_padded] on the last pipeline stage (None elsewhere),
    computed with Megatron's forward-only pipeline schedule, one sequence per microbatch."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = input_ids.shape
    input_ids = input_ids.to(ctx.device)
    positions = torch.arange(seq, device=ctx.device).unsqueeze(0)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        return model(tokens, positions, None), lambda output, non_loss_data=True: output

    iterators = [iter(list(input_ids.split(1))) for _ in models]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(models) > 1 else iterators[0],
            model=models if len(models) > 1 else models[0],
            num_microbatches=batch,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not ctx.is_last_stage:
        return None
    local = torch.cat(outputs)  # [B, T, V/tp]
    shards = [torch.empty_like(local) for _ in range(ctx.tp)]
    dist.all_gather(shards, local.contiguous(), group=ctx.tp_group)
    return torch.cat(shards, dim=-1).cpu()


def megatron_grads(models, ctx, input_ids, labels, vocab):
    """Backward of the mean token NLL (true vocabulary only) through Megatron's training
    schedule; returns {HF name: grad} on rank 0 (None elsewhere) via iter_hf_weights."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from selm_mcore.mcore.weights import iter_hf_weights

    batch, seq = input_ids.shape
    input_ids, labels = input_ids.to(ctx.device), labels.to(ctx.device)
    positions = torch.arange(seq, device=ctx.device).unsqueeze(0)

    def forward_step(data_iterator, model):
        tokens, targets = next(data_iterator)

        def loss_func(output):
            full = gather_from_tensor_model_parallel_region(output)[..., :vocab]
            logps = torch.log_softmax(full, dim=-1).gather(-1, targets.unsqueeze(-1))
            loss = -logps.mean()
            return loss, {"loss": loss.detach()}

        return model(tokens, positions, None), loss_func

    microbatches = list(zip(input_ids.split(1), labels.split(1)))
    iterators = [iter(microbatches) for _ in models]
    for model in models:
        model.zero_grad(set_to_none=True)
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(models) > 1 else iterators[0],
        model=models if len(models) > 1 else models[0],
        num_microbatches=batch,
        seq_length=seq,
        micro_batch_size=1,
        forward_only=False,
    )
    for model in models:  # export the gradients in HF layout with the weights' own exporter
        for param in model.parameters():
            param.data = param.grad
    grads = {name: grad.cpu() for name, grad in iter_hf_weights(models, ctx)}
    return grads if ctx.rank == 0 else None


def job(
    model: str,
    layout: str,
    *,
    kind: str = "logits",
    bf16: bool = False,
    save_to: str | None = None,
    load_from: str | None = None,
) -> dict:
    """One worker job; ``key`` names its output file. kind: logits | grads."""
    key = f"{model}_{layout}" + ("_bf16" if bf16 else "") + ("_grads" if kind == "grads" else "")
    key += f"_from_{load_from}" if load_from else ""
    return {
        "key": key,
        "model": model,
        "layout": layout,
        "kind": kind,
        "bf16": bf16,
        "save_to": save_to,
        "load_from": load_from,
    }


def _worker(out_dir: str) -> None:
    from launch import emit

    from selm_mcore.mcore.checkpoint import build_model_from_checkpoint, save_model_checkpoint
    from selm_mcore.mcore.model import build_model
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel
    from selm_mcore.mcore.weights import load_hf_weights

    out = Path(out_dir)
    spec = json.loads((out / "jobs.json").read_text())
    for job in spec["jobs"]:
        model_dir = spec["models"][job["model"]]
        tp, pp, vpp = _parse_layout(job["layout"])
        ctx = init_parallel(tp=tp, pp=pp, vpp=vpp)
        if job["load_from"]:
            models, _, _ = build_model_from_checkpoint(out / job["load_from"], ctx)
        else:
            dtype = torch.bfloat16 if job["bf16"] else torch.float32
            models = build_model(
                model_dir,
                ctx,
                init_weights=False,
                params_dtype=dtype,
                recompute=job["kind"] == "grads",
            )
            load_hf_weights(models, model_dir, ctx)
        if job["save_to"]:
            save_model_checkpoint(models, ctx, out / job["save_to"], tokenizer_dir=model_dir)
        input_ids = torch.load(out / f"{job['model']}_input_ids.pt")
        if job["kind"] == "grads":
            labels = torch.load(out / f"{job['model']}_labels.pt")
            result = megatron_grads(models, ctx, input_ids, labels, models[0].true_vocab_size)
            mine = ctx.rank == 0
        else:
            result = megatron_logits(models, ctx, input_ids)
            mine = result is not None and ctx.tp_rank == 0 and ctx.dp_rank == 0
        if mine:
            torch.save(result, out / f"{job['key']}.pt")
            emit({"job": job["key"], "rank": ctx.rank})
        del models
    destroy_parallel()


def _parse_layout(layout: str):
    """'2x2' -> (2, 2, None); '1x2v2' -> (1, 2, 2)."""
    tp, rest = layout.split("x")
    pp, _, vpp = rest.partition("v")
    return int(tp), int(pp), int(vpp) if vpp else None


def _hf_grads(hf, input_ids, labels) -> dict[str, torch.Tensor]:
    """HF gradients of the same loss as megatron_grads: mean token NLL."""
    hf.zero_grad(set_to_none=True)
    logps = torch.log_softmax(hf(input_ids).logits, dim=-1).gather(-1, labels.unsqueeze(-1))
    (-logps.mean()).backward()
    return {name: p.grad.clone() for name, p in hf.named_parameters()}


def run_parity(
    models: dict[str, Path],
    jobs: list[dict],
    out_dir: Path,
    nprocs: int,
    timeout_s: float,
    batch: int = 2,
    cuda: bool = False,
) -> dict[str, float]:
    """Run the jobs in one launch of nprocs ranks and compare each with HF; returns the diffs.

    fp32 logits: max abs diff <= TOL. bf16 logits: error against HF fp32 within 2x the error of
    HF's own bf16 model (layout mistakes give errors of the size of the logits). Gradients: max
    abs diff <= GRAD_RTOL x the largest gradient.
    """
    from launch import results, run_distributed
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    logits_ref, grads_ref, bf16_error = {}, {}, {}
    for name, model_dir in models.items():
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, hf.config.vocab_size, (batch, SEQ), generator=gen)
        torch.save(input_ids, out_dir / f"{name}_input_ids.pt")
        with torch.no_grad():
            logits_ref[name] = hf(input_ids).logits
        # Not trivially small: parity then means the weights were split and re-joined right.
        assert logits_ref[name].abs().max() > 100 * TOL
        if any(j["model"] == name and j["kind"] == "grads" for j in jobs):
            labels = torch.randint(0, hf.config.vocab_size, (batch, SEQ), generator=gen)
            torch.save(labels, out_dir / f"{name}_labels.pt")
            grads_ref[name] = _hf_grads(hf, input_ids, labels)
        if any(j["model"] == name and j["bf16"] for j in jobs):
            with torch.no_grad():
                hf_bf16 = hf.to(torch.bfloat16)(input_ids).logits.float()
            bf16_error[name] = (hf_bf16 - logits_ref[name]).abs().max().item()
        del hf
    (out_dir / "jobs.json").write_text(
        json.dumps({"models": {k: str(v) for k, v in models.items()}, "jobs": jobs})
    )
    outs = run_distributed(
        Path(__file__).resolve(), nprocs, ["--worker", out_dir], timeout_s=timeout_s, cuda=cuda
    )
    assert sorted(r["job"] for rank in results(outs) for r in rank) == sorted(
        j["key"] for j in jobs
    )

    diffs, bad = {}, []
    for j in jobs:
        result = torch.load(out_dir / f"{j['key']}.pt")
        name = j["model"]
        if j["kind"] == "grads":
            reference = grads_ref[name]
            assert sorted(result) == sorted(reference)
            diff = max((result[k] - reference[k]).abs().max().item() for k in reference)
            scale = max(reference[k].abs().max().item() for k in reference)
            limit = GRAD_RTOL * scale
        else:
            reference = logits_ref[name]
            vocab = reference.shape[-1]
            assert result.shape[:2] == reference.shape[:2] and result.shape[-1] >= vocab
            assert result.dtype == (torch.bfloat16 if j["bf16"] else torch.float32)
            diff = (result[..., :vocab].float() - reference).abs().max().item()
            limit = 2 * bf16_error[name] if j["bf16"] else TOL
        diffs[j["key"]] = diff
        if not diff <= limit:
            bad.append(f"{j['key']}: {diff:.3g} > {limit:.3g}")
    print(
        "max abs diff vs HF:",
        {k: f"{v:.2e}" for k, v in diffs.items()},
        "| HF bf16 vs HF fp32:",
        {k: f"{v:.2e}" for k, v in bf16_error.items()},
    )
    assert not bad, "parity broken: " + "; ".join(bad)
    return diffs


@pytest.mark.timeout(480)
def test_tiny_llama_parity_tp_pp_vpp(tmp_path):
    from selm_mcore.testing.assets import build_tiny_llama

    build_tiny_llama(
        tmp_path / "untied",
        rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        seed=3,
    )
    build_tiny_llama(tmp_path / "tied", tie_word_embeddings=True, seed=4)
    jobs = [job("untied", layout) for layout in ("1x1", "2x1", "1x2", "2x2")]
    jobs += [
        job("untied", "1x2v2", save_to="ckpt_vpp"),
        job("untied", "2x1", load_from="ckpt_vpp"),
        job("untied", "2x2", kind="grads"),
        job("untied", "1x2v2", kind="grads"),
        job("untied", "2x2", bf16=True),
        job("tied", "1x2"),
        job("tied", "2x2"),
    ]
    run_parity(
        {"untied": tmp_path / "untied", "tied": tmp_path / "tied"},
        jobs,
        tmp_path / "out",
        nprocs=4,
        timeout_s=420,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_parity_tp1_tp3(tmp_path):
    """SmolLM2-135M-Instruct (tied) at TP1 and TP3: its 9 heads / 3 query groups admit
    tp in {1, 3}; TP2 is refused by validate_layout (see test_model_config)."""
    from selm_mcore.testing.assets import smollm2_dir

    run_parity(
        {"smollm2": smollm2_dir()},
        [job("smollm2", "1x1"), job("smollm2", "3x1")],
        tmp_path / "out",
        nprocs=3,
        timeout_s=540,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(600)
def test_gpu_te_spec_parity(tmp_path):
    """On a GPU: the model (Transformer Engine layer spec when TE imports) in bf16 is as close
    to HF fp32 as HF's own bf16 model. Skipped without CUDA."""
    from selm_mcore.testing.assets import build_tiny_llama

    build_tiny_llama(
        tmp_path / "untied",
        rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        seed=3,
    )
    run_parity(
        {"untied": tmp_path / "untied"},
        [job("untied", "1x1", bf16=True)],
        tmp_path / "out",
        nprocs=1,
        timeout_s=540,
        cuda=True,
    )


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
