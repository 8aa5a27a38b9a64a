"""The device run's example stage: the AWS example script, unchanged, for an epoch or two.

``examples/cifar10/train.py`` (with its ``net.py``) is the SageMaker Chainer
CIFAR-10 VGG example as AWS wrote it: Chainer's own links and functions,
``SerialIterator``, ``StandardUpdater``, ``Evaluator``, ``LogReport``. This
script runs it through ``smchainer-train`` exactly as a user would
(``--source-dir examples/cifar10 --entry-point train.py``: the script imports
``net`` from its folder, so the folder is the source dir, as in SageMaker),
with its own hyperparameters except ``epochs`` (default 2), and reads the
wall time of every epoch from its ``LogReport`` log (the differences of
``elapsed_time``: the training iterations, the test-set evaluation and the
extensions; the first epoch also pays the warm-up).

Then the same epochs in PyTorch eager, measured, not derived: the same VGG
(``train_throughput.torch_vgg``: the example's layers plus one input
normalisation), the same batch size, learning rate, momentum and weight decay,
the same float32 arrays gathered batch by batch on the host and copied to the
device, the same number of iterations per epoch (the ``SerialIterator``'s
ceil(N / batch)) and the same test-set evaluation. cuDNN benchmark mode on,
TF32 as ``CUPY_TF32`` (as in ``train_throughput.py``).

The example's channels are what it reads: ``train/train.npz`` and
``test/test.npz`` with float32 ``data`` in [0, 1] (N x 3 x 32 x 32) and
``labels``, made from the carried CIFAR-10 zips (decoded through
``smchainer.datasets.load_channel`` with its cache, shared with the train
stage; or the first images of each class with ``--train-per-class``).

    python benchmarks/device/example_epoch.py --device gpu --cifar10 .carry/cifar10 \\
        --seconds 110 --out "$OUT/example.json"
    python benchmarks/device/example_epoch.py --stand-in --cifar10 ../shared/data/cifar10 \\
        --out /tmp/example.json       # here: CPU, 300 + 100 images, a tiny VGG, 1 epoch

The record is rewritten after each part, so a run stopped by its time cap
keeps what it measured. Exit status 0 when the example logged an epoch.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cifar10"
sys.path.insert(0, str(ROOT / "benchmarks"))  # train_throughput (torch_vgg, tf32_requested)

ENV_RECORDED = ("CUPY_TF32", "CHAINER_CUDNN", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
#: What --stand-in sets: CPU, a slice of the data, a network small enough for 2 shared cores.
STAND_IN = {"train_per_class": 30, "test_per_class": 10, "epochs": 1, "seconds": 60,
            "hp": ["width=0.125", "depth=8"]}
CLI = "import sys; from smchainer.training.cli import main; sys.exit(main())"


def script_defaults(script: Path = EXAMPLE / "train.py") -> dict[str, Any]:
    """The example's own argument defaults (batch size, learning rate, width, depth)."""
    text = script.read_text()
    found: dict[str, Any] = {}
    for name, kind in (("batch-size", int), ("learning-rate", float), ("width", float),
                       ("depth", int), ("epochs", int)):
        match = re.search(rf'"--{name}", type=\w+, default=([0-9.]+)', text)
        if match:
            found[name] = kind(match.group(1))
    return found


