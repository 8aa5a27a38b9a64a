"""TorchServe handler of the serving benchmark's peer: the VGG in PyTorch eager, smchainer's bodies.

Archived by :mod:`torchserve_peer` beside two files: ``vgg.pt`` (the
``state_dict`` of :func:`inference_throughput.build_torch_vgg`'s network,
converted from the Chainer VGG that ``smchainer-serve`` serves) and
``vgg-spec.json`` (the layers in order and the class names), from which
:func:`build_network` rebuilds the same ``nn.Module`` before loading the
weights (strictly: every tensor must fit).

Requests are what ``serving_load.py`` sends ``smchainer-serve``:
``application/x-npy`` (float32 N x 3 x 32 x 32 in [0, 1], or one 3 x 32 x 32
image) and ``application/json`` (the same as nested lists, or
``{"instances": [...]}``). Answers are smchainer's: npy of the N x
n_classes float32 logits, or JSON ``{"predictions": [{"label", "class",
"probability", "scores"}]}`` (as ``Accept`` asks; JSON by default). A batch
of several requests (TorchServe's ``batch_size``) runs as one forward pass
over all their images; a request that cannot be decoded is answered 400
on its own.

Threads: ``torch.set_num_threads`` with ``$TORCHSERVE_PEER_THREADS`` (else
``$OMP_NUM_THREADS``), and each worker writes what it got to
``$TORCHSERVE_PEER_REPORT_DIR/worker-<pid>.json`` when that is set. The
worker's root logger is set to WARNING (no log line per request, as the
smchainer server runs with ``SAGEMAKER_CONTAINER_LOG_LEVEL=warning``).

Nothing here imports Chainer or smchainer: the worker holds PyTorch alone.
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

NPY = "application/x-npy"
JSON = "application/json"
WEIGHTS_FILE = "vgg.pt"
SPEC_FILE = "vgg-spec.json"
INPUT_SHAPE = (3, 32, 32)
THREADS_ENV = "TORCHSERVE_PEER_THREADS"
REPORT_ENV = "TORCHSERVE_PEER_REPORT_DIR"

logger = logging.getLogger(__name__)


class BadInput(ValueError):
    """A request body that is not a batch of 3 x 32 x 32 images in [0, 1]."""


# --- the network -----------------------------------------------------------------------------

def network_spec(network: Any, class_names: list[str]) -> dict[str, Any]:
    """The layers of a ``build_torch_vgg`` network in order, as :func:`build_network` reads them."""
    from torch import nn

    def layers(sequence: Any) -> list[list[Any]]:
        found: list[list[Any]] = []
        for layer in sequence:
            if isinstance(layer, nn.Conv2d):
                found.append(["conv", layer.in_channels, layer.out_channels])
            elif isinstance(layer, nn.BatchNorm2d):
                found.append(["bn2d", layer.num_features, layer.eps])
            elif isinstance(layer, nn.BatchNorm1d):
                found.append(["bn1d", layer.num_features, layer.eps])
            elif isinstance(layer, nn.ReLU):
                found.append(["relu"])
            elif isinstance(layer, nn.MaxPool2d):
                found.append(["pool"])
            elif isinstance(layer, nn.Flatten):
                found.append(["flatten"])
            elif isinstance(layer, nn.Linear):
                found.append(["linear", layer.in_features, layer.out_features])
            else:
                raise TypeError(f"no spec for layer {type(layer).__name__}")
        return found

    return {"features": layers(network.features), "classifier": layers(network.classifier),
            "channels": int(network.mean.shape[1]), "class_names": list(class_names),
            "input_shape": list(INPUT_SHAPE)}


def build_network(spec: dict[str, Any]) -> Any:
    """The ``nn.Module`` that :func:`network_spec` describes, in evaluation mode (no weights)."""
    import torch
    from torch import nn

    def layer(kind: str, *sizes: Any) -> Any:
        if kind == "conv":
            return nn.Conv2d(sizes[0], sizes[1], 3, padding=1, bias=False)
        if kind == "bn2d":
            return nn.BatchNorm2d(sizes[0], eps=sizes[1])
        if kind == "bn1d":
            return nn.BatchNorm1d(sizes[0], eps=sizes[1])
        if kind == "relu":
            return nn.ReLU(inplace=True)
        if kind == "pool":
            return nn.MaxPool2d(2, 2)
        if kind == "flatten":
            return nn.Flatten()
        if kind == "linear":
            return nn.Linear(sizes[0], sizes[1], bias=False)
        raise ValueError(f"unknown layer {kind!r} in the spec")

    channels = int(spec["channels"])

    class TorchVGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
            self.register_buffer("scale", torch.ones(1, channels, 1, 1))
            self.features = nn.Sequential(*(layer(*entry) for entry in spec["features"]))
            self.classifier = nn.Sequential(*(layer(*entry) for entry in spec["classifier"]))

        def forward(self, x: Any) -> Any:
            return self.classifier(self.features((x - self.mean) * self.scale))

    return TorchVGG().eval()


def load_network(model_dir: str | os.PathLike) -> tuple[Any, list[str]]:
    """The archived network with its weights (strict) and its class names."""
    import torch

    folder = Path(model_dir)
    spec = json.loads((folder / SPEC_FILE).read_text())
    network = build_network(spec)
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    return network.eval(), list(spec["class_names"])


# --- bodies in, answers out ------------------------------------------------------------------

def media_type(header: str | None) -> str:
    """The bare media type of a Content-Type or Accept value (lower case, no parameters)."""
    return (header or "").split(",")[0].split(";")[0].strip().lower()


def decode(body: bytes | bytearray, content_type: str | None) -> np.ndarray:
    """A request body as float32 N x 3 x 32 x 32 in [0, 1]; :class:`BadInput` otherwise."""
    kind = media_type(content_type) or JSON
    try:
        if kind == NPY:
            array = np.load(io.BytesIO(bytes(body)), allow_pickle=False)
        elif kind == JSON:
            value = json.loads(bytes(body))
            if isinstance(value, dict):
                value = value.get("instances")
            array = np.asarray(value, dtype=np.float32)
        else:
            raise BadInput(f"content type {kind!r} is not {NPY} or {JSON}")
    except (ValueError, TypeError, OSError) as error:
        if isinstance(error, BadInput):
            raise
        raise BadInput(f"cannot read the {kind} body: {error}") from None
    if array.shape == INPUT_SHAPE:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != INPUT_SHAPE or len(array) == 0:
        raise BadInput(f"expected float32 N x 3 x 32 x 32, got shape {list(array.shape)}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise BadInput(f"expected float32 N x 3 x 32 x 32, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise BadInput("input holds NaN or infinite values")
    if float(array.min()) < -1e-3 or float(array.max()) > 1 + 1e-3:
        raise BadInput("expected values in [0, 1]")
    return array


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in the scores' precision (max-shifted), as smchainer computes it."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)


def encode(scores: np.ndarray, accept: str | None, class_names: list[str]) -> tuple[bytes, str]:
    """smchainer's answer for ``scores`` (N x n_classes logits): the bytes and their type."""
    kind = media_type(accept)
    if kind == NPY:
        buffer = io.BytesIO()
        np.save(buffer, scores.astype(np.float32, copy=False), allow_pickle=False)
        return buffer.getvalue(), NPY
    probabilities = softmax(scores)
    predictions = []
    for row, label in enumerate(scores.argmax(axis=1).tolist()):
        predictions.append({
            "label": label,
            "class": class_names[label] if label < len(class_names) else str(label),
            "probability": float(probabilities[row, label]),
            "scores": [float(v) for v in scores[row]],
        })
    return json.dumps({"predictions": predictions}).encode(), JSON


