"""smchainer's gunicorn worker: gthread, with request heads read on the event loop.

Why not gunicorn's plain ``gthread``: it hands every new connection, and
every kept-alive one that turns readable, to a pool thread that then reads
the request's head with a blocking socket. A client that connects and sends
nothing holds a thread for five seconds; one that sends its headers a byte a
second holds it for as long as it likes; with ``--threads 4`` four such
clients, or four requests waiting for the model, leave ``/ping`` unanswered
and the platform's 2-second health check takes a healthy worker out of
service. This worker keeps the thread pool for work and gives it only
complete request heads:

- **Heads on the event loop.** A connection's bytes are read, without
  blocking, by the worker's main loop until the head (request line and
  headers) is complete; only then is it parsed and handed on. A client gets
  ``--client-timeout`` seconds for its head (from connecting, or from its
  previous answer on a kept-alive connection) and is then dropped; an
  over-long head is a 431. Idle connections cost a file descriptor, never a
  thread, up to gunicorn's ``worker_connections`` per worker.
- **Inference requests skip the pool.** A ``POST /invocations`` (or to the
  served model's ``/v2/models/NAME/infer``) whose head
  is plain (:mod:`smchainer.serving.direct` says which) has its body read
  on the main loop too, within ``--client-timeout`` (then 408), and goes
  straight to the inference thread. That thread sends the answer, head and
  body in one non-blocking ``send``, the moment it has it; the main loop then
  logs the access line and keeps the connection (a pipelined next request
  included), and answers 504 itself when an inference runs past
  ``--timeout``. An answer the socket cannot take at once is finished by a
  pool thread. Such a request holds no thread while it waits; every other
  request (chunked bodies, bodies over 1 MiB, ``Expect``, the other KServe
  routes, anything unusual) takes gunicorn's path below.
- **Health checks never wait for a thread.** ``GET``/``HEAD /ping`` and
  ``GET /metrics`` without a body are answered right there on the main loop
  (both are a state check and a few bytes), so neither slow clients nor a
  full inference queue can delay them.
- **Bodies have a deadline too**: see
  :class:`smchainer.serving.app.BodyDeadlines`, which the app uses while it
  reads a body on a pool thread.
- **No traffic before the model.** A worker whose model is still loading
  does not accept connections while another worker of the server is ready
  (:class:`smchainer.serving.app.WorkerMarkers`; a replacement for a killed
  worker, say), so clients are not answered 503
  by it; when no worker is ready, it accepts and says 503 "still loading".
- **SIGTERM closes the listener at once**, so new connections are refused
  instead of waiting in the backlog of a worker that will never accept them;
  requests in flight still finish within the graceful timeout.
- **One heartbeat per half second.** gthread touches its heartbeat file
  (``os.utime``) on every turn of its loop, several times a request; each
  call lets go of the GIL and waits to get it back behind the pool and
  inference threads. This worker writes it every :data:`HEARTBEAT_SECONDS`
  (or a quarter of its timeout, when shorter), its loop waking for it when
  idle, far within the master's timeout. gthread's look at whether the master
  still lives (``getppid``, every turn) keeps the same pace.
- **Kept-alive connections are read at once.** When one turns readable, its
  head is read in the same turn of the loop, the socket staying registered
  (gthread unregisters it, registers it again and reads on the next turn).
- **Protocol errors in JSON.** gunicorn answers requests it cannot parse
  itself, with an HTML page written by :func:`gunicorn.util.write_error`,
  and offers no setting for that body. A worker of this class is a serving
  process and nothing else, so it replaces that function for the process
  with :func:`write_json_error`: every error a client of ``smchainer-serve``
  gets is ``{"error": ..., "status": N}``, with gunicorn's status and
  message. gunicorn's error log gets the one-line formatter of smchainer's
  logs, since gunicorn quotes parts of refused requests there.

It builds on ``gthread``'s connection objects and poller (gunicorn 27); the
request parsing, keep-alive handling, access log and error answers are
gunicorn's own.
"""
from __future__ import annotations

