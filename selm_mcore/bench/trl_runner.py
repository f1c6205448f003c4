"""The TRL peer of ``selm bench compare-trl``: trains TRL's DPOTrainer and prints step-time JSON.

Runs inside TRL's own environment (built by setup_trl_env.sh beside this file), never inside
ours, so it imports nothing from selm_mcore; ``selm bench compare-trl`` starts it by its path,
with -P so that the modules beside it do not shadow top-level names:

    <trl-venv>/bin/python -P selm_mcore/bench/trl_runner.py --model-dir M --pairs pairs.jsonl \
        --micro-batch-size 2 --global-batch-size 4 --max-length 512 --steps 4 --warmup-steps 1 \
        --threads 2 --ref-mode onthefly --out result.json

What it measures, chosen to match our trainer's benchmark (selm_mcore/bench/train.py) exactly:
* the same HF Llama folder in fp32 (``bf16=False``, no autocast), no gradient checkpointing,
  AdamW (torch), grad-norm clipping 1.0, dropout off, sigmoid DPO loss, the same beta and lr;
* the SAME token ids: rows of ``--pairs`` carry ``prompt_ids`` / ``chosen_ids`` /
  ``rejected_ids`` made by our data pipeline, and TRL's own text tokenisation is bypassed
  (``_prepare_dataset`` returns the ids as they are) so both sides train on identical sequences.
  Rows without ids are tokenised by TRL from ``prompt`` / ``chosen`` / ``rejected`` as usual;
* ``--ref-mode onthefly``: a frozen reference model copy, one extra no-grad forward per step;
  ``--ref-mode precompute``: ``precompute_ref_log_probs=True`` (reference pass once, in the
  trainer's constructor, timed separately as ``ref_precompute_s``);
* step time = wall time between consecutive optimizer-step ends (data collation, forwards,
  backward, clipping and the AdamW update included); the first ``--warmup-steps`` are dropped;
* tokens = non-pad tokens fed to the policy (prompt+chosen and prompt+rejected of every pair);
* peak memory = the process's peak resident set (ru_maxrss) after training; also the RSS
  after imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="HF Llama folder (config, weights, tokens)")
    p.add_argument("--pairs", required=True, help="JSONL of preference pairs (see module doc)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per forward")
    p.add_argument("--global-batch-size", type=int, default=1, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=1024, help="max tokens of prompt+response")
    p.add_argument("--steps", type=int, default=4, help="measured optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps not measured")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--ref-mode", choices=("onthefly", "precompute"), default="onthefly")
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="", help="also write the JSON result here")
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.warmup_steps < 1:
        raise SystemExit("--warmup-steps must be >= 1: the first step's start is the warm-up's end")
    if args.global_batch_size % args.micro_batch_size:
        raise SystemExit(
            f"--global-batch-size={args.global_batch_size} must be a multiple of "
            f"--micro-batch-size={args.micro_batch_size}"
        )


def load_pairs(args, total_steps: int):
    """(the pairs as a datasets.Dataset, whether they carry our token ids)."""
    from datasets import Dataset

    with open(args.pairs) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pretokenized = all("prompt_ids" in r for r in rows)
    keys = (
        ("prompt_ids", "chosen_ids", "rejected_ids")
        if pretokenized
        else ("prompt", "chosen", "rejected")
    )
    dataset = Dataset.from_list([{k: r[k] for k in keys} for r in rows])
    if len(rows) < total_steps * args.global_batch_size:
        raise SystemExit(
            f"{args.pairs}: {len(rows)} pairs < (warmup {args.warmup_steps} + steps "
            f"{args.steps}) x global batch {args.global_batch_size}; write more pairs"
        )
    return dataset, pretokenized


def dpo_config(args, total_steps: int):
    """TRL's settings matched to our trainer's benchmark (module docstring)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=os.path.join(
            os.path.dirname(os.path.abspath(args.out or args.pairs)), "trl_out"
        ),
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.global_batch_size // args.micro_batch_size,
        max_steps=total_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        precompute_ref_log_probs=args.ref_mode == "precompute",
        precompute_ref_batch_size=args.micro_batch_size,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def counting_trainer(pretokenized: bool):
    """(a DPOTrainer class that counts the tokens it trains on, a callback that records the
    time and those counts at each optimizer step's end in its ``ends``)."""
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on our token ids as they are (TRL's collator, loss and step unchanged)."""

        tokens_seen = 0
        padded_tokens_seen = 0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if pretokenized:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def training_step(self, *a, **kw):
            inputs = a[1] if len(a) > 1 else kw["inputs"]
            self.tokens_seen += int(inputs["attention_mask"].sum())
            self.padded_tokens_seen += int(inputs["input_ids"].numel())
            return super().training_step(*a, **kw)

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            # (time, tokens, padded tokens) at each optimizer step's end
            self.ends: list[tuple[float, int, int]] = []
            self.trainer: PretokenizedDPOTrainer | None = None

        def on_step_end(self, _args, state, control, **kw):
            trainer = self.trainer
            assert trainer is not None
            self.ends.append((time.perf_counter(), trainer.tokens_seen, trainer.padded_tokens_seen))

    return PretokenizedDPOTrainer, StepClock()


def step_deltas(ends, warmup_steps: int) -> tuple[list[float], list[int], list[int]]:
    """(seconds, tokens, padded tokens) of each optimizer step after the warm-up."""
    step_times, tokens, padded = [], [], []
    for (t_prev, n_prev, p_prev), (t, n, p) in zip(
        ends[warmup_steps - 1 : -1], ends[warmup_steps:]
    ):
        step_times.append(t - t_prev)
        tokens.append(n - n_prev)
        padded.append(p - p_prev)
    return step_times, tokens, padded


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    # Thread count before torch starts its pools (same rule as our side).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    rss_after_imports_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total_steps = args.warmup_steps + args.steps
    dataset, pretokenized = load_pairs(args, total_steps)
    config = dpo_config(args, total_steps)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ref_model = None
    if args.ref_mode == "onthefly":
        ref_model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    trainer_class, clock = counting_trainer(pretokenized)
    t0 = time.perf_counter()
    trainer = clock.trainer = trainer_class(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    init_s = time.perf_counter() - t0
    trainer.train()

    if len(clock.ends) != total_steps:
        raise SystemExit(
            f"expected {total_steps} optimizer steps, the trainer made {len(clock.ends)}"
        )
    step_times, tokens, padded = step_deltas(clock.ends, args.warmup_steps)
    result = {
        "impl": f"trl-{args.ref_mode}",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "step_time_s": statistics.median(step_times),
        "step_times_s": step_times,
        "tokens_per_step": statistics.mean(tokens),
        "padded_tokens_per_step": statistics.mean(padded),
        "tokens_per_s": sum(tokens) / sum(step_times),
        "ref_precompute_s": init_s if args.ref_mode == "precompute" else None,
        "init_s": init_s,
        "rss_after_imports_mb": rss_after_imports_mb,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
