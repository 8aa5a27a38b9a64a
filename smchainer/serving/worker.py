"""smchainer's gunicorn worker: gthread, with protocol errors in JSON and one-line logs.

gunicorn answers requests it cannot parse (a bad request line, a negative
Content-Length, header lines over the limits, a bad chunk size) itself,
before the app sees them, with an HTML page written by
:func:`gunicorn.util.write_error`; it offers no setting for that body. A
worker of this class is a serving process and nothing else, so it replaces
that function for the process with :func:`write_json_error`: every error a
client of ``smchainer-serve`` gets is ``{"error": ..., "status": N}``, with
gunicorn's own status and message. It also gives gunicorn's error log the
one-line formatter of smchainer's logs (:class:`smchainer.cli.OneLineFormatter`),
since gunicorn quotes parts of a refused request there.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from smchainer.cli import OneLineFormatter


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's protocol-error answer, as smchainer's JSON error body."""
    body = json.dumps({"error": mesg or reason, "status": int(status_int)}).encode()
    head = (f"HTTP/1.1 {int(status_int)} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


class ServingWorker(ThreadWorker):
    """The gthread worker with JSON protocol errors and one-line gunicorn logs."""

    def init_process(self) -> None:
        util.write_error = write_json_error
        for handler in self.log.error_log.handlers:
            current = handler.formatter or logging.Formatter()
            handler.setFormatter(OneLineFormatter(current._fmt, current.datefmt))
        super().init_process()
