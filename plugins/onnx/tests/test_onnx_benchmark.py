"""The inference benchmark still runs (a smoke run on a small VGG)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "inference_throughput.py"


@pytest.mark.slow
def test_quick_run_writes_a_record(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--depth", "8", "--width", "0.125",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "onnxruntime" in result.stdout and "batch 64 img/s" in result.stdout
    [path] = tmp_path.glob("inference_throughput-*.json")
    record = json.loads(path.read_text())
    assert record["model"]["depth"] == 8 and record["quick"] is True
    assert record["versions"]["onnxruntime"] and record["machine"]["cpu_model"]
    for name in ("chainer", "onnxruntime"):
        figures = record["results"][name]
        assert figures["batch1_latency_ms"] > 0 and figures["batch64_images_per_s"] > 0
        assert record["max_abs_difference_vs_chainer"][name] < 1e-3
    torch_installed = importlib.util.find_spec("torch") is not None
    assert (record["results"]["torch"] is not None) == torch_installed
    ratio = record["ratio_onnxruntime_over_torch_batch64"]
    assert (ratio is not None and ratio > 0) if torch_installed else ratio is None


def test_a_bad_argument_is_a_usage_error(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--depth", "seven", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("Error: argument --depth")
    assert list(tmp_path.iterdir()) == []
