"""Worker of test_packing.py: the reference log-probs of a tiny Llama under every packing, at
one parallel layout (run on every rank by ``run_distributed``).

    python tests/dist/packing_worker.py MODEL_DIR PAIRS.jsonl TP PP VPP|none PACK_TOKENS

Rank 0 emits {"none": [[c, r, y], ...], "pack": ..., "shared_prompt": ...} (per example) and
the number of micro-batches each packing used.
"""
import sys

from launch import emit


def main() -> None:
    from selm_mcore.data.tokenize import PreferenceDataset, load_tokenizer
    from selm_mcore.mcore.checkpoint import load_frozen_policy
    from selm_mcore.mcore.forward import pack_micro_batches
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel
    from selm_mcore.train.refpass import compute_reference_logps
    from selm_mcore.config.schema import ModelConfig

    model_dir, pairs, tp, pp, vpp, pack_tokens = sys.argv[1:]
    vpp = None if vpp == "none" else int(vpp)
    ctx = init_parallel(tp=int(tp), pp=int(pp), vpp=vpp)
    model_cfg = ModelConfig(hf_dir=model_dir)
    tokenizer = load_tokenizer(model_cfg, model_dir)
    dataset = PreferenceDataset.from_file(pairs, tokenizer, max_length=96, max_prompt_length=48)
    out, micro_batches = {}, {}
    for packed in (False, True):
        models = load_frozen_policy(model_dir, ctx, model_cfg, packed=packed)
        for packing in (("pack", "shared_prompt") if packed else ("none",)):
            budget = int(pack_tokens) if packed else 0
            logps = compute_reference_logps(
                models, ctx, dataset, pad_id=0, micro_batch_size=2, pad_to_multiple_of=8,
                seq_length=128 if ctx.pp > 1 else None, pack_tokens=budget,
                shared_prompt=packing == "shared_prompt", progress=False)
            out[packing] = logps_rows = [
                [float(logps.chosen[i]), float(logps.rejected[i]), float(logps.yref[i])]
                for i in range(len(dataset))]
            assert len(logps_rows) == len(dataset)
            if packed:
                micro_batches[packing] = len(pack_micro_batches(
                    dataset, range(len(dataset)), budget=budget,
                    shared_prompt=packing == "shared_prompt", pad_id=0, pad_to_multiple_of=8,
                    fixed_length=True))
    if ctx.rank == 0:
        emit({"logps": out, "micro_batches": micro_batches})
    destroy_parallel()


if __name__ == "__main__":
    main()
