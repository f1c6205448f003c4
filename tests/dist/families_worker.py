"""Worker of test_families.py: every supported non-Llama family in turn, on the 4 ranks of one
launch (Megatron's groups are re-initialised per layout; the processes and the gloo group are
kept, so the ~10 s start of a Megatron process is paid once).

    python tests/dist/families_worker.py OUT

OUT/jobs.json: {"families": {name: HF folder}, "pairs": JSONL, "config": YAML}. Per family, with
outputs under OUT/<name>/:

1. HF -> Megatron at TP2xPP2 (each rank reads only its slices; what ``selm convert
   hf-to-mcore`` runs on each rank), saved as a checkpoint (``mcore/``), then loaded at TP2xPP2
   and at PP2xVPP2 (TP1, DP2) and exported to HF folders (``export_2x2/``, ``export_1x2v2/``).
2. The reference pass from the HF folder at TP1 (DP4) and TP2 (DP2), packing none and
   shared_prompt: per example the summed response log-probs of chosen, rejected and y_ref.
3. Two SELM training steps (the trainer's own build_training / train_step, reference on the
   fly) at TP1 (DP4) and TP2 (DP2): loss and gradient norm per step.

Rank 0 emits one record per family: {"family", "refpass": {layout: {packing: [[c, r, y], ...]}},
"train": {layout: [{"loss", "grad_norm", "loss/preference"}, ...]}}.
"""

import json
import sys
from pathlib import Path

from launch import emit

TRAIN_STEPS = 2
LAYOUTS = {"1x1": (1, 1, None), "2x1": (2, 1, None), "2x2": (2, 2, None), "1x2v2": (1, 2, 2)}


def convert_and_export(hf_dir: str, out: Path) -> None:
    from selm_mcore.mcore.checkpoint import build_model_from_checkpoint, save_model_checkpoint
    from selm_mcore.mcore.model import build_model
    from selm_mcore.mcore.parallel import init_parallel
    from selm_mcore.mcore.weights import export_hf, load_hf_weights

    ctx = init_parallel(tp=2, pp=2)
    models = build_model(hf_dir, ctx, init_weights=False)
    load_hf_weights(models, hf_dir, ctx)
    save_model_checkpoint(models, ctx, out / "mcore", tokenizer_dir=hf_dir)
    del models
    for layout in ("2x2", "1x2v2"):
        tp, pp, vpp = LAYOUTS[layout]
        ctx = init_parallel(tp=tp, pp=pp, vpp=vpp)
        models, _, _ = build_model_from_checkpoint(out / "mcore", ctx)
        export_hf(models, ctx, out / f"export_{layout}", aux_dir=out / "mcore" / "hf")
        del models


def reference_logps(hf_dir: str, dataset, ctx) -> dict[str, list]:
    from selm_mcore.config.schema import ModelConfig
    from selm_mcore.data.packing import auto_budget
    from selm_mcore.mcore.checkpoint import load_frozen_policy
    from selm_mcore.train.refpass import compute_reference_logps

    out = {}
    for packing in ("none", "shared_prompt"):
        packed = packing != "none"
        models = load_frozen_policy(hf_dir, ctx, ModelConfig(hf_dir=hf_dir), packed=packed)
        logps = compute_reference_logps(
            models,
            ctx,
            dataset,
            pad_id=0,
            micro_batch_size=2,
            pad_to_multiple_of=8,
            pack_tokens=auto_budget(dataset.examples, True, 8) if packed else 0,
            shared_prompt=packed,
            progress=False,
        )
        out[packing] = [
            [float(logps.chosen[i]), float(logps.rejected[i]), float(logps.yref[i])]
            for i in range(len(dataset))
        ]
        del models
    return out


def train_steps(config: str, hf_dir: str, out: Path, layout: str) -> list[dict]:
    from selm_mcore.config.io import load_config
    from selm_mcore.mcore.parallel import init_parallel
    from selm_mcore.train.build import build_training, load_round_data
    from selm_mcore.train.step import train_step

    tp, pp, vpp = LAYOUTS[layout]
    overrides = [
        f"model.hf_dir={hf_dir}",
        f"train.output_dir={out / ('train_' + layout)}",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
    ]
    cfg = load_config(config, overrides)
    data = load_round_data(cfg)
    ctx = init_parallel(tp=tp, pp=pp, vpp=vpp, seed=cfg.parallel.seed)
    run = build_training(cfg, ctx, data)
    batches = run.sampler.batches()
    records = []
    for _ in range(TRAIN_STEPS):
        metrics = train_step(run, next(batches))
        records.append({k: metrics[k] for k in ("loss", "grad_norm", "loss/preference")})
    return records


def main() -> None:
    from selm_mcore.config.schema import ModelConfig
    from selm_mcore.data.tokenize import PreferenceDataset, load_tokenizer
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel

    out_dir = Path(sys.argv[1])
    spec = json.loads((out_dir / "jobs.json").read_text())
    for name, hf_dir in spec["families"].items():
        out = out_dir / name
        convert_and_export(hf_dir, out)
        tokenizer = load_tokenizer(ModelConfig(hf_dir=hf_dir), hf_dir)
        dataset = PreferenceDataset.from_file(
            spec["pairs"], tokenizer, max_length=96, max_prompt_length=48
        )
        record = {"family": name, "refpass": {}, "train": {}}
        for layout in ("1x1", "2x1"):
            ctx = init_parallel(tp=LAYOUTS[layout][0], pp=1)
            record["refpass"][layout] = reference_logps(hf_dir, dataset, ctx)
            record["train"][layout] = train_steps(spec["config"], hf_dir, out, layout)
        if ctx.rank == 0:
            emit(record)
    destroy_parallel()


if __name__ == "__main__":
    main()
