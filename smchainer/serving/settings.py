"""The server's settings: command-line options over SageMaker's environment variables.

:class:`ServerSettings` is what the master validates and what each worker's
WSGI app reads. :data:`ENVIRONMENT` documents every variable the server reads;
``smchainer-serve --help`` prints it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from smchainer import environ
from smchainer.errors import UsageError

WORKERS_ENV = "SAGEMAKER_MODEL_SERVER_WORKERS"
TIMEOUT_ENV = "SAGEMAKER_MODEL_SERVER_TIMEOUT"
MAX_PAYLOAD_ENV = "SAGEMAKER_MAX_PAYLOAD_IN_MB"
PORT_ENV = "SAGEMAKER_BIND_TO_PORT"
PROGRAM_ENV = "SAGEMAKER_PROGRAM"
DEFAULT_ACCEPT_ENV = "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT"
LOG_LEVEL_ENV = "SAGEMAKER_CONTAINER_LOG_LEVEL"
MAX_MODEL_SIZE_ENV = "SMCHAINER_MAX_MODEL_SIZE"
CLIENT_TIMEOUT_ENV = "SMCHAINER_CLIENT_TIMEOUT"
AUTH_TOKEN_ENV = "SMCHAINER_AUTH_TOKEN"
AUTH_TOKEN_FILE_ENV = "SMCHAINER_AUTH_TOKEN_FILE"
MODEL_NAME_ENV = "SMCHAINER_MODEL_NAME"
MAX_BATCH_SIZE_ENV = "SMCHAINER_MAX_BATCH_SIZE"
MAX_BATCH_DELAY_ENV = "SMCHAINER_MAX_BATCH_DELAY_MS"
CPU_AFFINITY_ENV = "SMCHAINER_CPU_AFFINITY"
#: Set by the server in a worker it bound to its own CPUs: how many (plugins size threads by it).
WORKER_CPUS_ENV = "SMCHAINER_WORKER_CPUS"

DEFAULT_PORT = 8080
#: Loopback, as local model servers bind by default: a container passes --bind 0.0.0.0.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 60
DEFAULT_MAX_PAYLOAD_MB = 6
DEFAULT_THREADS = 4
#: Seconds a client has for its request head, and again for its body.
DEFAULT_CLIENT_TIMEOUT = 10
DEFAULT_ACCEPT = "application/json"
#: The model's name in the Open Inference Protocol's routes (/v2/models/<name>).
DEFAULT_MODEL_NAME = "model"
#: What a model's name may be: characters that stand in a URL as they are.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Dynamic batching: the most items one merged predict_fn call holds (1: off) ...
DEFAULT_MAX_BATCH_SIZE = 16
#: ... and how long the first request of a batch waits for others on their way.
DEFAULT_MAX_BATCH_DELAY_MS = 5.0
#: Where workers run: "auto", each on its own share of the CPUs; "none", where the kernel puts them.
CPU_AFFINITY_MODES = ("auto", "none")
DEFAULT_CPU_AFFINITY = "auto"
#: The most a model archive may hold once extracted (a gzip bomb guard).
DEFAULT_MAX_MODEL_SIZE = "4G"
#: SageMaker sends SIGKILL 30 s after SIGTERM; in-flight requests get a little less.
GRACEFUL_TIMEOUT = 25

#: Every environment variable the server reads, with what it means.
ENVIRONMENT = (
    (WORKERS_ENV, "number of worker processes (--workers); default: the CPU count"),
    (TIMEOUT_ENV, "seconds an /invocations request may take (--timeout); "
     f"default {DEFAULT_TIMEOUT}"),
    (MAX_PAYLOAD_ENV, "largest request body in MB (--max-payload-mb); "
     f"default {DEFAULT_MAX_PAYLOAD_MB}"),
    (PORT_ENV, f"port to listen on (--port); default {DEFAULT_PORT}"),
    (PROGRAM_ENV, "file name of the user's inference script inside MODEL_DIR/code "
     "(default inference.py); --entry-point wins"),
    (DEFAULT_ACCEPT_ENV, "response type when Accept is missing or */*; "
     f"default {DEFAULT_ACCEPT}"),
    (LOG_LEVEL_ENV, "log level (--log-level): debug, info, warning, error or a number; "
     "default info"),
    (MAX_MODEL_SIZE_ENV, "the most a model archive may hold extracted (--max-model-size), "
     f"such as 500M or 8G; default {DEFAULT_MAX_MODEL_SIZE}"),
    (CLIENT_TIMEOUT_ENV, "seconds a client has to send its request head, and again its body, "
     f"before it is dropped (--client-timeout); default {DEFAULT_CLIENT_TIMEOUT}"),
    (AUTH_TOKEN_ENV, "a bearer token that /invocations, /metrics and /execution-parameters "
     "then require (--auth-token-file wins); /ping stays open"),
    (AUTH_TOKEN_FILE_ENV, "a file holding that token (--auth-token-file)"),
    (MODEL_NAME_ENV, "the model's name in the Open Inference Protocol routes, "
     f"/v2/models/<name> (--model-name); default {DEFAULT_MODEL_NAME}"),
    (MAX_BATCH_SIZE_ENV, "dynamic batching: the most items (rows) one merged predict_fn call "
     f"holds, 1 for none (--max-batch-size); default {DEFAULT_MAX_BATCH_SIZE}"),
    (MAX_BATCH_DELAY_ENV, "dynamic batching: milliseconds a batch waits for requests still "
     f"arriving (--max-batch-delay-ms); default {DEFAULT_MAX_BATCH_DELAY_MS:g}"),
    (CPU_AFFINITY_ENV, "auto: each worker bound to its own share of the CPUs, none: left to "
     f"the kernel (--cpu-affinity); default {DEFAULT_CPU_AFFINITY}"),
    ("SMCHAINER_LOAD_PLUGINS", "comma-separated names: load only these installed plugins"),
    ("SMCHAINER_DISABLE_PLUGIN_AUTOLOAD", "1: load no installed plugin"),
    ("SMCHAINER_DEVICE", "cpu: keep every worker on the CPU even when GPUs are visible"),
    ("SMCHAINER_WORKER_CLASS", "another gunicorn worker class (gthread), for comparisons only: "
     "the slow-client guarantees hold with the default"),
    ("AWS_ENDPOINT_URL", "S3-compatible endpoint for an s3:// --model-dir (--endpoint-url wins)"),
)


@dataclass
class ServerSettings:
    """Everything the server needs once the model source has been resolved."""

    model_dir: Path
    user_module: Path | None = None
    workers: int = 1
    threads: int = DEFAULT_THREADS
    timeout: int = DEFAULT_TIMEOUT
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_payload_mb: int = DEFAULT_MAX_PAYLOAD_MB
    default_accept: str = DEFAULT_ACCEPT
    log_level: int = 20
    metrics_dir: Path | None = None
    #: a device for every worker ("cpu", "gpu:0"); None: worker i on GPU i mod n
    device: str | None = None
    #: seconds a client has for its request head, and again for its body
    client_timeout: int = DEFAULT_CLIENT_TIMEOUT
    #: the bearer token requests other than /ping must carry; None: no authentication
    auth_token: str | None = field(default=None, repr=False)
    #: the model's name in /v2/models/<name>
    model_name: str = DEFAULT_MODEL_NAME
    #: dynamic batching: the most items one merged predict_fn call holds (1: off)
    max_batch_size: int = 1
    #: dynamic batching: how long a batch waits for requests still arriving
    max_batch_delay_ms: float = DEFAULT_MAX_BATCH_DELAY_MS
    #: "auto": each worker on its own share of the CPUs (:func:`worker_cpus`); "none"
    cpu_affinity: str = DEFAULT_CPU_AFFINITY

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def max_payload_bytes(self) -> int:
        return self.max_payload_mb * 1024 * 1024

    @property
    def debug(self) -> bool:
        """Debug logging is on: error bodies then carry tracebacks."""
        return self.log_level <= 10


def positive_int(value: str | int, what: str) -> int:
    """``value`` as an integer >= 1, or a :class:`UsageError` naming ``what``."""
    return environ.positive_int(value, what, UsageError)


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: str, what: str) -> int:
    """``500M``, ``8G``, ``1.5G`` or a number of bytes, as bytes (at least 1)."""
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    number = text[: len(text) - len(unit)]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        size = 0
    if size < 1:
        raise UsageError(f"{what} must be a size such as 500M or 8G, not {value!r}")
    return size


def milliseconds(value: str | float, what: str) -> float:
    """``value`` as a number of milliseconds from 0 to 10000, or a :class:`UsageError`."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = -1.0
    if not 0 <= number <= 10_000:  # NaN fails too
        raise UsageError(f"{what} must be milliseconds from 0 to 10000, not {value!r}")
    return number


