"""Fused kernels, imported as ``selm_mcore.kernels`` (see setup.py).

- ``torch_logprobs``: the plain torch reference and the memory-lean chunked torch path for
  label log-probs from vocab-parallel logits (re-exported here).
- ``vocab_parallel_logprobs``: the fused Triton kernel. Not imported here: importing it imports
  triton and builds the kernels, and on CPU TRITON_INTERPRET=1 must be set before that happens.
- ``bench_logprobs``: the benchmark (``python -m selm_mcore.kernels.bench_logprobs``).
"""

from selm_mcore.kernels.torch_logprobs import (
    chunked_vocab_parallel_logprobs,
    reference_vocab_parallel_logprobs,
)

__all__ = ["chunked_vocab_parallel_logprobs", "reference_vocab_parallel_logprobs"]
