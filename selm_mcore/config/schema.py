"""One typed, validated config tree for every selm command.

A config is a YAML file whose top-level sections mirror the dataclasses below
(``selm_mcore.config.io`` reads it, applies ``--set section.key=value`` overrides and checks
types). Inconsistent values are refused at load time with the key, the rule and a fix.

``validate()`` of a section checks only that section; ``SelmConfig.validate(world_size)`` checks
the rules that span sections (and, given the number of processes, the parallel layout).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selm_mcore.runtime.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-fixable problem in a config file or override."""


# model.recompute (selm_mcore.mcore.model maps each to Megatron's settings).
RECOMPUTE_CHOICES = ("none", "selective", "full")


@dataclass
class ModelConfig:
    # HF folder of the starting policy (round 1's generator, policy and reference).
    hf_dir: str = ""
    # Parameter dtype: "fp32" (CPU default, exact parity tests) or "bf16" (GPU).
    dtype: str = "fp32"
    # Activation recompute, trading compute for memory: "none" (keep every activation),
    # "selective" (recompute the core attention: its [heads, T, T] scores in the unfused local
    # attention; TE's fused attention keeps none, so little to gain there) or "full" (each layer
    # keeps only its input, ~1/3 more compute). true/false are read as full/none.
    recompute: str | bool = "none"
    # Model/tokenizer loads keep remote code off unless the user opts in.
    trust_remote_code: bool = False
    make_vocab_size_divisible_by: int = 128

    def validate(self) -> None:
        _choice("model.dtype", self.dtype, ("fp32", "bf16"))
        if isinstance(self.recompute, bool):  # the former boolean: true meant full recompute
            self.recompute = "full" if self.recompute else "none"
        _choice("model.recompute", self.recompute, RECOMPUTE_CHOICES)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B.
    vpp: int | None = None
    seed: int = 1234
    # Sequence parallelism (each tensor-parallel rank keeps 1/tp of the sequence between the
    # layers: activations / tp): "auto" = on with tp > 1 on a GPU, "true" (needs tp > 1; also
    # runs on CPU/gloo), "false".
    sequence_parallel: str | bool = "auto"
    # Where the Megatron phases, generation and ranking run: "cuda" (a GPU is required),
    # "cpu", or "auto" (cuda when an NVIDIA device is visible). Expecting CUDA that torch cannot
    # use stops the command with the versions and the fix (selm_mcore.runtime.device).
    device: str = "auto"

    def validate(self) -> None:
        _choice("parallel.device", self.device, ("auto", "cuda", "cpu"))
        for key in ("tp", "pp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ConfigError(
                f"parallel.vpp={self.vpp} needs vpp >= 2 and pp >= 2 (pp={self.pp}); "
                "set parallel.vpp=null for plain 1F1B"
            )
        if isinstance(self.sequence_parallel, bool):
            self.sequence_parallel = "true" if self.sequence_parallel else "false"
        _choice("parallel.sequence_parallel", self.sequence_parallel, ("auto", "true", "false"))
        if self.sequence_parallel == "true" and self.tp < 2:
            raise ConfigError(
                f"parallel.sequence_parallel=true needs parallel.tp > 1 (tp={self.tp}): it "
                "splits each sequence over the tensor-parallel ranks; set it to auto or false"
            )


