"""Gather what benchmarks/device/run.sh left in its output folder into one summary.json.

Usage: ``python summarize.py OUT STAGES`` where STAGES holds one line per
stage, ``name exit_code seconds``. Reads env.json, cudnn.json, pytest-gpu.xml,
bench-tf32.json, bench-fp32.json, bench-amp-*.json, kernels.json,
example.json and train.json when they are there; a missing or broken file is
reported in the summary, never an exception.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any


def read_stages(path: Path) -> dict[str, dict[str, Any]]:
    """``{stage: {"exit": code, "seconds": s}}`` from run.sh's stage lines."""
    stages: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return stages
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            name, code, seconds = parts
            stages[name] = {"exit": int(code) if code.lstrip("-").isdigit() else code,
                            "seconds": int(seconds)}
    return stages


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"}


def read_junit(path: Path) -> dict[str, Any] | None:
    """Counts and the failed tests' names from a pytest JUnit XML file."""
    if not path.exists():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        return {"unreadable": str(exc)}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {"unreadable": "no testsuite"}
    failed, skipped = [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(name)
    total = int(suite.get("tests", 0))
    return {"tests": total, "failed": failed, "skipped": skipped,
            "passed": total - len(failed) - len(skipped)}


def bench_summary(record: Any) -> Any:
    """images/s per framework and batch size, the ratios and the top of the profile."""
    if not isinstance(record, dict) or "frameworks" not in record:
        return record
    out: dict[str, Any] = {"tf32": record.get("tf32"), "amp": record.get("amp", "off"),
                           "ratio": record.get("ratio_images_per_s")}
    precisions = {f["framework"]: f["precision"] for f in record["frameworks"]
                  if "precision" in f}
    if precisions:
        out["precision"] = precisions
    for framework in record["frameworks"]:
        name = framework["framework"]
        if "unsupported" in framework:
            out[name] = {"unsupported": framework["unsupported"]}
            continue
        if "error" in framework:
            out[name] = {"error": framework["error"]}
            continue
        out[name] = {str(r["batch_size"]): r.get("images_per_s", r.get("error"))
                     for r in framework["results"]}
        profile = framework.get("profile")
        if profile and "function_ms_per_step" in profile:
            top = list(profile["function_ms_per_step"].items())[:8]
            out[f"{name}_profile"] = {
                "batch_size": profile.get("batch_size"),
                "phase_ms_per_step": profile.get("phase_ms_per_step"),
                "top_functions_ms": {k: v["ms_per_step"] for k, v in top},
            }
    return out


def images_per_s(record: Any) -> dict[str, dict[str, float]]:
    """``{framework: {batch: images/s}}`` of one train_throughput record (figures only)."""
    if not isinstance(record, dict):
        return {}
    return {f["framework"]: {str(r["batch_size"]): r["images_per_s"]
                             for r in f.get("results", []) if "images_per_s" in r}
            for f in record.get("frameworks", []) if isinstance(f, dict)}


def amp_summary(out: Path) -> dict[str, Any]:
    """Each bench-amp-MODE.json, with its speed-up over bench-tf32.json at the same batch."""
    base = images_per_s(read_json(out / "bench-tf32.json"))
    summary: dict[str, Any] = {}
    for path in sorted(out.glob("bench-amp-*.json")):
        mode = path.stem[len("bench-amp-"):]
        record = read_json(path)
        summary[mode] = bench_summary(record)
        speedup = {}
        for name, figures in images_per_s(record).items():
            pairs = {bs: round(ips / base[name][bs], 3) for bs, ips in figures.items()
                     if base.get(name, {}).get(bs)}
            if pairs:
                speedup[name] = pairs
        if isinstance(summary[mode], dict):
            summary[mode]["speedup_over_tf32"] = speedup
    return summary


def example_summary(record: Any) -> Any:
    """The example's epoch times beside PyTorch eager's for the same epochs."""
    if not isinstance(record, dict) or "benchmark" not in record:
        return record
    example = record.get("example") or {}
    torch = record.get("torch") or {}
    data = record.get("data") or {}
    out: dict[str, Any] = {
        "stand_in": record.get("stand_in"), "error": record.get("error"),
        "train_images": data.get("train_images"), "test_images": data.get("test_images"),
        "prepare_seconds": data.get("prepare_seconds"),
        "hyperparameters": example.get("hyperparameters"),
        "example": {k: example.get(k) for k in (
            "exit_code", "timed_out", "device", "wall_seconds", "epoch_seconds",
            "steady_epoch_seconds", "images_per_s", "validation_accuracy_by_epoch", "error")},
        "torch": {k: torch.get(k) for k in (
            "method", "device", "batch_size", "epoch_seconds", "steady_epoch_seconds",
            "images_per_s", "test_accuracy_by_epoch", "timed_out", "error")},
        "ratio_epoch_seconds_example_over_torch":
            record.get("ratio_epoch_seconds_example_over_torch"),
    }
    if example.get("exit_code") not in (0, None) or example.get("timed_out"):
        out["example"]["output_tail"] = (example.get("output_tail") or "")[-800:]
    return out


def cudnn_summary(record: Any) -> Any:
    """The cuDNN probe: which library, whether Chainer enabled it, agreement and speed-ups."""
    if not isinstance(record, dict) or "probe" not in record:
        return record
    binding = record.get("binding") or {}
    out: dict[str, Any] = {
        "ok": record.get("ok"), "describe": record.get("describe"),
        "library": binding.get("library"), "version": binding.get("version"),
        "cudnn_enabled": record.get("cudnn_enabled"), "error": record.get("error"),
    }
    for check in record.get("checks", []):
        out[check["name"]] = {k: check.get(k) for k in (
            "ok", "relative_error", "ms_always", "ms_never", "speedup") if k in check}
    return out


def train_summary(record: Any) -> Any:
    if not isinstance(record, dict):
        return record
    summary = {k: v for k, v in record.items() if k not in ("log", "failure", "model")}
    log = record.get("log")
    if isinstance(log, list) and log:
        summary["last_log_entry"] = log[-1]
        summary["validation_accuracy_by_epoch"] = [
            round(entry["validation/main/accuracy"], 4) for entry in log
            if "validation/main/accuracy" in entry
        ]
    model = record.get("model")
    if isinstance(model, dict):
        summary["hyperparameters"] = model.get("hyperparameters")
    if "failure" in record:
        summary["failure_head"] = record["failure"][:600]
    return summary


def summarize(out: Path, stages_file: Path) -> dict[str, Any]:
    """The summary of one run.sh run."""
    env = read_json(out / "env.json")
    keep = ("gpu_name", "cupy", "cuda_runtime", "cuda_driver", "nvrtc", "cudnn_enabled",
            "cudnn_version", "cudnn", "chainer", "numpy", "python", "torch", "torch_cudnn",
            "get_device_gpu0")
    return {
        "stages": read_stages(stages_file),
        "env": {k: env.get(k) for k in keep} if isinstance(env, dict) else env,
        "cudnn": cudnn_summary(read_json(out / "cudnn.json")),
        "tests": read_junit(out / "pytest-gpu.xml"),
        "bench_tf32": bench_summary(read_json(out / "bench-tf32.json")),
        "bench_fp32": bench_summary(read_json(out / "bench-fp32.json")),
        "bench_amp": amp_summary(out),
        "kernels": kernels_summary(read_json(out / "kernels.json")),
        "example": example_summary(read_json(out / "example.json")),
        "train": train_summary(read_json(out / "train.json")),
    }


def kernels_summary(record: Any) -> Any:
    """GPU milliseconds of a fused step by kind of kernel, and in all."""
    if not isinstance(record, dict) or "total_ms" not in record:
        return record
    return {k: record.get(k) for k in ("batch_size", "total_ms", "total_ms_by_kind")}


def main(argv: list[str]) -> int:
    """Write OUT/summary.json and print it."""
    if len(argv) != 2:
        print("usage: summarize.py OUT STAGES", file=sys.stderr)
        return 2
    out = Path(argv[0])
    summary = summarize(out, Path(argv[1]))
    text = json.dumps(summary, indent=2, default=str)
    (out / "summary.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
