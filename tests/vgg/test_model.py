"""The VGG network: the reference architecture's size, shapes and saved normalisation."""
from __future__ import annotations

import chainer
import numpy as np
import pytest
from chainer import serializers

from smchainer.models.vgg import CIFAR10_MEAN, STAGES, VGG, count_parameters


def test_vgg16_has_the_reference_parameter_count() -> None:
    model = VGG()
    # 13 conv + BN blocks, FC 512 + BN, FC 10: the Chainer CIFAR example's 15.0 M.
    assert count_parameters(model) == 14_987_200
    convs = [link for link in model.links() if isinstance(link, chainer.links.Convolution2D)]
    assert len(convs) == 13
    assert all(conv.b is None for conv in convs)
    assert [conv.out_channels for conv in convs] == [64, 64, 128, 128] + [256] * 3 + [512] * 6


@pytest.mark.parametrize("depth", sorted(STAGES))
def test_every_depth_maps_images_to_class_logits(depth) -> None:
    model = VGG(n_classes=7, width=0.125, depth=depth)
    x = np.random.RandomState(0).rand(5, 3, 32, 32).astype(np.float32)
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        first = model(x).array
        second = model(x).array
    assert first.shape == (5, 7) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)  # no dropout at inference
    convs = sum(isinstance(link, chainer.links.Convolution2D) for link in model.links())
    assert convs == sum(STAGES[depth])


def test_width_scales_channels_and_shrinks_the_model() -> None:
    small = VGG(width=0.25)
    assert [c.out_channels for c in small.links() if isinstance(c, chainer.links.Convolution2D)][
        :3
    ] == [16, 16, 32]
    assert count_parameters(small) < count_parameters(VGG()) / 10


def test_normalisation_is_part_of_the_saved_model(tmp_path) -> None:
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    model = VGG(width=0.125, depth=8, mean=mean, std=std)
    x = np.full((1, 3, 32, 32), 0.5, dtype=np.float32)
    normalized = model.normalize(x).array
    np.testing.assert_allclose(normalized[0, :, 0, 0], [0.8, 1.2, 1.6], rtol=1e-6)
    serializers.save_npz(tmp_path / "m.npz", model)
    with np.load(tmp_path / "m.npz") as saved:
        np.testing.assert_allclose(saved["mean"], mean, rtol=1e-7)
        np.testing.assert_allclose(saved["std"], std, rtol=1e-7)
    loaded = VGG(width=0.125, depth=8)  # CIFAR defaults until the file is loaded
    np.testing.assert_allclose(loaded.mean, CIFAR10_MEAN, rtol=1e-6)
    serializers.load_npz(tmp_path / "m.npz", loaded)
    np.testing.assert_allclose(loaded.mean, mean, rtol=1e-7)
    with chainer.using_config("train", False):
        np.testing.assert_array_equal(loaded(x).array, model(x).array)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"depth": 12}, "depth"), ({"width": 0}, "width"), ({"std": [1, 0, 1]}, "std"),
     ({"mean": [0.5, 0.5]}, "mean")],
)
def test_bad_options_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        VGG(**kwargs)
