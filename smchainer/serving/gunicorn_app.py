"""The gunicorn application: smchainer's server through gunicorn's custom-application API.

Worker class: :class:`smchainer.serving.worker.ServingWorker`, gunicorn's
``gthread`` with request heads read on its event loop, health checks answered
there, and protocol errors in JSON (its docstring says why). A ``sync``
worker handles one connection at a time, so while an inference runs its
``/ping`` waits; a threaded worker keeps answering ``/ping`` and
``/metrics`` while its inference thread
(:class:`smchainer.serving.app.InferenceRunner`) computes. gunicorn's own
timeout then only catches a worker whose main loop hangs, and the request
timeout is enforced by the app (504).

Workers are not preloaded: each worker builds its own plugin manager and
imports the user's module after the fork (:meth:`ServingApplication.load`),
then loads its model in the background (``post_worker_init``). The master
gives each worker a stable index (reused when a worker is replaced), which
picks its GPU and its CPUs, and its slot on the board that spreads new
connections over the workers (:mod:`smchainer.serving.balance`).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from gunicorn.app.base import BaseApplication

from smchainer.serving.balance import ConnectionBoard
from smchainer.serving.settings import (
    GRACEFUL_TIMEOUT,
    WORKER_CPUS_ENV,
    ServerSettings,
    worker_cpus,
)

logger = logging.getLogger(__name__)

WORKER_CLASS = "smchainer.serving.worker.ServingWorker"
#: Another gunicorn worker class instead (``gthread``), for comparisons such as
#: ``benchmarks/serving_faults.py``'s; the server's guarantees hold with the default only.
WORKER_CLASS_ENV = "SMCHAINER_WORKER_CLASS"


#: Where the workers' heartbeat files go when it exists: a memory file system.
#: gunicorn's documentation warns that its heartbeat, a metadata write on every
#: turn of a worker's loop, can block a worker on a disk-backed one.
HEARTBEAT_DIR = "/dev/shm"


def heartbeat_dir() -> str | None:
    """:data:`HEARTBEAT_DIR` where it is a writable directory; else None (the default temp dir)."""
    return HEARTBEAT_DIR if os.path.isdir(HEARTBEAT_DIR) and os.access(HEARTBEAT_DIR, os.W_OK) \
        else None


def build_app(settings: ServerSettings) -> Any:
    """A fresh WSGI app with its own plugin manager (called in each worker)."""
    from smchainer.manager import Hooks
    from smchainer.plugins import get_plugin_manager
    from smchainer.serving.app import InferenceApp
    from smchainer.serving.metrics import WorkerMetrics

    pm = get_plugin_manager(user_module=settings.user_module)
    return InferenceApp(Hooks(pm), settings, WorkerMetrics(settings.metrics_dir))


def pre_fork(server: Any, worker: Any) -> None:
    """In the master: give the new worker the lowest index no live worker has."""
    taken = {getattr(w, "smchainer_index", None) for w in server.WORKERS.values()}
    index = 0
    while index in taken:
        index += 1
    worker.smchainer_index = index


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker, before any thread of its own: bind it to its CPUs (``auto``).

    Its threads (event loop, pool, inference, and the inference library's
    own) inherit the binding, so a request's hand-offs between them wake a
    thread on a CPU of the same block rather than a halted one elsewhere,
    and the other workers' inferences do not evict its caches.
    """
    settings = server.app.settings
    if settings.cpu_affinity != "auto" or not hasattr(os, "sched_setaffinity"):
        return
    index = getattr(worker, "smchainer_index", 0)
    cpus = worker_cpus(os.sched_getaffinity(0), settings.workers, index)
    if cpus is None:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as error:  # a container that forbids it: run unbound
        logger.warning("worker %s could not be bound to CPUs %s: %s", index, sorted(cpus), error)
        return
    os.environ[WORKER_CPUS_ENV] = str(len(cpus))  # the inference libraries' thread count
    logger.info("worker %s bound to CPUs %s", index, ",".join(map(str, sorted(cpus))))


def child_exit(server: Any, worker: Any) -> None:
    """In the master, once a worker has exited: its live gauges go (its counters stay)."""
    from smchainer.serving.metrics import process_exited

    process_exited(worker.pid)
    board = getattr(server.app, "board", None)
    if board is not None:
        board.clear(getattr(worker, "smchainer_index", -1))


def post_worker_init(worker: Any) -> None:
    """In the worker, once its app is built: start loading the model."""
    worker.wsgi.start(getattr(worker, "smchainer_index", 0))


def gunicorn_log_level(level: int) -> str:
    """The gunicorn level name for a :mod:`logging` level (numbers round up)."""
    for name, value in (("debug", 10), ("info", 20), ("warning", 30), ("error", 40)):
        if level <= value:
            return name
    return "critical"


class ServingApplication(BaseApplication):
    """gunicorn configured from :class:`ServerSettings`, serving :func:`build_app`."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        #: the workers' open connections, for spreading new ones (mapped before the fork)
        self.board = ConnectionBoard(settings.workers)
        super().__init__(prog="smchainer-serve")

    def gunicorn_options(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "bind": [settings.bind],
            "workers": settings.workers,
            "worker_class": os.environ.get(WORKER_CLASS_ENV, WORKER_CLASS),
            "threads": settings.threads,
            "timeout": settings.timeout,
            "graceful_timeout": min(GRACEFUL_TIMEOUT, settings.timeout),
            "keepalive": 5,
            "worker_tmp_dir": heartbeat_dir(),
            "preload_app": False,
            "loglevel": gunicorn_log_level(settings.log_level),
            "errorlog": "-",
            "accesslog": None,  # the app logs one line per request itself
            "proc_name": "smchainer-serve",
            "control_socket_disable": True,
            "pre_fork": pre_fork,
            "post_fork": post_fork,
            "post_worker_init": post_worker_init,
            "child_exit": child_exit,
        }

    def load_config(self) -> None:
        for name, value in self.gunicorn_options().items():
            if name in self.cfg.settings:
                self.cfg.set(name, value)

    def load(self) -> Any:
        return build_app(self.settings)
