"""One rule for the bytes an agent produces that become text.

What an agent produces (command output, the files it reads, file names, the diff's preview, the
arguments it gives tools, its summary) travels as text: through checkpoints and the transcript,
results, Temporal payloads, events, the store, REST, SSE and the console. Some of them refuse
some code points: PostgreSQL's text and jsonb refuse NUL (jsonb's ``\\u0000``) and lone
surrogates, a peer refuses a signed message holding a NUL, UTF-8 encoders (HTTP bodies,
canonical JSON) refuse lone surrogates. So every text field carries valid Unicode without NUL,
by this one rule:

- bytes are read as UTF-8; each byte that is not part of a valid UTF-8 sequence shows as
  ``\\xNN`` (two lower-case hex digits, as Python's ``backslashreplace`` writes it);
- NUL (U+0000) shows as ``\\x00``;
- in text already decoded, a lone surrogate U+DC80..U+DCFF (a byte that Python kept undecoded
  with ``surrogateescape``, e.g. a file name that is not UTF-8) shows as the ``\\xNN`` of that
  byte; any other lone surrogate (e.g. ``\\ud800`` in a model's JSON) as ``\\uNNNN``.

A number JSON has no text for (NaN, infinities: Python's json reads 1e999 in a model's tool
input as infinity) shows as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``.

Everything else (other control characters too) is kept. The rule loses one thing only: an
escape the agent wrote literally looks like a byte escaped by the rule. Where exact bytes
matter they do not travel as text: the diff is kept byte-exact as an artifact.

`text_of` applies the rule where bytes become text; `clean` to text that may hold what the rule
removes (names decoded with surrogateescape, strings from a model's JSON); `clean_json` to every
string and key of a JSON value (the store's jsonb encoder applies it, so no value is refused).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_UNSAFE = re.compile("[\\x00\\ud800-\\udfff]")
# What json.dumps (ensure_ascii) writes for them; a literal backslash before "u0000" also
# matches, which only costs a closer look.
_UNSAFE_JSON = re.compile(r"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


def _escape(match: re.Match[str]) -> str:
    point = ord(match.group())
    if 0xDC80 <= point <= 0xDCFF:
        return f"\\x{point - 0xDC00:02x}"
    if point == 0:
        return "\\x00"
    return f"\\u{point:04x}"


def clean(text: str) -> str:
    """`text` with NUL and lone surrogates escaped by the rule (itself when it has none)."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)


def text_of(data: bytes, *, cut_start: bool = False, cut_end: bool = False) -> str:
    """Bytes as text by the rule. `cut_start`/`cut_end`: the bytes are a piece cut out of a
    longer stream there, so a character the cut split is left out instead of escaped."""
    if cut_end:
        data = data[: _whole_end(data)]
    if cut_start:
        data = data[_whole_start(data) :]
    return clean(data.decode("utf-8", "surrogateescape"))


def clean_json(value: Any) -> Any:
    """A JSON value with every string (and key) made safe by the rule."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)  # NaN, Infinity, -Infinity
    if isinstance(value, dict):
        return {clean(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def json_needs_cleaning(encoded: str) -> bool:
    """Whether JSON text from `json.dumps` (ASCII) may hold an escape the rule removes."""
    return _UNSAFE_JSON.search(encoded) is not None


def _whole_start(data: bytes) -> int:
    """Offset of the first byte that is not a continuation byte (at most 3 are skipped)."""
    start = 0
    while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
        start += 1
    return start


def _whole_end(data: bytes) -> int:
    """Length of `data` without a multi-byte character cut at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: its lead is further back
        return len(data) - back if back < _sequence_length(byte) else len(data)
    return len(data)


def _sequence_length(lead: int) -> int:
    """Bytes of the UTF-8 sequence that `lead` starts (1 for anything that starts none)."""
    for length, bits in ((2, 0b110), (3, 0b1110), (4, 0b11110)):
        if lead >> (8 - bits.bit_length()) == bits:
            return length
    return 1
