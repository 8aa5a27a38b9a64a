"""MPI scaling of the built-in VGG trainer, the end-to-end epoch and the communicator's cost.

Three measurements in one record:

``runs`` (end to end, through ``smchainer-train``)
    The built-in VGG CIFAR-10 trainer on the real CIFAR-10 zips, once per
    rank count (``--ranks 1 2``: one process, then ``--num-processes 2``, which
    starts ``mpirun`` with ChainerMN's ``naive`` communicator on the CPU).
    ``OMP_NUM_THREADS`` (and ``OPENBLAS_NUM_THREADS``) is CPUs // ranks for each
    run and recorded. On the CPU a 1-rank run with the multi-rank runs' thread
    count is added, so that both of these show:

    - ``speedup`` = images/s of n ranks / images/s of 1 rank on all the cores
      (the ranks share the same cores: what MPI data parallelism buys on
      this machine against BLAS threads);
    - ``efficiency`` = images/s of n ranks / (n x images/s of 1 rank with the
      same threads per rank): 1.0 is perfect scaling, the rest is the
      gradient all-reduce, the sharded evaluation and waiting for each other.

    Images/s come from the trainer's own log (``output/data/log``): training
    images / seconds of one epoch (its ``elapsed_time`` minus the previous
    one's), after the first epoch (which carries the warm-up). An epoch
    includes everything the trainer does: batching, augmentation, the update,
    the evaluation of ``--test-samples`` images and the report, so a data
    pipeline stall shows here and not in the bare step.
``bare_step``
    ``train_throughput.py`` for Chainer with the same network and batch size,
    once per thread count of the 1-rank runs: forward + backward + update on
    batches already in memory. ``pipeline_efficiency`` (per thread count) =
    the 1-rank epoch images/s / the bare step's.
``communicator``
    One rank under ``mpirun -n 1``: training steps with a plain optimizer and
    with ChainerMN's multi-node optimizer (``naive`` on the CPU, ``pure_nccl``
    on a GPU), turns interleaved; ``overhead`` = 1 - images/s with / without:
    what packing, all-reducing and unpacking the gradients costs one rank.

``--device gpu`` runs on the GPUs (rank i on GPU i; rank counts above the GPU
count are dropped, so a one-GPU machine gives the 1-rank run and the NCCL
overhead); default sizes are then the full VGG-16 on all of CIFAR-10. Writes
``benchmarks/results/mpi_scaling-<stamp>.json``::

    .venv/bin/python benchmarks/mpi_scaling.py             # CPU: 1 vs 2 ranks
    .venv/bin/python benchmarks/mpi_scaling.py --quick     # smoke run
    python benchmarks/mpi_scaling.py --device gpu          # on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np

import smchainer  # noqa: F401  (Chainer's NumPy 2 compat before chainer loads)
from smchainer.cli import ArgumentParser, add_common_arguments, run
from smchainer.errors import SmchainerError

HERE = Path(__file__).resolve().parent
SIZES = {
    # device, quick -> model and data sizes
    ("cpu", False): {"depth": 16, "width": 0.25, "batch_size": 64, "train_samples": 1536,
                     "test_samples": 128, "epochs": 2, "iters": 10},
    ("cpu", True): {"depth": 8, "width": 0.125, "batch_size": 32, "train_samples": 256,
                    "test_samples": 64, "epochs": 2, "iters": 3},
    ("gpu", False): {"depth": 16, "width": 1.0, "batch_size": 128, "train_samples": 0,
                     "test_samples": 2000, "epochs": 3, "iters": 30},
    ("gpu", True): {"depth": 16, "width": 1.0, "batch_size": 128, "train_samples": 10000,
                    "test_samples": 1000, "epochs": 2, "iters": 5},
}


def thread_env(threads: int, device: str) -> dict[str, str]:
    """The environment of a run with ``threads`` BLAS threads per process."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env["SMCHAINER_DEVICE"] = "cpu"
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without these
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


# --- end to end: smchainer-train -------------------------------------------------------------

def epoch_figures(log: list[dict[str, Any]], train_images: int) -> dict[str, Any]:
    """Seconds per epoch from the trainer's log, and images/s of the epochs after the first."""
    seconds, previous = [], 0.0
    for entry in log:
        seconds.append(round(entry["elapsed_time"] - previous, 3))
        previous = entry["elapsed_time"]
    if not seconds:
        raise SmchainerError("the trainer's log has no epoch")
    steady = seconds[1:] or seconds
    return {
        "epoch_seconds": seconds,
        "images_per_s": round(train_images / statistics.median(steady), 2),
        "first_epoch_images_per_s": round(train_images / seconds[0], 2),
        "steady_epochs": len(seconds) - 1 if len(seconds) > 1 else 0,
    }


