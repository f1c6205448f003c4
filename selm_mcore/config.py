"""One typed, validated config tree for every selm command.

A config is a YAML file whose top-level sections mirror the dataclasses below; any key may be
overridden on the command line with ``--set section.key=value`` (the value is parsed as YAML, so
``--set optim.lr=3e-7`` gives a float and ``--set parallel.vpp=null`` gives None). Unknown keys,
wrong types and inconsistent values are refused at load time with the key, the rule and a fix.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["train.global_batch_size=8"])

Each engineer owning a section adds its fields there; ``validate()`` of a section checks only
that section, ``SelmConfig.validate()`` checks rules that span sections.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-fixable problem in a config file or override."""


@dataclass
class ModelConfig:
    # HF folder of the starting policy (round 1's generator, policy and reference).
    hf_dir: str = ""
    # Parameter dtype: "fp32" (CPU default, exact parity tests) or "bf16" (GPU).
    dtype: str = "fp32"
    # Activation recompute (full, per layer) to trade compute for memory.
    recompute: bool = False
    # Model/tokenizer loads keep remote code off unless the user opts in.
    trust_remote_code: bool = False
    make_vocab_size_divisible_by: int = 128

    def validate(self) -> None:
        _choice("model.dtype", self.dtype, ("fp32", "bf16"))


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B); None = plain 1F1B.
    vpp: int | None = None
    seed: int = 1234

    def validate(self) -> None:
        for key in ("tp", "pp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ConfigError(
                f"parallel.vpp={self.vpp} needs vpp >= 2 and pp >= 2 (pp={self.pp}); "
                "set parallel.vpp=null for plain 1F1B")


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

    def validate(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length={self.max_prompt_length} must be < "
                f"data.max_length={self.max_length}")


@dataclass
class LossConfig:
    beta: float = 0.01
    # The optimism weight as the paper and reference code expose it: the loss adds
    # alpha * beta * (logp_pi(y_ref) - logp_ref(y_ref)). alpha = 0 is iterative DPO.
    alpha: float = 1e-4
    loss_type: str = "sigmoid"
    # Optional SFT (NLL) term on the chosen response, per token.
    sft_weight: float = 0.0

    def validate(self) -> None:
        _choice("loss.loss_type", self.loss_type, ("sigmoid", "ipo"))
        if self.beta <= 0:
            raise ConfigError(f"loss.beta={self.beta} must be > 0")
        if self.alpha < 0:
            raise ConfigError(f"loss.alpha={self.alpha} must be >= 0 (0 = iterative DPO)")


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
        _choice("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio={self.warmup_ratio} must be in [0, 1)")

    def lr_for_round(self, round_index: int) -> float:
        """Peak learning rate of 1-based round ``round_index``."""
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

    def validate(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}")


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

    def validate(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ConfigError("generation.n and generation.max_tokens must be >= 1")


@dataclass
class RankingConfig:
    # "pairrm" (llm-blender), "reward_model" (HF sequence classification), "verifiable"
    kind: str = "pairrm"
    model_path: str = "llm-blender/PairRM"
    # Backbone folder/name for PairRM (microsoft/deberta-v3-large by default).
    backbone: str = ""
    device: str = "auto"
    batch_size: int = 8

    def validate(self) -> None:
        _choice("ranking.kind", self.kind, ("pairrm", "reward_model", "verifiable"))


@dataclass
class OnlineConfig:
    rounds: int = 3
    workdir: str = "outputs/selm"
    # Prompts per round for the demo / smoke runs (0 = the full portion).
    max_prompts_per_round: int = 0

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"online.rounds={self.rounds} must be >= 1")


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

    def validate(self) -> SelmConfig:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation (int -> float allowed), naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item,) = typing.get_args(annotation)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "5e-7" (no dot) as a string
        except ValueError:
            pass
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(
            f"{key}={value!r} must be of type {annotation.__name__}, got {type(value).__name__}")
    return value


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> SelmConfig:
    """Build a validated SelmConfig from nested dicts, refusing unknown sections and keys."""
    cfg = SelmConfig()
    hints = typing.get_type_hints(SelmConfig)
    for section_name, section_values in (raw or {}).items():
        if section_name not in hints:
            raise ConfigError(
                f"{source}: unknown section {section_name!r}; known: {', '.join(hints)}")
        if not isinstance(section_values, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping")
        section = getattr(cfg, section_name)
        field_types = typing.get_type_hints(type(section))
        for key, value in section_values.items():
            if key not in field_types:
                raise ConfigError(
                    f"{source}: unknown key {section_name}.{key}; known: {', '.join(field_types)}")
            setattr(section, key, _coerce(f"{section_name}.{key}", value, field_types[key]))
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=3e-7")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = yaml.safe_load(text) if text else ""
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SelmConfig:
    """Read a YAML config (or defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        source = str(path)
    return from_dict(apply_overrides(raw, overrides or []), source)


def save_config(cfg: SelmConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def add_config_arguments(parser) -> None:
    """The arguments every config-driven subcommand takes: CONFIG and repeated --set overrides."""
    parser.add_argument("config", help="YAML config file (see examples/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")


def config_from_args(args) -> SelmConfig:
    return load_config(args.config, args.overrides)
