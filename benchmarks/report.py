"""Render every benchmark record as Markdown tables in benchmarks/README.md and as PNG plots.

Reads every ``*.json`` under ``benchmarks/results/`` (recursively) and
recognises each kind:

- ``vgg_train_throughput`` (``train_throughput.py``, CPU or GPU, also inside
  a device run's folder as ``bench-tf32.json`` / ``bench-fp32.json``);
- ``inference_throughput``, ``serving_load``, ``mpi_scaling``;
- a GPU device run's folder (``benchmarks/device/run.sh``): its ``env.json``
  names the GPU and its ``train.json`` gives the end-to-end training epoch;
  ``summary.json`` repeats the others and is skipped, as are its details
  (``cudnn.json``, ``kernels.json``, ``example.json``: see ``summary.json``).

The tables replace what is between the ``report:start`` and ``report:end``
markers of the README (the rest is written by hand); the plots go to
``benchmarks/results/plots/``. Records of ``--quick`` runs are left out
unless ``--include-quick``. Anything unrecognised is counted, never fatal::

    .venv/bin/python benchmarks/report.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import benchlib

START = "<!-- report:start (written by benchmarks/report.py; edit outside the markers) -->"
END = "<!-- report:end -->"
START_PATTERN = re.compile(r"<!-- report:start.*?-->")
PLOTS = "plots"


@dataclass
class Record:
    """One result file: its kind, when and where it ran, and its JSON."""

    path: Path
    kind: str
    data: dict[str, Any]
    when: dt.datetime
    machine: str
    commit: str | None = None
    load: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def date(self) -> str:
        return self.when.strftime("%Y-%m-%d %H:%M")

    @property
    def source(self) -> str:
        return self.extra.get("source", self.path.name)


# --- reading ---------------------------------------------------------------------------------

def _when(data: dict[str, Any], path: Path) -> dt.datetime:
    stamp = data.get("timestamp")
    if isinstance(stamp, str):
        try:
            parsed = dt.datetime.fromisoformat(stamp)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
        except ValueError:
            pass
    for part in (path.stem, path.parent.name):  # gpu-h200-20261128, x-20261128T053748Z
        match = re.search(r"(\d{8})(?:T(\d{6}))?", part)
        if match:
            text = match.group(1) + (match.group(2) or "000000")
            return dt.datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=dt.timezone.utc)
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)


def _cpu_label(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "unknown CPU"
    cpus = machine.get("cpus_available") or machine.get("cpus")
    name = machine.get("cpu_model") or machine.get("machine") or "unknown CPU"
    return f"{name}, {cpus} CPUs" if cpus else name


def _load(machine: dict[str, Any] | None) -> list[float] | None:
    if not machine:
        return None
    return machine.get("load_average_before") or machine.get("load_average_after")


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


#: A device run's files that other files sum up, or that have no table of their own (their
#: figures are in the run's summary.json): the environment, the stage summary, the cuDNN
#: probe, the kernel timings and the example script's epochs.
DEVICE_DETAILS = ("env.json", "summary.json", "cudnn.json", "kernels.json", "example.json")


def classify(path: Path, data: Any, folder_env: dict[Path, dict[str, Any]]) -> Record | None:
    """The :class:`Record` for one file, or None when it is not a benchmark result."""
    if not isinstance(data, dict):
        return None
    kind = data.get("benchmark")
    when = _when(data, path)
    commit = (data.get("git") or {}).get("commit")
    if kind == "vgg_train_throughput":
        if data.get("device") == "gpu":
            stack = data.get("chainer_stack") or {}
            machine = stack.get("gpu_name") or (data.get("torch_stack") or {}).get("gpu_name") \
                or "unknown GPU"
        else:
            machine = _cpu_label(data.get("machine") or data.get("host"))
        return Record(path, kind, data, when, machine, commit, _load(data.get("machine")))
    if kind in ("inference_throughput", "serving_load", "mpi_scaling", "serving_faults",
                "startup"):
        machine = _cpu_label(data.get("machine"))
        if kind == "mpi_scaling" and data.get("device") == "gpu":
            machine = (data.get("gpu") or {}).get("gpu_name") or "unknown GPU"
        return Record(path, kind, data, when, machine, commit, _load(data.get("machine")))
    if path.name == "train.json" and "metrics" in data and "exit_code" in data:
        env = folder_env.get(path.parent, {})
        machine = env.get("gpu_name") or "unknown GPU"
        return Record(path, "device_train", data, when, machine, extra={"env": env})
    return None


def load_records(results: Path, include_quick: bool = False) -> tuple[list[Record], dict]:
    """Every recognised record under ``results``, oldest first, and what was skipped."""
    files = sorted(p for p in results.rglob("*.json") if PLOTS not in p.parts)
    folder_env = {}
    for path in files:
        if path.name == "env.json":
            data = read_json(path)
            if isinstance(data, dict):
                folder_env[path.parent] = data
    records, skipped = [], {"quick": 0, "unrecognised": [], "unreadable": []}
    for path in files:
        if path.name in DEVICE_DETAILS:
            continue
        data = read_json(path)
        if data is None:
            skipped["unreadable"].append(str(path.relative_to(results)))
            continue
        record = classify(path, data, folder_env)
        if record is None:
            skipped["unrecognised"].append(str(path.relative_to(results)))
        elif record.data.get("quick") and not include_quick:
            skipped["quick"] += 1
        else:
            record.extra["source"] = path.relative_to(results).as_posix()
            records.append(record)
    records.sort(key=lambda r: (r.when, r.source))
    return records, skipped


# --- tables ----------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: numbers with thousands separators, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    """A Markdown table, or a note that there is nothing to show."""
    rows = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    if not rows:
        return "_no records yet_\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_text(record: Record) -> str:
    """The 1-minute load average when the run started."""
    return fmt(record.load[0], 2) if record.load else "-"


def commit_text(record: Record) -> str:
    """The short commit the run measured."""
    return record.commit[:7] if record.commit else "-"


def train_rows(records: list[Record]) -> list[list[Any]]:
    """One row per training-throughput record and batch size."""
    rows = []
    for r in records:
        if r.kind != "vgg_train_throughput":
            continue
        by = {f["framework"]: f for f in r.data.get("frameworks", [])}

        def figure(name: str, batch: int, by: dict = by) -> Any:
            framework = by.get(name)
            if framework is None:
                return None
            if "skipped" in framework:
                return "not installed"
            for result in framework.get("results", []):
                if result.get("batch_size") == batch:
                    return result.get("images_per_s", "error")
            return None if "error" not in framework else "error"

        batches = sorted({res["batch_size"] for f in by.values() for res in f.get("results", [])
                          if "batch_size" in res})
        model = r.data.get("model", {})
        precision = precision_of(r.data)
        ratios = r.data.get("ratio_images_per_s", {})

        def ratio_text(name: str, batch: int, ratios: dict = ratios) -> str:
            value = (ratios.get(name) or {}).get(str(batch))
            return fmt(value, 3) if value is not None else "-"

        for batch in batches:
            rows.append([r.date, r.machine, r.data.get("device"), precision,
                         f"{model.get('name', '?')} x{model.get('width', 1)}", batch,
                         figure("chainer", batch), figure("chainer-cudnn", batch) or "-",
                         figure("smchainer-fused", batch), figure("torch", batch),
                         ratio_text("chainer/torch", batch),
                         ratio_text("chainer-cudnn/torch", batch),
                         ratio_text("smchainer-fused/torch", batch),
                         figure("torch-nocudnn", batch), load_text(r), commit_text(r),
                         r.source])
    return rows


def precision_of(data: dict[str, Any]) -> str:
    """A throughput record's precision: its own word (``--amp``: fp16, bf16), else TF32/FP32."""
    precision = data.get("precision")
    if isinstance(precision, str) and precision:
        return precision.upper()
    return "TF32" if data.get("tf32") else "FP32"


