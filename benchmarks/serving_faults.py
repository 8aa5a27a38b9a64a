"""``smchainer-serve`` under faults: a worker SIGKILL and a SIGTERM mid-load, slow clients too.

One run, two servers, the same script: smchainer's worker
(``ServingWorker``) and, as the peer, gunicorn's plain ``gthread`` worker
(``SMCHAINER_WORKER_CLASS=gthread``), each with 2 workers and 4 threads on a
small VGG saved as the built-in trainer saves it. For each:

1. **Load**: ``--clients`` threads send a 1-image npy batch to
   ``/invocations`` over and over (a new connection each time) for
   ``--seconds``.
2. **Slow clients**, for the whole run: ``--idle`` connections that send
   nothing, ``--slow-heads`` that send a request head a byte every 0.5 s and
   ``--slow-bodies`` that send a body so (each reopened when dropped).
3. **Probes**: a fresh-connection ``GET /ping`` every 0.25 s, with a 2 s
   timeout, the platform's health check.
4. **SIGKILL** of one worker at a third of the run; the record has the
   failed requests around it, how many were 503, and the recovery time (from
   the kill to the replacement's "model loaded" log line).
5. **SIGTERM** to the server at two thirds: requests in flight should end
   200, and new connections should be refused from then on; the record has
   when the first refusal came and how long the server took to exit.

Ratios against the peer: /ping p99 and the share of probes over 1 s.
Writes ``benchmarks/results/serving_faults-<stamp>.json``::

    .venv/bin/python benchmarks/serving_faults.py            # 24 s per server
    .venv/bin/python benchmarks/serving_faults.py --quick    # 9 s per server
"""
from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import benchlib
import numpy as np

import smchainer  # noqa: F401  (Chainer's NumPy 2 compat before chainer loads)
from smchainer.cli import ArgumentParser, add_common_arguments, run
from smchainer.testing import free_port, send_slowly

WORKERS = {"smchainer": None, "gthread": "gthread"}
PROBE_EVERY = 0.25
PROBE_TIMEOUT = 2.0


def save_vgg(model_dir: Path) -> None:
    from smchainer.default_plugins.vgg.modelfile import save_model
    from smchainer.models import VGG

    np.random.seed(0)
    save_model(VGG(width=0.125, depth=8), model_dir, [f"class{i}" for i in range(10)], {})


def npy_body() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.full((1, 3, 32, 32), 0.5, np.float32))
    return buffer.getvalue()


