"""The one exception users see: a single line saying what was expected and what was found."""

from __future__ import annotations


class CompressError(ValueError):
    """A user-facing error. `str(err)` is one line: `<what>: expected <x>, found <y> (<hint>)`.

    Example:
        >>> raise CompressError("bad bits 'w9a8'", expected="w2a2 .. w8a8", found="9-bit weights")
    """

    def __init__(self, message: str, expected: str | None = None, found: str | None = None,
                 hint: str | None = None):
        parts = [message]
        if expected:
            parts.append(f"expected {expected}")
        if found:
            parts.append(f"found {found}")
        text = parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")
        if hint:
            text += f" ({hint})"
        super().__init__(" ".join(text.split()))  # one line, always