def e2e_rows(records: list[Record]) -> list[list[Any]]:
    """End-to-end epochs: mpi_scaling runs and GPU device-run trainings."""
    rows = []
    # run.sh's bench-tf32 stage ran with the training stage's settings in the same device run
    bench_by_folder = {r.path.parent: r for r in records
                       if r.kind == "vgg_train_throughput" and r.path.name == "bench-tf32.json"}
    for r in records:
        if r.kind == "mpi_scaling":
            model = r.data.get("model", {})
            for run in r.data.get("runs", []):
                if "images_per_s" not in run:
                    continue
                threads = str(run["threads_per_rank"])
                bare = r.data.get("bare_step", {}).get(threads, {}) if run["ranks"] == 1 else {}
                efficiency = r.data.get("pipeline_efficiency", {}).get(threads) \
                    if run["ranks"] == 1 else None
                rows.append([r.date, r.machine, r.data.get("device"),
                             f"VGG-{model.get('depth')} x{model.get('width')}",
                             run["hyperparameters"]["batch-size"], run["ranks"],
                             run["threads_per_rank"], run["train_images"],
                             run["images_per_s"], bare.get("images_per_s"),
                             fmt(efficiency, 3), load_text(r), commit_text(r), r.source])
        elif r.kind == "device_train":
            log = r.data.get("log") or []
            metrics = r.data.get("metrics") or {}
            images = metrics.get("train_images")
            if not log or not images:
                continue
            seconds = [b["elapsed_time"] - a["elapsed_time"] for a, b in pairwise(log)]
            if not seconds:
                continue
            ips = images / statistics.median(seconds)
            bench = bench_by_folder.get(r.path.parent)
            bare = None
            if bench is not None:
                chainer = next((f for f in bench.data.get("frameworks", [])
                                if f["framework"] == "chainer"), {})
                bare = next((x.get("images_per_s") for x in chainer.get("results", [])
                             if x.get("batch_size") == 128), None)
            rows.append([r.date, r.machine, "gpu", "VGG-16 x1.0", 128, metrics.get("ranks", 1),
                         "-", images, round(ips, 1), bare,
                         fmt(ips / bare, 3) if bare else "-", "-", "-", r.source])
    return rows


