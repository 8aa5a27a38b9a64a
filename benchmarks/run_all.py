"""The whole CPU benchmark suite, one script after the other, then the report (``make bench``).

Stages (each a child process; a failed stage is reported and the next one
runs anyway; the exit status is 1 when any failed):

1. ``train_throughput.py --device cpu``: VGG-16 training images/s, Chainer vs
   PyTorch eager, batch 64 and 128;
2. ``inference_throughput.py``: VGG-16 batch-1 latency and batch-64 images/s,
   Chainer vs ONNX Runtime vs PyTorch eager;
3. ``serving_load.py``: ``smchainer-serve`` under load, with and without the
   ONNX plugin, and the serving overhead;
4. ``mpi_scaling.py``: 1 vs 2 ranks of ``smchainer-train``, the end-to-end
   epoch against the bare step, the communicator's cost;
5. ``report.py``: the tables in ``benchmarks/README.md`` and the plots.

Every stage appends its record to ``--output-dir`` (default
``benchmarks/results``). ``--quick`` runs every stage's smoke version on tiny
models (well under a minute here) and, unless ``--output-dir`` is given, writes
into a new temporary folder, whose own ``README.md`` then gets the report, so
smoke figures never mix with the history. PyTorch is optional: without it
its columns say "not installed". About 8 minutes on 2 shared CPU cores::

    .venv/bin/python benchmarks/run_all.py            # or: make bench
    .venv/bin/python benchmarks/run_all.py --quick    # or: make bench BENCH_ARGS=--quick
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

HERE = Path(__file__).resolve().parent
STAGES = ("train_throughput", "inference_throughput", "serving_load", "mpi_scaling")


def stage_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each stage's command line (without the Python interpreter)."""
    out = args.output_dir
    stamp = benchlib.utc_now().strftime("%Y%m%dT%H%M%SZ")
    train = [str(HERE / "train_throughput.py"), "--device", "cpu",
             "--out", str(out / f"train_throughput-{stamp}.json")]
    if args.quick:
        small = ["--depth", "8", "--width", "0.125"]
        train += ["--quick", *small, "--batch-sizes", "8", "16"]
        inference = ["--quick", *small]
    else:
        # VGG-16 takes seconds per step here: few steps, but the same for both frameworks.
        train += ["--batch-sizes", "64", "128", "--warmup", "1", "--iters", "3"]
        inference = []
    common = ["--output-dir", str(out)]
    quick = ["--quick"] if args.quick else []
    return {
        "train_throughput": train,
        "inference_throughput": [str(HERE / "inference_throughput.py"), *inference, *common],
        "serving_load": [str(HERE / "serving_load.py"), *quick, *common],
        "mpi_scaling": [str(HERE / "mpi_scaling.py"), *quick, *common],
    }


def run_stage(name: str, command: list[str], timeout: float) -> dict[str, object]:
    """Run one stage with its output passed through; its status and seconds."""
    print(f"=== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        status = subprocess.run([sys.executable, *command], timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        status = "timeout"
    seconds = round(time.perf_counter() - started, 1)
    print(f"=== {name}: exit {status} after {seconds} s", flush=True)
    return {"stage": name, "exit": status, "seconds": seconds}


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` lists it)."""
    parser = argparse.ArgumentParser(prog="run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the smoke version of every stage, into a temporary folder")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the records go (default benchmarks/results; with --quick "
                        "a new temporary folder)")
    parser.add_argument("--only", nargs="+", choices=STAGES, default=None,
                        help="run these stages only (the report still runs)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="the README the report goes into (default benchmarks/README.md; "
                        "with --quick OUTPUT_DIR/README.md)")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--stage-timeout", type=float, default=None,
                        help="seconds per stage (default 600, 240 with --quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the stages and the report; 1 when any stage failed."""
    args = build_parser().parse_args(argv)
    if args.output_dir is None:
        args.output_dir = (Path(tempfile.mkdtemp(prefix="smchainer-bench-quick-"))
                           if args.quick else benchlib.RESULTS)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.readme is None:
        args.readme = (args.output_dir / "README.md" if args.quick
                       else HERE / "README.md")
    timeout = args.stage_timeout or (240.0 if args.quick else 600.0)
    load = benchlib.load_average()
    print(f"benchmarks into {args.output_dir}; {benchlib.cpu_model()}, "
          f"{benchlib.cpus_available()} CPUs, load average {load}", flush=True)
    note = benchlib.torch_missing_note()
    if note:
        print(note, flush=True)
    started = time.perf_counter()
    commands = stage_commands(args)
    results = [run_stage(name, commands[name], timeout)
               for name in STAGES if args.only is None or name in args.only]
    if not args.no_report:
        report = [str(HERE / "report.py"), "--results-dir", str(args.output_dir),
                  "--readme", str(args.readme)]
        if args.quick:
            report.append("--include-quick")
        results.append(run_stage("report", report, timeout))
    total = round(time.perf_counter() - started, 1)
    print(f"\nsuite: {total} s; load average before {load}, after "
          f"{benchlib.load_average()}")
    for result in results:
        print(f"  {result['stage']:22s} exit {result['exit']!s:8s} {result['seconds']:7.1f} s")
    failed = [r["stage"] for r in results if r["exit"] != 0]
    if failed:
        print(f"Error: stage(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