def train_run(ranks: int, threads: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One ``smchainer-train`` job of the built-in trainer; its end-to-end figures."""
    job_dir = work / f"job-{ranks}r-{threads}t"
    command = [sys.executable, "-m", "smchainer.training.cli", "--job-dir", str(job_dir),
               "--channel", f"train={args.cifar10 / 'train.zip'}",
               "--channel", f"test={args.cifar10 / 'test.zip'}"]
    hp = {"epochs": args.epochs, "batch-size": args.batch_size, "depth": args.depth,
          "width": args.width, "train-samples": args.train_samples,
          "test-samples": args.test_samples, "progress-bar": "false",
          "kernels": trainer_kernels(args.device)}
    if ranks > 1:
        command += ["--num-processes", str(ranks)]
        hp["communicator"] = args.communicator
    for key, value in hp.items():
        command += ["--hp", f"{key}={value}"]
    print(f"  smchainer-train: {ranks} rank(s), {threads} thread(s) each ...", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=thread_env(threads, args.device), capture_output=True,
                          text=True, timeout=args.run_timeout)
    wall = time.perf_counter() - started
    figures: dict[str, Any] = {
        "ranks": ranks, "threads_per_rank": threads, "OMP_NUM_THREADS": str(threads),
        "communicator": hp.get("communicator"), "exit_status": done.returncode,
        "wall_s": round(wall, 3), "hyperparameters": hp,
    }
    if done.returncode != 0:
        failure = job_dir / "output" / "failure"
        reason = failure.read_text()[:2000] if failure.exists() else done.stderr[-2000:]
        figures["error"] = reason.strip()
        return figures
    data = job_dir / "output" / "data"
    log = json.loads((data / "log").read_text())
    metrics = json.loads((data / "metrics.json").read_text())
    figures.update(epoch_figures(log, metrics["train_images"]))
    figures.update({
        "train_images": metrics["train_images"], "test_images": metrics["test_images"],
        "iterations": metrics["iteration"], "trainer_seconds": metrics["elapsed_seconds"],
        # process start, data loading and scattering, model build, saving, packing
        "outside_epochs_s": round(wall - log[-1]["elapsed_time"], 3),
        "test_accuracy": metrics["test_accuracy"],
    })
    return figures


def scaling(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Speedup and efficiency of each multi-rank run against the 1-rank runs."""
    ok = [r for r in runs if "images_per_s" in r]
    single = {r["threads_per_rank"]: r["images_per_s"] for r in ok if r["ranks"] == 1}
    out = {}
    for r in ok:
        if r["ranks"] == 1:
            continue
        entry: dict[str, Any] = {"images_per_s": r["images_per_s"]}
        all_cores = single[max(single)] if single else None
        if all_cores:
            entry["speedup_vs_1_rank_all_threads"] = round(r["images_per_s"] / all_cores, 3)
        same = single.get(r["threads_per_rank"])
        if same:
            entry["efficiency"] = round(r["images_per_s"] / (r["ranks"] * same), 3)
        out[str(r["ranks"])] = entry
    return out


# --- the bare step: train_throughput.py ------------------------------------------------------

def trainer_kernels(device: str) -> str:
    """What the trainer's ``kernels=auto`` runs on ``device`` (the bare step runs the same)."""
    from smchainer.default_plugins.vgg.hyperparameters import resolve_kernels

    return resolve_kernels("auto", on_gpu=device == "gpu")


def bare_step(args: argparse.Namespace, threads: int, work: Path) -> dict[str, Any]:
    """images/s of forward+backward+update alone: same network, kernels, batch and threads."""
    out = work / "bare.json"
    framework = "smchainer-fused" if trainer_kernels(args.device) == "fused" else "chainer"
    command = [sys.executable, str(HERE / "train_throughput.py"), "--device", args.device,
               "--frameworks", framework, "--depth", str(args.depth), "--width",
               str(args.width), "--batch-sizes", str(args.batch_size), "--warmup", "2",
               "--iters", str(args.iters), "--out", str(out)]
    print("  bare training step ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=thread_env(threads, args.device), capture_output=True,
                          text=True, timeout=args.run_timeout)
    if done.returncode != 0 or not out.exists():
        return {"error": done.stderr.strip()[-2000:]}
    [result] = json.loads(out.read_text())["frameworks"][0]["results"]
    return {"threads": threads, "batch_size": args.batch_size, "framework": framework, **result}


# --- the communicator's cost on one rank -----------------------------------------------------

def measure_communicator(device: str, communicator: str, depth: int, width: float,
                         batch_size: int, iters: int, rounds: int) -> dict[str, Any]:
    """Steps/s with a plain and with a multi-node optimizer; run by ``mpirun -n 1``."""
    import chainer
    import chainer.links as L
    import chainermn

    from smchainer.device import get_device
    from smchainer.models.vgg import VGG

    target = get_device("gpu:0" if device == "gpu" else "cpu")
    xp = target.xp
    sync = (lambda: None) if xp is np else xp.cuda.Device().synchronize
    rng = np.random.default_rng(0)
    batches = [(target.send(rng.random((batch_size, 3, 32, 32), dtype=np.float32)),
                target.send(rng.integers(0, 10, batch_size).astype(np.int32)))
               for _ in range(4)]
    comm = chainermn.create_communicator(communicator)
    steps = {}
    for variant in ("none", communicator):
        np.random.seed(0)
        model = L.Classifier(VGG(width=width, depth=depth))
        model.to_device(target)
        optimizer = chainer.optimizers.MomentumSGD(lr=0.05, momentum=0.9)
        if variant != "none":
            comm.bcast_data(model)
            optimizer = chainermn.create_multi_node_optimizer(optimizer, comm)
        optimizer.setup(model)
        optimizer.add_hook(chainer.optimizer_hooks.WeightDecay(5e-4))

        def step(i: int, model=model, optimizer=optimizer) -> None:
            x, t = batches[i % len(batches)]
            loss = model(x, t)
            model.cleargrads()
            loss.backward()
            optimizer.update()

        for i in range(2):
            step(i)
        steps[variant] = step
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):  # interleaved, so background load falls on both alike
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for i in range(iters):
                step(i)
            sync()
            seconds[name].append((time.perf_counter() - start) / iters)
    per_step = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "communicator": communicator, "size": comm.size, "batch_size": batch_size,
        "steps_per_round": iters, "rounds": rounds,
        "images_per_s": {name: round(batch_size / s, 2) for name, s in per_step.items()},
        "ms_per_step": {name: round(1000 * s, 3) for name, s in per_step.items()},
        "overhead": round(1 - per_step["none"] / per_step[communicator], 4),
    }


