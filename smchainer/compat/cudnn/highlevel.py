"""The high-level ``cupy.cudnn`` module for Chainer 7.8.1, on cuDNN 9 through ctypes.

The functions Chainer calls, with CuPy 7-13's signatures and results:
handles and workspace limits, descriptors, convolution (2-D and N-d, groups,
dilation, NCHW/NHWC, auto-tuning, determinism), batch normalization, pooling,
activations and softmax. RNNs, dropout states and the spatial transformer
are not bound: the hook in :mod:`smchainer.compat` sends those Chainer
functions down their own (non-cuDNN) path, and calling them here raises
``NotImplementedError``.
"""
from __future__ import annotations

import atexit
from typing import Any

from smchainer.compat.cudnn import libcudnn
from smchainer.compat.cudnn._context import (
    get_handle,
    get_max_workspace_size,
    is_tensor_core_available,
    reset_handles,
    set_max_workspace_size,
)
from smchainer.compat.cudnn._descriptors import (
    Descriptor,
    create_activation_descriptor,
    create_convolution_descriptor,
    create_filter_descriptor,
    create_pooling_descriptor,
    create_tensor_descriptor,
    create_tensor_nd_descriptor,
    create_uninitialized_tensor_descriptor,
    get_data_type,
)
from smchainer.compat.cudnn._ops import (
    activation_backward,
    activation_forward,
    pooling_backward,
    pooling_forward,
    softmax_backward,
    softmax_forward,
)
from smchainer.compat.cudnn.convolution import (
    convolution_backward_data,
    convolution_backward_filter,
    convolution_forward,
)
from smchainer.compat.cudnn.normalization import (
    batch_normalization_backward,
    batch_normalization_forward_inference,
    batch_normalization_forward_training,
    batch_normalization_forward_training_ex,
)

__all__ = [
    "Descriptor", "get_handle", "reset_handles", "get_max_workspace_size",
    "set_max_workspace_size", "get_data_type", "is_tensor_core_available",
    "create_tensor_descriptor", "create_uninitialized_tensor_descriptor",
    "create_tensor_nd_descriptor", "create_filter_descriptor",
    "create_convolution_descriptor", "create_pooling_descriptor",
    "create_activation_descriptor", "convolution_forward", "convolution_backward_data",
    "convolution_backward_filter", "batch_normalization_forward_training",
    "batch_normalization_forward_training_ex", "batch_normalization_forward_inference",
    "batch_normalization_backward", "pooling_forward", "pooling_backward",
    "activation_forward", "activation_backward", "softmax_forward", "softmax_backward",
    "getVersion", "BINDING",
]

#: How this module describes itself in version reports.
BINDING = "smchainer ctypes binding"
getVersion = libcudnn.getVersion

atexit.register(reset_handles)


class _NotBound:
    """A cuDNN feature this binding leaves out: Chainer uses its own path instead."""

    def __init__(self, name: str) -> None:
        self.__name__ = self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"cupy.cudnn.{self._name} is not provided by the {BINDING}; Chainer's own "
            "implementation is used for this function (see smchainer.compat.cudnn)")


DropoutStates = _NotBound("DropoutStates")
create_dropout_states = _NotBound("create_dropout_states")
create_dropout_descriptor = _NotBound("create_dropout_descriptor")
create_rnn_descriptor = _NotBound("create_rnn_descriptor")
get_rnn_lin_layer_matrix_params = _NotBound("get_rnn_lin_layer_matrix_params")
get_rnn_lin_layer_bias_params = _NotBound("get_rnn_lin_layer_bias_params")
rnn_forward_inference = _NotBound("rnn_forward_inference")
rnn_forward_training = _NotBound("rnn_forward_training")
rnn_backward_data = _NotBound("rnn_backward_data")
rnn_backward_weights = _NotBound("rnn_backward_weights")
create_spatial_transformer_descriptor = _NotBound("create_spatial_transformer_descriptor")
