"""The flash-attn varlen path of PackedAttention on a CUDA device (skipped without CUDA or
flash-attn): equal to the torch SDPA path in bf16, forward and backward, for pack and
shared_prompt layouts (the response mask relies on flash-attn's bottom-right causal alignment).
"""

import importlib.util
import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package"
    ),
]


@pytest.mark.parametrize("shared", [False, True])
def test_flash_varlen_equals_sdpa_varlen(shared):
    from selm_mcore.data.packing import collate_packed
    from selm_mcore.data.tokenize import TokenizedExample
    from selm_mcore.mcore.attention import flash_varlen, sdpa_varlen, varlen_attention, varlen_plan

    gen = torch.Generator().manual_seed(0)
    examples = []
    for i, (p, c, r, y) in enumerate([(50, 70, 30, 90), (120, 40, 110, 60), (3, 200, 20, 5)]):

        def ids(n):
            return tuple(torch.randint(3, 1000, (n,), generator=gen).tolist())

        examples.append(
            TokenizedExample(
                index=i, prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r), yref_ids=ids(y)
            )
        )
    batch = collate_packed(
        examples, pad_id=0, shared_prompt=shared, has_yref=True, pad_to_multiple_of=64
    )
    seq_len, heads, groups, dim = batch.tokens.shape[1], 8, 2, 128
    device = torch.device("cuda")
    q, k, v = (
        torch.randn(seq_len, h, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        for h in (heads, groups, groups)
    )
    plan = varlen_plan(batch.segments, seq_len, device)
    scale = 1 / math.sqrt(dim)
    outputs, grads = [], []
    for attend in (flash_varlen, sdpa_varlen):
        out = varlen_attention(q, k, v, plan, scale, attend)
        out.float().pow(2).sum().backward()
        outputs.append(out.float())
        grads.append([x.grad.float().clone() for x in (q, k, v)])
        for x in (q, k, v):
            x.grad = None
    torch.testing.assert_close(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