def mpi_rows(records: list[Record]) -> list[list[Any]]:
    """One row per multi-rank run of each MPI scaling record."""
    rows = []
    for r in records:
        if r.kind != "mpi_scaling":
            continue
        comm = r.data.get("communicator_overhead", {})
        overhead = comm.get("overhead")
        comm_text = (f"{comm.get('communicator')}: {100 * overhead:.1f} %"
                     if overhead is not None else f"{comm.get('communicator')}: error")
        model = r.data.get("model", {})
        scaling = r.data.get("scaling") or {}
        if not scaling:
            rows.append([r.date, r.machine, r.data.get("device"),
                         f"VGG-{model.get('depth')} x{model.get('width')}", "-", "-", "-", "-",
                         comm_text, load_text(r), commit_text(r), r.source])
        for ranks, figures in scaling.items():
            rows.append([r.date, r.machine, r.data.get("device"),
                         f"VGG-{model.get('depth')} x{model.get('width')}", ranks,
                         figures.get("images_per_s"),
                         fmt(figures.get("speedup_vs_1_rank_all_threads"), 3),
                         fmt(figures.get("efficiency"), 3), comm_text, load_text(r),
                         commit_text(r), r.source])
    return rows


def inference_rows(records: list[Record]) -> list[list[Any]]:
    """One row per inference record."""
    rows = []
    for r in records:
        if r.kind != "inference_throughput":
            continue
        results = r.data.get("results", {})

        def get(name: str, key: str, results: dict = results) -> Any:
            if name not in results:  # a record from before this framework was measured
                return "-"
            figures = results[name]
            return "not installed" if figures is None else figures.get(key)

        chainer64 = get("chainer", "batch64_images_per_s")
        torch64 = get("torch", "batch64_images_per_s")
        chainer_ratio = (fmt(chainer64 / torch64, 3) if isinstance(torch64, float)
                         and isinstance(chainer64, float) else "-")
        ratio = r.data.get("ratio_onnxruntime_over_torch_batch64")
        model = r.data.get("model", {})
        rows.append([r.date, r.machine, r.data.get("settings", {}).get("threads"),
                     f"VGG-{model.get('depth')} x{model.get('width')}",
                     get("chainer", "batch1_latency_ms"),
                     get("smchainer-fused", "batch1_latency_ms"),
                     get("onnxruntime", "batch1_latency_ms"),
                     get("torch", "batch1_latency_ms"), chainer64,
                     get("smchainer-fused", "batch64_images_per_s"),
                     get("onnxruntime", "batch64_images_per_s"), torch64, chainer_ratio,
                     fmt(ratio, 3) if ratio is not None else "-", load_text(r), commit_text(r),
                     r.source])
    return rows


