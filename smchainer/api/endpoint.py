"""A local endpoint: one ``smchainer-serve`` process group on a loopback port.

The server runs in its own session (process group), so that stopping it can
make sure that no worker outlives it: SIGTERM to the gunicorn master (which
lets requests in flight finish), then SIGKILL for the whole group if it has
not gone after ``stop_timeout`` seconds. Its output goes to a log file whose
last lines are in every error about it. Endpoints still running when Python
exits are stopped.
"""
from __future__ import annotations

import collections
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from smchainer.errors import SmchainerError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
LOG_TAIL_LINES = 30
#: under SageMaker's 30 s between SIGTERM and SIGKILL, above the server's 25 s drain
STOP_TIMEOUT = 30.0
POLL_SECONDS = 0.2
LOADED_METRIC = "smchainer_model_loaded{"

#: endpoints started by this process, by name, for ``Predictor(endpoint_name)``
_RUNNING: dict[str, LocalEndpoint] = {}


def metric_value(line: str) -> float | None:
    """The value of one Prometheus sample line (``1`` or ``1.0`` alike), None if unreadable."""
    try:
        return float(line.rsplit(" ", 1)[-1])
    except ValueError:
        return None


class EndpointError(SmchainerError):
    """The endpoint did not come up; the message ends with the server's last log lines."""

    def __init__(self, message: str, log_tail: Sequence[str] = ()) -> None:
        self.reason = message
        self.log_tail = list(log_tail)
        text = message
        if self.log_tail:
            text += "\nlast lines of the server log:\n" + "\n".join(self.log_tail)
        super().__init__(text)


def http_get(port: int, path: str, host: str = HOST, timeout: float = 5) -> tuple[int, str]:
    """``GET path`` on a local server: the status (0 when nothing answers) and the body."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    except OSError:
        return 0, ""
    finally:
        connection.close()


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes of process group ``group`` (Linux ``/proc``; else [])."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(entry.name))
    return sorted(members)


def _terminate(process: subprocess.Popen[bytes], work_dir: str, timeout: float) -> int | None:
    """Stop the server group (SIGTERM, wait, SIGKILL) and remove its work dir."""
    group = process.pid
    try:
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("server %d still running %.0f s after SIGTERM: killing it",
                               group, timeout)
                _kill_group(group)
                process.wait()
        # Workers normally leave with their master; make sure none was left behind.
        if group_members(group):
            _kill_group(group)
            deadline = time.monotonic() + 5
            while group_members(group) and time.monotonic() < deadline:
                time.sleep(0.05)
        return process.returncode
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


class LocalEndpoint:
    """``smchainer-serve`` on ``127.0.0.1:<free port>``, started by :meth:`start`.

    :param name: the endpoint's name (``Predictor(name)`` finds it).
    :param model_data: a model directory, ``model.tar.gz`` or ``s3://`` URI of one.
    :param entry_point: the user script with ``model_fn`` (and the other handlers).
    :param workers: gunicorn worker processes.
    :param env: the server's whole environment.
    """

    def __init__(self, name: str, model_data: str, entry_point: str | None = None,
                 workers: int = 1, env: Mapping[str, str] | None = None,
                 endpoint_url: str | None = None) -> None:
        self.name = name
        self.model_data = str(model_data)
        self.entry_point = entry_point
        self.workers = workers
        self.env = dict(os.environ if env is None else env)
        self.endpoint_url = endpoint_url
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.work_dir = ""
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self.work_dir) / "server.log"

    def command(self) -> list[str]:
        """The ``smchainer-serve`` command line."""
        command = [sys.executable, "-m", "smchainer.serving.cli", "--model-dir", self.model_data,
                   "--bind", f"{HOST}:{self.port}", "--workers", str(self.workers)]
        if self.entry_point:
            command += ["--entry-point", self.entry_point]
        if self.endpoint_url:
            command += ["--endpoint-url", self.endpoint_url]
        return command

    def start(self, wait: bool = True, timeout: float = 120.0) -> LocalEndpoint:
        """Start the server; with ``wait``, return once every worker's model is loaded.

        Raises :class:`EndpointError` with the server's last log lines when it
        exits, when a worker's ``model_fn`` fails, or after ``timeout`` seconds.
        """
        if self.process is not None:
            raise SmchainerError(f"endpoint {self.name!r} was already started")
        if self.name in _RUNNING:
            raise SmchainerError(f"an endpoint named {self.name!r} is already running")
        self.port = free_port()
        self.work_dir = tempfile.mkdtemp(prefix=f"smchainer-endpoint-{self.name[:40]}-")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, _terminate, self.process, self.work_dir,
                                           STOP_TIMEOUT)
        _RUNNING[self.name] = self
        logger.info("endpoint %s: starting %s", self.name, " ".join(self.command()))
        if wait:
            try:
                self.wait_until_ready(timeout)
            except BaseException as error:
                tail = self.log_tail()
                self.stop()
                if isinstance(error, EndpointError):
                    raise EndpointError(error.reason, tail) from None
                raise
        return self

    def wait_until_ready(self, timeout: float) -> None:
        """Poll ``/ping`` (and ``/metrics`` for every worker) until the model is loaded."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise EndpointError(
                    f"endpoint {self.name!r}: the server exited with status {code} before it "
                    f"was ready: {self._error_line() or 'see the log'}")
            status, body = self.get("/ping")
            if status == 503 and "could not be loaded" in body:
                raise EndpointError(f"endpoint {self.name!r}: {_error_message(body)}")
            if status == 200 and self.loaded_workers() >= self.workers:
                logger.info("endpoint %s ready at %s", self.name, self.url)
                return
            if time.monotonic() > deadline:
                raise EndpointError(f"endpoint {self.name!r} was not ready after {timeout:g} s")
            time.sleep(POLL_SECONDS)

    def loaded_workers(self) -> int:
        """How many workers report their model loaded (``/metrics``)."""
        status, body = self.get("/metrics")
        if status != 200:
            return 0
        return sum(1 for line in body.splitlines()
                   if line.startswith(LOADED_METRIC) and metric_value(line) == 1)

    def get(self, path: str) -> tuple[int, str]:
        """``GET path`` on the server: the status (0 when unreachable) and the body."""
        return http_get(self.port, path)

    def _error_line(self) -> str:
        for line in reversed(self.log_tail(200)):
            if line.startswith("Error:"):
                return line
        return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The server log's last ``lines`` lines."""
        try:
            with open(self.log_path, errors="replace") as log:
                return [line.rstrip("\n") for line in collections.deque(log, maxlen=lines)]
        except OSError:
            return []

    def logs(self) -> str:
        """The whole server log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def process_ids(self) -> list[int]:
        """The server's live processes: the master and its workers."""
        return group_members(self.process.pid) if self.process is not None else []

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the server and every worker; the master's exit status (None if never started)."""
        if self.process is None:
            return None
        if self._finalizer is None or not self._finalizer.alive:
            return self.process.returncode
        _RUNNING.pop(self.name, None)
        if self._finalizer is not None:
            self._finalizer.detach()
        code = _terminate(self.process, self.work_dir, timeout)
        logger.info("endpoint %s stopped (status %s)", self.name, code)
        return code


def find_endpoint(name: str) -> LocalEndpoint | None:
    """The running endpoint named ``name`` that this process started."""
    return _RUNNING.get(name)


def _error_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.strip()