import concurrent.futures
import errno
import heapq
import itertools
import json
import logging
import os
import selectors
import time
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from smchainer.cli import OneLineFormatter
from smchainer.serving.balance import NOT_TAKING, AcceptPacer
from smchainer.serving.direct import DirectHead, Limits, Recognizer, answer_bytes

#: A head longer than this (request line plus every header) is refused with 431.
MAX_HEAD_BYTES = 64 * 1024
#: Requests answered on the main loop: a method and path, with no body.
INLINE_REQUESTS = ((b"GET", b"/ping"), (b"HEAD", b"/ping"), (b"GET", b"/metrics"),
                   (b"GET", b"/v2/health/live"), (b"GET", b"/v2/health/ready"))
#: How often a loading worker looks again whether a sibling is ready.
READY_CHECK_SECONDS = 0.1
#: The heartbeat (the mtime of gunicorn's worker temp file, which the master
#: watches against its timeout) is written at most this often, and at most a
#: quarter of the worker's timeout apart.
HEARTBEAT_SECONDS = 0.5


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's protocol-error answer, as smchainer's JSON error body."""
    body = json.dumps({"error": mesg or reason, "status": int(status_int)}).encode()
    head = (f"HTTP/1.1 {int(status_int)} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


def inline_request(head: bytes) -> bool:
    """Whether a complete head is a health check or metrics scrape, with no body."""
    request_line, _, headers = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or (parts[0], parts[1]) not in INLINE_REQUESTS:
        return False
    lowered = headers.lower()
    return b"content-length:" not in lowered and b"transfer-encoding:" not in lowered


class ServingWorker(ThreadWorker):
    """gthread with heads read on the event loop (see the module docstring)."""

    alive: bool  # gunicorn's, set in its base class

    def init_process(self) -> None:
        util.write_error = write_json_error
        for handler in self.log.error_log.handlers:
            current = handler.formatter or logging.Formatter()
            handler.setFormatter(OneLineFormatter(current._fmt, current.datefmt))
        self._checked_siblings = 0.0
        self._sibling_ready = False
        self._heartbeat_every = min(HEARTBEAT_SECONDS, self.timeout / 4)
        self._last_heartbeat = -float("inf")
        self._checked_parent = -float("inf")
        #: direct requests at the inference thread, by number: (conn, request)
        self._direct: dict[int, tuple[TConn, Any]] = {}
        #: their (deadline, number), a heap; finished ones are dropped when on top
        self._deadlines: list[tuple[float, int]] = []
        self._numbers = itertools.count()
        #: this worker's share of new connections (see smchainer.serving.balance)
        self._pacer = AcceptPacer(getattr(self.app, "board", None),
                                  getattr(self, "smchainer_index", 0), os.getpid())
        super().init_process()

    def run(self) -> None:
        # Read once: each gunicorn setting is a property lookup through its Config.
        self._ssl: bool = self.cfg.is_ssl
        self._keepalive: float = self.cfg.keepalive
        routes: frozenset[bytes] = getattr(self.wsgi, "direct_routes", frozenset())
        self._direct_head: Recognizer | None = None
        if routes and not self._ssl:  # TLS: gthread's way throughout
            limit = getattr(getattr(self.wsgi, "settings", None), "max_payload_bytes", 0)
            self._direct_head = Recognizer(routes, Limits.of(self.cfg, limit))
        try:
            super().run()
        finally:
            self._pacer.withdraw()
            for name in ("ready_markers", "stuck_markers"):
                markers = getattr(self.wsgi, name, None)
                if markers is not None:
                    markers.clear()

    def is_parent_alive(self) -> bool:
        """gthread's check that the master still lives, at the heartbeat's pace."""
        now = time.monotonic()
        if now - self._checked_parent < self._heartbeat_every:
            return True
        self._checked_parent = now
        return bool(super().is_parent_alive())

    def notify(self) -> None:
        """The heartbeat, at most every ``_heartbeat_every`` seconds (see the module docstring)."""
        now = time.monotonic()
        if now - self._last_heartbeat >= self._heartbeat_every:
            self._last_heartbeat = now
            super().notify()

    # -- settings from the app ------------------------------------------------

    @property
    def client_timeout(self) -> float:
        settings = getattr(self.wsgi, "settings", None)
        return float(getattr(settings, "client_timeout", 10))

    def loading(self) -> bool:
        holder = getattr(self.wsgi, "holder", None)
        return holder is not None and holder.state in ("waiting", "loading")

    # -- accepting --------------------------------------------------------------

    def hold_back(self) -> bool:
        """Whether this worker leaves new connections to a sibling that is ready."""
        if not self.loading():
            return False
        now = time.monotonic()
        if now - self._checked_siblings > READY_CHECK_SECONDS:
            self._checked_siblings = now
            markers = getattr(self.wsgi, "ready_markers", None)
            self._sibling_ready = markers is not None and markers.another_ready()
        return self._sibling_ready

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._accepting and self.alive and self.hold_back():
            self.set_accept_enabled(False)
            timeout = min(timeout, READY_CHECK_SECONDS)
        taking = self.alive and self.nr_conns < self.worker_connections and not self.loading()
        self._pacer.publish(self.nr_conns if taking else NOT_TAKING)
        if not self._accepting and self._pacer.resume_at:  # listening again soon
            timeout = min(timeout, max(self._pacer.resume_at - time.monotonic(), 0.0))
        # Back in time for the next heartbeat, which the loop writes before it waits again,
        # and for the first deadline of a direct request (its 504).
        due = self._last_heartbeat + self._heartbeat_every
        first = self.first_deadline()
        if first is not None:
            due = min(due, first)
        super().wait_for_and_dispatch_events(min(timeout, max(due - time.monotonic(), 0.0)))

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread's, except that a worker letting connections go to a sibling waits a moment."""
        if enabled and self._pacer.resume_at:
            if time.monotonic() < self._pacer.resume_at:
                return
            self._pacer.resume_at = 0.0
        super().set_accept_enabled(enabled)

    def accept(self, listener: Any) -> None:
        if self._pacer.should_defer(self.nr_conns, time.monotonic()):
            self.set_accept_enabled(False)  # a sibling with fewer connections goes first
            return
        if self._ssl:  # TLS must be unwrapped before a head can be read: gthread's way
            super().accept(listener)
            return
        try:
            client_sock, client_addr = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        self.await_head(conn)

    def handle_exit(self, sig: Any, frame: Any) -> None:
        """SIGTERM: stop listening at once (new connections are refused), finish the rest."""
        if self.alive:
            self.method_queue.defer(self.close_listeners)
        super().handle_exit(sig, frame)

    def close_listeners(self) -> None:
        self.set_accept_enabled(False)
        for listener in self.sockets:
            try:
                listener.close()
            except OSError:
                pass

    # -- request heads on the main loop ---------------------------------------

    def await_head(self, conn: TConn) -> None:
        """Read ``conn``'s next head on the main loop, within the client timeout."""
        conn.sock.setblocking(False)
        self._expect_head(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_head_bytes, conn))

    def _expect_head(self, conn: TConn, buffered: bytes | bytearray = b"") -> None:
        """``conn`` waits for its head from now on, with ``buffered`` read already."""
        conn.head = bytearray(buffered)
        conn.body_coming = False
        conn.timeout = time.monotonic() + self.client_timeout
        self.pending_conns.append(conn)

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        """A kept-alive connection has its next request coming: read its head here too.

        The socket stays registered (``modify`` with the same events only swaps
        the callback, no system call) and non-blocking, as gthread left it,
        and its bytes are read at once rather than on the loop's next turn.
        """
        if self._ssl:
            super().on_client_socket_readable(conn, client)
            return
        self.keepalived_conns.remove(conn)
        self._expect_head(conn)
        self.poller.modify(client, selectors.EVENT_READ, partial(self.on_head_bytes, conn))
        self.on_head_bytes(conn, client)

    def _drop_pending(self, conn: TConn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass
        try:
            self.pending_conns.remove(conn)
        except ValueError:
            pass

    def on_head_bytes(self, conn: TConn, sock: Any) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop_pending(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.head += data
        self.took_head_bytes(conn)

    def took_head_bytes(self, conn: TConn) -> None:
        """``conn``'s buffer has grown: hand its head on once it is complete."""
        if b"\r\n\r\n" not in conn.head:
            if len(conn.head) > MAX_HEAD_BYTES:
                self._drop_pending(conn)
                self.nr_conns -= 1
                try:
                    write_json_error(conn.sock, 431, "Request Header Fields Too Large",
                                     f"the request head is over {MAX_HEAD_BYTES} bytes")
                except OSError:
                    pass
                conn.close()
            return
        direct = None
        if self._direct_head is not None:
            self.wsgi.came_back(id(conn))  # if it was answered on the direct path before
            direct = self._direct_head(conn.head)
        if direct is not None:
            self.await_body(conn, direct)
            return
        self._drop_pending(conn)
        head = bytes(conn.head)
        del conn.head
        conn.sock.setblocking(True)
        conn.init()
        conn.parser.unreader.unread(head)
        conn.data_ready = True
        if inline_request(head):
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                future.set_result(self.handle(conn))
            except BaseException as error:  # handle() answers errors itself; this is a last guard
                future.set_exception(error)
            self.finish_request(conn, future)
        else:
            self.enqueue_req(conn)

    # -- the direct path (see smchainer.serving.direct) ------------------------

    def await_body(self, conn: TConn, head: DirectHead) -> None:
        """Start ``conn``'s direct request once its body is here, reading it on this loop."""
        conn.direct = head
        if len(conn.head) >= head.total:
            self._drop_pending(conn)
            self.start_direct(conn)
            return
        # The body gets the client timeout from the end of its head, as on a pool thread.
        self.pending_conns.remove(conn)
        conn.timeout = time.monotonic() + self.client_timeout
        self.pending_conns.append(conn)
        conn.body_coming = True
        self.wsgi.body_on_its_way(True)
        self.poller.modify(conn.sock, selectors.EVENT_READ, partial(self.on_body_bytes, conn))

    def _body_ended(self, conn: TConn) -> None:
        if conn.body_coming:
            conn.body_coming = False
            self.wsgi.body_on_its_way(False)

    def on_body_bytes(self, conn: TConn, sock: Any) -> None:
        try:
            data = sock.recv(max(65536, conn.direct.total - len(conn.head)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away mid-body: nobody to answer
            self._body_ended(conn)
            self._drop_pending(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.head += data
        if len(conn.head) >= conn.direct.total:
            self._body_ended(conn)
            self._drop_pending(conn)
            self.start_direct(conn)

    def start_direct(self, conn: TConn) -> None:
        """Give ``conn``'s complete request to the app; answer it now or when it is done."""
        head, buffer = conn.direct, conn.head
        conn.direct = None
        body = bytes(buffer[head.head_bytes:head.total])
        conn.head = buffer[head.total:]  # a pipelined next request, if any
        conn.keep_alive = head.keep_alive
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False
        request = self.wsgi.start_direct(head.environ, body, head.arrived)
        if request.answer is not None:
            self.sent_direct(conn, *self.write_direct(conn, request.answer))
            return
        number = next(self._numbers)
        self._direct[number] = (conn, request)
        heapq.heappush(self._deadlines, (request.deadline, number))
        request.future.add_done_callback(partial(self._inference_done, number, conn, request))

    def _inference_done(self, number: int, conn: TConn, request: Any, _: Any) -> None:
        """Where the inference ended (its thread, normally): send the answer from there at once.

        Unless the loop's timer has claimed the request for its 504 first. The
        loop does the rest (:meth:`sent_direct`): the access line, the
        connection kept alive or closed.
        """
        if not request.claim():
            return
        try:
            written = self.write_direct(conn, self.wsgi.finish_direct(request))
        except Exception:  # never leave the connection waiting for nothing
            self.log.exception("a direct answer failed")
            written = (b"", -1, False, None)
        self.method_queue.defer(self.sent_direct, conn, *written, number)

    def first_deadline(self) -> float | None:
        """The first deadline of the direct requests still waiting for their inference."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in self._direct:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def expire_direct(self) -> None:
        """504 for the direct requests whose inference has run past their deadline."""
        now = time.monotonic()
        while (first := self.first_deadline()) is not None and first <= now:
            _, number = heapq.heappop(self._deadlines)
            conn, request = self._direct.pop(number)
            if request.claim():
                self.sent_direct(conn, *self.write_direct(conn, self.wsgi.finish_direct(request)))

    def write_direct(self, conn: TConn, answer: tuple[str, list[tuple[str, str]], Any]
                     ) -> tuple[bytes, int, bool, Any]:
        """Send a direct answer, head and body in one non-blocking ``send``.

        Returns the bytes, how many were sent (-1: the client went away), whether
        the connection stays open and the answer's body (for its access line).
        """
        status, headers, body = answer
        keep_alive = (conn.keep_alive and self.alive and self._keepalive > 0
                      and len(self.keepalived_conns) < self.max_keepalived)
        try:
            data = answer_bytes(status, headers, body.body, keep_alive)
        except ValueError as error:  # as gunicorn's own answers: a 500 instead
            self.log.error("a direct answer could not be written: %s", error)
            payload = json.dumps({"error": f"the answer could not be written: {error}",
                                  "status": 500}).encode()
            data = answer_bytes("500 Internal Server Error", [
                ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
                payload, keep_alive)
        if keep_alive:  # before the send: the client cannot be back before it counts
            self.wsgi.answered(id(conn))
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = -1
        return data, sent, keep_alive, body

    def sent_direct(self, conn: TConn, data: bytes, sent: int, keep_alive: bool, body: Any,
                    number: int | None = None) -> None:
        """On this loop, after :meth:`write_direct`: the rest of the answer, then the connection."""
        if number is not None:
            self._direct.pop(number, None)
        if sent < 0:  # the client went away
            if body is not None:
                body.close()
            self.nr_conns -= 1
            conn.close()
            return
        if sent < len(data):  # a client slow to read: a pool thread waits for it
            rest = self.tpool.submit(self._send_rest, conn, memoryview(data)[sent:])
            rest.add_done_callback(lambda done: self.method_queue.defer(
                self._after_rest, conn, keep_alive, body, done))
            return
        body.close()  # the access line, after the answer
        self.after_direct(conn, keep_alive)

    def _send_rest(self, conn: TConn, rest: memoryview) -> bool:
        """On a pool thread: the rest of an answer, each wait for the client at most its timeout."""
        try:
            conn.sock.settimeout(self.client_timeout)
            while rest:  # not sendall: its timeout bounds the whole answer, not each wait
                rest = rest[conn.sock.send(rest):]
            conn.sock.setblocking(False)
            return True
        except OSError:
            return False

    def _after_rest(self, conn: TConn, keep_alive: bool, body: Any,
                    done: concurrent.futures.Future[bool]) -> None:
        body.close()
        if done.result():
            self.after_direct(conn, keep_alive)
        else:
            self.nr_conns -= 1
            conn.close()

    def after_direct(self, conn: TConn, keep_alive: bool) -> None:
        """An answered direct request's connection: closed, kept alive, or its next head read."""
        if not keep_alive:
            self.nr_conns -= 1
            self.tpool.submit(conn.close, True)  # lingers for the client's FIN: off this loop
            return
        if conn.head:  # the next request came with this one: read it on the loop's next turn
            self._expect_head(conn, conn.head)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_head_bytes, conn))
            self.method_queue.defer(self._took_buffered, conn)
            return
        conn.timeout = time.monotonic() + self._keepalive  # gthread's set_timeout
        if not self.alive:
            conn.timeout = min(conn.timeout, time.monotonic() + STOP_KEEPALIVE_LINGER)
        self.keepalived_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_client_socket_readable, conn))

    def _took_buffered(self, conn: TConn) -> None:
        if conn in self.pending_conns and not conn.body_coming:
            self.took_head_bytes(conn)

    def murder_pending(self) -> None:
        """Drop connections past their head's deadline; a body's is answered 408 first."""
        now = time.monotonic()
        while self.pending_conns and self.pending_conns[0].timeout <= now:
            conn = self.pending_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            if getattr(conn, "body_coming", False):
                self._body_ended(conn)
                status, headers, body = self.wsgi.late_body(conn.direct.environ)
                try:
                    conn.sock.send(answer_bytes(status, headers, body.body, False))
                except OSError:
                    pass
                body.close()
            self.nr_conns -= 1
            conn.close()
        self.expire_direct()
