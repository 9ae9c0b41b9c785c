"""API errors with the JSON body EventStreams clients expect."""
from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    """An error answered as `{status, type, title, detail, method, uri}`
    (and a Retry-After header when retry_after is set). Every error answer
    of the API, the intake and the connection-level refusals is one, and
    its body always names the request's method and URI; the intake answers
    its outcomes (201, 202, 207) in the same shape."""

    def __init__(self, status: int, type: str, title: str, detail: str, retry_after: Optional[int] = None):
        super().__init__(detail)
        self.status, self.type, self.title, self.detail = status, type, title, detail
        self.retry_after = retry_after

    def body(self, method: str, uri: str) -> dict:
        return {
            "status": self.status,
            "type": self.type,
            "title": self.title,
            "detail": self.detail,
            "method": method.lower(),
            "uri": uri,
        }


def not_found(streams: list[str]) -> ApiError:
    return ApiError(400, "not_found", "Stream Not Found", "Invalid streams: " + ",".join(streams))


def bad_last_event_id(detail: str) -> ApiError:
    return ApiError(400, "invalid_last_event_id", "Invalid Last-Event-ID", detail)


def unavailable(detail: str, retry_after: Optional[int] = None) -> ApiError:
    return ApiError(503, "service_unavailable", "Service Unavailable", detail, retry_after)
