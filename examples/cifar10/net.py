"""The VGG network of the SageMaker Chainer CIFAR-10 example, with a width and a depth.

``VGG(10)`` is the reference network (Chainer's ``examples/cifar``: 13 blocks
of 3x3 convolution without bias + batch normalisation + ReLU, dropout between
the convolutions of a stage, 2x2 max pooling after each stage, then a
512-unit layer and the classifier). ``width`` scales every layer's channels
and ``depth`` picks fewer convolutions per stage, for quick CPU runs.
"""
import chainer
import chainer.functions as F
import chainer.links as L

#: Convolutions per stage for each depth (convolutions + 2 linear layers + 1).
STAGES = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3)}
STAGE_CHANNELS = (64, 128, 256, 512, 512)


class Block(chainer.Chain):
    """3x3 convolution (no bias), batch normalisation, ReLU."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, out_channels, 3, pad=1, nobias=True)
            self.bn = L.BatchNormalization(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class VGG(chainer.Chain):
    """VGG for 3 x 32 x 32 images in [0, 1]; returns the logits."""

    def __init__(self, class_labels=10, width=1.0, depth=16):
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"depth must be one of {sorted(STAGES)}, not {depth}")
        self.stages = []
        in_channels = 3
        with self.init_scope():
            layout = zip(STAGES[depth], STAGE_CHANNELS, strict=True)
            for stage, (count, channels) in enumerate(layout):
                out_channels = max(1, round(channels * width))
                names = []
                for index in range(count):
                    name = f"block{stage + 1}_{index + 1}"
                    setattr(self, name, Block(in_channels, out_channels))
                    names.append(name)
                    in_channels = out_channels
                self.stages.append(names)
            hidden = max(1, round(512 * width))
            self.fc1 = L.Linear(in_channels, hidden, nobias=True)
            self.bn_fc1 = L.BatchNormalization(hidden)
            self.fc2 = L.Linear(hidden, class_labels, nobias=True)

    def forward(self, x):
        h = x
        for stage, names in enumerate(self.stages):
            for index, name in enumerate(names):
                h = self[name](h)
                if index < len(names) - 1:
                    h = F.dropout(h, ratio=0.3 if stage == 0 else 0.4)
            h = F.max_pooling_2d(h, ksize=2, stride=2)
        h = F.dropout(h, ratio=0.5)
        h = F.relu(self.bn_fc1(self.fc1(h)))
        h = F.dropout(h, ratio=0.5)
        return self.fc2(h)
