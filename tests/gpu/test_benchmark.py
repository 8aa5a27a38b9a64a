"""benchmarks/train_throughput.py runs and writes a usable record (tiny VGG, on the CPU).

The GPU run (``--device gpu``) is benchmarks/device/run.sh's job; this checks
the script itself: both frameworks build the same network (same parameter
count), every batch size gets a figure, the ratio and the profile are there.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def run_benchmark(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "record.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--depth", "8", "--width", "0.125",
         "--batch-sizes", "4", "8", "--warmup", "1", "--iters", "2", "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    return proc, (json.loads(out.read_text()) if out.exists() else {})


@pytest.mark.slow
def test_chainer_and_torch_on_cpu(tmp_path):
    pytest.importorskip("torch", reason="the bench extra (torch) is not installed")
    proc, record = run_benchmark(tmp_path, "--profile", "--profile-steps", "1")
    assert proc.returncode == 0, proc.stderr
    frameworks = {f["framework"]: f for f in record["frameworks"]}
    assert set(frameworks) == {"chainer", "smchainer-fused", "torch"}
    # the same network on every side
    parameters = {f["meta"]["parameters"] for f in frameworks.values()}
    assert len(parameters) == 1
    for framework in frameworks.values():
        assert [r["batch_size"] for r in framework["results"]] == [4, 8]
        for result in framework["results"]:
            assert result["images_per_s"] > 0 and 0 < result["last_loss"] < 10
    assert set(record["ratio_images_per_s"]["chainer/torch"]) == {"4", "8"}
    assert set(record["ratio_images_per_s"]["smchainer-fused/torch"]) == {"4", "8"}
    profile = frameworks["chainer"]["profile"]
    assert set(profile["phase_ms_per_step"]) == {"forward", "backward", "update"}
    assert "forward Convolution2DFunction" in profile["function_ms_per_step"]
    fused = frameworks["smchainer-fused"]["profile"]["function_ms_per_step"]
    assert {"forward Conv3x3", "backward BatchNormReLU", "forward MaxPool2x2"} <= set(fused)
    assert not any("Convolution2DFunction" in name for name in fused)
    assert record["tf32"] is False and record["device"] == "cpu"


def test_asking_for_a_missing_gpu_is_an_error(tmp_path):
    from smchainer.device import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("a GPU is usable here")
    proc, record = run_benchmark(tmp_path, "--frameworks", "chainer", "--device", "gpu")
    assert proc.returncode == 1
    assert "was asked for but" in record["frameworks"][0]["error"]
