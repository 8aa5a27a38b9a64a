"""smchainer-onnx: serve Chainer models through ONNX Runtime on the CPU.

The plugin (:mod:`smchainer_onnx.plugin`, entry point ``onnx``) wraps
``model_fn``: a loaded Chainer link is exported to ONNX
(:mod:`smchainer_onnx.export`), checked against Chainer and answered by an
ONNX Runtime session (:mod:`smchainer_onnx.runtime`). A model it cannot
export faithfully is served by plain Chainer, with a warning.

Nothing heavy is imported here: the server imports this package when it
loads its plugins, and ONNX Runtime is only loaded for a model to convert.
Importing it imports :mod:`smchainer` first, so Chainer loads on NumPy 2.
"""
import smchainer  # noqa: F401  (installs Chainer's NumPy 2 compat before chainer loads)

__version__ = "0.1.0"
