"""Channel data in the three layouts, and the decode cache."""
from __future__ import annotations

import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smchainer import datasets
from smchainer.datasets import DatasetError

from .conftest import zip_members

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def members(cifar10) -> list[tuple[str, bytes]]:
    """Four real JPEGs per class from the shared test.zip."""
    return zip_members(cifar10 / "test.zip", per_class=4)


def pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def expected_arrays(members) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([pil_decode(data) for _, data in members])
    labels = np.array([CLASSES.index(name.split("/")[-2]) for name, _ in members])
    return images, labels


def write_tree(root: Path, members, prefix: str = "") -> Path:
    for name, data in members:
        path = root / prefix / Path(*name.split("/")[-2:])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_zip(path: Path, members, top: str = "train") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members:
            archive.writestr(f"{top}/" + "/".join(name.split("/")[-2:]), data)
    return path


def test_class_folders_zip_and_npz_give_the_same_dataset(members, tmp_path) -> None:
    images, labels = expected_arrays(members)
    cache = tmp_path / "cache"

    tree = datasets.load_channel(write_tree(tmp_path / "tree", members), cache_dir=cache)
    zipped = datasets.load_channel(write_zip(tmp_path / "train.zip", members), cache_dir=cache)
    channel = tmp_path / "npz"
    channel.mkdir()
    np.savez(channel / "train.npz", data=images.astype(np.float32) / 255, labels=labels)
    np.savez(channel / "test.npz", data=images[:3].astype(np.float32) / 255, labels=labels[:3])
    from_npz = datasets.load_channel(channel, "train")

    for dataset in (tree, zipped, from_npz):
        assert dataset.class_names == CLASSES
        assert dataset.images.dtype == np.uint8 and dataset.images.shape == (40, 3, 32, 32)
        np.testing.assert_array_equal(dataset.images, images)
        np.testing.assert_array_equal(dataset.labels, labels)
    assert len(datasets.load_channel(channel, "test")) == 3  # test.npz picked by split


def test_zip_and_tree_holding_both_splits_give_the_asked_one(members, tmp_path) -> None:
    train_part, test_part = members[::2], members[1::2]
    archive = tmp_path / "both.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for top, part in (("train", train_part), ("test", test_part)):
            for name, data in part:
                out.writestr(f"{top}/" + "/".join(name.split("/")[-2:]), data)
    test = datasets.load_channel(archive, "test", use_cache=False)
    np.testing.assert_array_equal(test.images, expected_arrays(test_part)[0])

    tree = tmp_path / "tree"
    write_tree(tree, train_part, "train")
    write_tree(tree, test_part, "test")
    train = datasets.load_channel(tree, "train", use_cache=False)
    np.testing.assert_array_equal(train.images, expected_arrays(train_part)[0])


def test_png_and_odd_sizes_are_decoded_to_32x32(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("L", (32, 32), 200).save(tmp_path / "a" / "grey.png")
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "b" / "big.png")
    dataset = datasets.load_channel(tmp_path, use_cache=False)
    assert dataset.class_names == ["a", "b"]
    assert dataset.images.shape == (2, 3, 32, 32)
    assert (dataset.images[0] == 200).all()
    np.testing.assert_array_equal(dataset.images[1, :, 5, 5], [10, 20, 30])


def test_second_load_comes_from_the_cache(members, tmp_path, caplog) -> None:
    archive = write_zip(tmp_path / "train.zip", members)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="smchainer.datasets"):
        first = datasets.load_channel(archive, cache_dir=cache)
        assert "decoded 40 images" in caplog.text
        caplog.clear()
        second = datasets.load_channel(archive, cache_dir=cache)
        assert "from the cache" in caplog.text and "decoded" not in caplog.text
    files = list(cache.glob("train.zip-*.npz"))
    assert len(files) == 1
    np.testing.assert_array_equal(first.images, second.images)

    # A copy elsewhere (a re-downloaded channel) has the same members: same entry.
    copy = tmp_path / "elsewhere" / "train.zip"
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    with caplog.at_level(logging.INFO, logger="smchainer.datasets"):
        caplog.clear()
        datasets.load_channel(copy, cache_dir=cache)
        assert "from the cache" in caplog.text


