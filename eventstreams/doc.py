"""`/?doc`: Swagger UI over the daemon's own `/?spec`, as upstream serves it.

Swagger UI's static files come from the `swagger-ui-bundle` package (PyPI,
maintained with connexion: swagger-ui's release files, no build step); the
page (`eventstreams/doc/`) is ours, so nothing is inline and the strict CSP
of the other pages holds. Files are `/?doc&path=NAME`, read once at start-up.
"""
from __future__ import annotations

import os
from typing import Optional

DOC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "doc")
# What the page loads from the package (the rest of it is not served).
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def swagger_dir() -> str:
    import swagger_ui_bundle

    return str(swagger_ui_bundle.swagger_ui_path)


def load(types: dict[str, str]) -> dict[str, tuple[str, bytes]]:
    """The page's files by name: (content type from `types`, by extension,
    as the UI's), bytes; "" is the page."""
    paths = {name: os.path.join(DOC_DIR, name) for name in os.listdir(DOC_DIR) if not name.startswith(".")}
    paths.update({name: os.path.join(swagger_dir(), name) for name in SWAGGER_FILES})
    files = {}
    for name, path in paths.items():
        kind = types.get(os.path.splitext(name)[1])
        if kind is not None:
            with open(path, "rb") as f:
                files[name] = (kind, f.read())
    files[""] = files.pop("index.html")
    return files


def query_value(query: bytes, key: bytes) -> Optional[bytes]:
    """A query parameter's raw value ("" when it has none), None when absent."""
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == key:
            return value
    return None
