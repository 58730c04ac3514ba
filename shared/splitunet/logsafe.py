"""Text from the network as it may appear in a log line: no forged lines, no terminal escapes.

A request path, a method or a message that quotes client input can hold control characters (``ESC [31m`` colours a
terminal, ``\\n`` or U+2028 starts a forged log line). :func:`escape_path` writes every control and non-ASCII
character as a JSON escape (``\\u001b``, ``\\u2028``), so one request is one log line, readable as it arrived.
"""

from __future__ import annotations

import json


def escape_path(text: object) -> str:
    """``text`` with control and non-ASCII characters JSON-escaped (quotes and backslashes too)."""
    return json.dumps(str(text), ensure_ascii=True)[1:-1]
