"""Server-side event filters from `filter.<path>=v1,v2` query parameters.

`matches` runs for every event and every filtered client, so parsing does
all the work up front: paths become tuples, exact alternatives a frozenset,
globs compiled regexes.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable

__all__ = ["Filter", "FilterError", "parse_filters", "value_text"]

PREFIX = "filter."
MAX_NAMES = 20
MAX_ALTERNATIVES = 100
MAX_LENGTH = 1000

_MISSING = object()
_GLOB_CHARS = frozenset("*?[")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class FilterError(ValueError):
    """A malformed filter parameter; the message names it and says why."""


def _short(text: str) -> str:
    """A parameter name or value cut down for an error message."""
    return text if len(text) <= 60 else text[:57] + "..."


def value_text(value: object) -> str:
    """The text a JSON value is compared as (`false`, `null`, `2`, `{"a":1}`)."""
    if type(value) is str:
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return json.dumps(value)
    if isinstance(value, str):
        return str(value)
    return _dumps(value)


class _Clause:
    """One filter name: a path and the alternatives it must (or must not) equal."""

    __slots__ = ("path", "negate", "alternatives", "exact", "exact_ints", "globs",
                 "steps", "single")

    def __init__(self, path: str, negate: bool, alternatives: Iterable[str]) -> None:
        self.path = path
        self.negate = negate
        self.alternatives = sorted(set(alternatives))
        exact: set[str] = set()
        globs: list[Callable[[str], object]] = []
        for alternative in self.alternatives:
            if _GLOB_CHARS.isdisjoint(alternative):
                exact.add(alternative)
            else:
                globs.append(re.compile(fnmatch.translate(alternative)).match)
        self.exact = frozenset(exact)
        # Lets an int field (namespace=2) match without formatting the int;
        # only canonical decimals, since "02" must not equal 2.
        self.exact_ints = frozenset(
            int(a) for a in exact if _is_canonical_int(a, allow_sign=True))
        self.globs = tuple(globs)
        # Each step is (dict key, list index or None).
        self.steps = tuple(
            (segment, int(segment) if _is_canonical_int(segment) else None)
            for segment in path.split("."))
        self.single = self.steps[0][0] if len(self.steps) == 1 else None

    def lookup(self, event: object) -> object:
        """The value at the path, or _MISSING."""
        value = event
        for key, index in self.steps:
            if isinstance(value, dict):
                value = value.get(key, _MISSING)
                if value is _MISSING:
                    return _MISSING
            elif index is not None and isinstance(value, list) and index < len(value):
                value = value[index]
            else:
                return _MISSING
        return value

    def holds(self, event: dict) -> bool:
        if self.single is not None:
            value = event.get(self.single, _MISSING)
        else:
            value = self.lookup(event)
        if value is _MISSING:
            return self.negate
        if type(value) is int and not self.globs:
            hit = value in self.exact_ints
        else:
            text = value_text(value)
            hit = text in self.exact
            if not hit:
                for glob in self.globs:
                    if glob(text) is not None:
                        hit = True
                        break
        return hit is not self.negate


def _is_canonical_int(text: str, allow_sign: bool = False) -> bool:
    """True for "0", "12" (and "-3" with allow_sign), not "01", "+1" or "1_0"."""
    digits = text
    if allow_sign and text.startswith("-"):
        digits = text[1:]
        if digits == "0":
            return False
    if not (digits.isascii() and digits.isdigit()):
        return False
    return digits == "0" or not digits.startswith("0")


class Filter:
    """All filter clauses of one request; an event must satisfy every one."""

    __slots__ = ("key", "_clauses")

    def __init__(self, clauses: Iterable[_Clause]) -> None:
        ordered = sorted(clauses, key=lambda c: (c.path, c.negate))
        self._clauses = tuple(ordered)
        # JSON, not query syntax, because alternatives may hold "&" or "=":
        # equal filters share subscribers and different ones never do.
        self.key = _dumps([
            [c.path + ("!" if c.negate else ""), c.alternatives] for c in ordered
        ])

    def matches(self, event: dict) -> bool:
        """Whether the decoded event passes every clause."""
        for clause in self._clauses:
            if not clause.holds(event):
                return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Filter) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"Filter({self.key})"


def parse_filters(params: Iterable[tuple[str, str]]) -> Filter | None:
    """Build the filter of a request from its decoded query parameters.

    Returns None when there is no `filter.` parameter, so unfiltered
    clients skip matching entirely.
    """
    alternatives: dict[str, set[str]] = {}
    for name, value in params:
        if not name.startswith(PREFIX):
            continue
        if len(name) > MAX_LENGTH:
            raise FilterError(
                f"{_short(name)}: filter name is longer than {MAX_LENGTH} characters")
        if len(value) > MAX_LENGTH:
            raise FilterError(f"{name}: value is longer than {MAX_LENGTH} characters")
        path = name[len(PREFIX):].removesuffix("!")
        if not path:
            raise FilterError(f"{name}: the path after 'filter.' is empty")
        if "" in path.split("."):
            raise FilterError(f"{name}: the path {path!r} has an empty segment")
        if not value:
            raise FilterError(f"{name}: the value is empty")
        given = value.split(",")
        if "" in given:
            raise FilterError(f"{name}: empty alternative in {_short(value)!r}")
        known = alternatives.get(name)
        if known is None:
            if len(alternatives) == MAX_NAMES:
                raise FilterError(f"{name}: more than {MAX_NAMES} different filter names")
            known = alternatives[name] = set()
        known.update(given)
        if len(known) > MAX_ALTERNATIVES:
            raise FilterError(f"{name}: more than {MAX_ALTERNATIVES} alternatives")
    if not alternatives:
        return None
    return Filter(
        _Clause(name[len(PREFIX):].removesuffix("!"), name.endswith("!"), values)
        for name, values in alternatives.items())