# --- the TorchServe entry point --------------------------------------------------------------

def _header(context: Any, idx: int, name: str) -> str | None:
    """Request ``idx``'s header ``name``, whatever its case on the wire."""
    headers = context.get_all_request_header(idx) or {}
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def _body(request: dict[str, Any]) -> bytes | bytearray:
    value = request.get("body", request.get("data"))
    if isinstance(value, str):
        return value.encode()
    if not isinstance(value, (bytes, bytearray)):
        raise BadInput("empty request body")
    return value


class VGGHandler:
    """Loads the network once per worker; answers a TorchServe batch in one forward pass."""

    def __init__(self) -> None:
        self.network: Any = None
        self.class_names: list[str] = []
        self.threads = 0

    def initialize(self, context: Any) -> None:
        """Threads, the network from the archive's folder, and the worker's report."""
        import torch

        logging.getLogger().setLevel(logging.WARNING)
        wanted = os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS") or ""
        if wanted.strip().isdigit() and int(wanted) > 0:
            torch.set_num_threads(int(wanted))
        self.threads = torch.get_num_threads()
        model_dir = context.system_properties.get("model_dir")
        self.network, self.class_names = load_network(model_dir)
        report = os.environ.get(REPORT_ENV)
        if report:
            Path(report, f"worker-{os.getpid()}.json").write_text(json.dumps({
                "pid": os.getpid(), "torch_threads": self.threads,
                "torch_version": torch.__version__,
                "batch_size": getattr(context, "system_properties", {}).get("batch_size"),
            }))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """N x n_classes logits of N images."""
        import torch

        with torch.inference_mode():
            return self.network(torch.from_numpy(images)).numpy()

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """One answer per request of the batch, in order."""
        decoded: list[np.ndarray | None] = []
        answers: list[bytes] = [b""] * len(data)
        for idx, request in enumerate(data):
            try:
                decoded.append(decode(_body(request), _header(context, idx, "content-type")))
            except BadInput as error:
                decoded.append(None)
                answers[idx] = json.dumps({"error": str(error)}).encode()
                context.set_response_status(400, str(error), idx)
                context.set_response_content_type(idx, JSON)
        good = [array for array in decoded if array is not None]
        if good:
            scores = self.predict(good[0] if len(good) == 1 else np.concatenate(good))
            start = 0
            for idx, array in enumerate(decoded):
                if array is None:
                    continue
                rows = scores[start:start + len(array)]
                start += len(array)
                answers[idx], kind = encode(rows, _header(context, idx, "accept"),
                                            self.class_names)
                context.set_response_content_type(idx, kind)
        return answers


_service = VGGHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    """TorchServe's entry point: load on the first call (``data`` None), then answer."""
    if _service.network is None:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
