"""JSON from untrusted peers (REST bodies, Socket.IO payloads, data-channel messages).

`json.loads` alone lets a crafted message hurt the server: a 100k-deep array raises
`RecursionError` (not `ValueError`), a 5000-digit integer raises past Python's
int-digits limit, `NaN`, `Infinity` and `1e400` become non-finite floats that later break
arithmetic and JSON output, an escaped lone surrogate breaks UTF-8 encoders. `loads`
refuses all of them with one exception type, `JsonRejected`, whose message says what was
wrong; callers turn it into their transport's `invalid_json` error. Depth is checked
after parsing by an iterative walk (the C parser's own recursion guard bounds the parse
itself).
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32
MAX_NUMBER_CHARS = 40  # far above any real timestamp or count; below the int-digit limit


class JsonRejected(ValueError):
    code = "invalid_json"


def _refuse_constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not allowed in JSON")


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise JsonRejected(f"number with {len(text)} digits is too long")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise JsonRejected(f"number with {len(text)} characters is too long")
    value = float(text)
    if not math.isfinite(value):
        raise JsonRejected(f"number {text[:20]} is out of range")
    return value


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children if isinstance(child, dict | list))
    return deepest


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON; raises `JsonRejected` for anything malformed or hostile."""
    try:
        value = json.loads(
            data,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except JsonRejected:
        raise
    except RecursionError:
        raise JsonRejected("JSON is nested too deeply") from None
    except UnicodeDecodeError:
        raise JsonRejected("JSON is not valid UTF-8") from None
    except ValueError as exc:  # JSONDecodeError and int-conversion limits
        message = getattr(exc, "msg", None) or str(exc)
        raise JsonRejected(f"not valid JSON: {message}") from None
    if depth(value) > max_depth:
        raise JsonRejected(f"JSON is nested deeper than {max_depth} levels")
    if _has_lone_surrogate(value):
        raise JsonRejected("JSON string holds an unpaired surrogate (\\ud800-\\udfff)")
    return value


def _bad_text(text: str) -> bool:
    if text.isascii():  # the common case, and every frame: no copy
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """An escaped lone surrogate ("\\ud800") parses, then breaks any UTF-8 encoder
    downstream (an SDK request, a log line)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _bad_text(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
