"""``smchainer-transform``: a SageMaker batch-transform job on this machine.

The command turns its options into a :class:`~smchainer.transform.job.TransformSpec`
and a server to start (``--model-data``) or to use (``--endpoint-url``), all
checked before anything starts, and runs the
:class:`~smchainer.transform.job.TransformJob`. Progress goes to stderr: a
bar on a terminal, plain lines otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from smchainer.cli import ArgumentParser, add_common_arguments, run_command, setup_logging
from smchainer.errors import UsageError

if TYPE_CHECKING:
    from smchainer.transform.job import TransformJob

logger = logging.getLogger(__name__)

EPILOG = """\
Each input file <name> (a file, every file under a folder, or every object
under an s3:// prefix) gives <output path>/<name>.out. A file with a failed
record gets no .out; <output path>/_failures.json then lists every failure
(file, records, HTTP status, the server's message) and the command exits 1.

Defaults not given come from the server's /execution-parameters, as on
SageMaker (smchainer-serve: MultiRecord, its --max-payload-mb, one request in
flight per worker), else SingleRecord, 6 MB and 1.

Exit status: 0 every record transformed, 1 a failure (records, server, S3),
2 bad usage, 130 interrupted (the server it started is stopped).

Examples:
  smchainer-transform data/ --model-data model.tar.gz --entry-point inference.py \\
      --content-type text/csv --split-type Line --strategy MultiRecord --assemble-with Line
  smchainer-transform s3://bucket/in/ --output-path s3://bucket/out/ --model-data model/
  smchainer-transform images/ --endpoint-url http://127.0.0.1:8080 \\
      --content-type application/x-npy --max-concurrent-transforms 4
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="smchainer-transform",
        description="Run a SageMaker batch-transform job locally: every record of a file, "
        "folder or S3 prefix through a model server, answers in <name>.out files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("input", metavar="INPUT",
                        help="a file, a folder (every file under it) or an s3:// prefix or object")
    parser.add_argument("--output-path", metavar="DIR|s3://BUCKET/PREFIX",
                        help="where <name>.out files go (default ./transforms/<job name>)")
    parser.add_argument("--job-name", metavar="NAME",
                        help="the job's name (default smchainer-transform-<date-time>)")
    server = parser.add_argument_group("the server (one of --model-data, --endpoint-url)")
    server.add_argument("--model-data", metavar="SOURCE",
                        help="start smchainer-serve for this model (a folder, a model.tar.gz, "
                        "or an s3:// URI of either) and stop it at the end")
    server.add_argument("--entry-point", metavar="FILE",
                        help="the inference script (model_fn, input_fn, predict_fn, output_fn)")
    server.add_argument("--endpoint-url", metavar="URL",
                        help="use the server running at http://HOST:PORT (left running)")
    server.add_argument("--instance-count", metavar="N", default=None,
                        help="server workers, as SageMaker instances (default 1); "
                        "--max-concurrent-transforms counts per instance")
    server.add_argument("--instance-type", metavar="TYPE",
                        help="local (CPU) or local_gpu (the GPUs); default: what "
                        "smchainer-serve uses (the GPUs when visible)")
    server.add_argument("--env", action="append", metavar="NAME[=VALUE]",
                        help="a variable of the server (repeatable); NAME alone passes on "
                        "this environment's value")
    server.add_argument("--startup-timeout", metavar="SECONDS", type=float,
                        default=120.0, help="time for the server to load the model "
                        "(default 120)")
    server.add_argument("--auth-token-file", metavar="FILE",
                        help="send 'Authorization: Bearer <token>' (the file's first line), "
                        "for a server that requires it (default $SMCHAINER_AUTH_TOKEN_FILE, "
                        "or the token in $SMCHAINER_AUTH_TOKEN)")
    data = parser.add_argument_group("records (SageMaker's names)")
    data.add_argument("--content-type", metavar="TYPE",
                      help="the requests' Content-Type, such as text/csv")
    data.add_argument("--accept", metavar="TYPE", help="the requests' Accept")
    data.add_argument("--split-type", metavar="Line|None",
                      help="Line: each line is a record; None (default): each file is one")
    data.add_argument("--compression-type", metavar="Gzip|None",
                      help="Gzip: the inputs are gzipped (the .out files are not)")
    data.add_argument("--strategy", metavar="SingleRecord|MultiRecord",
                      help="with --split-type Line: one record per request, or as many "
                      "consecutive records as fit in --max-payload")
    data.add_argument("--max-payload", metavar="MB",
                      help="the largest request body in MB; 0: no limit (default: the "
                      "server's, else 6)")
    data.add_argument("--max-concurrent-transforms", metavar="N",
                      help="requests in flight per instance (default: the server's, else 1)")
    data.add_argument("--assemble-with", metavar="Line|None",
                      help="Line: each answer ends with a newline in the .out; None "
                      "(default): answers are concatenated as they are")
    data.add_argument("--invocations-timeout", metavar="SECONDS", type=float, default=None,
                      help="seconds one request may take (default 600, as SageMaker)")
    data.add_argument("--max-retries", metavar="N", default=None,
                      help="tries again of a request that got no answer or a 5xx "
                      "(default 3, as SageMaker); a 4xx is never retried")
    data.add_argument("--s3-endpoint-url", metavar="URL",
                      help="S3-compatible endpoint for s3:// input, output and model "
                      "(default $AWS_ENDPOINT_URL)")
    return parser


def parse_env(items: Sequence[str] | None) -> dict[str, str]:
    """``--env NAME=VALUE`` / ``--env NAME`` as a dict, as ``smchainer-train --env`` reads them."""
    from smchainer.training.config import parse_variable

    return dict(parse_variable(item) for item in items or ())


def build_job(args: argparse.Namespace) -> TransformJob:
    """The :class:`TransformJob` of the command line; every usage error is raised here."""
    from smchainer.serving.cli import read_auth_token
    from smchainer.storage import is_s3_uri
    from smchainer.transform.client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, parse_url
    from smchainer.transform.job import ServerSpec, TransformJob, TransformSpec, new_job_name
    from smchainer.transform.progress import reporter_for
    from smchainer.transform.records import TransformOptionError

    if (args.model_data is None) == (args.endpoint_url is None):
        raise UsageError("give one of --model-data (a model to serve) and --endpoint-url "
                         "(a running server)")
    job_name = args.job_name or new_job_name()
    output_path = args.output_path or str(Path.cwd() / "transforms" / job_name)
    spec = TransformSpec(
        data=args.input, output_path=output_path, job_name=job_name,
        content_type=args.content_type, accept=args.accept, split_type=args.split_type,
        compression_type=args.compression_type, strategy=args.strategy,
        assemble_with=args.assemble_with, max_payload=args.max_payload,
        max_concurrent_transforms=args.max_concurrent_transforms,
        instance_count=args.instance_count or 1,
        invocations_timeout=(args.invocations_timeout if args.invocations_timeout is not None
                             else DEFAULT_TIMEOUT),
        max_retries=args.max_retries if args.max_retries is not None else DEFAULT_MAX_RETRIES,
        s3_endpoint_url=args.s3_endpoint_url, auth_token=read_auth_token(args.auth_token_file),
    )
    try:
        spec.checked()
    except TransformOptionError as error:
        # The option's name as the command line spells it: max_payload -> --max-payload.
        name, _, rest = str(error).partition(" ")
        raise UsageError(f"--{name.replace('_', '-')} {rest}"
                         if name in vars(args) else str(error)) from None
    reporter = reporter_for(sys.stderr)
    if args.endpoint_url is not None:
        for option in ("entry_point", "instance_count", "instance_type", "env"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option.replace('_', '-')} is for a server this command "
                                 "starts (--model-data), not one at --endpoint-url")
        parse_url(args.endpoint_url)
        return TransformJob(spec, endpoint_url=args.endpoint_url, reporter=reporter)
    model_data = args.model_data
    if not is_s3_uri(model_data):
        path = Path(model_data).expanduser()
        if not path.exists():
            raise UsageError(f"--model-data {model_data} does not exist")
        model_data = str(path.resolve())
    entry_point = None
    if args.entry_point is not None:
        script = Path(args.entry_point).expanduser()
        if not script.is_file():
            raise UsageError(f"--entry-point {args.entry_point} is not a file")
        entry_point = str(script.resolve())
    if not args.startup_timeout > 0:
        raise UsageError(f"--startup-timeout must be > 0, not {args.startup_timeout}")
    env = dict(os.environ)
    if args.instance_type is not None:
        from smchainer.api.local_mode import LOCAL_GPU, device_environment, require_gpu

        kind = args.instance_type.strip()
        if kind not in ("local", LOCAL_GPU):
            raise UsageError(f"--instance-type {args.instance_type!r}: use local (CPU) or "
                             "local_gpu")
        if kind == LOCAL_GPU:
            require_gpu()
        env = device_environment(kind)
    env.update(parse_env(args.env))
    if args.s3_endpoint_url:
        env["AWS_ENDPOINT_URL"] = args.s3_endpoint_url
    server = ServerSpec(model_data, entry_point=entry_point, workers=spec.instance_count,
                        env=env, s3_endpoint_url=args.s3_endpoint_url,
                        startup_timeout=args.startup_timeout)
    return TransformJob(spec, server=server, reporter=reporter)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``smchainer-transform`` command."""
    def body(args: argparse.Namespace) -> int:
        job = build_job(args)  # usage errors first, before logging is set up
        setup_logging(logging.DEBUG if args.debug else logging.WARNING)
        job.run()
        return 0

    return run_command(build_parser(), argv, body)


if __name__ == "__main__":
    sys.exit(main())
