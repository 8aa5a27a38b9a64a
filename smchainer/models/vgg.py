"""The Chainer CIFAR-10 VGG network, with its input normalisation inside.

Same layers as Chainer's ``examples/cifar`` VGG (the network of the SageMaker
Chainer CIFAR-10 example): 3x3 convolutions without bias, each followed by
batch normalisation and ReLU, dropout between the convolutions of a stage
(0.3 in the first stage, 0.4 after), 2x2 max pooling after each stage, then
dropout 0.5, a 512-unit linear layer without bias + batch norm + ReLU,
dropout 0.5 and the classifier layer. ``depth=16`` with ``width=1.0`` is the
reference network (about 15.0 M parameters); other depths and widths give
smaller or larger members of the family for quick runs.

The per-channel mean and standard deviation are persistent arrays of the
model, so they are saved in ``model.npz`` and clients send plain float32
images in [0, 1].

Two switches change how the same network runs, not what it is (neither is
saved): ``fused`` runs it channels-last through
:mod:`smchainer.functions.channels_last` (fused kernels for convolution,
batch normalisation + ReLU + dropout and pooling; same parameters, same
results within float32 rounding): True, False, or None (the default) for
:func:`~smchainer.functions.channels_last.fused_by_default` on the device of
each input; and ``dropout_scale`` multiplies every dropout rate (0 turns
dropout off).
"""
from __future__ import annotations

from collections.abc import Sequence

# Inside the smchainer package, so its compat hook is installed before chainer loads.
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from smchainer.functions import channels_last

