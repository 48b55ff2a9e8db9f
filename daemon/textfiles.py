"""The text files people hand the program (URL lists, clip files), read line by line with limits.

Files come from Notepad, Excel, scripts and other machines: a UTF-8 byte-order mark is dropped, CRLF
line ends are accepted, and each line is decoded on its own, so one stray byte costs that line only.
No line is held longer than its limit, whatever the file holds (one huge line, no newline at all).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

BOM = b"\xef\xbb\xbf"
SHOWN_CHARS = 80  # of a bad line, in the one line that reports it
_CHUNK = 1 << 16


@dataclass(frozen=True)
class TextLine:
    """One line of a file: its text, or why it has none (not UTF-8, too long)."""

    number: int  # from 1
    text: str | None
    problem: str | None = None


def shown(text: str) -> str:
    """A line as a report quotes it: repr, cut to SHOWN_CHARS so a huge line stays one short line."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}… ({len(text)} characters)"


def _skip_rest_of_line(handle: BinaryIO) -> int:
    """Reads past the end of an over-long line, in bounded pieces; returns how many bytes it skipped."""
    skipped = 0
    while True:
        piece = handle.readline(_CHUNK)
        skipped += len(piece)
        if not piece or piece.endswith(b"\n"):
            return skipped


def text_lines(handle: BinaryIO, max_line_bytes: int) -> Iterator[TextLine]:
    """Each line of a binary stream, decoded on its own; at most max_line_bytes of a line are kept."""
    number = 0
    while True:
        raw = handle.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        too_long = len(raw) > max_line_bytes and not raw.endswith(b"\n")
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        if too_long:
            total = len(raw) + _skip_rest_of_line(handle)
            yield TextLine(number, None, f"line of {total} bytes, longer than the {max_line_bytes} allowed")
            continue
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        try:
            yield TextLine(number, raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield TextLine(
                number,
                None,
                f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}): "
                + shown(raw.decode("utf-8", errors="replace")),
            )
