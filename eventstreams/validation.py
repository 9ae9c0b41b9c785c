"""Schema validation of intake events, as EventGate does it.

Each event names its schema in `$schema` (`/mediawiki/recentchange/1.0.0`);
the schema is `jsonschema/<title>/<version>.json` (or `.yaml`) in a schema
repository laid out like Wikimedia's schemas-event-primary. Every versioned
schema of the repository is read and compiled once, at start-up, so
validating touches no file and only reads shared, compiled validators (safe
from the intake's worker thread).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

__all__ = ["BUNDLED", "SchemaError", "SchemaRepository"]

BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
VERSION = re.compile(r"\d+\.\d+\.\d+")
# /title/segments/1.2.3: no empty, dot-only or otherwise odd segment
URI = re.compile(r"/?((?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)+)(\d+\.\d+\.\d+)")
MAX_ERRORS = 10  # reported per event
MAX_MESSAGE = 300  # characters of one error message


class SchemaError(Exception):
    """The repository cannot be used (raised at start-up)."""


def _load(path: str) -> Any:
    with open(path, "rb") as f:
        if path.endswith(".json"):
            return json.load(f)
        return yaml.safe_load(f)


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(the event)"


class SchemaRepository:
    def __init__(self, root: str):
        self.root = root
        base = os.path.join(root, "jsonschema")
        if not os.path.isdir(base):
            raise SchemaError(f"{root!r} has no jsonschema/ directory")
        schemas: dict[str, Any] = {}  # "/title/1.0.0" -> schema
        for directory, _, files in sorted(os.walk(base)):
            title = os.path.relpath(directory, base).replace(os.sep, "/")
            for name in sorted(files):  # .json before .yaml: the same schema
                stem, ext = os.path.splitext(name)
                uri = f"/{title}/{stem}"
                if ext not in (".json", ".yaml", ".yml") or not VERSION.fullmatch(stem) or uri in schemas:
                    continue
                try:
                    schemas[uri] = _load(os.path.join(directory, name))
                except (OSError, ValueError, yaml.YAMLError) as e:
                    raise SchemaError(f"{os.path.join(directory, name)}: {e}") from None
        registry: Registry = Registry().with_resources(
            (uri, Resource.from_contents(schema, default_specification=DRAFT7))
            for uri, schema in schemas.items() if isinstance(schema, dict)
        )
        self.validators: dict[str, Any] = {}
        for uri, schema in schemas.items():
            try:
                cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
                cls.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise SchemaError(f"schema {uri}: {e.message}") from None
            self.validators[uri] = cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER)

    def __len__(self) -> int:
        return len(self.validators)

    def validate(self, event: dict) -> list[dict]:
        """The event's problems as [{path, rule, message}]; [] when it is valid."""
        uri = event.get("$schema")
        if not isinstance(uri, str) or not uri:
            return [{"path": "$schema", "rule": "required",
                     "message": "'$schema' must name the event's schema, e.g. /test/event/1.0.0"}]
        validator = self._validator(uri)
        if validator is None:
            return [{"path": "$schema", "rule": "schema",
                     "message": f"no schema {uri[:200]!r} in the schema repository"}]
        errors = sorted(validator.iter_errors(event), key=lambda e: list(map(str, e.absolute_path)))
        return [
            {"path": _path(e), "rule": str(e.validator), "message": e.message[:MAX_MESSAGE]}
            for e in errors[:MAX_ERRORS]
        ]

    def _validator(self, uri: str) -> Optional[Any]:
        # "/title/1.0.0", or a URL whose path holds /jsonschema/title/1.0.0
        path = uri.split("#", 1)[0]
        if "/jsonschema/" in path:
            path = path.split("/jsonschema/", 1)[1]
        match = URI.fullmatch(path)
        if match is None:
            return None
        return self.validators.get(f"/{match.group(1).rstrip('/')}/{match.group(2)}")


def describe(problems: list[dict]) -> str:
    """One line for the answer's `context`: "'bot': 'yes' is not of type 'boolean' (type)"."""
    return "; ".join(f"{p['path']!r}: {p['message']} ({p['rule']})" for p in problems)