def serving_rows(records: list[Record]) -> list[list[Any]]:
    """One row per serving record and variant: latencies, overheads, peak."""
    rows = []
    for r in records:
        if r.kind != "serving_load":
            continue
        model = r.data.get("model", {})
        for variant in r.data.get("variants", []):
            if "error" in variant:
                rows.append([r.date, r.machine, f"VGG-{model.get('depth')} x{model.get('width')}",
                             variant["variant"], "error", "-", "-", "-", "-", "-", "-", "-",
                             "-", load_text(r), commit_text(r), r.source])
                continue
            overhead = variant.get("overhead", {})

            def pair(body: str, overhead: dict = overhead) -> str:
                o = overhead.get(body)
                return f"{o['served_p50_ms']:.1f} / {o['overhead_ms']:.1f}" if o else "-"

            cells = variant.get("cells", [])
            peak = max(cells, key=lambda c: c.get("images_per_s") or 0, default=None)
            errors = sum(c.get("errors", 0) for c in cells)
            rows.append([r.date, r.machine, f"VGG-{model.get('depth')} x{model.get('width')}",
                         variant["variant"], r.data.get("settings", {}).get("workers"),
                         pair("npy-1"), pair("npy-10"), pair("npy-64"), pair("json-10"),
                         (f"{peak['images_per_s']:,.0f} ({peak['body']}, c={peak['concurrency']})"
                          if peak and peak.get("images_per_s") else "-"),
                         batched_gain(r, variant["variant"]), versus_torchserve(r, variant),
                         errors, load_text(r), commit_text(r), r.source])
    return rows


def batched_gain(record: Record, variant: str) -> str:
    """A batched variant's npy-1 images/s at the top concurrency over its unbatched twin's."""
    gains = (record.data.get("ratios") or {}).get("batched_over_unbatched") or {}
    for pair, figures in gains.items():
        if pair.split("/")[0] == variant and figures.get("images_per_s") is not None:
            ceiling = (figures.get("ceiling") or {}).get("over_unbatched")
            most = f", at most {ceiling:.2f}" if ceiling else ""
            return f"{figures['images_per_s']:.2f} (c={figures.get('concurrency')}{most})"
    return "-"


def versus_torchserve(record: Record, variant: dict[str, Any]) -> str:
    """A smchainer variant's images/s and p99 over TorchServe's, npy-1 at the top concurrency."""
    rows = [row for row in (record.data.get("ratios") or {}).get("smchainer_over_torchserve", [])
            if row.get("smchainer") == variant["variant"] and row.get("body") == "npy-1"]
    if not rows:
        return "-"
    top = max(rows, key=lambda row: row["concurrency"])
    return (f"{fmt(top.get('images_per_s'), 2)} / {fmt(top.get('p99_ms'), 2)} "
            f"(c={top['concurrency']})")


