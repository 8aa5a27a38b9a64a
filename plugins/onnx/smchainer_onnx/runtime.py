"""Serving an exported Chainer model with ONNX Runtime.

:func:`convert` turns a loaded Chainer link into an :class:`OnnxModel`: it
exports the model (or reuses the ``.onnx`` file cached beside it), opens an
ONNX Runtime session with thread settings that suit gunicorn workers, and
checks once that ONNX Runtime and Chainer agree on random batches before the
session may answer a request.

Thread settings (read by :func:`intra_op_threads`):

``SMCHAINER_ONNX_THREADS=n``
    ONNX Runtime's intra-op threads per worker, explicitly.
``SAGEMAKER_MODEL_SERVER_WORKERS=w``
    Otherwise each worker gets ``max(1, cpus // w)`` threads, so that
    workers x threads stays within the CPUs this process may use. Without it
    the server starts one worker per CPU, hence one thread each.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smchainer.device import cpu_count
from smchainer.environ import env_positive_int
from smchainer.errors import BadRequest, SmchainerError
from smchainer.serving.settings import WORKER_CPUS_ENV

logger = logging.getLogger(__name__)

THREADS_ENV = "SMCHAINER_ONNX_THREADS"
WORKERS_ENV = "SAGEMAKER_MODEL_SERVER_WORKERS"
#: Cached files are ``smchainer-onnx-<key>.onnx`` in the model directory.
CACHE_PREFIX = "smchainer-onnx-"
#: Batch size of the export trace; not 1, so the batch axis stands out.
TRACE_BATCH = 2
#: Batch sizes of the check against Chainer: neither is the trace's.
CHECK_BATCHES = (3, 1)
#: Agreement required between ONNX Runtime and Chainer, relative to the
#: largest output magnitude: summation order and folded batch norm differ.
RTOL = 1e-3
ATOL = 1e-4


class OutputMismatch(SmchainerError):
    """ONNX Runtime's output differs from Chainer's on the same batch."""


def intra_op_threads(environ: Mapping[str, str] | None = None) -> int:
    """ONNX Runtime intra-op threads for one server worker.

    ``SMCHAINER_ONNX_THREADS`` when set; else, in a worker the server bound
    to its own CPUs, their number (``SMCHAINER_WORKER_CPUS``); else
    ``max(1, cpus // workers)`` with ``workers`` from
    ``SAGEMAKER_MODEL_SERVER_WORKERS`` (default: one worker per CPU, as the
    server starts).

    :raises SmchainerError: when either variable is not a positive integer.
    """
    explicit = env_positive_int(THREADS_ENV, None, environ)
    if explicit is not None:
        return explicit
    bound = env_positive_int(WORKER_CPUS_ENV, None, environ)
    if bound is not None:
        return bound
    cpus = cpu_count()
    workers = env_positive_int(WORKERS_ENV, cpus, environ)
    return max(1, cpus // workers)


def open_session(model_bytes: bytes, threads: int) -> Any:
    """An ONNX Runtime CPU session with all graph optimisations and ``threads``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Shape-merge warnings go to stderr unasked; a real mismatch fails the check anyway.
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """A Chainer model answered by ONNX Runtime, standing in for the link.

    Calling it behaves like calling the Chainer link in evaluation mode (it
    returns a :class:`chainer.Variable`) and any other attribute is the
    link's, so a ``predict_fn`` written for the Chainer model runs it
    unchanged and gets ONNX Runtime's speed. It does not pretend to be of
    the link's class: a hook that must know what it serves reads the model's
    contract (``context.contract``, as the built-in VGG's ``predict_fn``
    does) or :attr:`chainer_model`.

    :ivar session: the ONNX Runtime session.
    :ivar chainer_model: the link it was converted from.
    :ivar input_shape: the shape of one input, without the batch axis.
    :ivar source: the cached file the graph came from, or ``None`` when it
        was exported in this process.
    """

    def __init__(
        self, session: Any, chainer_model: Any, input_shape: Sequence[int],
        source: str | None = None,
    ) -> None:
        self.session = session
        self.chainer_model = chainer_model
        self.input_shape = tuple(int(d) for d in input_shape)
        self.source = source
        self._input_name = session.get_inputs()[0].name
        self._output_name = session.get_outputs()[0].name

    def __getattr__(self, name: str) -> Any:
        chainer_model = self.__dict__.get("chainer_model")
        if chainer_model is None:
            raise AttributeError(name)
        return getattr(chainer_model, name)

    def __repr__(self) -> str:
        return f"OnnxModel({type(self.chainer_model).__name__}, input N x {self.input_shape})"

    def predict(self, input_data: Any) -> np.ndarray:
        """The model's output for a batch, as a NumPy array.

        :raises BadRequest: when the batch is not floating point or does not
            have the model's input shape.
        """
        array = np.asarray(getattr(input_data, "array", input_data))
        if array.dtype.kind != "f":
            raise BadRequest(
                f"input does not fit the model: it takes floating-point data, not {array.dtype}"
            )
        if array.ndim != 1 + len(self.input_shape) or array.shape[1:] != self.input_shape:
            wanted = " x ".join(["N", *map(str, self.input_shape)])
            raise BadRequest(
                f"input does not fit the model: it takes {wanted}, not "
                f"{' x '.join(map(str, array.shape)) or 'a scalar'}"
            )
        if array.shape[0] == 0:
            raise BadRequest("input does not fit the model: the batch is empty")
        batch = np.ascontiguousarray(array, dtype=np.float32)
        return self.session.run([self._output_name], {self._input_name: batch})[0]

    def __call__(self, input_data: Any) -> Any:
        import chainer

        return chainer.Variable(self.predict(input_data))


def model_key(model: Any, input_shape: Sequence[int]) -> str:
    """A hash of everything an export depends on.

    The model's class, the input shape, the exporter's version and every
    array the model would save to ``model.npz`` (its parameters and
    persistent values, as loaded), so a changed ``model.npz`` gives a new key.
    """
    from chainer.serializers import DictionarySerializer

    from smchainer_onnx.export import EXPORTER_VERSION

    state = DictionarySerializer()
    state.save(model)
    digest = hashlib.sha256()
    cls = type(model)
    header = f"{EXPORTER_VERSION}|{cls.__module__}.{cls.__qualname__}|{tuple(input_shape)}"
    digest.update(header.encode())
    for name in sorted(state.target):
        array = np.ascontiguousarray(state.target[name])
        digest.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_agreement(
    session: Any, model: Any, input_shape: Sequence[int], seed: int = 0
) -> float:
    """Compare ONNX Runtime with Chainer on random batches in [0, 1).

    :return: the largest absolute difference seen.
    :raises OutputMismatch: when the outputs differ in shape or beyond
        :data:`RTOL` / :data:`ATOL` (scaled by the largest output magnitude).
    """
    import chainer

    rng = np.random.default_rng(seed)
    worst = 0.0
    input_name = session.get_inputs()[0].name
    for batch_size in CHECK_BATCHES:
        batch = rng.random((batch_size, *input_shape), dtype=np.float32)
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            expected = np.asarray(model(batch).array)
        got = session.run(None, {input_name: batch})[0]
        if got.shape != expected.shape:
            raise OutputMismatch(
                f"ONNX Runtime gives shape {got.shape}, Chainer {expected.shape} "
                f"for a batch of {batch_size}"
            )
        scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
        difference = float(np.abs(got - expected).max(initial=0.0))
        worst = max(worst, difference)
        if not np.allclose(got, expected, rtol=RTOL, atol=ATOL * scale):
            raise OutputMismatch(
                f"ONNX Runtime and Chainer differ by up to {difference:.3g} "
                f"(outputs up to {scale:.3g}) on a batch of {batch_size}"
            )
    return worst


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _store(cache_dir: Path, path: Path, data: bytes) -> None:
    """Cache the graph beside the model and drop files of older weights."""
    try:
        _write_atomically(path, data)
    except OSError as error:
        logger.info("not caching the ONNX graph in %s: %s", cache_dir, error)
        return
    for stale in cache_dir.glob(f"{CACHE_PREFIX}*.onnx"):
        if stale != path:
            stale.unlink(missing_ok=True)


def convert(
    model: Any,
    input_shape: Sequence[int],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> OnnxModel:
    """Serve a CPU Chainer link through ONNX Runtime.

    :param model: the loaded :class:`chainer.Link` (on the CPU).
    :param input_shape: one input's shape without the batch axis, e.g.
        ``(3, 32, 32)``.
    :param cache_dir: where to keep ``smchainer-onnx-<key>.onnx`` (the model
        directory); ``None`` exports in memory every time.
    :param threads: intra-op threads; default :func:`intra_op_threads`.
    :raises smchainer_onnx.export.UnsupportedLayer: when the model cannot be
        exported faithfully.
    :raises OutputMismatch: when ONNX Runtime disagrees with Chainer.
    """
    from smchainer_onnx.export import export_onnx

    shape = tuple(int(d) for d in input_shape)
    threads = intra_op_threads() if threads is None else threads
    folder = Path(cache_dir) if cache_dir is not None else None
    cached = folder / f"{CACHE_PREFIX}{model_key(model, shape)[:24]}.onnx" if folder else None
    if cached is not None and cached.is_file():
        try:
            session = open_session(cached.read_bytes(), threads)
            check_agreement(session, model, shape)
        except Exception as error:  # a damaged or stale file: export again
            logger.warning("ignoring cached %s: %s", cached, error)
        else:
            logger.info("ONNX graph for %s loaded from %s", type(model).__name__, cached)
            return OnnxModel(session, model, shape, source=str(cached))
    rng = np.random.default_rng(1)
    exported = export_onnx(model, rng.random((TRACE_BATCH, *shape), dtype=np.float32))
    data = exported.SerializeToString()
    session = open_session(data, threads)
    difference = check_agreement(session, model, shape)
    logger.info("exported %s to ONNX (%d nodes, largest difference from Chainer %.2g)",
                type(model).__name__, len(exported.graph.node), difference)
    if cached is not None and folder is not None:
        _store(folder, cached, data)
    return OnnxModel(session, model, shape)