#: Convolutions per stage for each supported depth (conv layers + 2 linear + 1).
STAGES: dict[int, tuple[int, ...]] = {
    8: (1, 1, 1, 1, 1),
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
#: Channels of each stage at ``width=1.0``.
STAGE_WIDTHS = (64, 128, 256, 512, 512)
HIDDEN_UNITS = 512
INPUT_SHAPE = (3, 32, 32)
#: CIFAR-10 training-set statistics of images scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class ConvBlock(chainer.Chain):
    """A 3x3 convolution (no bias), batch normalisation and ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, out_channels, 3, pad=1, nobias=True)
            self.bn = L.BatchNormalization(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class VGG(chainer.Chain):
    """VGG for 32 x 32 RGB images; ``forward`` returns logits.

    :param n_classes: outputs of the last layer.
    :param width: multiplier of every layer's channels (at least 1 channel).
    :param depth: one of :data:`STAGES` (16 is the reference network).
    :param mean: per-channel mean subtracted from the [0, 1] input;
        defaults to the CIFAR-10 statistics.
    :param std: per-channel standard deviation the input is divided by.
    """

    def __init__(
        self,
        n_classes: int = 10,
        width: float = 1.0,
        depth: int = 16,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"VGG depth must be one of {sorted(STAGES)}, not {depth!r}")
        if not width > 0:
            raise ValueError(f"VGG width must be positive, not {width!r}")
        if n_classes < 1:
            raise ValueError(f"VGG needs at least one class, not {n_classes!r}")
        self.n_classes = int(n_classes)
        self.width = float(width)
        self.depth = int(depth)
        self.add_persistent("mean", _channel_vector(CIFAR10_MEAN if mean is None else mean, "mean"))
        self.add_persistent("std", _channel_vector(CIFAR10_STD if std is None else std, "std"))
        if np.any(self.std <= 0):
            raise ValueError("VGG std must be positive in every channel")
        #: Run channels-last with smchainer's fused kernels: True, False, or None for the
        #: default of the input's device (see the module docstring).
        self.fused: bool | None = None
        #: Multiplier of every dropout rate (0: no dropout).
        self.dropout_scale = 1.0
        hidden = max(1, round(HIDDEN_UNITS * width))
        #: ``[[block name, ...] per stage]``, in forward order.
        self.stage_blocks: list[list[str]] = []
        in_channels = INPUT_SHAPE[0]
        with self.init_scope():
            layout = zip(STAGES[depth], STAGE_WIDTHS, strict=True)
            for stage, (count, channels) in enumerate(layout, 1):
                out_channels = max(1, round(channels * width))
                names = []
                for index in range(1, count + 1):
                    name = f"block{stage}_{index}"
                    setattr(self, name, ConvBlock(in_channels, out_channels))
                    names.append(name)
                    in_channels = out_channels
                self.stage_blocks.append(names)
            self.fc1 = L.Linear(in_channels, hidden, nobias=True)
            self.bn_fc1 = L.BatchNormalization(hidden)
            self.fc2 = L.Linear(hidden, n_classes, nobias=True)

    def normalize(self, x):
        """``(x - mean) / std`` per channel, as Chainer functions (traceable for export)."""
        mean, scale = self._mean_and_scale(x)
        shape = x.shape
        return (x - F.broadcast_to(mean, shape)) * F.broadcast_to(scale, shape)

    def _mean_and_scale(self, x):
        """The mean and ``1 / std`` as 1 x C x 1 x 1 arrays of ``x``'s kind and dtype."""
        xp = chainer.backend.get_array_module(x)
        dtype = getattr(x, "dtype", np.float32)
        mean = xp.asarray(self.mean, dtype=dtype).reshape(1, -1, 1, 1)
        scale = (1 / xp.asarray(self.std, dtype=dtype)).reshape(1, -1, 1, 1)
        return mean, scale

    def forward(self, x):
        """Logits (N x n_classes) of float32 images N x 3 x 32 x 32 in [0, 1]."""
        fused = self.fused
        if fused is None:
            array = x.array if isinstance(x, chainer.Variable) else x
            on_gpu = chainer.backend.get_array_module(array) is not np
            fused = channels_last.fused_by_default(on_gpu)
        if fused:
            return self._forward_channels_last(x)
        h = self.normalize(x)
        for stage, names in enumerate(self.stage_blocks):
            for position, name in enumerate(names):
                h = getattr(self, name)(h)
                if position < len(names) - 1:
                    h = self._dropout(h, 0.3 if stage == 0 else 0.4)
            h = F.max_pooling_2d(h, ksize=2, stride=2)
        return self._head(h)

    def _forward_channels_last(self, x):
        if isinstance(x, chainer.Variable) and x.requires_grad:
            h = F.transpose(self.normalize(x), (0, 2, 3, 1))
        else:  # a constant input: normalise it with plain array operations, off the graph
            array = x.array if isinstance(x, chainer.Variable) else x
            mean, scale = self._mean_and_scale(array)
            h = ((array - mean) * scale).transpose(0, 2, 3, 1)
        for stage, names in enumerate(self.stage_blocks):
            for position, name in enumerate(names):
                block = getattr(self, name)
                # dropout inside the fused function, between the convolutions of a stage
                ratio = (0.3 if stage == 0 else 0.4) if position < len(names) - 1 else 0.0
                h = channels_last.batch_norm_relu(
                    channels_last.conv3x3(h, block.conv.W), block.bn,
                    dropout=ratio * self.dropout_scale,
                )
            h = channels_last.max_pool_2x2(h)
        if h.shape[1:3] != (1, 1):  # flatten in the NCHW order fc1's weights expect
            h = F.transpose(h, (0, 3, 1, 2))
        h = F.reshape(h, (h.shape[0], -1))
        h = self._dropout(h, 0.5)
        h = channels_last.batch_norm_relu(self.fc1(h), self.bn_fc1,
                                          dropout=0.5 * self.dropout_scale)
        return self.fc2(h)

    def _head(self, h):
        h = self._dropout(h, 0.5)
        h = F.relu(self.bn_fc1(self.fc1(h)))
        h = self._dropout(h, 0.5)
        return self.fc2(h)

    def _dropout(self, h, ratio: float):
        ratio *= self.dropout_scale
        return F.dropout(h, ratio=ratio) if ratio > 0 else h


def _channel_vector(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.shape != (INPUT_SHAPE[0],):
        raise ValueError(f"VGG {name} needs {INPUT_SHAPE[0]} values (one per channel)")
    return array


def count_parameters(model: chainer.Link) -> int:
    """Trainable parameters of ``model`` (batch-norm statistics excluded)."""
    return sum(param.size for param in model.params())
