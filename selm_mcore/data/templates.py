"""Chat templates rendered under a time and size budget.

    text = render_chat_template(tokenizer, messages, add_generation_prompt=True)

A chat template is a program that comes with a model folder (jinja, run in transformers'
sandbox). The sandbox bounds each ``range`` but not loops inside loops, so a template can run
for hours or fill memory on one conversation. Every rendering of the project (training and
reference-pass prompts, generation prompts, a reward model's conversations) goes through
``render_chat_template``:

* time: at most ``TEMPLATE_SECONDS`` per conversation (a real template takes well under a
  millisecond; the first call also compiles it). The limit is a real-time timer (SIGALRM) on
  the main thread, which interrupts the template between two of its steps; the timer that was
  set before (e.g. a test runner's) is restored afterwards. Off the main thread only the size
  is checked;
* size: the text may hold at most ``TEMPLATE_MIN_CHARS`` characters plus
  ``TEMPLATE_CHARS_PER_INPUT_CHAR`` per character of the conversation.

Either limit stops with ``ChatTemplateError`` naming the file that holds the template.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from selm_mcore.runtime.errors import InputError

TEMPLATE_SECONDS = 2.0
TEMPLATE_MIN_CHARS = 1 << 20
TEMPLATE_CHARS_PER_INPUT_CHAR = 8


class ChatTemplateError(InputError):
    """A chat template that runs past its time or size budget."""


class _BudgetExpired(Exception):
    """Raised inside the template by the timer (never leaves this module)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[bool]:
    """Raise ``_BudgetExpired`` in this thread after ``seconds`` (main thread only: yields
    whether the limit is armed); the previous SIGALRM handler and timer are restored."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return

    def expire(signum: int, frame: Any) -> None:
        raise _BudgetExpired()

    previous = signal.signal(signal.SIGALRM, expire)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:  # re-arm the timer that was running, less the time spent here
            left = max(outer_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def template_source(tokenizer: Any) -> str:
    """The file that holds a tokenizer's chat template (for messages)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"the chat template of the tokenizer in {folder}"


def render_chat_template(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], **kwargs: Any
) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)`` within the time and
    size budget (module docstring); raises ``ChatTemplateError`` past either."""
    input_chars = sum(len(str(m.get("content", ""))) for m in messages)
    max_chars = TEMPLATE_MIN_CHARS + TEMPLATE_CHARS_PER_INPUT_CHAR * input_chars
    try:
        with _time_limit(TEMPLATE_SECONDS):
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)
    except MemoryError:
        raise ChatTemplateError(
            f"{template_source(tokenizer)}: rendering the chat template for one conversation "
            "ran out of memory; fix the template or use the model's original one"
        ) from None
    except _BudgetExpired:
        raise ChatTemplateError(
            f"{template_source(tokenizer)}: rendering the chat template for one conversation "
            f"({len(messages)} messages, {input_chars} characters) took more than "
            f"{TEMPLATE_SECONDS:g} s (loops inside loops?); fix the template or use the "
            "model's original one"
        ) from None
    if isinstance(text, str) and len(text) > max_chars:
        raise ChatTemplateError(
            f"{template_source(tokenizer)}: the chat template turned one conversation of "
            f"{input_chars} characters into {len(text)} characters (more than {max_chars}); "
            "fix the template or use the model's original one"
        )
    return text
