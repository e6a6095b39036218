"""Text for people: long values cut short in messages, and the last line of a long message.

Imports nothing heavy, so the command line's error paths can use it before (or without) torch.
"""

from __future__ import annotations

CLIP = 60  # characters of a value an error message repeats


def clip(text: str, limit: int = CLIP) -> str:
    """``text``, or its first ``limit`` characters and how long it was: a message stays readable
    whatever a file holds (a million-character value comes back as 60 characters and a count)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def last_line(err: BaseException | str) -> str:
    """The last non-empty line of an error's message (a spawned rank's traceback is one long message)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else ""
