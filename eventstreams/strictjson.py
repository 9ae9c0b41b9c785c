"""Strict JSON (RFC 8259): what every event must be to enter or leave the log.

Python's json module reads and writes NaN, Infinity and -Infinity, turns
1e999 into inf, and turns a "\\ud800" escape into a lone surrogate. None of
these can be passed on: JSON.parse and most libraries refuse the first ones,
and UTF-8 cannot encode the last. The intake refuses such events, the hub
skips such records, and the encoders here refuse to write them.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional

__all__ = ["NotStrictJSON", "dumps", "loads", "problem"]

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class NotStrictJSON(ValueError):
    """A value that is not strict JSON; `reason` is a short label (metrics)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _no_constants(name: str) -> Any:
    raise NotStrictJSON("non_finite", f"{name} is not JSON")


def loads(data: bytes | str) -> Any:
    """Parse JSON text, refusing NaN/Infinity; NotStrictJSON("invalid_json")
    for anything that is not JSON. (Lone surrogates and numbers too large
    for a float are found by dumps(): parse, then encode.)"""
    try:
        return json.loads(data, parse_constant=_no_constants)
    except NotStrictJSON:
        raise
    except (ValueError, RecursionError) as e:
        raise NotStrictJSON("invalid_json", f"not JSON: {e}") from None


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; NotStrictJSON for NaN, infinities and lone surrogates."""
    try:
        return _encoder.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        raise NotStrictJSON("lone_surrogate", problem(value) or "a lone surrogate is not JSON text") from None
    except ValueError:
        raise NotStrictJSON("non_finite", problem(value) or "NaN and infinities are not JSON") from None


def _path(keys: list) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".") or "(the event)"


def _surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def problem(value: Any) -> Optional[str]:
    """Where a value stops being strict JSON, e.g. "'length.old' is NaN",
    or None (iterative: no recursion limit to trip over)."""
    stack: list[tuple[list, Any]] = [([], value)]
    while stack:
        keys, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            what = "NaN" if math.isnan(item) else "an infinity (or a number too large)"
            return f"{_path(keys)!r} is {what}, which is not JSON"
        if isinstance(item, str) and _surrogate(item):
            return f"{_path(keys)!r} holds a lone surrogate (\\ud800-\\udfff), which is not Unicode text"
        if isinstance(item, dict):
            for k, v in reversed(list(item.items())):
                if isinstance(k, str) and _surrogate(k):
                    return f"a key in {_path(keys)!r} holds a lone surrogate, which is not Unicode text"
                stack.append((keys + [k], v))
        elif isinstance(item, list):
            for i in range(len(item) - 1, -1, -1):
                stack.append((keys + [i], item[i]))
    return None
