"""Everything that touches Megatron-Core, and the only package that imports ``megatron.core``.

    parallel    torch.distributed + Megatron's TP/PP/VPP/DP groups -> ParallelContext;
                Megatron's checkpoint-writer processes bound to their rank's lifetime
    cpu_compat  the CPU compatibility layer for megatron-core (applied only without CUDA)
    safe_load   dist-checkpoint loading without unpickling arbitrary objects
    families    the supported HF families (llama, mistral, qwen2, phi3): what each changes
    model       GPTModel in the Llama-3 layout from an HF config of a supported family
    gpt         SelmGPTModel: GPTModel plus the packed forward (per-token RoPE, response head)
    attention   PackedAttention: core attention of packed rows (flash-attn varlen / torch SDPA)
    weights     HF <-> Megatron name/layout maps, streaming load and export
    checkpoint  the Megatron checkpoint folder: model saves/loads, step checkpoints
    checksums   per-rank checksum lists of checkpoint folders, verified together at load
    optim       DDP, the distributed optimizer, the LR schedule, the optimizer's saved state
    forward     micro-batches through Megatron's pipeline schedule, sequence log-probs
    convert     HF <-> Megatron conversion (``selm convert``)

The rest of selm_mcore talks to Megatron only through these modules' plain functions.
"""
