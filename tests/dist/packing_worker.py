"""Worker of test_packing.py: the reference log-probs of a tiny Llama under every packing, at
each of several parallel layouts in turn (run on every rank by ``run_distributed``; Megatron's
groups are re-initialised per layout, the processes and the gloo group are kept).

    python tests/dist/packing_worker.py MODEL_DIR PAIRS.jsonl PACK_TOKENS TPxPP[vVPP]...

For each layout (e.g. ``1x1``, ``2x1``, ``1x2v2``, ``2x2``; the ranks left over form data-parallel
replicas) rank 0 emits {"layout": ..., "logps": {"none": [[c, r, y], ...], "pack": ...,
"shared_prompt": ...} (per example), "micro_batches": ...} (the micro-batches each packing used).
"""

import sys

from launch import emit


def _parse_layout(layout: str) -> tuple[int, int, int | None]:
    """'2x2' -> (2, 2, None); '1x2v2' -> (1, 2, 2)."""
    tp, rest = layout.split("x")
    pp, _, vpp = rest.partition("v")
    return int(tp), int(pp), int(vpp) if vpp else None


def _layout_logps(model_dir: str, dataset, ctx, pack_tokens: int) -> tuple[dict, dict]:
    from selm_mcore.config.schema import ModelConfig
    from selm_mcore.mcore.checkpoint import load_frozen_policy
    from selm_mcore.mcore.forward import pack_micro_batches
    from selm_mcore.train.refpass import compute_reference_logps

    model_cfg = ModelConfig(hf_dir=model_dir)
    out, micro_batches = {}, {}
    for packed in (False, True):
        models = load_frozen_policy(model_dir, ctx, model_cfg, packed=packed)
        for packing in ("pack", "shared_prompt") if packed else ("none",):
            budget = pack_tokens if packed else 0
            logps = compute_reference_logps(
                models,
                ctx,
                dataset,
                pad_id=0,
                micro_batch_size=2,
                pad_to_multiple_of=8,
                seq_length=128 if ctx.pp > 1 else None,
                pack_tokens=budget,
                shared_prompt=packing == "shared_prompt",
                progress=False,
            )
            out[packing] = logps_rows = [
                [float(logps.chosen[i]), float(logps.rejected[i]), float(logps.yref[i])]
                for i in range(len(dataset))
            ]
            assert len(logps_rows) == len(dataset)
            if packed:
                micro_batches[packing] = len(
                    pack_micro_batches(
                        dataset,
                        range(len(dataset)),
                        budget=budget,
                        shared_prompt=packing == "shared_prompt",
                        pad_id=0,
                        pad_to_multiple_of=8,
                        fixed_length=True,
                    )
                )
        del models
    return out, micro_batches


def main() -> None:
    from selm_mcore.config.schema import ModelConfig
    from selm_mcore.data.tokenize import PreferenceDataset, load_tokenizer
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel

    model_dir, pairs, pack_tokens, *layouts = sys.argv[1:]
    tokenizer = load_tokenizer(ModelConfig(hf_dir=model_dir), model_dir)
    dataset = PreferenceDataset.from_file(pairs, tokenizer, max_length=96, max_prompt_length=48)
    for layout in layouts:
        tp, pp, vpp = _parse_layout(layout)
        ctx = init_parallel(tp=tp, pp=pp, vpp=vpp)
        logps, micro_batches = _layout_logps(model_dir, dataset, ctx, int(pack_tokens))
        if ctx.rank == 0:
            emit({"layout": layout, "dp": ctx.dp, "logps": logps, "micro_batches": micro_batches})
    destroy_parallel()


if __name__ == "__main__":
    main()