def communicator_overhead(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """:func:`measure_communicator` in one rank under a real ``mpirun -n 1``."""
    from smchainer.training.launch import mpirun_path

    command = [str(mpirun_path()), "-n", "1", sys.executable, __file__, "--communicator-step",
               args.device, args.communicator, str(args.depth), str(args.width),
               str(args.batch_size), str(args.iters), str(args.rounds)]
    print(f"  one rank, {args.communicator} communicator vs none ...", file=sys.stderr,
          flush=True)
    done = subprocess.run(command, env=thread_env(threads, args.device), capture_output=True,
                          text=True, timeout=args.run_timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"communicator": args.communicator,
                "error": (done.stderr or done.stdout).strip()[-2000:]}
    return {"threads": threads, **json.loads(lines[-1])}


# --- the command -----------------------------------------------------------------------------

def gpu_stack() -> dict[str, Any]:
    """Versions and the GPU name as Chainer and CuPy see them."""
    from smchainer.compat.cupy import describe_gpu_stack

    return describe_gpu_stack()


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The bare steps, the training runs, the communicator's cost; the whole record."""
    record = benchlib.context("mpi_scaling", args.quick)
    cores = benchlib.cpus_available()
    record["device"] = args.device
    ranks = sorted(set(args.ranks))
    if args.device == "gpu":
        stack = gpu_stack()
        record["gpu"] = stack
        if not stack.get("cuda_available") or not stack.get("gpu_count"):
            raise SmchainerError(f"--device gpu, but no usable GPU: {stack.get('error')}")
        dropped = [n for n in ranks if n > stack["gpu_count"]]
        ranks = [n for n in ranks if n <= stack["gpu_count"]]
        if dropped:
            record["ranks_dropped"] = {"ranks": dropped,
                                       "reason": f"{stack['gpu_count']} GPU(s): one rank per GPU"}
    record["model"] = {"architecture": "smchainer.models.VGG", "depth": args.depth,
                       "width": args.width}
    record["settings"] = {
        "batch_size_per_rank": args.batch_size, "epochs": args.epochs,
        "train_samples": args.train_samples or "all", "test_samples": args.test_samples or "all",
        "communicator": args.communicator, "cpus": cores, "ranks": ranks,
        "threads_rule": "OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = cpus // ranks",
    }
    plan = [(n, max(1, cores // n)) for n in ranks]
    if args.device == "cpu":
        for n, threads in list(plan):
            if n > 1 and (1, threads) not in plan:
                plan.insert(1, (1, threads))  # efficiency needs 1 rank at the same threads
    with tempfile.TemporaryDirectory(prefix="smchainer-mpi-bench-") as tmp:
        work = Path(tmp)
        single_threads = sorted({threads for n, threads in plan if n == 1}, reverse=True)
        record["bare_step"] = {str(t): bare_step(args, t, work) for t in single_threads}
        record["runs"] = [train_run(n, threads, args, work) for n, threads in plan]
        record["communicator_overhead"] = communicator_overhead(
            args, single_threads[0] if single_threads else cores)
    record["scaling"] = scaling(record["runs"])
    record["pipeline_efficiency"] = {}
    for job in record["runs"]:
        bare = record["bare_step"].get(str(job["threads_per_rank"]), {}).get("images_per_s")
        if job["ranks"] == 1 and bare and "images_per_s" in job:
            record["pipeline_efficiency"][str(job["threads_per_rank"])] = round(
                job["images_per_s"] / bare, 3)
    return benchlib.finish(record)


def build_parser() -> ArgumentParser:
    """The command line (``--help`` lists it)."""
    parser = ArgumentParser(prog="mpi_scaling", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a width-0.125 VGG-8 on 256 images (explicit options win)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--communicator", default=None,
                        help="ChainerMN communicator (default: naive on CPU, pure_nccl on GPU)")
    parser.add_argument("--depth", type=int, choices=(8, 11, 13, 16, 19), default=None)
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="per rank")
    parser.add_argument("--epochs", type=int, default=None,
                        help="at least 2: the first epoch is warm-up")
    parser.add_argument("--train-samples", type=int, default=None, help="0: all 50,000")
    parser.add_argument("--test-samples", type=int, default=None, help="0: all 10,000")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps of the bare step and of each communicator round")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the communicator measurement (default 3)")
    parser.add_argument("--run-timeout", type=float, default=900.0,
                        help="seconds before one training run is stopped")
    parser.add_argument("--cifar10", type=Path, default=benchlib.cifar10_folder(),
                        help="folder with train.zip and test.zip "
                        "(default $SMCHAINER_SHARED/data/cifar10)")
    parser.add_argument("--output-dir", type=Path, default=benchlib.RESULTS,
                        help="where the JSON record goes (default benchmarks/results)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, fill in the device's (and ``--quick``'s) sizes, check the data."""
    args = build_parser().parse_args(argv)
    for name, value in SIZES[(args.device, args.quick)].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.communicator is None:
        args.communicator = "pure_nccl" if args.device == "gpu" else "naive"
    if args.epochs < 1 or args.batch_size < 1 or args.iters < 1 or args.rounds < 1:
        raise SmchainerError("--epochs, --batch-size, --iters and --rounds must be positive")
    if not args.ranks or min(args.ranks) < 1:
        raise SmchainerError("--ranks must be positive")
    for name in ("train.zip", "test.zip"):
        if not (args.cifar10 / name).is_file():
            raise SmchainerError(f"{args.cifar10 / name} not found (set SMCHAINER_SHARED or "
                                 "--cifar10)")
    return args


def summary_lines(record: dict[str, Any]) -> list[str]:
    """The record's key figures, one line each, for the terminal."""
    lines = []
    for r in record["runs"]:
        if "error" in r:
            lines.append(f"{r['ranks']} rank(s) x {r['threads_per_rank']} thread(s): "
                         f"failed: {r['error'].splitlines()[0] if r['error'] else '?'}")
        else:
            lines.append(f"{r['ranks']} rank(s) x {r['threads_per_rank']} thread(s): "
                         f"{r['images_per_s']:.1f} images/s end to end (epochs "
                         f"{r['epoch_seconds']} s)")
    for n, figures in record["scaling"].items():
        lines.append(f"{n} ranks: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    for threads, bare in record["bare_step"].items():
        if "images_per_s" in bare:
            lines.append(f"bare step, {threads} thread(s): {bare['images_per_s']:.1f} images/s;"
                         f" epoch / bare {record['pipeline_efficiency'].get(threads)}")
        else:
            lines.append(f"bare step, {threads} thread(s) failed: {bare.get('error')}")
    comm = record["communicator_overhead"]
    if "overhead" in comm:
        lines.append(f"communicator {comm['communicator']} on 1 rank: {comm['images_per_s']}"
                     f" images/s, overhead {100 * comm['overhead']:.1f} %")
    else:
        lines.append(f"communicator: {comm.get('error', '?')[-300:]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its record; 1 when a training run failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--communicator-step"]:  # the rank under mpirun -n 1
        device, communicator, depth, width, batch, iters, rounds = argv[1:8]
        print(json.dumps(measure_communicator(device, communicator, int(depth), float(width),
                                              int(batch), int(iters), int(rounds))))
        return 0

    def body() -> int:
        args = parse_args(argv)
        record = benchmark(args)
        path = benchlib.write_record(record, args.output_dir, "mpi_scaling")
        print("\n".join(summary_lines(record)))
        print(f"record: {path}")
        failed = [r for r in record["runs"] if "error" in r]
        if failed or any("error" in bare for bare in record["bare_step"].values()):
            raise SmchainerError(f"{len(failed)} training run(s) or the bare step failed: "
                                 f"see {path}")
        return 0

    return run(body, lambda: "--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
