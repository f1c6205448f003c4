"""The rows of the two-stage SELM run (tests/e2e/conftest.py's ``paper_run``): 8 preference rows
in UltraFeedback-binarized's schema whose responses span short to long (so y_ref lands anywhere
in the ranking), 3 held-out rows, and 3 AlpacaEval rows with reference outputs.

Importable as ``selm_run_data`` from tests (tests/conftest.py).
"""

RESPONSES = [
    "6.",
    "It is 5.",
    "The answer is five.",
    "The answer is 5 because 2 plus 3 is 5, and 5 is the sum of 2 and 3 here.",
    "First add the two numbers step by step, then write the result: the sum is 5.",
]
ALPACA = [
    {"instruction": "Name two animals.", "output": "Cats.", "generator": "ref_writer",
     "dataset": "helpful_base"},
    {"instruction": "Say hello politely.", "output": "Hello there, it is a pleasure to meet "
     "you today; I hope that your day is going very well indeed.", "generator": "ref_writer",
     "dataset": "oasst"},
    {"instruction": "What is 2 plus 3?", "output": "5", "generator": "ref_writer",
     "dataset": "selfinstruct"},
]  # fmt: skip


def uf_row(prompt: str, prompt_id: str, chosen: str, rejected: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "prompt_id": prompt_id,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "messages": [user, {"role": "assistant", "content": chosen}],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }


def train_rows(responses: list[str]) -> list[dict]:
    """8 arithmetic prompts, each pairing two of the 5 ``responses`` (ids p0..p7)."""
    return [
        uf_row(f"What is {i + 2} plus {3 * i + 1}?", f"p{i}", responses[(2 * i) % 5],
               responses[(3 * i + 1) % 5])
        for i in range(8)
    ]  # fmt: skip


TRAIN = train_rows(RESPONSES)
HELD_OUT = [uf_row(f"What is {i} times {i + 1}?", f"e{i}", f"{i * (i + 1)}.", "No.")
            for i in range(3)]  # fmt: skip
