"""The transform's HTTP client: ``POST /invocations`` with retries, one connection per thread.

A request that cannot reach the server, times out, or gets a 5xx answer is
tried again up to ``max_retries`` times (SageMaker's ``InvocationsMaxRetries``,
default 3), after 0.5 s, 1 s, 2 s... (at most 8 s). A 4xx answer is final at
once: the request itself is refused, and sending it again cannot help. A
kept-alive connection that the server closed meanwhile is reopened without
counting as a try.
"""
from __future__ import annotations

import http.client
import json
import logging
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from smchainer.errors import UsageError

logger = logging.getLogger(__name__)

#: SageMaker's InvocationsTimeoutInSeconds default.
DEFAULT_TIMEOUT = 600.0
#: SageMaker's InvocationsMaxRetries default.
DEFAULT_MAX_RETRIES = 3
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 8.0
#: seconds for /ping and /execution-parameters
QUICK_TIMEOUT = 10.0


@dataclass
class Answer:
    """The outcome of one request: its status (0: no answer), body, error text and tries."""

    status: int
    body: bytes = b""
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def error_message(body: bytes) -> str:
    """The server's JSON ``error``, else the start of the body."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace").strip() or "(empty body)"


def parse_url(url: str) -> tuple[str, str, int, str]:
    """``http://host:port/path`` -> ``(scheme, host, port, path)``; a :class:`UsageError`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"endpoint URL {url!r} must be http://HOST:PORT (or https://)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"endpoint URL {url!r} has a bad port") from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


class Client:
    """Requests to one server, safe to use from many threads.

    :param url: the server, ``http://host:port``.
    :param timeout: seconds one request may take.
    :param max_retries: tries after the first for retriable failures.
    :param token: a bearer token for ``Authorization``.
    :param cancelled: set to stop: no request is started or retried after it.
    """

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, token: str | None = None,
                 cancelled: threading.Event | None = None) -> None:
        self.url = url
        self.scheme, self.host, self.port, self.path = parse_url(url)
        self.timeout = timeout
        self.max_retries = max_retries
        self.token = token
        self.cancelled = cancelled or threading.Event()
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it has been used before."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, True
        kind = (http.client.HTTPSConnection if self.scheme == "https"
                else http.client.HTTPConnection)
        connection = kind(self.host, self.port, timeout=self.timeout)
        self._local.connection = connection
        with self._lock:
            self._opened.append(connection)
        return connection, False

    def _drop(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None
            with self._lock:
                if connection in self._opened:
                    self._opened.remove(connection)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request, no retries: ``(status, body)``; ``OSError``/``HTTPException`` raise."""
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for _ in range(2):
            connection, reused = self._connection()
            try:
                connection.request(method, self.path + path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                if response.will_close:
                    self._drop()
                return response.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop()
                if not reused:
                    raise
            except BaseException:
                self._drop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def invoke(self, body: bytes, content_type: str | None, accept: str | None) -> Answer:
        """``POST /invocations`` with retries (see the module docstring); never raises."""
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if accept:
            headers["Accept"] = accept
        attempt = 0
        while True:
            attempt += 1
            try:
                status, data = self.request("POST", "/invocations", body, headers)
            except (OSError, http.client.HTTPException) as error:
                answer = Answer(0, error=f"no answer from {self.url}: "
                                f"{type(error).__name__}: {error}", attempts=attempt)
            else:
                if 200 <= status < 300:
                    return Answer(status, data, attempts=attempt)
                answer = Answer(status, data, error=error_message(data), attempts=attempt)
            retriable = answer.status == 0 or answer.status >= 500
            if not retriable or attempt > self.max_retries or self.cancelled.is_set():
                return answer
            delay = min(FIRST_BACKOFF * 2 ** (attempt - 1), MAX_BACKOFF)
            logger.info("request failed (%s), try %d of %d in %.1f s", answer.error,
                        attempt + 1, self.max_retries + 1, delay)
            if self.cancelled.wait(delay):
                return answer

    def _quick(self, path: str) -> tuple[int, bytes]:
        """``GET path`` on a connection of its own, with a short timeout."""
        kind = (http.client.HTTPSConnection if self.scheme == "https"
                else http.client.HTTPConnection)
        connection = kind(self.host, self.port, timeout=min(self.timeout, QUICK_TIMEOUT))
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            connection.request("GET", self.path + path, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get_json(self, path: str) -> dict | None:
        """``GET path`` as a JSON object; None on any failure (no retries)."""
        try:
            status, data = self._quick(path)
            answer = json.loads(data) if status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        return answer if isinstance(answer, dict) else None

    def ping(self) -> int:
        """``GET /ping``'s status; 0 when nothing answers."""
        try:
            return self._quick("/ping")[0]
        except (OSError, http.client.HTTPException):
            return 0

    def close(self) -> None:
        """Close every thread's connection (once no request is in flight)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for connection in opened:
            connection.close()
