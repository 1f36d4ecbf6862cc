"""How much of a streamed text's tail to hold back because it may be the start of a tag."""

from __future__ import annotations


def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 when none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_emittable(text: str, tag: str) -> tuple[str, str]:
    """(text safe to emit now, tail to hold back): the tail is a possible start of `tag`."""
    keep = partial_tag_length(text, tag)
    return text[:len(text) - keep], text[len(text) - keep:]