def serving_ratios(records: list[Record]) -> str:
    """Every smchainer / TorchServe ratio of the latest serving record that has them."""
    latest = [r for r in records if r.kind == "serving_load"
              and (r.data.get("ratios") or {}).get("smchainer_over_torchserve")]
    if not latest:
        return ""
    r = latest[-1]
    versus = r.data["ratios"]["smchainer_over_torchserve"]
    levels = sorted({row["concurrency"] for row in versus})
    grouped: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for row in versus:
        grouped.setdefault((row["smchainer"], row["torchserve"], row["body"]), {})[
            row["concurrency"]] = row
    rows = []
    for (mine, theirs, body), by_level in grouped.items():
        cells = []
        for level in levels:
            row = by_level.get(level)
            cells.append(f"{fmt(row.get('images_per_s'), 2)} / {fmt(row.get('p99_ms'), 2)}"
                         if row else "-")
        rows.append([mine, theirs, body, *cells])
    return (f"\nsmchainer / TorchServe in the latest run that has both ({r.date}, {r.machine}, "
            f"{r.source}), per cell: images/s ratio (above 1: smchainer serves more) / p99 "
            "ratio (below 1: smchainer's tail is shorter), equal batching settings:\n\n"
            + table(["smchainer", "TorchServe", "body", *[f"c={c}" for c in levels]], rows))


def faults_rows(records: list[Record]) -> list[list[Any]]:
    """One row per fault record and server: /ping, failures, recovery, SIGTERM."""
    rows = []
    for r in records:
        if r.kind != "serving_faults":
            continue
        for run in r.data.get("runs", []):
            phases = run.get("phases", {})
            answered = sum(phases.get(p, {}).get("outcomes", {}).get("200", 0)
                           for p in ("steady", "after_sigkill"))
            probes = sum(phases.get(p, {}).get("ping_probes", 0)
                         for p in ("steady", "after_sigkill"))
            over = sum(phases.get(p, {}).get("ping_over_1s", 0)
                       for p in ("steady", "after_sigkill"))
            refused = run.get("refused_after_sigterm_s")
            rows.append([r.date, r.machine, run.get("name"), answered, f"{over} of {probes}",
                         run.get("ping_p99_ms_before_sigterm"), run.get("responses_503"),
                         run.get("failed_requests"), run.get("recovery_s"),
                         "no" if refused is None else f"{refused} s",
                         run.get("exited_after_sigterm_s"), load_text(r), commit_text(r),
                         r.source])
    return rows


def startup_rows(records: list[Record]) -> list[list[Any]]:
    """One row per startup record: a bare interpreter with and without the compat hook."""
    rows = []
    for r in records:
        if r.kind != "startup":
            continue
        bare = r.data.get("bare_interpreter", {})
        own = r.data.get("module_self_import_us") or []
        chainer = r.data.get("import_chainer", {})
        rows.append([r.date, r.machine, r.data.get("runs"),
                     (bare.get("with_hook") or {}).get("median_ms"),
                     (bare.get("without_hook") or {}).get("median_ms"),
                     bare.get("ratio_median"),
                     f"{min(own)}-{max(own)}" if own else "-",
                     (chainer.get("through_the_hook") or {}).get("median_ms"),
                     (chainer.get("after_import_smchainer_hook_off") or {}).get("median_ms"),
                     load_text(r), commit_text(r), r.source])
    return rows


def serving_detail(records: list[Record]) -> str:
    """Every cell of the latest serving record."""
    latest = [r for r in records if r.kind == "serving_load"]
    if not latest:
        return ""
    r = latest[-1]
    rows = []
    for variant in r.data.get("variants", []):
        for c in variant.get("cells", []):
            rows.append([variant["variant"], c["body"], c["concurrency"], c["ok"],
                         c.get("requests_per_s"), c.get("images_per_s"), c.get("p50_ms"),
                         c.get("p95_ms"), c.get("p99_ms"), c["errors"]])
    return (f"\nLatest serving run in full ({r.date}, {r.machine}, {r.source}):\n\n"
            + table(["variant", "body", "concurrency", "answers", "requests/s", "images/s",
                     "p50 ms", "p95 ms", "p99 ms", "errors"], rows))


