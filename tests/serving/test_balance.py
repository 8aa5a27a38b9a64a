"""New connections spread evenly over the workers (smchainer.serving.balance).

The board and the pacer on their own (shared across a fork, the deferral
and its limit), the worker's accept with them, the master clearing a
worker's slot, and a real two-worker server given a burst of connections.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import re
import socket
import time
import types
from typing import Any

import numpy as np
import pytest
from gunicorn.workers.gthread import ThreadWorker

from smchainer import content
from smchainer.serving import gunicorn_app
from smchainer.serving.balance import (
    ACCEPT_RECHECK_SECONDS,
    MAX_ACCEPT_DEFER_SECONDS,
    NOT_TAKING,
    AcceptPacer,
    ConnectionBoard,
)
from smchainer.serving.worker import ServingWorker
from tests.serving.conftest import npy_bytes
from tests.serving.test_worker_loop import bare_worker


def test_the_board_reports_the_fewest_connections_of_the_other_workers_taking_any():
    board = ConnectionBoard(3)
    assert board.fewest_elsewhere(0) is None  # nobody has said anything
    board.publish(0, 1, 100)
    board.publish(1, 5, 101)
    board.publish(2, NOT_TAKING, 102)  # loading: nobody waits for it
    assert board.fewest_elsewhere(0) == 5
    assert board.fewest_elsewhere(1) == 1
    assert board.read(2) == (NOT_TAKING, 102)
    board.publish(7, 0, 103)  # a worker past the board's slots (more workers than planned)
    assert board.fewest_elsewhere(0) == 5
    board.clear(1)
    assert board.fewest_elsewhere(0) is None


def test_a_forked_workers_slot_is_seen_by_its_siblings():
    board = ConnectionBoard(2)
    pid = os.fork()
    if pid == 0:  # the "worker"
        board.publish(1, 7, os.getpid())
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert board.read(1) == (7, pid)
    assert board.fewest_elsewhere(0) == 7


def test_a_worker_lets_a_connection_go_to_a_sibling_with_fewer_for_a_limited_time():
    board = ConnectionBoard(2)
    pacer = AcceptPacer(board, 0, 1)
    board.publish(1, 2, 2)
    assert not pacer.should_defer(2, now=10.0)  # as many: take it
    assert pacer.should_defer(3, now=10.0)
    assert pacer.resume_at == pytest.approx(10.0 + ACCEPT_RECHECK_SECONDS)
    now = 10.0
    while now - 10.0 < MAX_ACCEPT_DEFER_SECONDS:  # the sibling never takes it
        assert pacer.should_defer(3, now)
        now += ACCEPT_RECHECK_SECONDS
    assert not pacer.should_defer(3, now)  # waited long enough: the connection is taken
    later = now + 1.0  # a new connection, much later: a new episode
    assert pacer.should_defer(3, later)
    board.publish(1, 3, 2)
    assert not pacer.should_defer(3, later + ACCEPT_RECHECK_SECONDS)


def test_a_single_worker_or_no_board_never_defers():
    assert not AcceptPacer(None, 0, 1).should_defer(100, now=1.0)
    lone = ConnectionBoard(1)
    assert not AcceptPacer(lone, 0, 1).should_defer(100, now=1.0)


def test_the_pacer_publishes_only_changes_and_withdraws():
    board = ConnectionBoard(2)
    pacer = AcceptPacer(board, 1, 42)
    pacer.publish(4)
    assert board.read(1) == (4, 42)
    pacer.withdraw()
    assert board.read(1) == (NOT_TAKING, 42)


def paced_worker(monkeypatch, method: str, index: int,
                 pid: int) -> tuple[ServingWorker, ConnectionBoard, list[Any]]:
    """A bare worker in slot ``index`` of a two-slot board, with gthread's ``method``
    replaced by one that records its argument."""
    calls: list[Any] = []
    monkeypatch.setattr(ThreadWorker, method, lambda self, value: calls.append(value))
    board = ConnectionBoard(2)
    worker = bare_worker(timeout=30)
    worker._pacer = AcceptPacer(board, index, pid)
    return worker, board, calls


def test_the_worker_leaves_the_socket_alone_while_deferring(monkeypatch):
    worker, board, enabled = paced_worker(monkeypatch, "set_accept_enabled", 0, 1)
    worker.nr_conns = 3
    board.publish(1, 0, 2)

    class Listener:
        accepted = 0

        def accept(self):
            self.accepted += 1
            raise BlockingIOError(11, "nothing")

    listener = Listener()
    worker.accept(listener)
    assert listener.accepted == 0 and enabled == [False]
    worker.set_accept_enabled(True)  # gthread's loop, at once: not yet
    assert enabled == [False]
    worker._pacer.resume_at = 1.0  # the recheck is due
    worker.set_accept_enabled(True)
    assert enabled == [False, True] and worker._pacer.resume_at == 0.0
    board.publish(1, 3, 2)  # the sibling caught up: accept
    worker._ssl = False
    worker.accept(listener)
    assert listener.accepted == 1


def test_the_master_clears_the_slot_of_a_worker_that_exited(monkeypatch):
    monkeypatch.setattr("smchainer.serving.metrics.process_exited", lambda pid: None)
    board = ConnectionBoard(2)
    board.publish(1, 0, 99)
    server = types.SimpleNamespace(app=types.SimpleNamespace(board=board))
    gunicorn_app.child_exit(server, types.SimpleNamespace(pid=99, smchainer_index=1))
    assert board.read(1) == (NOT_TAKING, 0)


WHO_ANSWERS = '''
import os

import numpy as np


def model_fn(model_dir):
    return "pid"


def predict_fn(input_data, model):
    return np.full((len(input_data), 1), os.getpid(), np.float64)
'''


def answer_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole answer (its head and Content-Length bytes of body)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", data[:end])
    assert length, data
    return len(data) >= end + 4 + int(length.group(1))


def ask(sock: socket.socket, request: bytes) -> int:
    """Send ``request`` on ``sock``: the pid in its answer."""
    sock.sendall(request)
    data = b""
    while not answer_complete(data):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data
    return int(content.decode_npy(data[data.index(b"\r\n\r\n") + 4:])[0, 0])


def test_a_burst_of_connections_is_spread_evenly_over_two_workers(start_server, tmp_path):
    model_dir = tmp_path / "model"
    (model_dir / "code").mkdir(parents=True)
    (model_dir / "code" / "inference.py").write_text(WHO_ANSWERS)
    server = start_server(["--model-dir", str(model_dir), "--workers", "2"])
    deadline = time.monotonic() + 60
    while server.request("GET", "/v2/health/ready").status != 200:  # both have the model
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    body = npy_bytes(np.ones((1, 2), np.float32))
    request = (f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: {content.NPY}\r\n"
               f"Accept: {content.NPY}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    for attempt in range(3):  # three bursts, each on fresh connections
        time.sleep(0.5)  # the last burst's connections closed on both sides
        sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=30)
                   for _ in range(16)]  # all in the listen queue at once
        try:
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                answered = list(pool.map(ask, sockets, [request] * 16))
        finally:
            for sock in sockets:
                sock.close()
        counts = collections.Counter(answered)
        assert len(counts) == 2 and max(counts.values()) - min(counts.values()) <= 2, \
            (attempt, counts)


def test_each_turn_of_the_loop_publishes_what_the_worker_takes(monkeypatch):
    worker, board, waits = paced_worker(monkeypatch, "wait_for_and_dispatch_events", 1, 5)
    worker.notify()
    worker.nr_conns = 4
    worker.wait_for_and_dispatch_events(1.0)
    assert board.read(1) == (4, 5)
    worker._pacer.resume_at = time.monotonic() + 0.001  # deferring: listens again soon
    worker.wait_for_and_dispatch_events(1.0)
    assert waits[-1] <= 0.001
    worker.nr_conns = worker.worker_connections  # full
    worker.wait_for_and_dispatch_events(1.0)
    assert board.read(1) == (NOT_TAKING, 5)
    worker.nr_conns = 2
    worker.wsgi = types.SimpleNamespace(holder=types.SimpleNamespace(state="loading"))
    worker.wait_for_and_dispatch_events(1.0)
    assert board.read(1) == (NOT_TAKING, 5)
    worker.wsgi = None
    worker.alive = False  # draining
    worker.wait_for_and_dispatch_events(1.0)
    assert board.read(1) == (NOT_TAKING, 5)
