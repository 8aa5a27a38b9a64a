"""/ping under slow and idle clients, a full inference queue, worker kills and SIGTERM.

Every case starts a real server and holds /ping to answering within a second,
the platform's health check having a 2-second timeout. Clients are raw
sockets, so that they can be as slow or as silent as an attacker's.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from smchainer.testing import send_slowly
from tests.serving.conftest import MODEL_FN, inputs, make_model_dir, npy_bytes

SLOW_PREDICT = MODEL_FN + '''
import time


def predict_fn(input_data, model):
    time.sleep(float(os.environ.get("PREDICT_SECONDS", "0")))
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        return model(input_data).array
'''

SLOW_LOAD = MODEL_FN.replace("def model_fn(model_dir):\n", "def model_fn_fast(model_dir):\n") + '''
import time


def model_fn(model_dir):
    time.sleep(float(os.environ.get("LOAD_SECONDS", "0")))
    return model_fn_fast(model_dir)
'''


def ping_times(server, count: int = 5, pause: float = 0.2) -> list[float]:
    """Seconds each of ``count`` fresh-connection pings took (inf: no 200 within 2 s)."""
    times = []
    for _ in range(count):
        started = time.monotonic()
        try:
            ok = server.request("GET", "/ping", timeout=2).status == 200
        except OSError:
            ok = False
        times.append(time.monotonic() - started if ok else float("inf"))
        time.sleep(pause)
    return times


@pytest.fixture
def server(start_server, tmp_path):
    model_dir = make_model_dir(tmp_path / "model", code=SLOW_PREDICT)
    return start_server(["--model-dir", str(model_dir), "--workers", "1", "--threads", "4",
                         "--client-timeout", "3"], env={"PREDICT_SECONDS": "3"})


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def test_ping_answers_while_100_idle_connections_are_held(server) -> None:
    idle = [connect(server.port) for _ in range(100)]
    try:
        time.sleep(0.5)
        assert max(ping_times(server)) < 1.0
    finally:
        for sock in idle:
            sock.close()


def test_ping_answers_while_50_clients_send_headers_a_byte_at_a_time(server) -> None:
    stop = threading.Event()
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n"
    clients = [threading.Thread(target=send_slowly, args=(server.port, head, stop), daemon=True)
               for _ in range(50)]
    for client in clients:
        client.start()
    try:
        time.sleep(1)
        assert max(ping_times(server)) < 1.0
    finally:
        stop.set()


def test_ping_answers_while_8_clients_send_a_body_a_byte_at_a_time(server) -> None:
    stop = threading.Event()
    body = npy_bytes(inputs(1))
    request = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode())
    results: list[bytes] = []

    def slow_body() -> None:
        with connect(server.port) as sock:
            sock.settimeout(10)
            sock.sendall(request)
            for byte in body:
                if stop.wait(0.5):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
            try:
                results.append(sock.recv(4096))
            except OSError:
                results.append(b"")

    clients = [threading.Thread(target=slow_body, daemon=True) for _ in range(8)]
    for client in clients:
        client.start()
    try:
        time.sleep(1)
        assert max(ping_times(server)) < 1.0
        # The slow bodies are cut off at the client timeout (3 s) with a 408.
        for client in clients:
            client.join(timeout=10)
        assert len(results) == 8 and all(r.startswith(b"HTTP/1.1 408") for r in results), results
    finally:
        stop.set()


def test_a_client_that_stalls_its_head_is_dropped_after_the_client_timeout(server) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost")
        started = time.monotonic()
        sock.settimeout(10)
        assert sock.recv(4096) == b""  # closed by the server
        assert 2.5 < time.monotonic() - started < 6


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP answer from a raw socket: its status and body (nothing read past it)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def test_a_kept_alive_connections_next_heads_may_come_in_pieces_together_or_never(
        server) -> None:
    """A kept-alive connection's next head is read on the loop as soon as it is readable."""
    with connect(server.port) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock)[0] == 200
        for piece in (b"GET /execution-para", b"meters HTTP/1.1\r\nHo", b"st: x\r\n\r\n"):
            sock.sendall(piece)
            time.sleep(0.3)
        status, body = read_answer(sock)
        assert status == 200 and b"MaxPayloadInMB" in body, body
        # Two whole requests in one write: both answered, in order.
        sock.sendall(b"GET /execution-parameters HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock)[0] == 200
        assert read_answer(sock)[0] == 404
        # A head that stalls on a kept-alive connection is dropped after the client timeout.
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost")
        started = time.monotonic()
        sock.settimeout(10)
        assert sock.recv(4096) == b""
        assert 2.5 < time.monotonic() - started < 6
    assert max(ping_times(server, count=2)) < 1.0


def test_ping_answers_while_every_thread_waits_for_an_inference(server) -> None:
    replies: list[int] = []

    def infer() -> None:
        replies.append(server.post(npy_bytes(inputs(1)), "application/x-npy",
                                   "application/x-npy", timeout=30).status)

    busy = [threading.Thread(target=infer, daemon=True) for _ in range(4)]
    for thread in busy:
        thread.start()
    time.sleep(0.5)
    assert max(ping_times(server, count=3)) < 1.0
    for thread in busy:
        thread.join(timeout=30)
    assert replies == [200] * 4


def test_after_sigterm_new_connections_are_refused_and_the_request_in_flight_finishes(
        start_server, tmp_path) -> None:
    model_dir = make_model_dir(tmp_path / "model", code=SLOW_PREDICT)
    server = start_server(["--model-dir", str(model_dir), "--workers", "1"],
                          env={"PREDICT_SECONDS": "2"})
    replies: list[int] = []
    inflight = threading.Thread(target=lambda: replies.append(server.post(
        npy_bytes(inputs(1)), "application/x-npy", "application/x-npy", timeout=30).status))
    inflight.start()
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    assert time.monotonic() - started < 1
    inflight.join(timeout=30)
    assert replies == [200]


def test_a_replacement_worker_takes_no_traffic_before_its_model(start_server, tmp_path) -> None:
    """SIGKILL one of 2 workers under load: only the requests it held may fail, none is 503."""
    model_dir = make_model_dir(tmp_path / "model", code=SLOW_LOAD)
    server = start_server(["--model-dir", str(model_dir), "--workers", "2"],
                          env={"LOAD_SECONDS": "2"})
    time.sleep(2.5)  # both workers loaded
    statuses: list[int | str] = []
    stop = threading.Event()

    def load() -> None:
        body = npy_bytes(inputs(1))
        while not stop.is_set():
            try:
                statuses.append(server.post(body, "application/x-npy", "application/x-npy",
                                            timeout=10).status)
            except (OSError, http.client.HTTPException) as error:  # held by the killed worker
                statuses.append(type(error).__name__)

    clients = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(1)
    found = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True,
                           text=True, check=True)
    workers = [int(pid) for pid in found.stdout.split()]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    time.sleep(4)  # the replacement loads its model (2 s) meanwhile
    stop.set()
    for client in clients:
        client.join(timeout=15)
    failed = [s for s in statuses if s != 200]
    assert statuses.count(503) == 0, failed
    assert len(failed) <= 4, failed  # at most what the killed worker held, one per client
    assert statuses.count(200) > 20
