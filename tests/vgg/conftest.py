"""Small real CIFAR-10 data for the VGG trainer tests, built once per session.

Everything comes from the shared ``test.zip`` (10,000 JPEGs): it is decoded
once into a session cache folder, and tests draw disjoint slices from it.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from smchainer import datasets


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory) -> Path:
    """A decode-cache folder shared by the session's tests."""
    return tmp_path_factory.mktemp("cifar-cache")


@pytest.fixture(scope="session")
def cifar_test_set(shared_dir, cifar_cache) -> datasets.ImageDataset:
    """The shared CIFAR-10 test.zip, decoded (10,000 images)."""
    zip_path = shared_dir / "data" / "cifar10" / "test.zip"
    if not zip_path.exists():
        pytest.skip(f"CIFAR-10 not found at {zip_path.parent} (set SMCHAINER_SHARED)")
    return datasets.load_channel(zip_path, "test", cache_dir=cifar_cache)


@pytest.fixture(scope="session")
def cifar_npz_channels(tmp_path_factory, cifar_test_set) -> dict[str, Path]:
    """SageMaker-example channels: train.npz (4,000 images) and test.npz (1,000 others)."""
    folder = tmp_path_factory.mktemp("npz-channels")
    order = np.random.RandomState(1234).permutation(len(cifar_test_set))
    channels = {}
    for name, indices in (("train", order[:4000]), ("test", order[4000:5000])):
        part = cifar_test_set.subset(np.sort(indices))
        (folder / name).mkdir()
        np.savez(
            folder / name / f"{name}.npz",
            data=part.images.astype(np.float32) / 255,
            labels=part.labels,
        )
        channels[name] = folder / name
    return channels


def zip_members(zip_path: Path, per_class: int) -> list[tuple[str, bytes]]:
    """``per_class`` JPEGs of each class from a CIFAR zip, as (name, bytes)."""
    chosen: dict[str, list[tuple[str, bytes]]] = {}
    with zipfile.ZipFile(zip_path) as archive:
        for name in sorted(archive.namelist()):
            if not name.endswith(".jpg"):
                continue
            label = name.split("/")[-2]
            picked = chosen.setdefault(label, [])
            if len(picked) < per_class:
                picked.append((name, archive.read(name)))
    return [item for label in sorted(chosen) for item in chosen[label]]
