"""``smchainer-train``: run a training job with the SageMaker contract.

Alone it runs the job in this process. Under ``mpirun`` every rank runs it
and the ranks agree through MPI. With ``--num-processes N`` it starts
``mpirun`` itself. This module only turns the command line into a checked
:class:`~smchainer.training.config.JobSpec` (every option is checked before
any rank starts) and hands it to :func:`smchainer.training.launch.run`, which
owns how the job starts and ends.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from smchainer.cli import ArgumentParser, add_common_arguments, run_command

logger = logging.getLogger(__name__)

EPILOG = """\
The job tree (--job-dir, default ./jobs/<job name>, or $SAGEMAKER_BASE_DIR):
  code/ input/config/{hyperparameters,inputdataconfig,resourceconfig}.json
  input/data/<channel>/ model/ output/{success,failure} output/data/
  output/intermediate/ checkpoints/ model.tar.gz output.tar.gz

The script gets every SM_* variable of the SageMaker contract and the
hyperparameters as sorted arguments (--key value; sagemaker_* keys left out).
Without --entry-point the train(env) hook runs (default: VGG on CIFAR-10).
Exit status: 0 success, 1 the job failed (see output/failure), 2 bad usage,
130 stopped by SIGINT, 143 by SIGTERM (after a snapshot, with the built-in
trainer: a rerun resumes from it).

Examples:
  smchainer-train --entry-point train.py --channel train=data/ --hp epochs=3
  mpirun -n 2 smchainer-train --entry-point train.py --channel train=data/
  smchainer-train --num-processes 4 --hostfile hosts --entry-point train.py ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="smchainer-train",
        description="Run a training job with the SageMaker Chainer contract: one process, "
        "every rank of an mpirun job, or N ranks started with --num-processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    job = parser.add_argument_group("the job")
    job.add_argument("--entry-point", metavar="FILE",
                     help="the training script (relative to --source-dir when given); "
                     "without it the train(env) hook runs")
    job.add_argument("--source-dir", metavar="DIR",
                     help="folder copied to the job's code/ (with requirements.txt, installed "
                     "with pip first); the script runs from there")
    job.add_argument("--channel", action="append", metavar="NAME=PATH|s3://BUCKET/PREFIX",
                     help="an input channel (repeatable): a local folder or file, or S3 "
                     "(AWS_ENDPOINT_URL for S3-compatible stores); the script sees "
                     "SM_CHANNEL_<NAME>")
    job.add_argument("--hp", action="append", metavar="KEY=VALUE",
                     help="a hyperparameter (repeatable); VALUE is decoded as JSON when it "
                     "parses (3 -> int, true -> bool), else kept as a string")
    job.add_argument("--hyperparameters", metavar="FILE.json",
                     help="hyperparameters from a JSON object (SageMaker's "
                     "hyperparameters.json works); --hp wins")
    job.add_argument("--job-file", metavar="FILE.json",
                     help="the job as a JSON object with these options' names "
                     "(entry_point, channels {}, hyperparameters {}, ...); options win")
    job.add_argument("--job-dir", metavar="DIR",
                     help="the /opt/ml-style job tree (default: $SAGEMAKER_BASE_DIR, else "
                     "./jobs/<job name>)")
    job.add_argument("--job-name", metavar="NAME",
                     help="the job's name (default smchainer-<date>-<time>-<random>)")
    job.add_argument("--output-path", metavar="DIR|s3://BUCKET/PREFIX",
                     help="also copy or upload model.tar.gz and output.tar.gz to "
                     "<output path>/<job name>/output/")
    job.add_argument("--env", action="append", metavar="NAME[=VALUE]",
                     help="a variable for the script on every rank and host (repeatable); "
                     "NAME alone passes on this environment's value")
    job.add_argument("--checkpoint-dir", metavar="DIR",
                     help="checkpoint folder (default <job dir>/checkpoints; "
                     "SMCHAINER_CHECKPOINT_DIR in the script)")
    job.add_argument("--checkpoint-s3-uri", metavar="s3://BUCKET/PREFIX",
                     help="restore the checkpoint folder from here before the job and upload "
                     "each new checkpoint while it runs")
    ends = parser.add_argument_group("stopping and restarting")
    ends.add_argument("--grace-period", type=float, metavar="SECONDS",
                      help="time between SIGTERM (or SIGUSR1) and the hard stop; the built-in "
                      "trainer writes a snapshot in it (default 25: Kubernetes gives 30)")
    ends.add_argument("--max-restarts", type=int, metavar="N",
                      help="rerun a failed attempt up to N times, resuming from the newest "
                      "snapshot (default 0)")
    mpi = parser.add_argument_group("starting mpirun (one host or many)")
    mpi.add_argument("--num-processes", type=int, metavar="N",
                     help="start N ranks with mpirun (printed before it runs)")
    mpi.add_argument("--hostfile", metavar="FILE",
                     help="Open MPI hostfile (see hostfile.example); default: this machine")
    mpi.add_argument("--mpi-options", metavar='"..."',
                     help="more mpirun options, as one shell-quoted string")
    mpi.add_argument("--oversubscribe", action="store_true",
                     help="allow more ranks than slots (added by itself when N exceeds this "
                     "machine's CPUs and there is no hostfile)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``smchainer-train`` command."""
    def body(args: argparse.Namespace) -> int:
        # Imported once there is a job to run, so that --help stays quick.
        from smchainer.training.config import build_spec
        from smchainer.training.launch import run

        return run(build_spec(args), logging.DEBUG if args.debug else logging.INFO)

    return run_command(build_parser(), argv, body)


if __name__ == "__main__":
    sys.exit(main())