def render(records: list[Record], skipped: dict, plots: list[str], plot_prefix: str) -> str:
    """The Markdown that goes between the markers."""
    parts = [START, "", f"_{len(records)} records; generated "
             f"{benchlib.utc_now().strftime('%Y-%m-%d %H:%M')} UTC by `benchmarks/report.py`"
             + (f"; {skipped['quick']} `--quick` records left out" if skipped["quick"] else "")
             + "._", ""]
    parts += ["### Training throughput (images/s, forward + backward + update)", "",
              "`Chainer` runs VGG through Chainer's own functions (without cuDNN), "
              "`Chainer + cuDNN` the same functions on smchainer's cuDNN 9 binding, "
              "`fused` through smchainer's channels-last kernels (`VGG.fused`, what "
              "`smchainer-train` uses).", "",
              table(["date", "machine", "device", "precision", "model", "batch", "Chainer",
                     "Chainer + cuDNN", "fused", "PyTorch", "Chainer / PyTorch",
                     "Chainer + cuDNN / PyTorch", "fused / PyTorch", "PyTorch no cuDNN",
                     "load", "commit", "record"], train_rows(records))]
    parts += ["### End-to-end training epoch (`smchainer-train`, data pipeline included)", "",
              table(["date", "machine", "device", "model", "batch / rank", "ranks",
                     "threads / rank", "train images", "epoch images/s", "bare step images/s",
                     "epoch / bare", "load", "commit", "record"], e2e_rows(records))]
    parts += ["### MPI scaling", "",
              table(["date", "machine", "device", "model", "ranks", "images/s",
                     "speedup vs 1 rank", "efficiency", "communicator overhead (1 rank)",
                     "load", "commit", "record"], mpi_rows(records))]
    parts += ["### Inference (VGG, CPU)", "",
              table(["date", "machine", "threads", "model", "Chainer b1 ms", "fused b1 ms",
                     "ONNX RT b1 ms", "PyTorch b1 ms", "Chainer b64 img/s", "fused b64 img/s",
                     "ONNX RT b64 img/s",
                     "PyTorch b64 img/s", "Chainer / PyTorch", "ONNX RT / PyTorch", "load",
                     "commit", "record"], inference_rows(records))]
    parts += ["### Serving under load (`smchainer-serve` and TorchServe, loopback)", "",
              "Per body: p50 latency at concurrency 1 / serving overhead (p50 minus the bare "
              "`predict_fn`, for TorchServe the handler's forward pass), in ms; from records "
              "of 2026-12-01 21:03 on, both timed in alternating rounds (the record's "
              "`interleaved`), before then the p50 of the concurrency-1 cell against one "
              "earlier timing of the bare call. `batched / "
              "unbatched`: npy-1 images/s of a `-batched` variant over its unbatched twin's at "
              "the top concurrency; `vs TorchServe`: a smchainer variant's npy-1 images/s / "
              "p99 over TorchServe's with the same batching, at the top concurrency.", "",
              table(["date", "machine", "model", "variant", "workers", "npy-1", "npy-10",
                     "npy-64", "json-10", "peak images/s", "batched / unbatched",
                     "vs TorchServe", "errors", "load", "commit", "record"],
                    serving_rows(records))]
    versus = serving_ratios(records)
    if versus:
        parts.append(versus)
    detail = serving_detail(records)
    if detail:
        parts.append(detail)
    faults = faults_rows(records)
    if faults:  # a run of its own, not part of run_all.py
        parts += ["", "### Serving under faults (`serving_faults.py`: slow clients, SIGKILL, "
                  "SIGTERM)", "",
                  "Before SIGTERM: requests answered 200, /ping probes over 1 s (or "
                  "unanswered), /ping p99; then the 503s, failed requests, seconds from the "
                  "SIGKILL to the replacement's model, and after SIGTERM how soon new "
                  "connections were refused and when the server exited.", "",
                  table(["date", "machine", "worker", "answered", "/ping > 1 s",
                         "/ping p99 ms", "503s", "failed", "recovery s",
                         "refused after SIGTERM", "exit s", "load", "commit", "record"],
                        faults)]
    startup = startup_rows(records)
    if startup:  # a run of its own, not part of run_all.py
        parts += ["", "### Interpreter start (`startup.py`: the `smchainer-compat.pth` hook)", "",
                  "`python -c pass` with the hook and with `SMCHAINER_NO_COMPAT_HOOK=1` "
                  "(medians, turns interleaved, bytecode cached), the hook module's own "
                  "import time from `-X importtime`, and `import chainer` through the hook "
                  "or after `import smchainer`.", "",
                  table(["date", "machine", "runs", "with hook ms", "hook off ms",
                         "with / off", "module import us", "import chainer (hook) ms",
                         "import smchainer, chainer ms", "load", "commit", "record"],
                        startup)]
    if plots:
        parts += ["### Plots", ""] + [f"![{p}]({plot_prefix}/{p})" for p in plots] + [""]
    if skipped["unrecognised"] or skipped["unreadable"]:
        parts += [f"Not recognised: {', '.join(skipped['unrecognised']) or '-'}; unreadable: "
                  f"{', '.join(skipped['unreadable']) or '-'}.", ""]
    parts.append(END)
    return "\n".join(parts)


