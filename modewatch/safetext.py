"""Text from a log made harmless to show: one function, applied by every reporter.

A log is written by whoever sent it. Its strings (layer names, file paths, function names, ``via``,
argv) and the paths of the logs themselves reach terminals, Markdown, HTML and SARIF viewers, where
a control character, a bidi override or a lone surrogate can clear the screen, forge a line,
reorder what a reader sees, or crash the encoder. ``neutralise`` turns each of those characters
into a visible escape (``\\x1b``, ``\\u202e``), so the text shows what the log holds and does
nothing else. Imports no torch.
"""

from __future__ import annotations

import re

# C0 controls (even \n and \t: a field is never more than one line), DEL and C1 controls; the
# bidi controls (embeddings, overrides, isolates, marks); lone surrogates (a str from JSON can
# hold one; no encoder writes it).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def neutralise(text: object) -> str:
    """``text`` as a string in which every control, bidi or surrogate character is a visible escape."""
    text = str(text)
    return _UNSAFE.sub(_escape, text)
