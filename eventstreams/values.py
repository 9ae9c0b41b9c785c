"""Parsers of configuration values: text in, a typed value out, or a
ValueError whose message is the reason (eventstreams.config.parse_values
adds file, section and key). The core's sections and every bridge's use
the same ones, so a duration or a size is written the same everywhere.
"""
from __future__ import annotations

import math
import re
from typing import Optional

from . import compat


def number(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if value != value or value < 0 or value == float("inf"):
        raise ValueError(f"expected a non-negative number, got {text!r}")
    return value


def positive_number(text: str) -> float:
    value = number(text)
    if value <= 0:
        raise ValueError(f"expected a number above 0, got {text!r}")
    return value


# -- durations: a number of seconds, or with a unit: 30s, 5m, 12h, 7d, 1w ----

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _in_seconds(text: str) -> float:
    """A number with an optional unit, in seconds; ValueError as number()'s."""
    lowered = text.strip().lower()
    factor = UNITS.get(lowered[-1:])
    if factor is not None:
        lowered = lowered[:-1].strip()
    value = number(lowered) * (factor or 1)
    if not math.isfinite(value):
        raise ValueError(f"expected a non-negative number, got {text!r}")
    return value


def duration(text: str) -> float:
    """A duration >= 0 (retention, dedupe_window, ...)."""
    try:
        return _in_seconds(text)
    except ValueError:
        raise ValueError(f"expected a duration such as 30s, 12h or 7d, got {text!r}") from None


def seconds(text: str) -> float:
    """A duration >= 0, the same syntax as duration(); for the keys that
    always took a plain number of seconds (heartbeat, max_lifetime,
    ping_interval, ...), so their messages stay those of a number."""
    try:
        return _in_seconds(text)
    except ValueError:
        return number(text)  # not a number either: its message (a number is in seconds)


def positive_duration(text: str) -> float:
    """A duration above 0: for deadlines where 0 would mean never."""
    value = duration(text)
    if value <= 0:
        raise ValueError(f"expected a duration above 0 such as 10s, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """seconds() above 0."""
    value = seconds(text)
    if value <= 0:
        raise ValueError(f"expected a number above 0, got {text!r}")
    return value


def interval(text: str) -> float:
    """Seconds from 0 to 1: a wait added to deliveries, never a long one."""
    value = seconds(text)
    if value > 1:
        raise ValueError(f"expected at most 1 (second), got {text!r}")
    return value


# -- counts and sizes --------------------------------------------------------


def count(text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def positive_count(text: str) -> int:
    value = count(text)
    if value < 1:
        raise ValueError(f"expected an integer >= 1, got {text!r}")
    return value


SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size(text: str) -> int:
    """Bytes: 4096, 64k, 4M, 1GiB."""
    match = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", text.strip().lower())
    if not match:
        raise ValueError(f"expected a size such as 4096, 64k or 4M, got {text!r}")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


# -- words -------------------------------------------------------------------


def boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def endpoint(text: str) -> str:
    """A Twisted server endpoint string (tcp:8092, unix:/run/x.sock, ssl:...)."""
    if not text:
        raise ValueError("expected a Twisted endpoint string such as tcp:8092")
    try:
        kind, args = compat.parse_endpoint(text)
    except Exception as e:  # the endpoint parser raises many kinds
        raise ValueError(f"not a valid endpoint string {text!r}: {e}") from None
    if kind in ("TCP", "SSL") and args and isinstance(args[0], int) and not 0 <= args[0] <= 65535:
        raise ValueError(f"port {args[0]} is out of range (0-65535)")
    return text


def optional_endpoint(text: str) -> Optional[str]:
    """An endpoint, or None for none / off / no / empty (the listener is off)."""
    if text.strip().lower() in ("", "none", "off", "no"):
        return None
    return endpoint(text)


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names of streams or topics."""
    found = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in found:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ValueError(f"{name!r} is not a valid name (letters, digits, . _ -)")
    return found


def header_name(text: str) -> Optional[str]:
    if not text:
        return None
    if not re.fullmatch(r"[A-Za-z0-9-]+", text):
        raise ValueError(f"{text!r} is not an HTTP header name")
    return text


def text(value: str) -> str:
    return value
