"""The worker's loop and its helper thread, in process: the heartbeat and the body deadlines.

Both are written so that a request wakes no thread it does not need; these
tests hold them to what they must still do: the master's heartbeat in time,
every late body's read ended at its deadline, no early one ever.
"""
from __future__ import annotations

import logging
import os
import socket
import time

import pytest
from gunicorn.workers.gthread import ThreadWorker

from smchainer.serving import app as app_module
from smchainer.serving import gunicorn_app
from smchainer.serving.app import BodyDeadlines
from smchainer.serving.balance import AcceptPacer
from smchainer.serving.worker import HEARTBEAT_SECONDS, ServingWorker


class CountingTmp:
    def __init__(self) -> None:
        self.writes = 0

    def notify(self) -> None:
        self.writes += 1


def bare_worker(timeout: float) -> ServingWorker:
    worker = object.__new__(ServingWorker)  # no gunicorn process around it
    worker.timeout = timeout
    worker.tmp = CountingTmp()
    worker._heartbeat_every = min(HEARTBEAT_SECONDS, timeout / 4)
    worker._last_heartbeat = -float("inf")
    worker._checked_parent = -float("inf")
    worker._accepting = False
    worker._direct = {}
    worker._deadlines = []
    worker._pacer = AcceptPacer(None, 0, 0)
    worker.alive = True
    worker.nr_conns = 0
    worker.worker_connections = 1000
    worker.wsgi = None
    return worker


def test_the_heartbeat_is_written_once_per_interval_however_often_the_loop_turns() -> None:
    worker = bare_worker(timeout=0.4)  # a 0.8 s server timeout: every 0.1 s
    for _ in range(1000):
        worker.notify()
    assert worker.tmp.writes == 1
    time.sleep(0.12)
    worker.notify()
    worker.notify()
    assert worker.tmp.writes == 2


def test_an_idle_loop_wakes_in_time_for_the_next_heartbeat(monkeypatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(ThreadWorker, "wait_for_and_dispatch_events",
                        lambda self, timeout: waits.append(timeout))
    worker = bare_worker(timeout=30)
    worker.notify()
    worker.wait_for_and_dispatch_events(1.0)  # gthread's own wait is 1 s
    assert 0.4 < waits[-1] <= HEARTBEAT_SECONDS


def test_the_loop_wakes_in_time_for_the_first_direct_requests_deadline(monkeypatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(ThreadWorker, "wait_for_and_dispatch_events",
                        lambda self, timeout: waits.append(timeout))
    worker = bare_worker(timeout=30)
    worker.notify()
    worker._direct = {0: (None, None)}
    worker._deadlines.append((time.monotonic() + 0.05, 0))  # a 504 due in 50 ms
    worker.wait_for_and_dispatch_events(1.0)
    assert 0.0 < waits[-1] <= 0.05
    worker._last_heartbeat -= 10  # long overdue: no wait at all
    worker.wait_for_and_dispatch_events(1.0)
    assert waits[-1] == 0.0


def test_the_parent_is_looked_at_once_per_heartbeat_interval(monkeypatch) -> None:
    calls: list[int] = []
    parent = [4242]

    def getppid() -> int:
        calls.append(1)
        return parent[0]

    monkeypatch.setattr(os, "getppid", getppid)
    worker = bare_worker(timeout=0.4)  # every 0.1 s
    worker.ppid = 4242
    worker.log = logging.getLogger("test-worker")
    assert all(worker.is_parent_alive() for _ in range(1000))
    assert len(calls) == 1
    parent[0] = 1  # the master died: the worker was re-parented
    time.sleep(0.12)
    assert not worker.is_parent_alive()
    assert len(calls) == 2


def test_heartbeat_files_go_to_a_memory_file_system_when_there_is_one(monkeypatch,
                                                                      tmp_path) -> None:
    monkeypatch.setattr(gunicorn_app, "HEARTBEAT_DIR", str(tmp_path))
    assert gunicorn_app.heartbeat_dir() == str(tmp_path)
    monkeypatch.setattr(gunicorn_app, "HEARTBEAT_DIR", str(tmp_path / "absent"))
    assert gunicorn_app.heartbeat_dir() is None  # gunicorn's default temp dir then


def read_ends_after(sock: socket.socket, limit: float) -> float:
    """Seconds until a read of ``sock`` ends (its reading side shut); fails past ``limit``."""
    sock.settimeout(limit)
    began = time.monotonic()
    assert sock.recv(1) == b""
    return time.monotonic() - began


@pytest.fixture
def pairs():
    made: list[socket.socket] = []

    def pair() -> tuple[socket.socket, socket.socket]:
        ours, peer = socket.socketpair()
        made.extend((ours, peer))
        return ours, peer

    yield pair
    for sock in made:
        sock.close()


def test_deadlines_before_and_after_the_threads_own_wake_are_both_kept(pairs,
                                                                       monkeypatch) -> None:
    monkeypatch.setattr(app_module, "IDLE_WAKE_SECONDS", 1.0)
    deadlines = BodyDeadlines()
    first, _ = pairs()
    deadlines.watch(first, time.monotonic() + 0.2)  # starts the thread
    assert 0.1 < read_ends_after(first, 2) < 0.6
    time.sleep(0.05)  # the thread sleeps now, up to 1 s
    early, _ = pairs()
    late, _ = pairs()
    now = time.monotonic()
    deadlines.watch(late, now + 1.6)  # after its own wake: no need to wake it
    deadlines.watch(early, now + 0.1)  # before: it is woken for this one
    assert read_ends_after(early, 2) < 0.4
    assert 1.3 < read_ends_after(late, 3) < 2.1


def test_bodies_read_in_time_are_never_cut_and_late_ones_always_are(pairs,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(app_module, "IDLE_WAKE_SECONDS", 0.3)
    deadlines = BodyDeadlines()
    in_time = []
    for _ in range(200):  # as a stream of requests would: watched, then read at once
        ours, peer = pairs()
        assert deadlines.release(deadlines.watch(ours, time.monotonic() + 0.2))
        in_time.append((ours, peer))
    late, _ = pairs()
    token = deadlines.watch(late, time.monotonic() + 0.3)
    assert read_ends_after(late, 2) < 0.8
    assert deadlines.release(token) is False  # the caller learns it was cut: a 408
    time.sleep(0.3)
    for ours, peer in in_time:
        peer.sendall(b"x")
        ours.settimeout(1)
        assert ours.recv(1) == b"x"  # still open for reading


def test_the_access_line_is_logged_when_the_server_closes_the_sent_answer(caplog) -> None:
    answer = app_module.Answer(b"payload", ("POST", "/invocations", 200, 12.34, 3))
    with caplog.at_level(logging.INFO, logger="smchainer.serving.access"):
        assert list(answer) == [b"payload"]
        assert not caplog.records  # the body goes out first
        answer.close()
    assert [r.getMessage() for r in caplog.records] == ["POST /invocations 200 12.3ms worker=3"]