def hyperparameters(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings as smchainer-train decodes them (JSON when it parses)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


# --- the channels ---------------------------------------------------------------------------

def first_per_class(archive: Path, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` JPEGs of each class folder, uint8 N x 3 x 32 x 32, and labels."""
    from PIL import Image

    from smchainer.datasets import CIFAR10_CLASSES

    chosen: dict[str, list[str]] = {}
    with zipfile.ZipFile(archive) as zipped:
        for name in sorted(zipped.namelist()):
            parts = name.split("/")
            if len(parts) < 3 or parts[0] != split or not name.lower().endswith(".jpg"):
                continue
            picked = chosen.setdefault(parts[-2], [])
            if len(picked) < per_class:
                picked.append(name)
        classes = sorted(chosen, key=lambda c: (CIFAR10_CLASSES.index(c)
                                                if c in CIFAR10_CLASSES else 99, c))
        images, labels = [], []
        for label, cls in enumerate(classes):
            for member in chosen[cls]:
                with Image.open(io.BytesIO(zipped.read(member))) as image:
                    images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
                labels.append(label)
    return np.stack(images).transpose(0, 3, 1, 2), np.asarray(labels, dtype=np.int32)


def make_channels(cifar10: Path, target: Path, train_per_class: int | None,
                  test_per_class: int | None, cache_dir: str) -> dict[str, Any]:
    """``target/train/train.npz`` and ``target/test/test.npz`` as the example reads them."""
    from smchainer.datasets import load_channel

    started = time.perf_counter()
    info: dict[str, Any] = {"source": str(cifar10)}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        archive = cifar10 / f"{split}.zip"
        if per_class:
            images, labels = first_per_class(archive, split, per_class)
        else:
            dataset = load_channel(archive, split, cache_dir=cache_dir)
            images, labels = dataset.images, dataset.labels.astype(np.int32)
        folder = target / split
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / f"{split}.npz", data=images.astype(np.float32) / np.float32(255),
                 labels=labels)
        info[f"{split}_images"] = int(len(labels))
        info[f"{split}_dir"] = str(folder)
    info["prepare_seconds"] = round(time.perf_counter() - started, 2)
    return info


# --- the example through smchainer-train ----------------------------------------------------

def epoch_seconds(log: list[dict]) -> list[float]:
    """Seconds of each epoch from LogReport's cumulative ``elapsed_time``."""
    times = [entry["elapsed_time"] for entry in log if "elapsed_time" in entry]
    return [round(b - a, 3) for a, b in zip([0.0, *times[:-1]], times, strict=True)]


def run_example(args: argparse.Namespace, channels: dict[str, Any], work: Path,
                seconds: float) -> dict[str, Any]:
    """smchainer-train on the unchanged example; its epochs as its LogReport logged them."""
    job = work / "job"
    shutil.rmtree(job, ignore_errors=True)
    hp = [f"epochs={args.epochs}", *args.hp]
    command = [sys.executable, "-c", CLI, "--source-dir", str(EXAMPLE), "--entry-point",
               "train.py", "--job-dir", str(job), "--channel", f"train={channels['train_dir']}",
               "--channel", f"test={channels['test_dir']}"]
    for pair in hp:
        command += ["--hp", pair]
    result: dict[str, Any] = {"command": ["smchainer-train", *command[3:]],
                              "hyperparameters": hyperparameters(hp),
                              "time_cap_seconds": round(seconds, 1)}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds,
                              cwd=work)
        result["exit_code"], result["timed_out"] = done.returncode, False
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        result["exit_code"], result["timed_out"] = None, True
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                         for part in (exc.stdout, exc.stderr))
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    sys.stdout.write(output[-4000:])
    result["output_tail"] = output[-3000:]
    device = re.search(r"^training on (.+)$", output, re.MULTILINE)
    result["device"] = device.group(1).strip() if device else None
    log_path = job / "output" / "data" / "log"
    try:
        log = json.loads(log_path.read_text())
    except (OSError, ValueError) as exc:
        result["error"] = f"no LogReport log at {log_path}: {type(exc).__name__}: {exc}"
        return result
    result["log"] = log
    result["epoch_seconds"] = epoch_seconds(log)
    result["epochs_logged"] = len(result["epoch_seconds"])
    if result["epoch_seconds"]:
        steady = result["epoch_seconds"][-1]
        result["steady_epoch_seconds"] = steady  # the last epoch logged
        result["steady_is_first_epoch"] = len(result["epoch_seconds"]) == 1
        result["images_per_s"] = round(channels["train_images"] / steady, 1)
        result["validation_accuracy_by_epoch"] = [
            round(entry["validation/main/accuracy"], 4) for entry in log
            if "validation/main/accuracy" in entry]
    return result


# --- PyTorch eager, the same epochs ---------------------------------------------------------

def run_torch(args: argparse.Namespace, channels: dict[str, Any], example: dict[str, Any],
              deadline: float) -> dict[str, Any]:
    """The example's epochs in PyTorch eager on the same arrays; stops at ``deadline``."""
    try:
        import torch
    except ImportError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    from train_throughput import MOMENTUM, WEIGHT_DECAY, tf32_requested, torch_vgg

    settings = {**script_defaults(), **example.get("hyperparameters", {})}
    batch, lr = int(settings["batch-size"]), float(settings["learning-rate"])
    width, depth = float(settings.get("width", 1.0)), int(settings.get("depth", 16))
    on_gpu = args.device == "gpu"
    if on_gpu and not torch.cuda.is_available():
        return {"error": "--device gpu but torch.cuda.is_available() is False"}
    device = torch.device("cuda:0" if on_gpu else "cpu")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32_requested()
    torch.backends.cudnn.allow_tf32 = tf32_requested()
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)

    train = np.load(Path(channels["train_dir"]) / "train.npz")
    test = np.load(Path(channels["test_dir"]) / "test.npz")
    train_x, train_t = torch.from_numpy(train["data"]), torch.from_numpy(train["labels"]).long()
    test_x, test_t = torch.from_numpy(test["data"]), torch.from_numpy(test["labels"]).long()
    n = len(train_t)
    iterations = math.ceil(n / batch)  # SerialIterator: the last batch wraps into the next order
    model = torch_vgg(torch, depth, width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    record: dict[str, Any] = {
        "method": "measured: PyTorch eager epochs on the same arrays (host gather + copy per "
                  "batch, the example's iterations per epoch, then the test set), not derived "
                  "from train_throughput's images/s",
        "batch_size": batch, "learning_rate": lr, "width": width, "depth": depth,
        "iterations_per_epoch": iterations, "cudnn_benchmark": True,
        "allow_tf32": tf32_requested(), "device": str(device), "threads": torch.get_num_threads(),
        "epoch_seconds": [], "test_accuracy_by_epoch": [], "timed_out": False,
    }
    order = np.empty(0, dtype=np.int64)
    for _ in range(args.epochs):
        synchronize()
        started = time.perf_counter()
        model.train()
        total = torch.zeros((), device=device)
        for it in range(iterations):
            if len(order) < batch:
                order = np.concatenate([order, rng.permutation(n)])
            index, order = torch.from_numpy(order[:batch]), order[batch:]
            x, t = train_x[index].to(device), train_t[index].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), t)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            if it % 50 == 49 and time.perf_counter() > deadline:
                record["timed_out"] = True
                break
        if record["timed_out"]:
            break
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(test_t), batch):
                x = test_x[start:start + batch].to(device)
                t = test_t[start:start + batch].to(device)
                correct += int((model(x).argmax(1) == t).sum())
        synchronize()
        record["epoch_seconds"].append(round(time.perf_counter() - started, 3))
        record["test_accuracy_by_epoch"].append(round(correct / len(test_t), 4))
        record["last_mean_loss"] = round(float(total) / iterations, 4)
        if time.perf_counter() > deadline:
            record["timed_out"] = len(record["epoch_seconds"]) < args.epochs
            break
    if record["epoch_seconds"]:
        record["steady_epoch_seconds"] = record["epoch_seconds"][-1]
        record["images_per_s"] = round(n / record["steady_epoch_seconds"], 1)
    print(f"torch eager: epochs {record['epoch_seconds']} s, "
          f"test accuracy {record['test_accuracy_by_epoch']}", flush=True)
    return record


# --- the record -----------------------------------------------------------------------------

def write_record(record: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("chainer", "cupy", "torch"):
        try:
            found[name] = __import__(name).__version__
        except Exception as exc:  # a missing package is a record, not a failure
            found[name] = f"{type(exc).__name__}"
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument("--cifar10", type=Path, default=ROOT / ".carry" / "cifar10",
                        help="folder with train.zip and test.zip")
    parser.add_argument("--epochs", type=int, default=None, help="default 2 (stand-in: 1)")
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                        help="another hyperparameter for the example (repeatable)")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="only the first images of each class (default: all)")
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None,
                        help="the whole stage's budget (default 110; stand-in 60)")
    parser.add_argument("--torch-reserve", type=float, default=None,
                        help="seconds kept for the PyTorch epochs (default: a quarter, at "
                             "most 25)")
    parser.add_argument("--cache-dir", default="/tmp/smchainer-cache")
    parser.add_argument("--work", type=Path, default=Path("/tmp/smchainer-example"))
    parser.add_argument("--stand-in", action="store_true",
                        help="rehearsal: CPU, 30 + 10 images per class, width 0.125, depth 8, "
                             "1 epoch, 60 s")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.stand_in:
        args.device = "cpu"
        args.train_per_class = args.train_per_class or STAND_IN["train_per_class"]
        args.test_per_class = args.test_per_class or STAND_IN["test_per_class"]
        args.epochs = args.epochs or STAND_IN["epochs"]
        args.seconds = args.seconds or STAND_IN["seconds"]
        given = {pair.partition("=")[0] for pair in args.hp}
        args.hp = [p for p in STAND_IN["hp"] if p.partition("=")[0] not in given] + args.hp
    args.epochs = args.epochs or 2
    args.seconds = args.seconds or 110.0
    if args.device == "cpu" and not any(p.startswith("num-gpus=") for p in args.hp):
        args.hp.append("num-gpus=0")  # the script's own switch: train on the CPU
    if args.torch_reserve is None:
        args.torch_reserve = min(25.0, args.seconds / 4)
    if args.epochs < 1 or args.seconds <= args.torch_reserve:
        parser.error("--epochs must be positive and --seconds above --torch-reserve")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.seconds
    record: dict[str, Any] = {
        "benchmark": "example_epoch",
        "script": "examples/cifar10/train.py + net.py (the AWS SageMaker Chainer CIFAR-10 "
                  "example, unchanged)",
        "device": args.device, "stand_in": args.stand_in, "epochs": args.epochs,
        "script_defaults": script_defaults(),
        "epoch_seconds_are": "LogReport elapsed_time differences: training iterations + "
                             "test-set evaluation + extensions; the first epoch includes the "
                             "warm-up",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": {k: os.environ.get(k) for k in ENV_RECORDED},
        "versions": versions(),
    }
    for name in ("train.zip", "test.zip"):
        if not (args.cifar10 / name).exists():
            record["error"] = f"{args.cifar10 / name} not found"
            write_record(record, args.out)
            print(f"Error: {record['error']}", file=sys.stderr)
            return 1
    args.work.mkdir(parents=True, exist_ok=True)
    channels = make_channels(args.cifar10, args.work / "channels", args.train_per_class,
                             args.test_per_class, args.cache_dir)
    record["data"] = channels
    print(f"channels: {channels['train_images']} + {channels['test_images']} images in "
          f"{channels['prepare_seconds']} s", flush=True)
    write_record(record, args.out)

    left = deadline - time.perf_counter() - args.torch_reserve
    record["example"] = run_example(args, channels, args.work, max(10.0, left))
    example = record["example"]
    print(f"example: exit {example.get('exit_code')}, epochs {example.get('epoch_seconds')} s,"
          f" {example.get('wall_seconds')} s in all", flush=True)
    write_record(record, args.out)

    if not args.no_torch:
        record["torch"] = run_torch(args, channels, example, deadline)
        mine, theirs = example.get("steady_epoch_seconds"), record["torch"].get(
            "steady_epoch_seconds")
        if mine and theirs:
            record["ratio_epoch_seconds_example_over_torch"] = round(mine / theirs, 3)
    record["total_seconds"] = round(time.perf_counter() - start, 2)
    write_record(record, args.out)
    print(json.dumps({k: record.get(k) for k in (
        "ratio_epoch_seconds_example_over_torch", "total_seconds")}), flush=True)
    return 0 if example.get("epoch_seconds") else 1


if __name__ == "__main__":
    sys.exit(main())
