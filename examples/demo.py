"""The main job end to end, on CPU, in a few minutes (``make demo``).

1. ``smchainer-train`` trains a small VGG on a slice of the shared CIFAR-10
   with no user code (the built-in trainer);
2. ``smchainer-serve`` serves the ``model.tar.gz`` it wrote, again with no
   user code;
3. real CIFAR-10 test images go to ``/invocations`` as an
   ``application/x-npy`` batch, answered as JSON with class names;
4. the predicted classes and the accuracy are printed, and the server is
   shut down with SIGTERM.

Every figure printed is computed from the server's answers: nothing is
assumed. Options: ``--help``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def shared_cifar10() -> Path:
    shared = Path(os.environ.get("SMCHAINER_SHARED", ROOT.parent / "shared"))
    return shared / "data" / "cifar10"


def load_test_images(test_zip: Path, count: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``count`` test images picked at random: their names and a float32 [0, 1] batch."""
    with zipfile.ZipFile(test_zip) as archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith(".jpg"))
        picked = sorted(np.random.default_rng(seed).choice(len(names), count, replace=False))
        images = []
        for index in picked:
            with Image.open(io.BytesIO(archive.read(names[index]))) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    batch = np.stack(images).transpose(0, 3, 1, 2).copy()
    return [names[i] for i in picked], batch


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_ping(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"Error: the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"Error: the server did not answer /ping within {timeout:.0f} s")


def predict(url: str, batch: np.ndarray) -> list[dict]:
    body = io.BytesIO()
    np.save(body, batch, allow_pickle=False)
    request = urllib.request.Request(
        url + "/invocations", data=body.getvalue(), method="POST",
        headers={"Content-Type": "application/x-npy", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["predictions"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_cifar10(),
                        help="folder with train.zip and test.zip (default: ../shared)")
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--job-dir", type=Path, default=None,
                        help="where the job tree goes (default: a new temporary folder)")
    args = parser.parse_args()

    for name in ("train.zip", "test.zip"):
        if not (args.data / name).exists():
            print(f"Error: {args.data / name} not found (pass --data or set SMCHAINER_SHARED)",
                  file=sys.stderr)
            return 1
    job = args.job_dir or Path(tempfile.mkdtemp(prefix="smchainer-demo-"))
    print(f"== 1. training a VGG-{args.depth} (width {args.width}) on {args.train_samples} "
          f"CIFAR-10 images for {args.epochs} epochs; job dir {job}", flush=True)
    started = time.monotonic()
    train = subprocess.run([
        str(BIN / "smchainer-train"), "--job-dir", str(job),
        "--channel", f"train={args.data / 'train.zip'}",
        "--channel", f"test={args.data / 'test.zip'}",
        "--hp", f"epochs={args.epochs}", "--hp", f"train-samples={args.train_samples}",
        "--hp", "test-samples=2000", "--hp", f"width={args.width}", "--hp", f"depth={args.depth}",
        "--hp", "batch-size=64", "--hp", "learning-rate=0.05", "--hp", "lr-schedule=onecycle",
        "--hp", "progress-bar=false",
    ])
    if train.returncode != 0:
        print(f"Error: training failed; see {job / 'output' / 'failure'}", file=sys.stderr)
        return 1
    metrics = json.loads((job / "output" / "data" / "metrics.json").read_text())
    print(f"   trained in {time.monotonic() - started:.0f} s; the trainer's own test accuracy: "
          f"{metrics['test_accuracy']:.3f} on {metrics['test_images']} images", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"== 2. serving {job / 'model.tar.gz'} at {url}", flush=True)
    server = subprocess.Popen([str(BIN / "smchainer-serve"), "--model-dir",
                               str(job / "model.tar.gz"), "--bind", f"127.0.0.1:{port}",
                               "--workers", "1"])
    try:
        wait_for_ping(url, server, timeout=120)
        names, batch = load_test_images(args.data / "test.zip", args.test_images, seed=1)
        print(f"== 3. sending {len(names)} real test images to /invocations", flush=True)
        predictions = []
        for start in range(0, len(batch), 100):
            predictions += predict(url, batch[start:start + 100])
        truth = [name.split("/")[-2] for name in names]
        correct = sum(p["class"] == t for p, t in zip(predictions, truth, strict=True))
        print("== 4. predictions (first 10):")
        for name, prediction in list(zip(names, predictions, strict=True))[:10]:
            print(f"   {name:28s} -> {prediction['class']:10s} "
                  f"(p={prediction['probability']:.2f})")
        print(f"   accuracy over HTTP: {correct}/{len(names)} = {correct / len(names):.3f} "
              f"(chance: 0.100)")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"== server stopped (exit status {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