class Run:
    """One server under load, slow clients, probes, a SIGKILL and a SIGTERM."""

    def __init__(self, name: str, worker_class: str | None, model_dir: Path, log: Path,
                 args: argparse.Namespace) -> None:
        self.name, self.args, self.log = name, args, log
        self.port = free_port()
        env = dict(os.environ, SMCHAINER_DISABLE_PLUGIN_AUTOLOAD="1", SMCHAINER_DEVICE="cpu",
                   OMP_NUM_THREADS="1")
        env.pop("SMCHAINER_WORKER_CLASS", None)
        if worker_class is not None:
            env["SMCHAINER_WORKER_CLASS"] = worker_class
        command = [str(Path(sys.executable).parent / "smchainer-serve"), "--model-dir",
                   str(model_dir), "--bind", f"127.0.0.1:{self.port}", "--workers", "2",
                   "--threads", "4", "--client-timeout", "5", "--log-level", "info"]
        self.output = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.server = subprocess.Popen(command, stdout=self.output, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True)
        self.stop_event = threading.Event()
        self.requests: list[tuple[float, float, str]] = []  # (start, seconds, outcome)
        self.probes: list[tuple[float, float | None]] = []  # (start, seconds or None)
        self.lock = threading.Lock()
        self.t0 = 0.0

    # -- clients ---------------------------------------------------------------

    def request(self, body: bytes) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("POST", "/invocations", body,
                               {"Content-Type": "application/x-npy",
                                "Accept": "application/x-npy"})
            response = connection.getresponse()
            response.read()
            return str(response.status)
        except ConnectionRefusedError:
            return "refused"
        except (OSError, http.client.HTTPException) as error:  # a worker killed mid-answer
            return type(error).__name__
        finally:
            connection.close()

    def load(self) -> None:
        body = npy_body()
        while not self.stop_event.is_set():
            started = time.monotonic()
            outcome = self.request(body)
            with self.lock:
                self.requests.append((started - self.t0, time.monotonic() - started, outcome))
            if outcome == "refused":
                time.sleep(0.05)

    def probe(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            seconds: float | None
            connection = http.client.HTTPConnection("127.0.0.1", self.port,
                                                    timeout=PROBE_TIMEOUT)
            try:
                connection.request("GET", "/ping")
                response = connection.getresponse()
                response.read()
                seconds = time.monotonic() - started if response.status == 200 else None
            except (OSError, http.client.HTTPException):
                seconds = None
            finally:
                connection.close()
            with self.lock:
                self.probes.append((started - self.t0, seconds))
            self.stop_event.wait(max(0.0, PROBE_EVERY - (time.monotonic() - started)))

    def slow_client(self, payload: bytes) -> None:
        """Send ``payload`` a byte every 0.5 s; reconnect when dropped."""
        while not self.stop_event.is_set():
            if not send_slowly(self.port, payload, self.stop_event, 0.5):
                self.stop_event.wait(0.5)

    def idle_clients(self) -> None:
        held: list[socket.socket] = []
        while not self.stop_event.is_set():
            held = [s for s in held if s.fileno() != -1]
            while len(held) < self.args.idle:
                try:
                    held.append(socket.create_connection(("127.0.0.1", self.port), timeout=5))
                except OSError:
                    break
            for sock in list(held):  # a connection the server dropped is replaced
                sock.setblocking(False)
                try:
                    if sock.recv(1) == b"":
                        sock.close()
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
            self.stop_event.wait(0.5)
        for sock in held:
            sock.close()

    # -- the run ---------------------------------------------------------------

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/ping")
                if connection.getresponse().status == 200:
                    time.sleep(3)  # the second worker loads its model too
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: the server did not start:\n{self.log.read_text()}")

    def workers(self) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(self.server.pid)], capture_output=True,
                               text=True)
        return [int(pid) for pid in found.stdout.split()]

    def execute(self) -> dict[str, Any]:
        self.wait_ready()
        self.t0 = time.monotonic()
        head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n\r\n"
        body = npy_body()
        slow_body = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/x-npy\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        threads = [threading.Thread(target=self.load, daemon=True)
                   for _ in range(self.args.clients)]
        threads += [threading.Thread(target=self.slow_client, args=(head,), daemon=True)
                    for _ in range(self.args.slow_heads)]
        threads += [threading.Thread(target=self.slow_client, args=(slow_body,), daemon=True)
                    for _ in range(self.args.slow_bodies)]
        threads += [threading.Thread(target=self.idle_clients, daemon=True),
                    threading.Thread(target=self.probe, daemon=True)]
        for thread in threads:
            thread.start()
        seconds = self.args.seconds
        time.sleep(seconds / 3)
        victims = self.workers()
        kill_at = time.monotonic() - self.t0
        os.kill(victims[0], signal.SIGKILL)
        time.sleep(seconds / 3)
        term_at = time.monotonic() - self.t0
        self.server.send_signal(signal.SIGTERM)
        refused_at = None
        while refused_at is None and time.monotonic() - self.t0 < term_at + 10:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except ConnectionRefusedError:
                refused_at = time.monotonic() - self.t0
            except OSError:
                pass
            time.sleep(0.05)
        try:
            self.server.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.server.kill()
        exit_at = time.monotonic() - self.t0
        self.stop_event.set()
        for thread in threads:
            thread.join(timeout=10)
        self.output.close()
        return self.summary(kill_at, term_at, refused_at, exit_at)

    def recovery(self, kill_at: float) -> float | None:
        """Seconds from the kill to the next "model loaded" line in the server's log."""
        stamps = []
        for line in self.log.read_text(errors="replace").splitlines():
            if "model loaded from" in line:
                match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
                if match:
                    stamps.append(datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
                                  .timestamp())
        # The log's clock is the wall clock; the run's is monotonic: convert the kill.
        kill_wall = time.time() - (time.monotonic() - self.t0 - kill_at)
        after = [s - kill_wall for s in stamps if s > kill_wall]
        return round(min(after), 2) if after else None

    def summary(self, kill_at: float, term_at: float, refused_at: float | None,
                exit_at: float) -> dict[str, Any]:
        def phase(start: float, end: float) -> dict[str, Any]:
            done = [r for r in self.requests if start <= r[0] < end]
            probes = [p for p in self.probes if start <= p[0] < end]
            answered = sorted(p[1] for p in probes if p[1] is not None)
            return {
                "requests": len(done),
                "outcomes": dict(Counter(r[2] for r in done)),
                "ping_probes": len(probes),
                "ping_unanswered_2s": sum(1 for p in probes if p[1] is None),
                "ping_over_1s": sum(1 for p in probes if p[1] is None or p[1] > 1.0),
                "ping_p50_ms": round(statistics.median(answered) * 1000, 1) if answered else None,
                "ping_max_ms": round(answered[-1] * 1000, 1) if answered else None,
            }

        all_probes = [p[1] for p in self.probes if p[0] < term_at]
        answered = sorted(p for p in all_probes if p is not None)
        p99 = (answered[min(len(answered) - 1, int(0.99 * len(answered)))]
               if len(answered) == len(all_probes) and answered else None)
        after_term = [r for r in self.requests if r[0] >= term_at]
        return {
            "name": self.name,
            "phases": {"steady": phase(0, kill_at), "after_sigkill": phase(kill_at, term_at),
                       "after_sigterm": phase(term_at, exit_at + 1)},
            "ping_p99_ms_before_sigterm": round(p99 * 1000, 1) if p99 is not None else None,
            "ping_over_1s_share": round(sum(1 for p in all_probes if p is None or p > 1.0)
                                        / max(len(all_probes), 1), 3),
            "responses_503": sum(1 for r in self.requests if r[2] == "503"),
            "failed_requests": sum(1 for r in self.requests
                                   if r[2] != "200" and r[0] < term_at),
            "sigkill_at_s": round(kill_at, 2),
            "recovery_s": self.recovery(kill_at),
            "sigterm_at_s": round(term_at, 2),
            "refused_after_sigterm_s": (round(refused_at - term_at, 2)
                                        if refused_at is not None else None),
            "exited_after_sigterm_s": round(exit_at - term_at, 2),
            "requests_started_after_sigterm": dict(Counter(r[2] for r in after_term)),
        }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    record = benchlib.context("serving_faults", args.quick)
    record["settings"] = {
        "workers": 2, "threads": 4, "client_timeout_s": 5, "seconds": args.seconds,
        "clients": args.clients, "idle_connections": args.idle, "slow_heads": args.slow_heads,
        "slow_bodies": args.slow_bodies, "probe_every_s": PROBE_EVERY,
        "probe_timeout_s": PROBE_TIMEOUT, "model": "built-in VGG-8, width 0.125, CPU",
    }
    runs = []
    with tempfile.TemporaryDirectory(prefix="smchainer-faults-") as tmp:
        model_dir = Path(tmp) / "model"
        save_vgg(model_dir)
        for name, worker_class in WORKERS.items():
            runs.append(Run(name, worker_class, model_dir, Path(tmp) / f"{name}.log",
                            args).execute())
    record["runs"] = runs
    ours, peer = runs
    record["ratios"] = {
        "ping_over_1s_share_smchainer_vs_gthread": [ours["ping_over_1s_share"],
                                                    peer["ping_over_1s_share"]],
        "responses_503_smchainer_vs_gthread": [ours["responses_503"], peer["responses_503"]],
    }
    return benchlib.finish(record)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="serving_faults", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="9 s per server (default 24)")
    parser.add_argument("--seconds", type=benchlib.positive(float), default=None)
    parser.add_argument("--clients", type=benchlib.positive(int), default=4)
    parser.add_argument("--idle", type=benchlib.positive(int), default=50)
    parser.add_argument("--slow-heads", type=benchlib.positive(int), default=20)
    parser.add_argument("--slow-bodies", type=benchlib.positive(int), default=4)
    parser.add_argument("--output-dir", type=Path, default=benchlib.RESULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = build_parser().parse_args(argv)
        if args.seconds is None:
            args.seconds = 9.0 if args.quick else 24.0
        record = benchmark(args)
        path = benchlib.write_record(record, args.output_dir, "serving_faults")
        for result in record["runs"]:
            print(f"{result['name']}: /ping over 1 s {result['ping_over_1s_share']:.1%}, "
                  f"503s {result['responses_503']}, failed {result['failed_requests']}, "
                  f"recovery {result['recovery_s']} s, refused after SIGTERM in "
                  f"{result['refused_after_sigterm_s']} s")
        print(f"wrote {path}")
        return 0

    return run(body, debug=lambda: "--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