def test_a_changed_zip_member_invalidates_the_cache(members, tmp_path) -> None:
    archive = write_zip(tmp_path / "train.zip", members)
    cache = tmp_path / "cache"
    before = datasets.load_channel(archive, cache_dir=cache)
    # Same names, one image swapped for another class's picture: a new CRC.
    swapped = list(members)
    swapped[0] = (members[0][0], members[-1][1])
    write_zip(archive, swapped)
    after = datasets.load_channel(archive, cache_dir=cache)
    np.testing.assert_array_equal(after.images[0], pil_decode(members[-1][1]))
    assert not np.array_equal(after.images[0], before.images[0])
    assert len(list(cache.glob("train.zip-*.npz"))) == 2


def test_a_changed_folder_invalidates_the_cache(members, tmp_path, caplog) -> None:
    tree = write_tree(tmp_path / "tree", members)
    cache = tmp_path / "cache"
    assert len(datasets.load_channel(tree, cache_dir=cache)) == 40
    extra = tree / "cat" / "extra.jpg"
    extra.write_bytes(members[0][1])
    again = datasets.load_channel(tree, cache_dir=cache)
    assert len(again) == 41 and (again.labels == CLASSES.index("cat")).sum() == 5
    # Rewriting a file (new mtime) is a change too.
    target = tree / "cat" / "extra.jpg"
    target.write_bytes(members[1][1])
    os.utime(target, ns=(1, 1))
    with caplog.at_level(logging.INFO, logger="smchainer.datasets"):
        third = datasets.load_channel(tree, cache_dir=cache)
        assert "decoded 41 images" in caplog.text
    cat_images = third.images[third.labels == CLASSES.index("cat")]
    assert any(np.array_equal(image, pil_decode(members[1][1])) for image in cat_images)


def test_cache_folder_defaults_to_the_user_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SMCHAINER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.cache_directory() == tmp_path / "xdg" / "smchainer" / "datasets"
    monkeypatch.setenv("SMCHAINER_CACHE_DIR", str(tmp_path / "mine"))
    assert datasets.cache_directory() == tmp_path / "mine"
    assert datasets.cache_directory(tmp_path / "explicit") == tmp_path / "explicit"


def test_holdout_and_sampling_are_deterministic(members, tmp_path) -> None:
    dataset = datasets.load_channel(write_tree(tmp_path / "tree", members), use_cache=False)
    train, held = datasets.split_holdout(dataset, 0.25, seed=3)
    assert (len(train), len(held)) == (30, 10)
    again_train, again_held = datasets.split_holdout(dataset, 0.25, seed=3)
    np.testing.assert_array_equal(held.images, again_held.images)
    other_train, _ = datasets.split_holdout(dataset, 0.25, seed=4)
    assert not np.array_equal(train.labels, other_train.labels) or not np.array_equal(
        train.images, other_train.images
    )
    both = np.concatenate([train.images, held.images]).reshape(40, -1)
    assert len(np.unique(both, axis=0)) == len(np.unique(dataset.images.reshape(40, -1), axis=0))
    np.testing.assert_array_equal(dataset.sample(12, 5).images, dataset.sample(12, 5).images)
    assert len(dataset.sample(12, 5)) == 12


def test_test_classes_are_renumbered_to_the_training_classes(members, tmp_path) -> None:
    cats_and_ships = [m for m in members if m[0].split("/")[-2] in ("cat", "ship")]
    test = datasets.load_channel(write_tree(tmp_path / "t", cats_and_ships), use_cache=False)
    assert test.class_names == ["cat", "ship"]
    aligned = datasets.align_classes(test, CLASSES)
    assert sorted(set(aligned.labels.tolist())) == [3, 8]
    with pytest.raises(DatasetError, match="not among the training classes"):
        datasets.align_classes(test, ["cat", "dog"])


def test_bad_channels_are_clear_errors(tmp_path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.load_channel(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .jpg/.jpeg/.png images"):
        datasets.load_channel(tmp_path / "empty", use_cache=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "train.npz", data=np.zeros((2, 3, 28, 28), np.float32), labels=[0, 1])
    with pytest.raises(DatasetError, match="N x 3 x 32 x 32"):
        datasets.load_channel(bad)
    np.savez(bad / "train.npz", data=np.full((2, 3, 32, 32), 255.0, np.float32), labels=[0, 1])
    with pytest.raises(DatasetError, match=r"scaled to \[0, 1\]"):
        datasets.load_channel(bad)
    np.savez(bad / "train.npz", images=np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(DatasetError, match="'data' and 'labels'"):
        datasets.load_channel(bad)
    (tmp_path / "broken" / "cat").mkdir(parents=True)
    (tmp_path / "broken" / "cat" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="cannot decode image"):
        datasets.load_channel(tmp_path / "broken", use_cache=False)
