"""TorchServe as the serving benchmark's peer: the same VGG weights and bodies, one process group.

:func:`archive_vgg` converts the Chainer VGG that ``smchainer-serve`` serves
to PyTorch eager (``inference_throughput.build_torch_vgg``), checks the two
agree on a batch, and packs the ``state_dict``, the layer spec and
:mod:`torchserve_handler` with ``torch-model-archiver`` (offline: no
requirements file, nothing fetched). :class:`TorchServe` starts
``torchserve --foreground`` on free ``127.0.0.1`` ports in its own session,
with a private work folder (model store, logs, ``TEMP``/``TMPDIR``, so its
pid file and worker sockets are its own), a ``config.properties`` that
registers the model with a fixed number of workers and TorchServe's own
batching (``batchSize``, ``maxBatchDelay``), token authorization, the model
API, per-model dependency installs, system metrics and per-request logs all
off. It is ready when the management API reports every worker ``READY``;
:meth:`TorchServe.stop` runs ``torchserve --stop`` (the same ``TMPDIR``),
waits, and kills whatever of the group is left.

Needs the ``bench`` extra (``torch``, ``torchserve``, ``torch-model-archiver``)
and Java 11 or later (17 here); :func:`missing_reason` says what is absent.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torchserve_handler as handler

from smchainer.api.endpoint import free_port, group_members, http_get
from smchainer.errors import SmchainerError

HOST = "127.0.0.1"
HANDLER_FILE = Path(handler.__file__).resolve()
MODEL_NAME = "vgg"
#: Java 11 is TorchServe 0.12's minimum.
JAVA_MINIMUM = 11
#: The archived network must agree with Chainer's this closely (relative to the largest logit).
TOLERANCE = 1e-3
STOP_TIMEOUT = 60.0
POLL_SECONDS = 0.25

#: Frontend logs: warnings and the workers' output only (no access log, no metrics lines).
LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <File name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
    <File name="model_log" fileName="${env:LOG_LOCATION:-logs}/model_log.log">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="MODEL_LOG" level="info" additivity="false">
      <AppenderRef ref="model_log"/>
    </Logger>
    <Logger name="org.pytorch.serve" level="warn" additivity="false">
      <AppenderRef ref="ts_log"/>
    </Logger>
    <Root level="warn">
      <AppenderRef ref="ts_log"/>
    </Root>
  </Loggers>
</Configuration>
"""


class TorchServeError(SmchainerError):
    """TorchServe did not come up; the message ends with its last log lines."""


# --- what it needs ---------------------------------------------------------------------------

def java_command(env: Mapping[str, str] | None = None) -> str:
    """The ``java`` TorchServe's launcher runs: ``$JAVA_HOME/bin/java``, else ``java``."""
    home = (env if env is not None else os.environ).get("JAVA_HOME")
    return f"{home}/bin/java" if home else "java"


def java_version(env: Mapping[str, str] | None = None) -> str | None:
    """``java -version``'s version string (``17.0.15``), or None when Java cannot run."""
    try:
        done = subprocess.run([java_command(env), "-version"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "([^"]+)"', done.stderr + done.stdout)
    return match.group(1) if match and done.returncode == 0 else None


def java_major(version: str) -> int:
    """The major release of a Java version string (``1.8.0_292`` is 8, ``17.0.15`` is 17)."""
    parts = version.split(".")
    return int(parts[1]) if parts[0] == "1" and len(parts) > 1 else int(re.sub(r"\D.*", "",
                                                                               parts[0]) or 0)


def missing_reason() -> str | None:
    """Why TorchServe cannot run here (a module or Java missing), else None."""
    try:
        import torch  # noqa: F401
    except Exception as exc:
        return f"torch not importable ({type(exc).__name__}: {exc}); pip install -e '.[bench]'"
    # found, not imported: they run in TorchServe's and the archiver's own processes
    for module, distribution in (("ts", "torchserve"), ("model_archiver", "torch-model-archiver")):
        if importlib.util.find_spec(module) is None:
            return f"{distribution} is not installed; pip install -e '.[bench]'"
    version = java_version()
    if version is None:
        return f"{java_command()} -version failed: TorchServe's frontend needs Java 11 or later"
    if java_major(version) < JAVA_MINIMUM:
        return f"Java {version} found; TorchServe needs Java {JAVA_MINIMUM} or later"
    return None


