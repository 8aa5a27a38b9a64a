"""What ``smchainer-compat.pth`` costs at interpreter start.

The ``.pth`` file imports ``_smchainer_startup`` in every interpreter of the
environment, so that ``import chainer`` works without importing smchainer
first. This measures a bare interpreter (``python -c pass``) with the hook
and with ``SMCHAINER_NO_COMPAT_HOOK=1``, turns interleaved, and reads the
module's own import time from ``python -X importtime``. The peer is the same
interpreter without the hook, in the same run; bytecode is cached (a warm-up
run writes it), as in a user's environment. It also times ``import
chainer`` both ways: through the hook, and after ``import smchainer``.

    .venv/bin/python benchmarks/startup.py [--runs 40] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import benchlib

HOOK_OFF = {"SMCHAINER_NO_COMPAT_HOOK": "1"}


def wall_seconds(code: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def own_import_microseconds(env: dict[str, str]) -> int | None:
    """``_smchainer_startup``'s self time in ``-X importtime`` (None: not imported)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=env,
                            capture_output=True, text=True, check=True)
    for line in result.stderr.splitlines():
        if line.rstrip().endswith("_smchainer_startup"):
            return int(line.split(":", 1)[1].split("|")[0])
    return None


def interleaved(code: str, first: dict[str, str], second: dict[str, str],
                runs: int) -> tuple[list[float], list[float]]:
    a, b = [], []
    for _ in range(runs):
        a.append(wall_seconds(code, first))
        b.append(wall_seconds(code, second))
    return a, b


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values) * 1e3, 3),
            "min_ms": round(min(values) * 1e3, 3), "max_ms": round(max(values) * 1e3, 3)}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    record = benchlib.context("startup", args.quick)
    # Bytecode is cached, as in a user's environment (pip compiles a wheel's modules at
    # install; an editable checkout caches them on first import).
    base = {k: v for k, v in os.environ.items()
            if k not in ("SMCHAINER_NO_COMPAT_HOOK", "PYTHONDONTWRITEBYTECODE")}
    off = {**base, **HOOK_OFF}
    record["bytecode_cached"] = True
    for env in (base, off):  # warm-up: caches written, files in the page cache
        wall_seconds("import smchainer, chainer", env)
    with_hook, without = interleaved("pass", base, off, args.runs)
    record["bare_interpreter"] = {
        "with_hook": summary(with_hook), "without_hook": summary(without),
        "ratio_median": round(statistics.median(with_hook) / statistics.median(without), 4),
        "difference_median_ms": round(
            (statistics.median(with_hook) - statistics.median(without)) * 1e3, 3),
    }
    record["module_self_import_us"] = [own_import_microseconds(base) for _ in range(5)]
    record["module_imported_with_hook_off"] = own_import_microseconds(off) is not None
    chainer_runs = max(3, args.runs // 5)
    through_hook: list[float] = []
    after_smchainer: list[float] = []
    for _ in range(chainer_runs):  # interleaved too
        through_hook.append(wall_seconds("import chainer", base))
        after_smchainer.append(wall_seconds("import smchainer, chainer", off))
    record["import_chainer"] = {
        "through_the_hook": summary(through_hook),
        "after_import_smchainer_hook_off": summary(after_smchainer),
    }
    record["runs"] = args.runs
    return benchlib.finish(record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=benchlib.positive(int), default=40,
                        help="interpreter starts per variant (default 40)")
    parser.add_argument("--quick", action="store_true", help="5 runs, a smoke test")
    parser.add_argument("--output-dir", default=str(benchlib.RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.runs = 5
    record = benchmark(args)
    path = benchlib.write_record(record, args.output_dir, "startup")
    bare = record["bare_interpreter"]
    print(f"python -c pass: {bare['with_hook']['median_ms']} ms with the hook, "
          f"{bare['without_hook']['median_ms']} ms without (ratio {bare['ratio_median']}, "
          f"{bare['difference_median_ms']} ms); the module's own import: "
          f"{record['module_self_import_us']} us")
    chainer = record["import_chainer"]
    print(f"import chainer: {chainer['through_the_hook']['median_ms']} ms through the hook, "
          f"{chainer['after_import_smchainer_hook_off']['median_ms']} ms after import smchainer")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