def from_env(name: str, default: int) -> int:
    """A positive integer setting from the environment variable ``name`` (a usage error)."""
    return environ.env_positive_int(name, default, error=UsageError)


def parse_bind(bind: str | None, port: int | None) -> tuple[str, int]:
    """``--bind HOST[:PORT]`` and ``--port`` as ``(host, port)``.

    The port comes from ``--port``, else the bind address, else
    ``SAGEMAKER_BIND_TO_PORT``, else 8080.
    """
    host, bound_port = DEFAULT_HOST, None
    if bind:
        text = bind.strip()
        if text.startswith("["):  # [::1]:8080
            host, _, rest = text[1:].partition("]")
            if rest.startswith(":"):
                bound_port = rest[1:]
        elif text.count(":") == 1:
            host, bound_port = text.split(":")
        else:
            host = text
        if not host:
            raise UsageError(f"--bind {bind!r} names no host")
    if port is not None and bound_port is not None and int(bound_port or 0) != port:
        raise UsageError(f"--bind {bind!r} and --port {port} disagree: give the port once")
    if port is None and bound_port is not None:
        port = positive_int(bound_port, "the port in --bind")
    if port is None:
        port = from_env(PORT_ENV, DEFAULT_PORT)
    if not 1 <= port <= 65535:
        raise UsageError(f"port {port} is out of range 1-65535")
    return host, port


def worker_cpus(allowed: set[int], workers: int, index: int) -> set[int] | None:
    """The CPUs worker ``index`` of ``workers`` is bound to with ``--cpu-affinity auto``.

    ``allowed`` (the CPUs the server may use, in order) is cut into
    ``workers`` contiguous blocks whose sizes differ by one at most, and
    worker ``index`` takes block ``index`` (a replacement worker has the
    index of the one it replaces). None, for no binding, with one worker
    (it has every CPU anyway) or more workers than CPUs (a block would be
    shared).
    """
    cpus = sorted(allowed)
    if workers <= 1 or workers > len(cpus) or not 0 <= index < workers:
        return None
    size, extra = divmod(len(cpus), workers)
    start = index * size + min(index, extra)
    return set(cpus[start:start + size + (1 if index < extra else 0)])
