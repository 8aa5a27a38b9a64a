"""Errors that carry an HTTP status (serving) or an exit code (commands).

One place turns an exception into a status: :func:`http_status_of`. Hooks may
raise any exception with an integer ``status_code`` attribute (this module's
:class:`HTTPError` or a framework's) to choose the response status.
"""
from __future__ import annotations

__all__ = [
    "SmchainerError",
    "UsageError",
    "HTTPError",
    "BadRequest",
    "UnsupportedMediaType",
    "NotAcceptable",
    "PayloadTooLarge",
    "ModelNotLoaded",
    "PluginError",
    "http_status_of",
]


class SmchainerError(Exception):
    """A runtime error with a message fit for a user: the commands exit 1."""

    exit_code = 1


class UsageError(SmchainerError):
    """Bad command-line usage: the commands exit 2."""

    exit_code = 2


class PluginError(SmchainerError):
    """A plugin could not be loaded or registered."""


class HTTPError(SmchainerError):
    """An error that the server answers with ``status_code`` and a JSON body."""

    status_code = 500

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


class BadRequest(HTTPError):
    """The body could not be decoded, or has the wrong shape or dtype."""

    status_code = 400


class UnsupportedMediaType(HTTPError):
    """No decoder for the request's Content-Type."""

    status_code = 415


class NotAcceptable(HTTPError):
    """No encoder for any type the client accepts."""

    status_code = 406


class PayloadTooLarge(HTTPError):
    """The request body is over the configured limit."""

    status_code = 413


class ModelNotLoaded(HTTPError):
    """The worker has no model yet (or loading it failed)."""

    status_code = 503


class RequestTimeout(HTTPError):
    """The request's time ran out; its work was abandoned where it stood."""

    status_code = 504


def http_status_of(error: BaseException) -> int:
    """The HTTP status for an exception raised while handling a request.

    An integer ``status_code`` between 400 and 599 on the exception wins;
    everything else is a 500.
    """
    code = getattr(error, "status_code", None)
    if isinstance(code, int) and 400 <= code <= 599:
        return code
    return 500