def versions() -> dict[str, str | None]:
    """TorchServe's, the archiver's, PyTorch's and Java's versions (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in ("torchserve", "torch-model-archiver", "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["java"] = java_version()
    return found


# --- the archive -----------------------------------------------------------------------------

def archive_vgg(chainer_model: Any, class_names: list[str], folder: Path,
                name: str = MODEL_NAME, check_images: np.ndarray | None = None,
                seed: int = 0) -> dict[str, Any]:
    """Convert ``chainer_model`` to PyTorch eager and archive it as ``folder/<name>.mar``.

    The converted network's logits are compared with Chainer's on
    ``check_images`` (default: 8 seeded random images) first; a difference
    above :data:`TOLERANCE` is an error, nothing archived. The weights and
    the spec stay in ``folder/torch-model`` (what the bare forward pass is
    timed on). Returns the paths (``mar``, ``torch_dir``), the archive's
    size, the seconds taken, the difference, the check batch and the
    archived network's logits on it (``reference_logits``).
    """
    import chainer
    import torch
    from inference_throughput import build_torch_vgg

    started = time.perf_counter()
    if check_images is None:
        rng = np.random.default_rng(seed)
        check_images = rng.random((8, *handler.INPUT_SHAPE), dtype=np.float32)
    network = build_torch_vgg(chainer_model)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        expected = chainer_model(check_images).array
    with torch.inference_mode():
        got = network(torch.from_numpy(check_images)).numpy()
    difference = float(np.abs(got - expected).max())
    if difference > TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise SmchainerError(f"the PyTorch VGG differs from Chainer's by {difference:g}: "
                             "not the same network, nothing archived")
    torch_dir = Path(folder) / "torch-model"
    torch_dir.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), torch_dir / handler.WEIGHTS_FILE)
    (torch_dir / handler.SPEC_FILE).write_text(
        json.dumps(handler.network_spec(network, class_names)))
    done = subprocess.run(
        [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name,
         "--version", "1.0", "--serialized-file", str(torch_dir / handler.WEIGHTS_FILE),
         "--handler", str(HANDLER_FILE), "--extra-files", str(torch_dir / handler.SPEC_FILE),
         "--export-path", str(folder), "--force"],
        capture_output=True, text=True, timeout=600, cwd=folder,
    )
    mar = Path(folder) / f"{name}.mar"
    if done.returncode != 0 or not mar.is_file():
        raise SmchainerError(f"torch-model-archiver failed ({done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-2000:]}")
    # what the served answers are checked against: the archived network as the handler loads it
    loaded, _ = load_from_mar(mar)
    with torch.inference_mode():
        reference = loaded(torch.from_numpy(check_images)).numpy()
    return {"mar": mar, "torch_dir": torch_dir, "archive": mar.name,
            "archive_bytes": mar.stat().st_size,
            "archive_s": round(time.perf_counter() - started, 3),
            "converted_with": "inference_throughput.build_torch_vgg",
            "max_abs_difference_vs_chainer": difference,
            "check_images": check_images, "reference_logits": reference}


def load_from_mar(mar: Path) -> tuple[Any, list[str]]:
    """The network in a ``.mar`` (a zip file), loaded as the handler loads it."""
    import zipfile

    with tempfile.TemporaryDirectory(prefix="torchserve-mar-") as tmp, \
            zipfile.ZipFile(mar) as archive:
        archive.extractall(tmp)
        return handler.load_network(tmp)


# --- the server ------------------------------------------------------------------------------

@dataclass
class TorchServeSettings:
    """What a TorchServe run is configured with (the record keeps it)."""

    workers: int
    threads: int
    batch_size: int = 1
    max_batch_delay_ms: int = 0
    response_timeout_s: int = 120
    model_name: str = MODEL_NAME
    extra_config: dict[str, str] = field(default_factory=dict)

    def models_json(self, mar: str) -> str:
        """config.properties' ``models`` entry for the one model."""
        return json.dumps({self.model_name: {"1.0": {
            "defaultVersion": True, "marName": mar, "minWorkers": self.workers,
            "maxWorkers": self.workers, "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
        }}})


