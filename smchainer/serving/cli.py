"""``smchainer-serve``: serve a model with the SageMaker hosting contract on gunicorn.

Everything that can be checked before forking is checked in the master
(model source, user script, plugins, port), so bad input ends with one
``Error: ...`` line and exit code 2 (usage) or 1 (runtime) instead of a
crash loop of workers.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from smchainer.cli import (
    ArgumentParser,
    add_common_arguments,
    parse_log_level,
    run_command,
    setup_logging,
)
from smchainer.device import cpu_count
from smchainer.errors import SmchainerError, UsageError
from smchainer.serving import settings as config
from smchainer.serving.settings import ServerSettings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = "/opt/ml/model"

DESCRIPTION = """\
Serve a Chainer model with the SageMaker hosting contract on gunicorn.

Endpoints: GET /ping (200 once this worker's model is loaded, else 503),
POST /invocations, GET /execution-parameters, GET /metrics (Prometheus).
User code (model_fn, input_fn, predict_fn, output_fn or transform_fn) comes
from --entry-point, else MODEL_DIR/code/$SAGEMAKER_PROGRAM, else
MODEL_DIR/code/inference.py; installed plugins (entry-point group
"smchainer") and the built-in NumPy defaults fill in the rest.
"""


def environment_help() -> str:
    lines = ["environment variables (options win over them):"]
    for name, meaning in config.ENVIRONMENT:
        lines.append(f"  {name}\n      {meaning}")
    lines.append(
        "\nexit status: 0 after a clean shutdown (SIGTERM finishes in-flight requests),"
        " 1 on a runtime error, 2 on bad usage."
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="smchainer-serve",
        description=DESCRIPTION,
        epilog=environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--model-dir", default=DEFAULT_MODEL_DIR, metavar="SOURCE",
        help="the model: a directory, a model.tar.gz, or an s3://bucket/key of either "
        f"(default {DEFAULT_MODEL_DIR})",
    )
    parser.add_argument(
        "--entry-point", metavar="FILE",
        help="the user's inference script (a training script with its training behind "
        "the main guard works too); default MODEL_DIR/code/$SAGEMAKER_PROGRAM or "
        "MODEL_DIR/code/inference.py",
    )
    parser.add_argument(
        "--workers", metavar="N",
        help=f"worker processes, each with its own copy of the model (default "
        f"${config.WORKERS_ENV}, else the CPU count); worker i uses GPU i mod n",
    )
    parser.add_argument(
        "--threads", metavar="N",
        help="threads per worker that read and answer requests while one more runs the "
        f"inferences (default {config.DEFAULT_THREADS}, and with dynamic batching at least "
        "--max-batch-size, so that many requests can wait for one batch)",
    )
    parser.add_argument(
        "--max-batch-size", metavar="N",
        help="dynamic batching: requests waiting for the model are merged into one "
        "predict_fn call of up to N items (rows), then split back; 1 turns it off. Only "
        "where the hooks allow it (batch_fn: the built-in VGG and image plugin do, a "
        "user's predict_fn opts in) "
        f"(default ${config.MAX_BATCH_SIZE_ENV}, else {config.DEFAULT_MAX_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-batch-delay-ms", metavar="MS",
        help="dynamic batching: how long a batch waits for requests still on their way "
        "(being read by the same worker); a lone request never waits "
        f"(default ${config.MAX_BATCH_DELAY_ENV}, else {config.DEFAULT_MAX_BATCH_DELAY_MS:g})",
    )
    parser.add_argument(
        "--cpu-affinity", choices=config.CPU_AFFINITY_MODES,
        help="auto: with more than one worker and at least as many CPUs, worker i is bound "
        "to the i-th of --workers equal blocks of the CPUs the server may use, so that its "
        "threads hand requests to each other on the CPUs that hold its caches; none: the "
        f"kernel places them (default ${config.CPU_AFFINITY_ENV}, else "
        f"{config.DEFAULT_CPU_AFFINITY})",
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS",
        help="an /invocations request that takes longer gets 504 (default "
        f"${config.TIMEOUT_ENV}, else {config.DEFAULT_TIMEOUT})",
    )
    parser.add_argument(
        "--bind", metavar="HOST[:PORT]",
        help=f"address to listen on (default {config.DEFAULT_HOST})",
    )
    parser.add_argument(
        "--port", metavar="PORT",
        help=f"port to listen on (default ${config.PORT_ENV}, else {config.DEFAULT_PORT})",
    )
    parser.add_argument(
        "--max-payload-mb", metavar="MB",
        help="largest request body; larger ones get 413 before they are read (default "
        f"${config.MAX_PAYLOAD_ENV}, else {config.DEFAULT_MAX_PAYLOAD_MB})",
    )
    parser.add_argument(
        "--client-timeout", metavar="SECONDS",
        help="a client that has not sent its request line and headers this long after "
        "connecting (or after its previous answer), or its body as long again, is dropped; "
        "slow clients never hold a thread meanwhile "
        f"(default ${config.CLIENT_TIMEOUT_ENV}, else {config.DEFAULT_CLIENT_TIMEOUT})",
    )
    parser.add_argument(
        "--max-model-size", metavar="SIZE",
        help="the most a model archive may hold once extracted, such as 500M or 8G; a "
        f"larger one is refused before it is written (default ${config.MAX_MODEL_SIZE_ENV}, "
        f"else {config.DEFAULT_MAX_MODEL_SIZE})",
    )
    parser.add_argument(
        "--auth-token-file", metavar="FILE",
        help="require 'Authorization: Bearer <token>' (the file's first line) on "
        "/invocations, /metrics and /execution-parameters; /ping stays open for health "
        f"checks (default ${config.AUTH_TOKEN_FILE_ENV}, or the token in "
        f"${config.AUTH_TOKEN_ENV})",
    )
    parser.add_argument(
        "--model-name", metavar="NAME",
        help="the model's name in the Open Inference Protocol (KServe v2) routes, "
        f"/v2/models/NAME/infer (default ${config.MODEL_NAME_ENV}, else "
        f"{config.DEFAULT_MODEL_NAME})",
    )
    parser.add_argument(
        "--log-level", metavar="LEVEL",
        help=f"debug, info, warning or error (default ${config.LOG_LEVEL_ENV}, else info); "
        "at debug, error responses carry the traceback",
    )
    parser.add_argument(
        "--endpoint-url", metavar="URL",
        help="S3-compatible endpoint for an s3:// --model-dir (default $AWS_ENDPOINT_URL)",
    )
    return parser


def check_port_free(host: str, port: int) -> None:
    """Fail now, not in gunicorn, when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SmchainerError(
                f"cannot listen on {host}:{port}: {error.strerror or error}; "
                "is another server using it? choose another with --port"
            ) from None


def resolve_settings(args: argparse.Namespace, log_level: int, work_dir: Path) -> ServerSettings:
    """Validate everything the workers will need; raise on the first problem."""
    from smchainer.manager import Hooks
    from smchainer.plugins import describe_plugins, get_plugin_manager
    from smchainer.serving.model_source import find_user_module, prepare_model_dir

    workers = (config.positive_int(args.workers, "--workers") if args.workers is not None
               else config.from_env(config.WORKERS_ENV, cpu_count()))
    timeout = (config.positive_int(args.timeout, "--timeout") if args.timeout is not None
               else config.from_env(config.TIMEOUT_ENV, config.DEFAULT_TIMEOUT))
    max_payload = (config.positive_int(args.max_payload_mb, "--max-payload-mb")
                   if args.max_payload_mb is not None
                   else config.from_env(config.MAX_PAYLOAD_ENV, config.DEFAULT_MAX_PAYLOAD_MB))
    max_batch_size = (config.positive_int(args.max_batch_size, "--max-batch-size")
                      if args.max_batch_size is not None
                      else config.from_env(config.MAX_BATCH_SIZE_ENV,
                                           config.DEFAULT_MAX_BATCH_SIZE))
    raw_delay = (args.max_batch_delay_ms if args.max_batch_delay_ms is not None
                 else os.environ.get(config.MAX_BATCH_DELAY_ENV, "").strip()
                 or config.DEFAULT_MAX_BATCH_DELAY_MS)
    max_batch_delay_ms = config.milliseconds(
        raw_delay, "--max-batch-delay-ms" if args.max_batch_delay_ms is not None
        else config.MAX_BATCH_DELAY_ENV)
    client_timeout = (config.positive_int(args.client_timeout, "--client-timeout")
                      if args.client_timeout is not None
                      else config.from_env(config.CLIENT_TIMEOUT_ENV,
                                           config.DEFAULT_CLIENT_TIMEOUT))
    cpu_affinity = (args.cpu_affinity or os.environ.get(config.CPU_AFFINITY_ENV, "").strip().lower()
                    or config.DEFAULT_CPU_AFFINITY)
    if cpu_affinity not in config.CPU_AFFINITY_MODES:
        raise UsageError(f"{config.CPU_AFFINITY_ENV}={cpu_affinity!r}: use "
                         f"{' or '.join(config.CPU_AFFINITY_MODES)}")
    port = config.positive_int(args.port, "--port") if args.port is not None else None
    host, port = config.parse_bind(args.bind, port)
    default_accept = os.environ.get(config.DEFAULT_ACCEPT_ENV, "").strip() or config.DEFAULT_ACCEPT
    if "/" not in default_accept or "*" in default_accept:
        raise UsageError(
            f"{config.DEFAULT_ACCEPT_ENV}={default_accept!r} is not a media type "
            "such as application/json"
        )

    if args.max_model_size is not None:
        max_model_size = config.parse_size(args.max_model_size, "--max-model-size")
    else:
        max_model_size = config.parse_size(
            os.environ.get(config.MAX_MODEL_SIZE_ENV, "").strip()
            or config.DEFAULT_MAX_MODEL_SIZE, config.MAX_MODEL_SIZE_ENV)
    auth_token = read_auth_token(args.auth_token_file)
    model_name = (args.model_name or os.environ.get(config.MODEL_NAME_ENV, "").strip()
                  or config.DEFAULT_MODEL_NAME)
    if not config.MODEL_NAME.match(model_name):
        raise UsageError(f"--model-name {model_name!r}: use letters, digits, '.', '-' and '_'")

    check_port_free(host, port)
    model_dir = prepare_model_dir(args.model_dir, work_dir, endpoint_url=args.endpoint_url,
                                  max_bytes=max_model_size)
    user_module = find_user_module(model_dir, args.entry_point)
    # Built here only to fail before forking; each worker builds its own.
    pm = get_plugin_manager(user_module=user_module)
    for plugin in describe_plugins(pm):
        logger.info("plugin %s (%s): %s", plugin["name"], plugin["kind"],
                    ", ".join(plugin["hooks"]) or "no hooks")
    threads = batching_threads(args.threads, max_batch_size, Hooks(pm).batching_refusal())
    metrics_dir = work_dir / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    return ServerSettings(
        model_dir=model_dir, user_module=user_module, workers=workers, threads=threads,
        timeout=timeout, host=host, port=port, max_payload_mb=max_payload,
        default_accept=default_accept, log_level=log_level, metrics_dir=metrics_dir,
        auth_token=auth_token, client_timeout=client_timeout, model_name=model_name,
        max_batch_size=max_batch_size, max_batch_delay_ms=max_batch_delay_ms,
        cpu_affinity=cpu_affinity,
    )


def batching_threads(given: str | None, max_batch_size: int, refusal: str | None) -> int:
    """Threads per worker: ``--threads``, else enough for a full batch to wait together.

    A request read through gunicorn's pool (a chunked body, one over 1 MiB:
    see :mod:`smchainer.serving.direct`) waits for its answer on a thread of
    its worker, so a merged batch holds at most that many of them; requests
    of the direct path hold no thread.
    """
    batching = max_batch_size > 1 and refusal is None
    if max_batch_size > 1 and refusal is not None:
        logger.info("dynamic batching is off: %s", refusal)
    if given is not None:
        threads = config.positive_int(given, "--threads")
        if batching and threads < max_batch_size:
            logger.info("a batch holds at most %d requests read through the pool (chunked "
                        "or over 1 MiB; --threads %d) of the %d items --max-batch-size allows",
                        threads, threads, max_batch_size)
        return threads
    return max(config.DEFAULT_THREADS, max_batch_size) if batching else config.DEFAULT_THREADS


def read_auth_token(path: str | None) -> str | None:
    """The bearer token: ``--auth-token-file``, else its variable, else ``SMCHAINER_AUTH_TOKEN``."""
    path = path or os.environ.get(config.AUTH_TOKEN_FILE_ENV, "").strip() or None
    if path is not None:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as error:
            raise UsageError(f"--auth-token-file {path}: {error.strerror or error}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise UsageError(f"--auth-token-file {path} holds no token")
        return token
    token = os.environ.get(config.AUTH_TOKEN_ENV, "").strip()
    return token or None


def serve(args: argparse.Namespace, log_level: int) -> int:
    """Validate, then run gunicorn until it stops; the exit status of the server."""
    from smchainer.serving.gunicorn_app import ServingApplication
    from smchainer.serving.metrics import use_directory

    master = os.getpid()
    work_dir = Path(tempfile.mkdtemp(prefix="smchainer-serve-"))
    # Before anything (a user's module) imports prometheus_client: the workers' metrics files.
    (work_dir / "metrics").mkdir()
    use_directory(work_dir / "metrics")
    try:
        settings = resolve_settings(args, log_level, work_dir)
        logger.info("serving %s on %s with %d worker(s)", settings.model_dir, settings.bind,
                    settings.workers)
        # Plugins size their thread pools by the worker count (cores per worker).
        os.environ["SAGEMAKER_MODEL_SERVER_WORKERS"] = str(settings.workers)
        try:
            ServingApplication(settings).run()
            code = 0
        except SystemExit as stop:
            if os.getpid() != master:
                raise  # a worker leaving: gunicorn decides its exit status
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if code != 0:
            raise SmchainerError(f"the server stopped with status {code} (see the log above)")
        return 0
    finally:
        if os.getpid() == master:
            shutil.rmtree(work_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``smchainer-serve``."""
    def body(args: argparse.Namespace) -> int:
        if args.debug:
            level = logging.DEBUG
        else:
            level = parse_log_level(
                args.log_level or os.environ.get(config.LOG_LEVEL_ENV, "").strip() or "info"
            )
        setup_logging(level)
        return serve(args, level)

    return run_command(build_parser(), argv, body)


if __name__ == "__main__":
    sys.exit(main())