@dataclass
class DataConfig:
    # Preference rows (UltraFeedback-binarized schema) or prompt-only rows: JSONL or Parquet.
    train_path: str = ""
    # Held-out prompts for the per-round reports.
    eval_prompts_path: str = ""
    max_length: int = 1024
    max_prompt_length: int = 512
    # Skip malformed rows (with a count) instead of stopping at the first one.
    skip_bad_rows: bool = False
    # Collation: pad each micro-batch to a multiple of this many tokens (packed rows and the
    # automatic packing budget too) ...
    pad_to_multiple_of: int = 64
    # ... or, when true, every micro-batch of packing none to max_length rounded up to that
    # multiple (equal shapes: pipeline parallelism needs them; packed rows are then always
    # pack_tokens long).
    pad_to_max_length: bool = False
    # Shuffle the epoch order (seeded by train.seed); false = file order.
    shuffle: bool = True
    # How the sequences of a micro-batch are laid out (selm_mcore.data.packing):
    #   shared_prompt  each pair's prompt once, then its 2-3 responses, pairs packed into rows
    #                  of pack_tokens (the fastest: no padding, no repeated prompt, LM head on
    #                  response positions only)
    #   pack           every sequence packed into rows of pack_tokens (no padding)
    #   none           one right-padded row per sequence, train.micro_batch_size pairs per
    #                  micro-batch (the plain layout)
    packing: str = "shared_prompt"
    # Tokens per packed micro-batch; 0 = the longest packed pair of the round's data (rounded
    # up to pad_to_multiple_of), so every pair fits and no budget is wasted.
    pack_tokens: int = 0
    # Tokens per packed micro-batch of the forward-only reference pass; 0 = 2 * pack_tokens.
    refpass_pack_tokens: int = 0
    # A row with more text than this (UTF-8 bytes of prompt, messages and responses) is refused
    # (or skipped with skip_bad_rows) before tokenisation; 0 = no limit.
    max_row_bytes: int = 1_000_000

    def validate(self) -> None:
        _choice("data.packing", self.packing, ("shared_prompt", "pack", "none"))
        for key in ("max_length", "max_prompt_length", "pad_to_multiple_of"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 1")
        for key in ("pack_tokens", "refpass_pack_tokens", "max_row_bytes"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 0 (0 = automatic)")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length={self.max_prompt_length} must be < "
                f"data.max_length={self.max_length}"
            )

    def seq_length(self) -> int | None:
        """Fixed padded length T of every micro-batch, or None (pad each to the multiple)."""
        if not self.pad_to_max_length:
            return None
        multiple = self.pad_to_multiple_of
        return -(-self.max_length // multiple) * multiple


@dataclass
class LossConfig:
    beta: float = 0.01
    # The optimism weight as the paper and reference code expose it: the loss adds
    # alpha * beta * (logp_pi(y_ref) - logp_ref(y_ref)). alpha = 0 is iterative DPO.
    alpha: float = 1e-4
    # "sigmoid" (DPO; what SELM uses) or "ipo" (TRL's IPO on token-averaged log-probs).
    loss_type: str = "sigmoid"
    # Optional SFT (NLL) term on the chosen response, per token:
    # sft_weight * (-logp_pi(y_w) / |y_w|).
    sft_weight: float = 0.0

    def validate(self) -> None:
        check_numbers("loss", self)
        _choice("loss.loss_type", self.loss_type, ("sigmoid", "ipo"))


@dataclass
class OptimConfig:
    lr: float = 5e-7
    # Learning rate of round t (1-based) = lr_per_round[t-1] when given, else lr.
    lr_per_round: list[float] = field(default_factory=list)
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    clip_grad: float = 1.0

    def validate(self) -> None:
        check_numbers("optim", self)
        _choice("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        peaks = self.lr_per_round or [self.lr]
        if self.min_lr > min(peaks):
            where = (
                "optim.lr"
                if not self.lr_per_round
                else "every optim.lr_per_round entry, the smallest"
            )
            raise ConfigError(
                f"optim.min_lr={self.min_lr} must be <= {where}={min(peaks)} (the "
                "peak learning rate); lower optim.min_lr"
            )

    def lr_for_round(self, round_index: int) -> float:
        """Peak learning rate of 1-based round ``round_index``."""
        if round_index < 1:
            raise ValueError(f"round_index={round_index} must be >= 1 (rounds are 1-based)")
        if self.lr_per_round:
            return self.lr_per_round[min(round_index, len(self.lr_per_round)) - 1]
        return self.lr


@dataclass
class TrainConfig:
    global_batch_size: int = 128
    micro_batch_size: int = 1
    epochs: int = 1
    # Stop after this many optimizer steps (0 = the full epoch); for smoke runs and benchmarks.
    max_steps: int = 0
    seed: int = 1234
    save_interval: int = 0
    log_interval: int = 1
    output_dir: str = "outputs/train"
    tensorboard: bool = True
    # The round's starting policy and frozen reference: a Megatron checkpoint folder (the format
    # of docs/architecture.md) or an HF folder; empty = model.hf_dir.
    init_from: str = ""
    # 1-based position in the learning-rate schedule: picks optim.lr_per_round[round_index - 1]
    # when that list is set (the online loop sets it: round t, or t + 1 after a DPO warm-up).
    round_index: int = 1
    # "precomputed": reference log-probs from train.ref_cache (written by `selm refpass`);
    # "onthefly": a frozen copy of the reference computes them every step (as the reference code).
    reference_mode: str = "precomputed"
    # Reference log-prob cache (safetensors); empty = <output_dir>/ref_logps.safetensors.
    ref_cache: str = ""
    # Micro-batch size of the forward-only reference pass; 0 = train.micro_batch_size.
    refpass_micro_batch_size: int = 0
    # Continue from <output_dir>/checkpoints/latest when it exists.
    resume: bool = True
    # Step checkpoints to keep (the newest); 0 = keep all.
    keep_checkpoints: int = 2
    # Optimizer state format of the step checkpoints. false: in-round checkpoints are saved
    # dp-reshardable (each rank writes its own shard, no gather; resumable at the same tp/pp/vpp,
    # any dp) and the round's last one fully reshardable; true: every checkpoint fully
    # reshardable (resumable at any layout; gathers each replica's optimizer state on its
    # DP rank 0's host at every save).
    reshardable_checkpoints: bool = False
    # Host memory (GiB per node) a fully reshardable save may gather the optimizer state into;
    # 0 = what the node has available when the round starts. Checked before the round trains:
    # too little saves the last checkpoint dp-reshardable (selm_mcore.plan.host_memory).
    host_memory_gb: float = 0.0

    def ref_cache_path(self) -> Path:
        """train.ref_cache, else <train.output_dir>/ref_logps.safetensors."""
        return Path(self.ref_cache or Path(self.output_dir) / "ref_logps.safetensors")

    def validate(self) -> None:
        check_numbers("train", self)
        for key in (
            "global_batch_size",
            "micro_batch_size",
            "epochs",
            "round_index",
            "log_interval",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        for key in ("max_steps", "save_interval", "refpass_micro_batch_size", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 0")
        _choice("train.reference_mode", self.reference_mode, ("precomputed", "onthefly"))
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class GenerationConfig:
    # Reference defaults: greedy, one sample, up to 1024 new tokens, stop at EOS.
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    max_tokens: int = 1024
    seed: int = 0
    tensor_parallel_size: int = 1
    # Independent vLLM engines, each on its own slice of the prompts (data parallel).
    num_engines: int = 1
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.85
    dtype: str = "auto"
    # KV cache size in GiB (0 = vLLM's default: gpu_memory_utilization on GPU,
    # VLLM_CPU_KVCACHE_SPACE or its automatic size on CPU).
    kv_cache_memory_gb: float = 0.0
    # Skip torch.compile / CUDA graphs. None = eager on CPU (compiling costs 20-170 s at engine
    # start there and generated no faster on SmolLM2-135M, measured), compiled on GPU.
    enforce_eager: bool | None = None
    # Stop a data-parallel engine process after this many seconds (0 = no limit).
    engine_timeout_s: int = 0
    # Timeout of an in-place weight update through vLLM's collective_rpc (a bad call hangs).
    reload_timeout_s: float = 600.0

    def validate(self) -> None:
        check_numbers("generation", self)
        if self.n < 1 or self.max_tokens < 1:
            raise ConfigError("generation.n and generation.max_tokens must be >= 1")
        if self.n > 1 and self.temperature == 0:
            raise ConfigError(
                f"generation.n={self.n} with temperature=0 gives {self.n} identical greedy "
                "responses; set generation.temperature > 0 (e.g. 0.7) or generation.n=1"
            )
        for key in ("tensor_parallel_size", "num_engines", "max_model_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"generation.{key}={getattr(self, key)} must be >= 1")
        if self.max_tokens >= self.max_model_len:
            raise ConfigError(
                f"generation.max_tokens={self.max_tokens} must be < generation.max_model_len="
                f"{self.max_model_len} (prompt + response must fit); raise max_model_len"
            )
        _choice("generation.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.engine_timeout_s < 0:
            raise ConfigError(f"generation.engine_timeout_s={self.engine_timeout_s} must be >= 0")


@dataclass
class RankingConfig:
    # "pairrm" (llm-blender), "reward_model" (HF sequence classification), "verifiable"
    kind: str = "pairrm"
    model_path: str = "llm-blender/PairRM"
    # Backbone folder/name for PairRM (microsoft/deberta-v3-large by default).
    backbone: str = ""
    # "auto" = cuda when a GPU is visible, else cpu; or "cpu", "cuda", "cuda:N".
    device: str = "auto"
    batch_size: int = 8
    # reward_model: tokens kept per prompt + response (the end is kept).
    max_length: int = 2048
    # verifiable: the row field holding the checkable answer.
    answer_key: str = "answer"
    # Ranker processes per node, each on its own GPU (or share of the CPU cores), each ranking a
    # contiguous slice of whole batches; 0 = one per visible GPU when the ranker runs on CUDA
    # (ranking.device auto or cuda), else 1 (selm_mcore.rollout.rank_workers).
    num_workers: int = 0

    def validate(self) -> None:
        _choice("ranking.kind", self.kind, ("pairrm", "reward_model", "verifiable"))
        if self.num_workers < 0:
            raise ConfigError(
                f"ranking.num_workers={self.num_workers} must be >= 0 (0 = one per GPU)"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"ranking.device={self.device!r} must be auto, cpu, cuda or cuda:N")
        if self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("ranking.batch_size and ranking.max_length must be >= 1")
        if self.kind != "verifiable" and not self.model_path:
            raise ConfigError(f"ranking.kind={self.kind} needs ranking.model_path")


@dataclass
class OnlineConfig:
    # SELM rounds (each: generate, rank, reference pass, train).
    rounds: int = 3
    # The Zephyr recipe: one offline DPO round (round 0, alpha = 0) on the original
    # chosen/rejected pairs of the first portion before the SELM rounds; the data is then split
    # into rounds + 1 portions and optim.lr_per_round lists round 0's learning rate first.
    warmup_dpo_round: bool = False
    workdir: str = "outputs/selm"
    # Prompts per round for the demo / smoke runs (0 = the full portion).
    max_prompts_per_round: int = 0
    # Held-out prompts scored each round for the reports (0 = all of data.eval_prompts_path).
    max_eval_prompts: int = 0
    # After the last round, export the final policy and score it on the held-out prompts.
    final_eval: bool = True
    # Processes for the Megatron phases (refpass, train): torchrun when nproc_per_node * nnodes > 1.
    nproc_per_node: int = 1
    nnodes: int = 1
    # Multi-node: a command prefix that starts one torchrun per node (e.g. "srun --nodes=8
    # --ntasks-per-node=1"), and the c10d rendezvous host:port every node reaches.
    launcher: str = ""
    rdzv_endpoint: str = ""
    rdzv_id: str = "selm"
    # Stop a phase's subprocess after this many seconds (0 = no limit).
    phase_timeout_s: int = 0
    # Files above this size are hashed by size + three 1 MiB windows (weights, optimizer shards).
    full_hash_max_mb: int = 64
    # Local processes the policy export (Megatron -> HF for vLLM) is spread over; each holds
    # about 1/export_tp of the model in CPU memory.
    export_tp: int = 1

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"online.rounds={self.rounds} must be >= 1")
        for key in ("nproc_per_node", "nnodes", "export_tp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"online.{key}={getattr(self, key)} must be >= 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(
                f"online.nnodes={self.nnodes} needs online.rdzv_endpoint=HOST:PORT (the first "
                "node's address), e.g. --set online.rdzv_endpoint=$MASTER_ADDR:29500"
            )
        for key in ("max_prompts_per_round", "max_eval_prompts", "phase_timeout_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"online.{key}={getattr(self, key)} must be >= 0 (0 = no limit)")


@dataclass
class SelmConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def validate(self, world_size: int | None = None) -> SelmConfig:
        """Every section's rules, then the cross-section ones; with ``world_size`` (processes of
        the Megatron phases) also the data-parallel split of the batch."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if world_size is not None:
            model_parallel = self.parallel.tp * self.parallel.pp
            if world_size % model_parallel:
                raise ConfigError(
                    f"{world_size} processes must be a multiple of parallel.tp * parallel.pp = "
                    f"{model_parallel}; change online.nproc_per_node / online.nnodes or the "
                    "layout"
                )
            dp = world_size // model_parallel
            # Packed micro-batches hold as many pairs as fit: only none splits by micro_batch_size.
            micro = self.train.micro_batch_size if self.data.packing == "none" else 1
            if self.train.global_batch_size % (dp * micro):
                raise ConfigError(
                    f"train.global_batch_size={self.train.global_batch_size} must be a multiple "
                    f"of the data-parallel size {dp} (= {world_size} processes / tp*pp "
                    f"{model_parallel})"
                    + (f" times train.micro_batch_size={micro}" if micro > 1 else "")
                )
        return self

    def start_model(self) -> Path:
        """The round's starting policy and frozen reference: train.init_from, else model.hf_dir
        (a Megatron checkpoint folder or an HF folder)."""
        source = self.train.init_from or self.model.hf_dir
        if not source:
            raise ConfigError(
                "no model to start from: set train.init_from (a Megatron "
                "checkpoint or HF folder) or model.hf_dir"
            )
        if not Path(source).is_dir():
            raise ConfigError(f"train.init_from / model.hf_dir = {source} is not a folder")
        return Path(source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The range of each float value (every float value must also be finite: NaN passes every
# comparison and inf trains to an all-NaN model). Keys without a rule need only be finite. A
# section with float fields calls check_numbers first in its validate().
NUMBER_RULES = {
    "loss.beta": "> 0",
    "loss.alpha": ">= 0",
    "loss.sft_weight": ">= 0",
    "optim.lr": ">= 0",
    "optim.lr_per_round": ">= 0",
    "optim.min_lr": ">= 0",
    "optim.weight_decay": ">= 0",
    "optim.adam_beta1": "in [0, 1)",
    "optim.adam_beta2": "in [0, 1)",
    "optim.adam_eps": "> 0",
    "optim.warmup_ratio": "in [0, 1)",
    "optim.clip_grad": ">= 0",
    "train.host_memory_gb": ">= 0",
    "generation.temperature": ">= 0",
    "generation.top_p": "in (0, 1]",
    "generation.gpu_memory_utilization": "in (0, 1]",
    "generation.kv_cache_memory_gb": ">= 0",
    "generation.reload_timeout_s": ">= 0",
}


def _satisfies(value: float, rule: str) -> bool:
    """``value`` within ``rule``: "> x", ">= x" or an interval "in [a, b)" (any brackets)."""
    if rule.startswith("in "):
        low, high = (float(x) for x in rule[4:-1].split(","))
        return ((low <= value) if rule[3] == "[" else (low < value)) and (
            (value <= high) if rule[-1] == "]" else (value < high)
        )
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def check_numbers(section_name: str, section: Any) -> None:
    """Every float value of a section (list entries too) is finite and within its
    ``NUMBER_RULES`` range (each section's ``validate`` calls this first)."""
    for name, annotation in typing.get_type_hints(type(section)).items():
        if "float" not in str(annotation):
            continue
        key, value = f"{section_name}.{name}", getattr(section, name)
        items = (
            [(f"{key}[{i}]", v) for i, v in enumerate(value)]
            if isinstance(value, list)
            else [(key, value)]
        )
        rule = NUMBER_RULES.get(key, "")
        for item_key, item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue  # None of an optional field; types are checked on load
            if not math.isfinite(item) or (rule and not _satisfies(item, rule)):
                raise ConfigError(f"{item_key}={item!r} must be a finite number {rule}".rstrip())


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
