"""Sample rows shared by the data-path unit tests (test_data, test_dataset, test_batches)."""

from __future__ import annotations

import pytest

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture
def sample_rows(preference_row):
    """Three preference rows with y_ref: two single-turn rows with prompt ids, and a multi-turn
    row (system turn, an earlier exchange) without one. A fresh list per test."""
    history = [
        SYSTEM,
        {"role": "user", "content": "Explain briefly."},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Explain briefly."},
    ]
    multi = preference_row(
        "Explain briefly.",
        "Because it is the best way.",
        "I do not know.",
        reference_response="It helps.",
        score_chosen=9.0,
    )
    multi["chosen"] = history + [{"role": "assistant", "content": "Because it is the best way."}]
    multi["rejected"] = history + [{"role": "assistant", "content": "I do not know."}]
    return [
        preference_row(
            "What is 2 plus 3?",
            "The answer is 5.",
            "It is 6.",
            prompt_id="p0",
            reference_response="5.",
        ),
        preference_row(
            "Tell me a story.",
            "Once there was a boy who found water.",
            "No.",
            prompt_id="p1",
            reference_response="A story about the sea and the sun.",
        ),
        multi,
    ]
