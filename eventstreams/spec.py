"""The OpenAPI 3 document served at `/?spec`; the streams are the enum of `{streams}`."""
from __future__ import annotations

from . import __version__
from .config import Config

_ERROR = {
    "description": "Error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "status": {"type": "integer"},
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "detail": {"type": "string"},
                    "method": {"type": "string"},
                    "uri": {"type": "string"},
                },
            }
        }
    },
}

_HEADER_LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "description": (
        "Where to resume: the `id` of the last event received, a JSON array of "
        "`{topic, partition, offset}` or `{topic, partition, timestamp}` objects "
        "(offset wins when both are given) or of topic names. Topics must belong to "
        "the requested streams; a subset of partitions limits the stream to them."
    ),
    "schema": {"type": "string"},
}

_QUERY_SINCE = {
    "name": "since",
    "in": "query",
    "description": (
        "Start at this time in each partition: UTC epoch milliseconds or an ISO-8601 "
        "date. Ignored when Last-Event-ID is given. Data older than the retention "
        "period is not available."
    ),
    "schema": {"type": "string"},
}

_FILTER_HELP = (
    "\n\nServer-side filters are query parameters `filter.<dotted.path>=a,b` (any of "
    "the comma-separated values; `*` and `?` glob; a name ending in `!` negates, as in "
    "`filter.namespace!=2`). Values compare against the JSON value's text (`false`, "
    "`0`, `enwiki`). Example: `?filter.wiki=enwiki,dewiki&filter.bot=false`."
)

_STREAM_RESPONSES = {
    "200": {
        "description": "A stream of events: Server-Sent Events, or newline-delimited "
        "JSON when the request accepts application/json.",
        "content": {
            "text/event-stream": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    },
    "400": _ERROR,
    "404": _ERROR,
    "429": _ERROR,
    "503": _ERROR,
}


def _example(title: str, body: dict) -> dict:
    """An x-amples entry as upstream's spec has them (service-checker runs
    them; an operation without one says `x-monitor: false`)."""
    response: dict = {"status": 200, "headers": {"content-type": "application/json"}}
    if body:
        response["body"] = body
    return {"title": title, "request": {}, "response": response}


def openapi_spec(config: Config) -> dict:
    names = sorted(
        {name for s in config.streams.values() for name in (s.name, *s.aliases)}
    )
    paths: dict = {
        "/v2/stream/{streams}": {
            "get": {
                "tags": ["streams"],
                "summary": "Subscribe to one or several streams.",
                "description": "A comma-separated list of configured streams." + _FILTER_HELP,
                "parameters": [
                    {
                        "name": "streams",
                        "in": "path",
                        "required": True,
                        "description": "Comma-separated list of stream names to subscribe to.",
                        "style": "simple",
                        "explode": False,
                        "schema": {"type": "array", "items": {"type": "string", "enum": names}},
                    },
                    _HEADER_LAST_EVENT_ID,
                    _QUERY_SINCE,
                ],
                "responses": _STREAM_RESPONSES,
                "x-monitor": False,  # streams never end: no service-checker probe
            }
        },
    }
    for stream in sorted(config.streams.values(), key=lambda s: s.name):
        description = stream.description or f"The {stream.name} stream."
        if stream.schema_title:
            description += f"\n\nSchema title: {stream.schema_title}"
        description += "\n\nTopics: " + ", ".join(stream.topics)
        for name in (stream.name, *stream.aliases):
            paths[f"/v2/stream/{name}"] = {
                "get": {
                    "tags": ["streams"],
                    "summary": f"{stream.name} events",
                    "description": description,
                    "parameters": [_HEADER_LAST_EVENT_ID, _QUERY_SINCE],
                    "responses": _STREAM_RESPONSES,
                    "x-monitor": False,
                }
            }
    paths["/v2/streams"] = {
        "get": {
            "tags": ["streams"],
            "summary": "The configured streams, their aliases, topics and descriptions.",
            "responses": {
                "200": {
                    "description": "A list of streams",
                    "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}},
                }
            },
            "x-amples": [_example("list the streams", {})],
        }
    }
    for path, summary, fields in (
        ("/_info", "Service name, version and description.", ("name", "description", "version", "home")),
        ("/_info/name", "Service name.", ("name",)),
        ("/_info/version", "Service version.", ("version",)),
    ):
        paths[path] = {
            "get": {
                "tags": ["service"],
                "summary": summary,
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
                },
                "x-amples": [_example(f"retrieve {path}", {f: "/.+/" for f in fields})],
            }
        }
    return {
        "openapi": "3.0.0",
        "info": {
            "version": __version__,
            "title": "EventStreams",
            "description": "Streams of JSON events over HTTP Server-Sent Events / EventSource",
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "externalDocs": {
            "description": "EventStreams on Wikitech",
            "url": "https://wikitech.wikimedia.org/wiki/Event_Platform/EventStreams_HTTP_Service",
        },
        "paths": paths,
    }