class TorchServe:
    """``torchserve --foreground`` on free loopback ports, in its own session.

    :param mar: the model archive (``archive_vgg``'s), copied into a private model store.
    :param settings: workers, threads per worker, batching.
    :param env: the environment to start from (thread variables are set from ``settings``).
    """

    def __init__(self, mar: Path, settings: TorchServeSettings,
                 env: Mapping[str, str] | None = None) -> None:
        self.mar = Path(mar)
        self.settings = settings
        self.base_env = dict(os.environ if env is None else env)
        self.work_dir = Path()
        self.port = 0
        self.management_port = 0
        self.metrics_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def path(self) -> str:
        """The inference URL's path (``/predictions/<model>``)."""
        return f"/predictions/{self.settings.model_name}"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def report_dir(self) -> Path:
        return self.work_dir / "workers"

    def env(self) -> dict[str, str]:
        """The launcher's (so the frontend's and the workers') environment."""
        env = dict(self.base_env)
        tmp = str(self.work_dir / "tmp")
        threads = str(self.settings.threads)
        env.update({
            "TEMP": tmp, "TMPDIR": tmp,  # the pid file, the worker sockets, Java's tmpdir
            "LOG_LOCATION": str(self.log_dir), "METRICS_LOCATION": str(self.log_dir),
            "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads, handler.THREADS_ENV: threads,
            handler.REPORT_ENV: str(self.report_dir),
        })
        env.pop("TS_CONFIG_FILE", None)
        return env

    def config(self) -> dict[str, str]:
        """config.properties, as key -> value."""
        s = self.settings
        config = {
            "inference_address": f"http://{HOST}:{self.port}",
            "management_address": f"http://{HOST}:{self.management_port}",
            "metrics_address": f"http://{HOST}:{self.metrics_port}",
            "model_store": str(self.work_dir / "model-store"),
            "load_models": self.mar.name,
            "models": s.models_json(self.mar.name),
            "default_workers_per_model": str(s.workers),
            "initial_worker_port": str(free_port()),
            "install_py_dep_per_model": "false",
            "disable_token_authorization": "true",
            "enable_model_api": "false",
            "disable_system_metrics": "true",
            "enable_metrics_api": "false",
            "decode_input_request": "false",  # the handler decodes, as smchainer's worker does
            "default_response_timeout": str(s.response_timeout_s),
            "async_logging": "true",
            "allowed_urls": "file://.*",  # nothing fetched: the model store is local
        }
        config.update(s.extra_config)
        return config

    def command(self, *args: str) -> list[str]:
        """The ``torchserve`` launcher with ``args`` (this interpreter's, offline)."""
        return [sys.executable, "-m", "ts.model_server", *args]

    def start(self, timeout: float = 300.0) -> TorchServe:
        """Write the work folder, start TorchServe, return once every worker is ``READY``."""
        if self.process is not None:
            raise SmchainerError("this TorchServe was already started")
        self.work_dir = Path(tempfile.mkdtemp(prefix="smchainer-torchserve-"))
        for folder in ("model-store", "tmp", "logs", "workers"):
            (self.work_dir / folder).mkdir()
        shutil.copy2(self.mar, self.work_dir / "model-store" / self.mar.name)
        self.port, self.management_port, self.metrics_port = free_port(), free_port(), \
            free_port()
        config = self.config()
        (self.work_dir / "config.properties").write_text(
            "".join(f"{key}={value}\n" for key, value in config.items()))
        (self.work_dir / "log4j2.xml").write_text(LOG4J2)
        with open(self.work_dir / "launcher.log", "wb") as log:
            self.process = subprocess.Popen(
                self.command("--start", "--foreground", "--ncs", "--disable-token-auth",
                             "--model-store", str(self.work_dir / "model-store"),
                             "--ts-config", str(self.work_dir / "config.properties"),
                             "--log-config", str(self.work_dir / "log4j2.xml")),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env(), cwd=self.work_dir, start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, _terminate, self.process, self.work_dir,
                                           self.env(), 10.0)
        try:
            self.wait_until_ready(timeout)
        except BaseException as error:
            tail = self.log_tail()
            self.stop()
            if isinstance(error, TorchServeError):
                raise TorchServeError(f"{error}\nlast log lines:\n" + "\n".join(tail)) from None
            raise
        return self

    def wait_until_ready(self, timeout: float) -> None:
        """Poll the management API until the model's workers are all ``READY``."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise TorchServeError(f"torchserve exited with status {code} before it was "
                                      "ready")
            if self.ready_workers() >= self.settings.workers:
                status, _ = self.get(self.port, "/ping")
                if status == 200:
                    return
            if time.monotonic() > deadline:
                raise TorchServeError(f"TorchServe was not ready after {timeout:g} s")
            time.sleep(POLL_SECONDS)

    def describe(self) -> dict[str, Any] | None:
        """The management API's description of the model (workers, batch settings)."""
        status, body = self.get(self.management_port, f"/models/{self.settings.model_name}")
        if status != 200:
            return None
        try:
            found = json.loads(body)
        except ValueError:
            return None
        return found[0] if isinstance(found, list) and found else None

    def ready_workers(self) -> int:
        """How many of the model's workers are ``READY``."""
        described = self.describe() or {}
        return sum(1 for w in described.get("workers", []) if w.get("status") == "READY")

    def get(self, port: int, path: str) -> tuple[int, str]:
        """``GET path`` on one of the server's ports: status (0: unreachable) and body."""
        return http_get(port, path, HOST)

    def worker_reports(self) -> list[dict[str, Any]]:
        """What each worker's handler wrote when it loaded (pid, torch threads)."""
        reports = []
        for path in sorted(self.report_dir.glob("worker-*.json")):
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return reports

    def log_tail(self, lines: int = 30) -> list[str]:
        """The last lines of the launcher's output, the frontend's and the workers' logs."""
        tail: list[str] = []
        for path in (self.work_dir / "launcher.log", self.log_dir / "ts_log.log",
                     self.log_dir / "model_log.log"):
            try:
                with open(path, errors="replace") as log:
                    last = collections.deque(log, maxlen=lines)
            except OSError:
                continue
            if last:
                tail.append(f"--- {path.name}")
                tail += [line.rstrip("\n") for line in last]
        return tail

    def process_ids(self) -> list[int]:
        """The live processes of the server's group: launcher, Java frontend, workers."""
        return group_members(self.process.pid) if self.process is not None else []

    def stop(self, timeout: float = STOP_TIMEOUT) -> dict[str, Any]:
        """``torchserve --stop``, then the group killed if anything is left; what happened."""
        if self.process is None:
            return {"stopped": False}
        if self._finalizer is not None:
            self._finalizer.detach()
        return _terminate(self.process, self.work_dir, self.env(), timeout)


def _terminate(process: subprocess.Popen[bytes], work_dir: Path, env: dict[str, str],
               timeout: float) -> dict[str, Any]:
    """Stop a TorchServe group and remove its work folder; what it took."""
    group = process.pid
    started = time.monotonic()
    outcome: dict[str, Any] = {"stopped": True}
    try:
        if process.poll() is None:
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "ts.model_server", "--stop", "--foreground"],
                    env=env, cwd=work_dir, capture_output=True, text=True, timeout=timeout + 10)
                outcome["stop_command"] = (done.stdout + done.stderr).strip()[-300:]
            except (OSError, subprocess.SubprocessError) as exc:
                outcome["stop_command"] = f"{type(exc).__name__}: {exc}"
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(group)
                process.wait()
                outcome["killed"] = True
        outcome["exit_status"] = process.returncode
        left = group_members(group)
        outcome["left_after_stop"] = len(left)
        if left:
            _kill_group(group)
            deadline = time.monotonic() + 5
            while group_members(group) and time.monotonic() < deadline:
                time.sleep(0.05)
        outcome["left"] = len(group_members(group))
        outcome["stop_s"] = round(time.monotonic() - started, 3)
        return outcome
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
