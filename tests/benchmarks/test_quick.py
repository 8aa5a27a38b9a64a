"""The benchmark scripts still run: the ``--quick`` suite, without PyTorch, and the report.

Figures are never asserted against thresholds (this machine is shared); what
is checked is that every record has every figure, positive, under the right
keys, that nothing lands in ``benchmarks/results``, and that the report reads
the committed records (GPU device run included) as well as the new ones.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
BODIES = {"npy-1", "npy-10", "npy-64", "json-10"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def torch_importable() -> bool:
    done = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    return done.returncode == 0


def bench_env(cifar10: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, SMCHAINER_SHARED=str(cifar10.parent.parent), **extra)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(name, None)
    return env


def only_record(folder: Path, kind: str) -> dict:
    paths = sorted(folder.glob(f"{kind}-*.json"))
    assert len(paths) == 1, f"expected one {kind} record, found {paths}"
    return json.loads(paths[0].read_text())


def assert_context(record: dict) -> None:
    """What every record carries: when, where, with what, from which commit."""
    assert record["quick"] is True and record["timestamp"]
    machine = record["machine"]
    assert machine["cpu_model"] and machine["cpus_available"] >= 1
    assert len(machine["load_average_before"]) == 3 and len(machine["load_average_after"]) == 3
    assert record["versions"]["chainer"] == "7.8.1" and record["versions"]["numpy"]
    assert len(record["git"]["commit"]) == 40


def results_listing() -> set[Path]:
    return set(RESULTS.rglob("*"))


@pytest.mark.slow
@pytest.mark.mpi
def test_quick_suite_writes_every_record_and_the_report(tmp_path, cifar10):
    before = results_listing()
    readme = tmp_path / "README.md"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--output-dir", str(tmp_path),
         "--readme", str(readme)],
        env=bench_env(cifar10), capture_output=True, text=True, timeout=400, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert results_listing() == before, "a quick run wrote into benchmarks/results"
    with_torch = torch_importable()

    train = only_record(tmp_path, "train_throughput")
    assert_context(train)
    frameworks = {f["framework"]: f for f in train["frameworks"]}
    for result in frameworks["chainer"]["results"]:
        assert result["images_per_s"] > 0 and result["ms_per_step"] > 0
    assert [r["batch_size"] for r in frameworks["chainer"]["results"]] == [8, 16]
    if with_torch:
        assert set(train["ratio_images_per_s"]["chainer/torch"]) == {"8", "16"}
        assert all(v > 0 for v in train["ratio_images_per_s"]["chainer/torch"].values())
    else:
        assert "not installed" in frameworks["torch"]["skipped"]

    inference = only_record(tmp_path, "inference_throughput")
    assert_context(inference)
    for name in ("chainer", "smchainer-fused", "onnxruntime"):
        figures = inference["results"][name]
        assert figures["batch1_latency_ms"] > 0 and figures["batch64_images_per_s"] > 0
    assert (inference["results"]["torch"] is not None) == with_torch

    serving = only_record(tmp_path, "serving_load")
    assert_context(serving)
    [variant] = serving["variants"]
    assert variant["variant"] == "onnx" and variant["in_process"]["runs_onnxruntime"] is True
    cells = {(c["body"], c["concurrency"]): c for c in variant["cells"]}
    assert set(cells) == {(b, c) for b in BODIES for c in (1, 4, 16)}
    for cell in cells.values():
        assert cell["errors"] == 0 and cell["warmup_errors"] == 0, cell["first_errors"]
        assert cell["ok"] == cell["requests"] >= 1
        assert cell["requests_per_s"] > 0
        assert cell["images_per_s"] == pytest.approx(cell["requests_per_s"] * cell["batch"],
                                                     rel=1e-3)
        assert 0 < cell["p50_ms"] <= cell["p95_ms"] <= cell["p99_ms"] <= cell["max_ms"]
    # a fixed request count bounds every cell: the quick budget is 32 requests
    assert all(cell["requests"] <= 32 for cell in cells.values())
    assert set(variant["overhead"]) == set(variant["interleaved"]) == BODIES
    for body, figures in variant["overhead"].items():
        mixed = variant["interleaved"][body]
        # two rounds (--quick) of bare calls and as many served requests, every answer good
        assert mixed["errors"] == 0, mixed["first_errors"]
        assert mixed["rounds"] == 2 and len(mixed["overhead_ms_rounds"]) == 2
        assert 1 <= mixed["calls_per_round"] <= 25
        assert figures["method"] == "interleaved"
        assert figures["predict_ms"] == mixed["predict_ms"] > 0
        assert figures["served_p50_ms"] == mixed["served_p50_ms"] > 0
        assert figures["cell_p50_ms"] == cells[(body, 1)]["p50_ms"]
        assert figures["overhead_ms"] == pytest.approx(
            figures["served_p50_ms"] - figures["predict_ms"], abs=1e-3)
        assert mixed["in_server_inference_ms"] > 0
    assert variant["server_exit_status"] == 0

    mpi = only_record(tmp_path, "mpi_scaling")
    assert_context(mpi)
    cpus = mpi["machine"]["cpus_available"]
    runs = {(r["ranks"], r["threads_per_rank"]): r for r in mpi["runs"]}
    assert (1, cpus) in runs and (2, max(1, cpus // 2)) in runs
    for (ranks, threads), run in runs.items():
        assert run["exit_status"] == 0, run.get("error")
        assert run["OMP_NUM_THREADS"] == str(threads)
        if ranks > 1:  # the rule: the cores shared out among the ranks
            assert threads == max(1, cpus // ranks)
        assert run["images_per_s"] > 0 and len(run["epoch_seconds"]) == 2
        assert run["train_images"] == 256
    assert runs[(2, max(1, cpus // 2))]["communicator"] == "naive"
    assert mpi["scaling"]["2"]["efficiency"] > 0
    assert mpi["scaling"]["2"]["speedup_vs_1_rank_all_threads"] > 0
    for bare in mpi["bare_step"].values():
        assert bare["images_per_s"] > 0
    assert set(mpi["pipeline_efficiency"]) == set(mpi["bare_step"])
    comm = mpi["communicator_overhead"]
    assert comm["size"] == 1 and set(comm["images_per_s"]) == {"none", "naive"}
    assert all(v > 0 for v in comm["images_per_s"].values())

    text = readme.read_text()
    assert text.count("<!-- report:start") == 1 and text.count("<!-- report:end -->") == 1
    assert "4 records" in text
    for heading in ("Training throughput", "End-to-end training epoch", "MPI scaling",
                    "Inference", "Serving under load"):
        assert f"### {heading}" in text
    assert "_no records yet_" not in text
    plots = sorted((tmp_path / "plots").glob("*.png"))
    assert {p.name for p in plots} == {"train_throughput.png", "inference.png",
                                       "mpi_scaling.png", "serving_load.png"}
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size < 100_000
        assert f"(plots/{plot.name})" in text


def test_without_torch_the_pytorch_parts_are_skipped(tmp_path):
    hidden = tmp_path / "hide"
    (hidden / "torch").mkdir(parents=True)
    (hidden / "torch" / "__init__.py").write_text(
        'raise ImportError("No module named torch (hidden by the test)")\n')
    env = dict(os.environ, PYTHONPATH=str(hidden))
    small = ["--depth", "8", "--width", "0.125"]
    out = tmp_path / "train.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "train_throughput.py"), "--device", "cpu", "--quick",
         *small, "--batch-sizes", "4", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    frameworks = {f["framework"]: f for f in record["frameworks"]}
    assert frameworks["chainer"]["results"][0]["images_per_s"] > 0
    assert frameworks["torch"]["results"] == []
    assert "not installed" in frameworks["torch"]["skipped"]
    # only the ratio that needs no PyTorch: fused kernels against Chainer's functions
    assert set(record["ratio_images_per_s"]) == {"smchainer-fused/chainer"}
    assert "error" in record["torch_stack"]
    done = subprocess.run(
        [sys.executable, str(BENCH / "inference_throughput.py"), "--quick", *small,
         "--output-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "(not installed)" in done.stdout
    inference = only_record(tmp_path, "inference_throughput")
    assert inference["results"]["torch"] is None
    assert inference["ratio_onnxruntime_over_torch_batch64"] is None
    assert inference["results"]["onnxruntime"]["batch64_images_per_s"] > 0


def test_the_report_reads_the_committed_records(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("plots"))
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nHand-written text.\n")
    command = [sys.executable, str(BENCH / "report.py"), "--results-dir", str(results),
               "--readme", str(readme)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "0 unrecognised, 0 unreadable" in done.stdout
    first = readme.read_text()
    assert first.startswith("# Benchmarks\n\nHand-written text.\n")

    # the GPU device run: its benchmark rows, ratio and the end-to-end epoch
    device_runs = [p.parent for p in results.rglob("summary.json")]
    assert device_runs, "the committed GPU device run is missing"
    for folder in device_runs:
        gpu = json.loads((folder / "env.json").read_text())["gpu_name"]
        bench = json.loads((folder / "bench-tf32.json").read_text())
        chainer = next(f for f in bench["frameworks"] if f["framework"] == "chainer")
        for result in chainer["results"]:
            ratio = bench["ratio_images_per_s"]["chainer/torch"][str(result["batch_size"])]
            row = (f"| {gpu} | gpu | TF32 | VGG-16 x1.0 | {result['batch_size']} | "
                   f"{result['images_per_s']:,.1f} |")
            line = next((line for line in first.splitlines() if row in line), None)
            assert line is not None, row
            assert f"| {ratio:.3f} |" in line
        # the end-to-end epoch, against the bare step at the trainer's batch size (128)
        train = json.loads((folder / "train.json").read_text())
        images = train["metrics"]["train_images"]
        [bare] = [r["images_per_s"] for r in chainer["results"] if r["batch_size"] == 128]
        [line] = [line for line in first.splitlines() if f"{folder.name}/train.json" in line]
        assert f"| {gpu} | gpu |" in line and f"| {images} |" in line
        assert f"| {bare:,.1f} |" in line
    for path in results.glob("inference_throughput-*.json"):
        record = json.loads(path.read_text())
        if not record["quick"]:
            ms = record["results"]["onnxruntime"]["batch1_latency_ms"]
            assert any(path.name in line and f"{ms:,.1f}" in line for line in first.splitlines())

    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    second = readme.read_text()
    assert second.count("<!-- report:start") == 1 and second.count("<!-- report:end -->") == 1
    assert second.startswith("# Benchmarks\n\nHand-written text.\n")


@pytest.mark.parametrize("script, args, status, message", [
    ("serving_load.py", ["--depth", "7"], 2, "Error: argument --depth"),
    ("serving_load.py", ["--overhead-rounds", "-1", "--quick"], 1,
     "Error: --overhead-rounds must not be negative"),
    ("serving_load.py", ["--test-zip", "/nonexistent/test.zip", "--quick"], 1,
     "Error: CIFAR-10 test images not found"),
    ("mpi_scaling.py", ["--cifar10", "/nonexistent"], 1, "Error: /nonexistent/train.zip not found"),
    ("mpi_scaling.py", ["--ranks", "0"], 1, "Error: --ranks must be positive"),
])
def test_bad_input_is_one_error_line(tmp_path, script, args, status, message):
    done = subprocess.run([sys.executable, str(BENCH / script), *args,
                           "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_asking_for_a_missing_gpu_is_an_error(tmp_path, cifar10):
    from smchainer.device import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("a GPU is usable here: --device gpu would run the GPU benchmark")
    done = subprocess.run([sys.executable, str(BENCH / "mpi_scaling.py"), "--device", "gpu",
                           "--output-dir", str(tmp_path)],
                          env=bench_env(cifar10), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: --device gpu, but no usable GPU"), done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_fault_benchmark_records_both_servers(tmp_path):
    """serving_faults.py --quick: a kill and a SIGTERM per server, every figure recorded."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "serving_faults.py"), "--quick", "--seconds", "6",
         "--idle", "20", "--slow-heads", "8", "--slow-bodies", "2",
         "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = only_record(tmp_path, "serving_faults")
    assert_context(record)
    runs = {run["name"]: run for run in record["runs"]}
    assert set(runs) == {"smchainer", "gthread"}
    for run in runs.values():
        assert run["sigkill_at_s"] < run["sigterm_at_s"] < run["sigterm_at_s"] + \
            run["exited_after_sigterm_s"]
        steady = run["phases"]["steady"]
        assert steady["requests"] > 0 and steady["ping_probes"] > 0
        assert 0 <= run["ping_over_1s_share"] <= 1
    assert set(record["ratios"]) == {"ping_over_1s_share_smchainer_vs_gthread",
                                     "responses_503_smchainer_vs_gthread"}