def update_readme(readme: Path, block: str) -> None:
    """Replace the marked block of ``readme`` (appended when it has no markers)."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    match = START_PATTERN.search(text)
    end = text.find(END, match.end()) if match else -1
    if match and end != -1:
        text = text[:match.start()] + block + text[end + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


# --- plots -----------------------------------------------------------------------------------

def make_plots(records: list[Record], folder: Path) -> list[str]:
    """Small PNGs of the history (one x position per run, oldest left); their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=72)
        plt.close(fig)
        made.append(name)

    def history(ax: Any, series: dict[str, list[tuple[dt.datetime, float]]], title: str,
                log: bool = True) -> None:
        runs = sorted({when for points in series.values() for when, _ in points})
        position = {when: i for i, when in enumerate(runs)}
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([position[p[0]] for p in points], [p[1] for p in points], marker="o",
                    label=label)
        if log:
            ax.set_yscale("log")
        ax.set_xticks(range(len(runs)), [w.strftime("%m-%d %H:%M") for w in runs],
                      rotation=30, ha="right")
        ax.set_xlim(-0.5, max(len(runs) - 0.5, 0.5))
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)

    def figure(panels: list[tuple[dict, str, bool]], name: str) -> None:
        panels = [p for p in panels if p[0]]
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.2),
                                 squeeze=False)
        for ax, (series, title, log) in zip(axes[0], panels, strict=True):
            history(ax, series, title, log)
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        save(fig, name)

    speed: dict[str, list] = {}
    ratio: dict[str, list] = {}
    for r in records:
        if r.kind != "vgg_train_throughput":
            continue
        device = f"{r.data.get('device')} {precision_of(r.data)}"
        for f in r.data.get("frameworks", []):
            if f["framework"] not in ("chainer", "smchainer-fused"):
                continue
            label = "" if f["framework"] == "chainer" else " fused"
            for res in f.get("results", []):
                if "images_per_s" in res:
                    speed.setdefault(f"{device}{label} b{res['batch_size']}", []).append(
                        (r.when, res["images_per_s"]))
        for key, label in (("chainer/torch", ""), ("smchainer-fused/torch", " fused")):
            for batch, value in (r.data.get("ratio_images_per_s", {}).get(key) or {}).items():
                ratio.setdefault(f"{device}{label} b{batch}", []).append((r.when, value))
    figure([(speed, "VGG training, Chainer images/s", True),
            (ratio, "Chainer / PyTorch eager", False)], "train_throughput.png")

    inference: dict[str, list] = {}
    for r in records:
        if r.kind != "inference_throughput":
            continue
        threads = r.data.get("settings", {}).get("threads")
        for name, figures in r.data.get("results", {}).items():
            if figures:
                inference.setdefault(f"{name}, {threads} thr", []).append(
                    (r.when, figures["batch64_images_per_s"]))
    figure([(inference, "VGG inference (CPU), batch 64 images/s", True)], "inference.png")

    e2e: dict[str, list] = {}
    overhead: dict[str, list] = {}
    for r in records:
        if r.kind != "mpi_scaling":
            continue
        for run in r.data.get("runs", []):
            if "images_per_s" in run:
                e2e.setdefault(f"{r.data.get('device')} {run['ranks']} rank x "
                               f"{run['threads_per_rank']} thr", []).append(
                    (r.when, run["images_per_s"]))
        comm = r.data.get("communicator_overhead", {})
        if comm.get("overhead") is not None:
            overhead.setdefault(f"{r.data.get('device')} {comm['communicator']}", []).append(
                (r.when, 100 * comm["overhead"]))
    figure([(e2e, "smchainer-train epoch images/s", True),
            (overhead, "communicator overhead, 1 rank, %", False)], "mpi_scaling.png")

    serving = [r for r in records if r.kind == "serving_load"]
    if serving:
        latest = serving[-1]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for variant in latest.data.get("variants", []):
            bodies: dict[str, list] = {}
            for c in variant.get("cells", []):
                bodies.setdefault(c["body"], []).append(c)
            for body, cells in bodies.items():
                cells.sort(key=lambda c: c["concurrency"])
                label = f"{variant['variant']} {body}"
                xs = [c["concurrency"] for c in cells]
                axes[0].plot(xs, [c.get("images_per_s") or float("nan") for c in cells],
                             marker="o", label=label)
                axes[1].plot(xs, [c.get("p50_ms") or float("nan") for c in cells], marker="o",
                             label=label)
        concurrency = sorted({c["concurrency"] for v in latest.data.get("variants", [])
                              for c in v.get("cells", [])})
        for ax, title in zip(axes, ("images/s", "p50 latency, ms"), strict=True):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(concurrency, [str(c) for c in concurrency])
            ax.minorticks_off()
            ax.set_xlabel("concurrency", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
        axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.suptitle(f"serving under load ({latest.date}, {latest.machine})",
                     fontsize=9)
        save(fig, "serving_load.png")
    return made


# --- the command -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` lists it)."""
    parser = argparse.ArgumentParser(prog="report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=benchlib.RESULTS)
    parser.add_argument("--readme", type=Path, default=benchlib.ROOT / "benchmarks" / "README.md")
    parser.add_argument("--plots-dir", type=Path, default=None,
                        help="default: RESULTS_DIR/plots")
    parser.add_argument("--include-quick", action="store_true",
                        help="also show the records of --quick runs")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Render the records into the README and the plots; 1 without a results folder."""
    args = build_parser().parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"Error: no results folder at {args.results_dir}", file=sys.stderr)
        return 1
    records, skipped = load_records(args.results_dir, args.include_quick)
    plots_dir = args.plots_dir or args.results_dir / PLOTS
    plots = [] if args.no_plots else make_plots(records, plots_dir)
    prefix = Path(os.path.relpath(plots_dir.resolve(), args.readme.resolve().parent)).as_posix()
    update_readme(args.readme, render(records, skipped, plots, prefix))
    kinds: dict[str, int] = {}
    for record in records:
        kinds[record.kind] = kinds.get(record.kind, 0) + 1
    print(f"report: {len(records)} records {kinds} -> {args.readme}; plots: {plots}; "
          f"skipped: {skipped['quick']} quick, {len(skipped['unrecognised'])} unrecognised, "
          f"{len(skipped['unreadable'])} unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
