"""Pieces of the trainer: hyperparameters, augmentation, schedules, data order."""
from __future__ import annotations

import math

import numpy as np
import pytest

from smchainer.default_plugins.vgg import data as vgg_data
from smchainer.default_plugins.vgg import extensions as vgg_ext
from smchainer.default_plugins.vgg import hyperparameters as vgg_hp
from smchainer.default_plugins.vgg import sampling as vgg_sampling
from smchainer.errors import SmchainerError
from tests.vgg import reference as former


def test_hyperparameters_take_strings_numbers_and_both_spellings() -> None:
    hp = vgg_hp.parse_hyperparameters({
        "batch_size": "32", "learning-rate": "0.1", "epochs": 3.0, "augment": "false",
        "lr_schedule": "cosine", "sagemaker_program": "ignored.py",
    })
    assert hp["batch-size"] == 32 and hp.batch_size == 32
    assert hp["learning-rate"] == 0.1 and hp["epochs"] == 3 and hp["augment"] is False
    assert hp["lr-schedule"] == "cosine"
    defaults = vgg_hp.parse_hyperparameters({})
    assert (defaults.epochs, defaults.batch_size, defaults.learning_rate) == (50, 64, 0.05)
    assert (defaults.momentum, defaults.weight_decay, defaults.lr_step_epochs) == (0.9, 5e-4, 25)


@pytest.mark.parametrize(
    "raw, message",
    [({"learnin-rate": 1}, "unknown hyperparameter 'learnin-rate'"),
     ({"epochs": "many"}, "epochs must be int"),
     ({"epochs": 1.5}, "epochs must be int"),
     ({"lr-schedule": "linear"}, "lr-schedule must be one of"),
     ({"batch-size": 0}, "batch-size must be at least 1")],
)
def test_bad_hyperparameters_are_named(raw, message) -> None:
    with pytest.raises(SmchainerError, match=message):
        vgg_hp.parse_hyperparameters(raw)


def test_augment_crops_and_flips_every_image() -> None:
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(64, 3, 32, 32)).astype(np.uint8)
    out = former.augment(images, np.random.default_rng(7))
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    flips = shifted = 0
    for image, source in zip(out, padded, strict=True):
        matches = [
            (top, left, flip)
            for top in range(9) for left in range(9) for flip in (False, True)
            if np.array_equal(
                image, (source[:, top:top + 32, left:left + 32])[..., ::-1 if flip else 1]
            )
        ]
        assert matches, "an augmented image is not a crop of the padded original"
        top, left, flip = matches[0]
        flips += flip
        shifted += (top, left) != (4, 4)
    assert 16 <= flips <= 48  # about half are mirrored
    assert shifted >= 50
    again = former.augment(images, np.random.default_rng(7))
    np.testing.assert_array_equal(out, again)


def test_learning_rate_schedules() -> None:
    step = vgg_hp.parse_hyperparameters({})
    assert vgg_ext.learning_rate(step, 0, 50) == 0.05
    assert vgg_ext.learning_rate(step, 24.99, 50) == 0.05
    assert vgg_ext.learning_rate(step, 25, 50) == 0.025  # halved every 25 epochs
    assert vgg_ext.learning_rate(step, 49.9, 50) == 0.025
    cosine = vgg_hp.parse_hyperparameters({"lr-schedule": "cosine", "learning-rate": 0.1})
    assert vgg_ext.learning_rate(cosine, 0, 10) == pytest.approx(0.1)
    assert vgg_ext.learning_rate(cosine, 5, 10) == pytest.approx(0.05)
    assert vgg_ext.learning_rate(cosine, 10, 10) == pytest.approx(0.0)
    cycle = vgg_hp.parse_hyperparameters({"lr-schedule": "onecycle", "learning-rate": 0.1})
    assert vgg_ext.learning_rate(cycle, 0, 10) == pytest.approx(0.1 / 25)
    assert vgg_ext.learning_rate(cycle, 3, 10) == pytest.approx(0.1)
    assert vgg_ext.learning_rate(cycle, 10, 10) == pytest.approx(1e-5)
    rates = [vgg_ext.learning_rate(cycle, e / 10, 10) for e in range(101)]
    peak = rates.index(max(rates))
    assert all(a <= b for a, b in zip(rates[:peak], rates[1:peak + 1], strict=True))
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1:], strict=False))
    assert not any(math.isnan(r) for r in rates)


def test_epoch_orders_depend_only_on_seed_and_previous_order() -> None:
    sampler = vgg_sampling.DerivedOrderSampler(seed=5)
    first = sampler(np.arange(100), 0)
    second = sampler(first, 0)
    assert sorted(first) == list(range(100)) and not np.array_equal(first, second)
    fresh = vgg_sampling.DerivedOrderSampler(seed=5)  # e.g. after a restart
    np.testing.assert_array_equal(fresh(first, 0), second)
    assert not np.array_equal(vgg_sampling.DerivedOrderSampler(seed=6)(np.arange(100), 0), first)
    other_rank = vgg_sampling.DerivedOrderSampler(seed=5, rank=1)
    assert not np.array_equal(other_rank(np.arange(100), 0), first)


def test_channel_statistics_match_numpy() -> None:
    images = np.random.RandomState(1).randint(0, 256, size=(50, 3, 8, 8)).astype(np.uint8)
    mean, std = vgg_data.channel_statistics(images, chunk=7)
    as_float = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, as_float.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, as_float.std(axis=(0, 2, 3)), rtol=1e-8)
