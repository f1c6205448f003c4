"""Pure model arithmetic of the Llama-layout families selm-mcore trains: dimensions, parameter
count, FLOPs, padded vocabulary. Plain Python (no torch, no Megatron), read by the planner, the
benchmarks, the pre-flight size checks and the trainer's MFU.

    shape = ModelShape.from_dir(hf_dir)        # or .from_hf_config(config object or dict)
    shape.num_params()                         # every parameter, a tied embedding counted once
    forward_flops(shape, [512, 300])           # one forward over two sequences
    padded_vocab_size(128256, tp=2)            # 128512: Megatron's padded vocabulary

Parameters (``num_params``), per layer: q, k, v and o projections (h * d_q + 2 * h * d_kv +
d_q * h, with d_q = heads * head_dim and d_kv = groups * head_dim), the three SwiGLU matrices
(3 * h * f) and two RMSNorm weights (2 * h); plus the embedding (V * h), the final norm (h) and
the LM head (V * h, none when it is tied to the embedding). V is the unpadded vocabulary. A
Qwen2 model adds its q, k and v biases (d_q + 2 * d_kv per layer); the other families of
``selm_mcore.mcore.families`` have the same parameters as the Llama layout (Phi-3 fuses some
matrices in its HF files, not in its shapes).

Model FLOPs (``training_flops``): with N = matmul weights per token (``matmul_params``: per
layer q, k, v, o and the three SwiGLU projections, plus the LM head; the embedding lookup is no
matmul) and a sequence of s tokens, one forward costs ``2*N*s + 2*L*d_q*s*(s+1)`` (the second
term: causal attention scores and weighted values, each query attending to its own and earlier
positions). The policy's forward + backward costs 3x its forward; a reference forward inside
the step (on the fly) is counted separately, once. Norms, softmax, RoPE and the loss are not
counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Vocabulary rounded up to a multiple of ``divisible_by * tp`` (Megatron's convention)."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def config_getter(config: Any) -> Callable[..., Any]:
    """``get(key, default)`` over an HF config object or a config.json dict (a multimodal
    config.json's ``text_config`` is the language model's)."""
    if isinstance(config, dict):
        return config.get("text_config", config).get
    return lambda key, default=None: getattr(config, key, default)


def _has_qkv_bias(model_type: Any) -> bool:
    from selm_mcore.mcore.families import FAMILIES  # plain Python; imports this module

    family = FAMILIES.get(str(model_type))
    return bool(family and family.qkv_bias)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-layout model (``name`` is a label, not part of the shape)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool = False
    vocab_divisible_by: int = 128  # Megatron's make_vocab_size_divisible_by
    name: str = field(default="", compare=False)
    qkv_bias: bool = False  # biases on q, k and v (Qwen2)

    @classmethod
    def from_hf_config(
        cls, hf_config: Any, *, name: str = "", vocab_divisible_by: int = 128
    ) -> ModelShape:
        """From an HF config object or a plain dict (config.json)."""
        get = config_getter(hf_config)
        heads = int(get("num_attention_heads"))
        return cls(
            num_layers=int(get("num_hidden_layers")),
            hidden_size=int(get("hidden_size")),
            ffn_hidden_size=int(get("intermediate_size")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or int(get("hidden_size")) // heads),
            vocab_size=int(get("vocab_size")),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            vocab_divisible_by=vocab_divisible_by,
            name=name,
            qkv_bias=_has_qkv_bias(get("model_type")),
        )

    @classmethod
    def from_dir(cls, hf_dir: str | os.PathLike, **kwargs: Any) -> ModelShape:
        """From the config.json of an HF model folder."""
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: model.hf_dir must be an HF model folder")
        return cls.from_hf_config(json.loads(path.read_text()), **kwargs)

    @property
    def query_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def padded_vocab(self, tp: int) -> int:
        return padded_vocab_size(self.vocab_size, tp, self.vocab_divisible_by)

    def layer_matmul_params(self) -> int:
        """Matmul weights of one layer: q, k, v, o and the three SwiGLU projections."""
        h = self.hidden_size
        attention = h * self.query_dim + 2 * h * self.kv_dim + self.query_dim * h
        return attention + 3 * h * self.ffn_hidden_size

    def matmul_params(self) -> int:
        """N: weights that take part in a matmul per token (layers + LM head, no embedding)."""
        return self.num_layers * self.layer_matmul_params() + self.hidden_size * self.vocab_size

    def num_params(self) -> int:
        """Every parameter of the model (module docstring; a tied LM head counted once)."""
        h, vocab = self.hidden_size, self.vocab_size
        biases = self.query_dim + 2 * self.kv_dim if self.qkv_bias else 0
        layer = self.layer_matmul_params() + 2 * h + biases
        head = 0 if self.tied_embeddings else vocab * h
        return self.num_layers * layer + vocab * h + h + head


def causal_pairs(length: int) -> int:
    """(query, key) pairs of causal attention over ``length`` tokens."""
    return length * (length + 1) // 2


def packed_group_pairs(prompt: int, responses: Iterable[int]) -> int:
    """(query, key) pairs of one packed group: the prompt attends causally to itself, each
    response to the whole prompt and causally to itself."""
    return causal_pairs(prompt) + sum(r * prompt + causal_pairs(r) for r in responses)


def forward_flops(shape: ModelShape, seq_lens: Iterable[int], *, causal: bool = True) -> float:
    """FLOPs of one forward over sequences of the given (non-pad) lengths (module docstring).

    ``causal=False`` counts the full s x s score matrix (what an unmasked matmul executes); the
    benchmarks use the causal count.
    """
    seq_lens = [int(s) for s in seq_lens]
    dense = 2 * shape.matmul_params() * sum(seq_lens)
    pairs = sum(causal_pairs(s) if causal else s * s for s in seq_lens)
    return float(dense + 4 * shape.num_layers * shape.query_dim * pairs)


def packed_forward_flops(
    shape: ModelShape, segments: Iterable[Sequence[int]], num_head_positions: int
) -> float:
    """FLOPs of one forward over a packed layout (``selm_mcore.data.packing`` segments rows: row,
    start, prompt_len, r1, r2, r3): every fed token through the layers once, the LM head on the
    head positions only, and attention as the groups attend (``packed_group_pairs``). Counted as
    ``forward_flops`` counts."""
    tokens = pairs = 0
    for _, _, prompt, *responses in segments:
        tokens += prompt + sum(responses)
        pairs += packed_group_pairs(prompt, responses)
    layers = shape.num_layers * shape.layer_matmul_params()
    return float(
        2 * layers * tokens
        + 2 * shape.hidden_size * shape.vocab_size * num_head_positions
        + 4 * shape.num_layers * shape.query_dim * pairs
    )


def training_flops(
    shape: ModelShape, seq_lens: Iterable[int], *, reference_forward: bool, causal: bool = True
) -> dict[str, float]:
    """Model FLOPs of one optimizer step over the policy's sequences.

    {"policy": 3 x forward (forward + backward), "reference": one forward when the reference
    log-probs are computed inside the step (on the fly), else 0, "total": the sum}.
    """
    forward = forward_flops(shape, seq_lens, causal=causal)
    reference = forward if reference_forward else 0.0
    return {"policy": 3.0 * forward, "reference": reference, "total": 3.0 * forward + reference}
