"""Random sentences of common English words: prompts and responses of the tests' preference rows.

Importable as ``sentences`` from tests (tests/conftest.py) and dist workers (tests/dist/launch.py).
"""

import random

WORDS = (
    "the a of to and in is it that for on with as was be by this are or at from have not "
    "but what which one all were when we there can your"
).split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    """Between ``low`` and ``high`` words drawn by ``rng``."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def random_pairs(
    preference_row,
    rng: random.Random,
    num_rows: int,
    prompt_words: tuple[int, int] = (3, 14),
    response_words: tuple[int, int] = (1, 12),
) -> list[dict]:
    """``num_rows`` preference rows of random sentences (prompt, chosen, rejected and a
    reference response, drawn from ``rng`` in that order)."""
    return [
        preference_row(
            sentence(rng, *prompt_words) + "?",
            sentence(rng, *response_words),
            sentence(rng, *response_words),
            reference_response=sentence(rng, *response_words),
        )
        for _ in range(num_rows)
    ]
