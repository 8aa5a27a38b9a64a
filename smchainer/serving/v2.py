"""The Open Inference Protocol (KServe v2 REST) beside SageMaker's routes.

KServe, Triton and their clients speak it; ``smchainer-serve`` answers it for
its one model, named by ``--model-name`` (default ``model``):

- ``GET /v2``: the server's name, version and extensions;
- ``GET /v2/health/live``, ``GET /v2/health/ready`` (see the app);
- ``GET /v2/models/{name}`` (``/versions/{v}`` allowed): the model's inputs
  and outputs, from its ``smchainer-model.json`` where it has one;
- ``GET /v2/models/{name}/ready``;
- ``POST /v2/models/{name}/infer``: one input tensor in, one output tensor out,
  as JSON (``{"name", "datatype", "shape", "data"}``) or with the binary tensor
  extension (``Inference-Header-Content-Length``; ``binary_data`` per output).

An inference goes through the same hooks and limits as ``/invocations``: the
input tensor is handed to ``input_fn`` as ``application/x-npy`` and the answer
asked for as ``application/x-npy``, so a SageMaker script's ``input_fn`` /
``predict_fn`` / ``output_fn`` serve both protocols unchanged. Errors are the
protocol's ``{"error": "..."}`` (with ``status`` beside it, as every error of
this server).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from smchainer.errors import BadRequest

#: The protocol's datatypes and NumPy's (BYTES, strings, is not served).
DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
_NAMES = {np.dtype(kind): name for name, kind in DATATYPES.items()}
#: The header that says how long the JSON part of a binary-extension body is.
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
DEFAULT_INPUT = "input"
DEFAULT_OUTPUT = "output"


def datatype_of(dtype: Any) -> str:
    """The protocol's name of a NumPy dtype."""
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise BadRequest(f"the answer's dtype {np.dtype(dtype)} has no Open Inference "
                         "Protocol datatype") from None


@dataclass
class InferRequest:
    """The one input tensor of a request, its id, and how each output is wanted."""

    array: np.ndarray
    input_name: str
    id: str | None
    binary_outputs: dict[str, bool]
    binary_default: bool


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise BadRequest(f"a tensor's shape must be a list of whole numbers >= 0, not {value!r}")
    return tuple(value)


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """A ``/v2/models/{name}/infer`` body as its input tensor (JSON or binary extension)."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
        if not 0 <= length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} {length} does not fit a body of {len(body)} "
                             "bytes")
        head, binary = body[:length], memoryview(body)[length:]
    else:
        head, binary = body, memoryview(b"")
    try:
        request = json.loads(head)
    except ValueError as error:
        raise BadRequest(f"the inference request is not JSON: {error}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("the inference request needs 'inputs': a list of tensors")
    inputs = request["inputs"]
    if len(inputs) != 1:
        raise BadRequest(f"this model takes one input tensor, not {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise BadRequest("an input tensor must be an object with name, datatype, shape, data")
    name = tensor.get("name")
    datatype = tensor.get("datatype")
    if not isinstance(name, str) or datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: datatype {datatype!r} is not one of "
                         f"{', '.join(DATATYPES)}")
    shape = _shape(tensor.get("shape"))
    dtype = np.dtype(DATATYPES[datatype])
    count = math.prod(shape)  # Python ints: a huge shape cannot overflow into a 500
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize or size > len(binary):
            raise BadRequest(f"input {name!r}: binary_data_size {size!r} does not match shape "
                             f"{list(shape)} of {datatype} or the {len(binary)} bytes sent")
        array = np.frombuffer(binary[:size], dtype=dtype).reshape(shape)
    else:
        try:
            array = np.asarray(tensor.get("data"), dtype=dtype)
        except (TypeError, ValueError, OverflowError) as error:
            raise BadRequest(f"input {name!r}: data is not {datatype}: {error}") from None
        if array.size != count:
            raise BadRequest(f"input {name!r}: {array.size} values for shape {list(shape)}")
        array = array.reshape(shape)
    wanted = request.get("outputs") or []
    binary_outputs = {}
    for output in wanted if isinstance(wanted, list) else []:
        if isinstance(output, dict) and isinstance(output.get("name"), str):
            flags = output.get("parameters") or {}
            binary_outputs[output["name"]] = bool(isinstance(flags, dict)
                                                  and flags.get("binary_data"))
    request_flags = request.get("parameters") or {}
    binary_default = bool(isinstance(request_flags, dict)
                          and request_flags.get("binary_data_output"))
    request_id = request.get("id")
    return InferRequest(array, name, None if request_id is None else str(request_id),
                        binary_outputs, binary_default)


class PendingInfer:
    """An ``infer`` body on its way to the hooks: parsed where the inference runs.

    The parse (the JSON tensors especially: a millisecond or more an image)
    happens on the worker's inference thread, by :meth:`unwrap`, never on
    the event loop that reads other clients' requests; its error is the
    request's 400. :attr:`request` then holds what the answer needs.
    """

    def __init__(self, body: bytes, header_length: str | None) -> None:
        self.body = body
        self.header_length = header_length
        self.request: InferRequest | None = None

    def unwrap(self) -> bytes:
        """The input tensor as the ``application/x-npy`` body ``input_fn`` is given."""
        self.request = parse_infer(self.body, self.header_length)
        self.body = b""
        return npy_bytes(self.request.array)

    def answer(self, model_name: str, output: np.ndarray) -> tuple[bytes, list[tuple[str, str]]]:
        """The response of the unwrapped request (:func:`infer_response`)."""
        assert self.request is not None, "answered before it was unwrapped"
        return infer_response(model_name, self.request, output)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def infer_response(model_name: str, request: InferRequest, output: np.ndarray,
                   output_name: str = DEFAULT_OUTPUT) -> tuple[bytes, list[tuple[str, str]]]:
    """The response body (JSON, or JSON then binary) and its extra headers."""
    output = np.asarray(output)
    binary = request.binary_outputs.get(output_name, request.binary_default)
    tensor: dict[str, Any] = {"name": output_name, "datatype": datatype_of(output.dtype),
                              "shape": list(output.shape)}
    payload = b""
    if binary:
        payload = np.ascontiguousarray(output).tobytes()
        tensor["parameters"] = {"binary_data_size": len(payload)}
    else:
        tensor["data"] = output.reshape(-1).tolist()
    response: dict[str, Any] = {"model_name": model_name, "outputs": [tensor]}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response).encode()
    if not binary:
        return head, []
    return head + payload, [(HEADER_LENGTH, str(len(head)))]


def model_metadata(model_name: str, contract: Any) -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs from the model's contract where it has one."""
    input_shape: list[int] = [-1]
    datatype = "FP32"
    if contract is not None and contract.present:
        shape = contract.input_shape
        if shape:
            input_shape = [-1, *shape]
        dtype = contract.input.get("dtype")
        if dtype:
            try:
                datatype = datatype_of(dtype)
            except (BadRequest, TypeError):
                pass
    return {
        "name": model_name, "versions": ["1"], "platform": "chainer",
        "inputs": [{"name": DEFAULT_INPUT, "datatype": datatype, "shape": input_shape}],
        "outputs": [{"name": DEFAULT_OUTPUT, "datatype": "FP32", "shape": [-1, -1]}],
    }
