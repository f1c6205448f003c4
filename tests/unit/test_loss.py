"""selm_mcore.train.loss against an independent plain-torch computation on HF transformers
log-probs.

Path under test: batches.collate_preferences -> one padded forward of the HF tiny Llama over all
3B sequences -> token log-probs from the padded logits -> selm_loss. Independent path: one
unpadded forward per sequence, the response log-probs summed token by token, and the SELM formula
written out with torch.log(torch.sigmoid(.)). Loss, its gradient w.r.t. the policy logits and the
metrics must agree in fp32 to 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from selm_mcore.data.batches import collate_preferences
from selm_mcore.data.rows import PreferenceRow
from selm_mcore.data.tokenize import PreferenceDataset
from selm_mcore.train.loss import selm_loss

BETA, ALPHA = 0.1, 0.5  # large, so that the optimism term visibly moves loss and gradient
TOL = dict(rtol=1e-5, atol=1e-5)

PAIRS = [  # (prompt, chosen, rejected, y_ref)
    ("What is 2 plus 3?", "The answer is 5.", "It is 6.", "5."),
    (
        "Tell me a story.",
        "Once there was a boy who found water in the land.",
        "No.",
        "A story about the sea.",
    ),
    (
        "Explain briefly.",
        "Because it is the best way.",
        "I do not know why.",
        "It helps people work together.",
    ),
]


@pytest.fixture(scope="module")
def models_and_data(tiny_llama_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model_dir = tiny_llama_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    policy = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    rows = [
        PreferenceRow(
            prompt=p,
            prompt_messages=({"role": "user", "content": p},),
            chosen=c,
            rejected=r,
            reference_response=y,
        )
        for p, c, r, y in PAIRS
    ]
    dataset = PreferenceDataset.from_rows(rows, tokenizer, max_length=128, max_prompt_length=64)
    return policy, reference, dataset, tokenizer.pad_token_id


# --- the path under test ----------------------------------------------------------------------


def batched_logps(model, batch, logits=None):
    """Sequence log-probs [N] from one padded forward (logits may be passed in as a leaf)."""
    if logits is None:
        with torch.no_grad():
            logits = model(input_ids=batch.tokens, position_ids=batch.position_ids).logits
    token_logps = (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    )
    return (token_logps * batch.loss_mask).sum(-1)


# --- the independent reference ----------------------------------------------------------------


def sequences(example):
    return [list(example.prompt_ids) + list(r) for r in example.responses]


def unpadded_logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def response_logp(logits, ids, prompt_len):
    """sum_{t >= prompt_len} log p(ids[t] | ids[:t]), one token at a time."""
    total = torch.zeros(())
    for t in range(prompt_len, len(ids)):
        total = total + torch.log_softmax(logits[t - 1], dim=-1)[ids[t]]
    return total


def reference_path(policy, reference, examples, *, beta, alpha, sft_weight=0.0):
    """Loss (mean), per-sequence policy logit leaves [(example, s) -> [L, V]] and quantities."""
    leaves, losses, values = {}, [], []
    for i, example in enumerate(examples):
        pi, ref = [], []
        prompt_len = len(example.prompt_ids)
        for s, ids in enumerate(sequences(example)):
            with torch.no_grad():
                leaf = unpadded_logits(policy, ids)
                ref.append(response_logp(unpadded_logits(reference, ids), ids, prompt_len))
            leaf.requires_grad_(True)
            leaves[(i, s)] = leaf
            pi.append(response_logp(leaf, ids, prompt_len))
        h = (pi[0] - pi[1]) - (ref[0] - ref[1])
        loss = -torch.log(torch.sigmoid(beta * h)) + alpha * beta * (pi[2] - ref[2])
        loss = loss + sft_weight * (-pi[0] / len(example.chosen_ids))
        losses.append(loss)
        values.append({"pi": [v.detach() for v in pi], "ref": ref, "h": h.detach()})
    return torch.stack(losses).mean(), leaves, values


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,sft_weight", [(ALPHA, 0.0), (0.0, 0.0), (ALPHA, 0.3)])
def test_loss_gradient_and_metrics_match_independent_hf_computation(
    models_and_data, alpha, sft_weight
):
    policy, reference, dataset, pad_id = models_and_data
    examples = dataset.examples
    batch = collate_preferences(examples, pad_id=pad_id, pad_to_multiple_of=16)
    with torch.no_grad():
        policy_logits = policy(input_ids=batch.tokens, position_ids=batch.position_ids).logits
    policy_logits = policy_logits.float().requires_grad_(True)
    pi_c, pi_r, pi_y = batch.split(batched_logps(policy, batch, policy_logits))
    ref_c, ref_r, ref_y = batch.split(batched_logps(reference, batch))
    chosen_tokens = batch.split(batch.loss_mask.sum(-1))[0]
    losses, metrics = selm_loss(
        pi_c,
        pi_r,
        ref_c,
        ref_r,
        pi_y,
        ref_y,
        beta=BETA,
        alpha=alpha,
        sft_weight=sft_weight,
        chosen_num_tokens=chosen_tokens,
    )
    losses.mean().backward()

    expected_loss, leaves, values = reference_path(
        policy, reference, examples, beta=BETA, alpha=alpha, sft_weight=sft_weight
    )
    expected_loss.backward()
    torch.testing.assert_close(losses.mean().detach(), expected_loss.detach(), **TOL)

    # gradient w.r.t. every policy logit: equal on real positions, zero on padding
    b = len(examples)
    for (i, s), leaf in leaves.items():
        row = s * b + i
        length = leaf.shape[0]
        torch.testing.assert_close(policy_logits.grad[row, :length], leaf.grad, **TOL)
        assert policy_logits.grad[row, length:].abs().max() == 0
    # the check above is not vacuous: chosen logits get gradient; y_ref logits only if alpha > 0
    assert min(leaves[(i, 0)].grad.abs().max() for i in range(b)) > 1e-4
    assert (max(leaves[(i, 2)].grad.abs().max() for i in range(b)) > 1e-4) == (alpha > 0)

    pi = torch.stack([torch.stack(v["pi"]) for v in values])  # [B, 3]
    ref = torch.stack([torch.stack(v["ref"]) for v in values])  # [B, 3]
    chosen_rewards, rejected_rewards = BETA * (pi[:, 0] - ref[:, 0]), BETA * (pi[:, 1] - ref[:, 1])
    expected = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": pi[:, 0],
        "logps/rejected": pi[:, 1],
        "logps/pi_response": pi[:, 2],
        "logps/ref_chosen": ref[:, 0],
        "logps/ref_rejected": ref[:, 1],
        "logps/ref_response": ref[:, 2],
        "loss/optimism": alpha * BETA * (pi[:, 2] - ref[:, 2]),
        "loss/preference": -torch.log(torch.sigmoid(BETA * torch.stack([v["h"] for v in values]))),
    }
    if sft_weight:
        expected["loss/sft"] = -pi[:, 0] / torch.tensor([len(e.chosen_ids) for e in examples])
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], value, **TOL, msg=name)
        assert not metrics[name].requires_grad, name
    # the pairs are not trivially equal, and the optimism term is really in play
    assert (metrics["loss/optimism"].abs() > 1e-3).all() == (alpha > 0)
    assert (metrics["rewards/margins"].abs() > 1e-3).all()


def test_step_zero_policy_equals_reference_is_ln2(models_and_data):
    _, reference, dataset, pad_id = models_and_data
    batch = collate_preferences(dataset.examples, pad_id=pad_id, pad_to_multiple_of=16)
    policy_logps = batched_logps(reference, batch)  # padded batch forward
    # the "reference cache": an independent unpadded forward per sequence
    ref_logps = torch.zeros_like(policy_logps)
    b = len(dataset)
    with torch.no_grad():
        for i, example in enumerate(dataset.examples):
            for s, ids in enumerate(sequences(example)):
                ref_logps[s * b + i] = response_logp(
                    unpadded_logits(reference, ids), ids, len(example.prompt_ids)
                )
    losses, metrics = selm_loss(
        *batch.split(policy_logps)[:2],
        *batch.split(ref_logps)[:2],
        batch.split(policy_logps)[2],
        batch.split(ref_logps)[2],
        beta=0.01,
        alpha=1e-3,
    )
    torch.testing.assert_close(losses, torch.full((b,), math.log(2.0)), rtol=0, atol=1e-6)
    assert metrics["loss/optimism"].abs().max() < 1e-6
    # the very same tensors on both sides: exactly ln 2 and exactly 0
    same = torch.tensor([-12.5, -3.25, -40.0])
    losses, metrics = selm_loss(
        same, same - 1, same, same - 1, same + 2, same + 2, beta=0.01, alpha=1e-3
    )
    assert torch.equal(losses, torch.full((3,), math.log(2.0)))
    assert torch.equal(metrics["loss/optimism"], torch.zeros(3))


def test_alpha_zero_is_exactly_dpo():
    generator = torch.Generator().manual_seed(1)
    pc, pr, rc, rr, py, ry = (-20 * torch.rand(5, generator=generator) for _ in range(6))
    pc.requires_grad_(True)
    py.requires_grad_(True)
    with_yref, _ = selm_loss(pc, pr, rc, rr, py, ry, beta=0.01, alpha=0.0)
    dpo, metrics = selm_loss(pc, pr, rc, rr, beta=0.01, alpha=0.0)
    assert torch.equal(with_yref, dpo)
    assert torch.equal(dpo, -torch.nn.functional.logsigmoid(0.01 * ((pc - pr) - (rc - rr))))
    assert "logps/pi_response" not in metrics
    with_yref.sum().backward()
    assert py.grad is None  # y_ref takes no part in the loss at alpha = 0
    # alpha > 0 adds exactly alpha * beta * (pi - ref) on y_ref
    selm, _ = selm_loss(pc, pr, rc, rr, py, ry, beta=0.01, alpha=1e-3)
    torch.testing.assert_close(selm, dpo + 1e-5 * (py - ry), rtol=0, atol=1e-7)
    assert (selm - dpo).abs().min() > 1e-6


def test_reference_side_carries_no_gradient():
    pc, pr = (
        torch.tensor([-5.0, -7.0], requires_grad=True),
        torch.tensor([-6.0, -2.0], requires_grad=True),
    )
    rc, rr, ry = (torch.tensor([-5.5, -6.0], requires_grad=True) for _ in range(3))
    py = torch.tensor([-4.0, -9.0], requires_grad=True)
    losses, _ = selm_loss(pc, pr, rc, rr, py, ry, beta=0.1, alpha=0.5)
    losses.sum().backward()
    assert rc.grad is None and rr.grad is None and ry.grad is None
    # d/d logp_pi(y_ref) of the optimism term is alpha * beta per example
    torch.testing.assert_close(py.grad, torch.full((2,), 0.05))


def test_ipo_uses_token_averaged_logps_as_trl():
    pc, pr = torch.tensor([-30.0, -8.0]), torch.tensor([-12.0, -20.0])
    rc, rr = torch.tensor([-28.0, -9.0]), torch.tensor([-13.0, -18.0])
    nc, nr = torch.tensor([10, 4]), torch.tensor([6, 5])
    beta = 0.1
    losses, metrics = selm_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        alpha=0.0,
        loss_type="ipo",
        chosen_num_tokens=nc,
        rejected_num_tokens=nr,
    )
    h_avg = (pc / nc - pr / nr) - (rc / nc - rr / nr)
    torch.testing.assert_close(losses, (h_avg - 1 / (2 * beta)) ** 2)
    torch.testing.assert_close(metrics["rewards/chosen"], beta * (pc - rc))  # sums, documented
    with pytest.raises(ValueError, match="pass chosen_num_tokens and rejected_num_tokens"):
        selm_loss(pc, pr, rc, rr, beta=beta, alpha=0.0, loss_type="ipo")


def test_inputs_are_checked_and_upcast():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="alpha=0.001 > 0 needs y_ref log-probs"):
        selm_loss(x, x, x, x, beta=0.01, alpha=1e-3)
    with pytest.raises(ValueError, match="pass both policy_yref_logps and ref_yref_logps"):
        selm_loss(x, x, x, x, x, beta=0.01, alpha=0.0)
    with pytest.raises(ValueError, match="ref_rejected_logps has shape \\(2,\\)"):
        selm_loss(x, x, x, torch.zeros(2), beta=0.01, alpha=0.0)
    with pytest.raises(ValueError, match="loss_type='hinge'"):
        selm_loss(x, x, x, x, beta=0.01, alpha=0.0, loss_type="hinge")
    with pytest.raises(ValueError, match="sft_weight > 0 needs chosen_num_tokens"):
        selm_loss(x, x, x, x, beta=0.01, alpha=0.0, sft_weight=1.0)
    losses, _ = selm_loss(
        *(torch.full((2,), -3.0, dtype=torch.bfloat16) for _ in range(4)), beta=0.01, alpha=0.0
    )
    assert losses.dtype == torch.float32
