"""PackedAttention's CUDA backends on a CUDA device (skipped without CUDA): torch's varlen_attn
(and flash-attn's varlen kernel where it is installed) equal the per-sequence SDPA path in bf16,
forward and backward, for pack and shared_prompt layouts with grouped-query heads (the response
mask relies on the kernels' bottom-right causal alignment). The same decomposition is checked on
CPU against a dense masked reference in tests/unit/test_packed_attention.py.
"""

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _batch(shared: bool):
    from selm_mcore.data.packing import collate_packed
    from selm_mcore.data.tokenize import TokenizedExample

    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return tuple(torch.randint(3, 1000, (n,), generator=gen).tolist())

    examples = [
        TokenizedExample(
            index=i, prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r), yref_ids=ids(y)
        )
        for i, (p, c, r, y) in enumerate([(50, 70, 30, 90), (120, 40, 110, 60), (3, 200, 20, 5)])
    ]
    return collate_packed(
        examples, pad_id=0, shared_prompt=shared, has_yref=True, pad_to_multiple_of=64
    )


def _backends():
    from selm_mcore.mcore.attention import flash_attn_installed, torch_varlen_function

    names = []
    if torch_varlen_function() is not None:
        names.append("varlen")
    if flash_attn_installed():
        names.append("flash")
    return names


@pytest.mark.parametrize("shared", [False, True])
def test_cuda_backends_equal_sdpa(shared):
    from selm_mcore.mcore.attention import backend_attend, varlen_attention

    backends = _backends()
    if not backends:
        pytest.skip("neither torch.nn.attention.varlen nor flash-attn is available")
    batch = _batch(shared)
    seq_len, heads, groups, dim = batch.tokens.shape[1], 8, 2, 128
    device = torch.device("cuda")
    plan = batch.attention_plan.to(device)
    q, k, v = (
        torch.randn(seq_len, h, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        for h in (heads, groups, groups)
    )
    scale = 1 / math.sqrt(dim)
    outputs, grads = {}, {}
    for name in ["sdpa", *backends]:
        out = varlen_attention(q, k, v, plan, scale, backend_attend(name))
        out.float().pow(2).sum().backward()
        outputs[name] = out.float()
        grads[name] = [x.grad.float().clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
    for name in backends:
        torch.testing.assert_close(outputs[name], outputs["sdpa"], rtol=2e-2, atol=2e-2)
        for a, b in zip(grads[name], grads["sdpa"]):
            torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
