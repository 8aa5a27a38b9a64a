"""Image classification data from a training channel, decoded once and cached.

A channel (a folder, or a file given as the channel) may hold:

``train.npz`` / ``test.npz``
    The SageMaker Chainer CIFAR-10 example's format: ``data`` float32
    N x 3 x 32 x 32 in [0, 1] (uint8 and N x 32 x 32 x 3 are accepted too)
    and ``labels``; optional ``class_names``. A folder with a single ``.npz``
    uses that one.
image class folders
    ``<class>/<file>.jpg|jpeg|png`` at any depth: the class is the image's
    parent folder. If the top folders are split names (``train/``,
    ``test/``), only the requested split is read.
a zip of class folders
    The same layout inside a ``.zip`` (``train/<class>/<NNNN>.jpg``, as in
    the shared CIFAR-10 copy).

Whatever the layout, the result is an :class:`ImageDataset`: uint8 images
N x 3 x 32 x 32, int32 labels and the sorted class names.

Decoding tens of thousands of JPEGs costs seconds per run, so decoded zips and
folders are cached as one uncompressed ``.npz`` in the cache folder (see
:func:`cache_directory`). The cache file's name carries a key computed from
the source: for a zip, the member names, sizes and CRC-32s from its central
directory (a re-downloaded copy of the same zip hits the cache, any changed
member misses it); for a folder, every image's relative path, size and
modification time. A changed source therefore gets a new key and is decoded
again; stale cache files are never read and may be deleted at any time.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path, PurePosixPath

import numpy as np

from smchainer.errors import SmchainerError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_SHAPE = (3, 32, 32)
#: Bumped when the decoded format changes, so old cache files are not read.
CACHE_VERSION = 1
#: Below this many images one process decodes faster than a pool starts.
POOL_THRESHOLD = 20000
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


class DatasetError(SmchainerError):
    """A channel's data is missing, unreadable or not image classification data."""


@dataclass
class ImageDataset:
    """Images (uint8 N x 3 x 32 x 32), labels (int32 N) and class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageDataset:
        """The images at ``indices``, as a new dataset with the same classes."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageDataset(
            self.images[indices], self.labels[indices], list(self.class_names), self.source
        )

    def sample(self, count: int, seed: int) -> ImageDataset:
        """``count`` images drawn without replacement, deterministic in ``seed``."""
        if count <= 0 or count >= len(self):
            return self
        order = np.random.RandomState(seed).permutation(len(self))[:count]
        return self.subset(np.sort(order))


def cache_directory(explicit: str | os.PathLike | None = None) -> Path:
    """Where decoded datasets are cached.

    ``explicit`` if given, else ``$SMCHAINER_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/smchainer/datasets`` (``~/.cache/smchainer/datasets``).
    A user folder rather than "next to the data", because channels are often
    read-only (mounted or shared data) or fresh downloads that a cache beside
    them would not outlive.
    """
    if explicit:
        return Path(explicit)
    if os.environ.get("SMCHAINER_CACHE_DIR"):
        return Path(os.environ["SMCHAINER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smchainer" / "datasets"


def load_channel(
    path: str | os.PathLike,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    workers: int | None = None,
) -> ImageDataset:
    """Load the image classification data of one channel.

    :param path: the channel folder, or a ``.npz`` / ``.zip`` file.
    :param split: ``"train"`` or ``"test"``: picks ``<split>.npz`` in a
        folder with several, and the ``<split>/`` top folder of a tree or zip
        holding both.
    :param cache_dir: see :func:`cache_directory`.
    :param use_cache: read and write the decode cache.
    :param workers: decoding processes; default: the CPU count for large
        sources (at least :data:`POOL_THRESHOLD` images), else one.
    :raises DatasetError: when nothing usable is there.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"channel data {str(path)!r} does not exist")
    kind, source = _resolve(path, split)
    if kind == "npz":
        return load_npz(source)
    entries = _zip_entries(source) if kind == "zip" else _folder_entries(source)
    entries = _only_split(entries, split)
    if not entries:
        raise DatasetError(f"{str(source)!r} holds no .jpg/.jpeg/.png images in class folders")
    key = _cache_key(kind, source, entries)
    cache_file = cache_directory(cache_dir) / f"{_safe_name(source)}-{key[:24]}.npz"
    if use_cache:
        cached = _read_cache(cache_file, key)
        if cached is not None:
            logger.info("%s: %d images from the cache %s", source, len(cached), cache_file)
            cached.source = str(source)
            return cached
    started = time.monotonic()
    dataset = _decode(kind, source, entries, workers)
    logger.info(
        "%s: decoded %d images of %d classes in %.1f s",
        source, len(dataset), len(dataset.class_names), time.monotonic() - started,
    )
    if use_cache:
        _write_cache(cache_file, key, dataset)
    return dataset


def load_npz(path: str | os.PathLike) -> ImageDataset:
    """Read a SageMaker-example ``.npz`` (``data`` + ``labels``) as uint8 images."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            data_key = next((k for k in ("data", "images", "x") if k in keys), None)
            label_key = next((k for k in ("labels", "label", "y") if k in keys), None)
            if data_key is None or label_key is None:
                raise DatasetError(
                    f"{str(path)!r} must hold arrays 'data' and 'labels' (it has {sorted(keys)})"
                )
            data, labels = archive[data_key], archive[label_key]
            names = [str(n) for n in archive["class_names"]] if "class_names" in keys else None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{str(path)!r} is not a readable .npz: {error}") from None
    images = _to_uint8_nchw(data, path)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise DatasetError(f"{str(path)!r}: {len(images)} images but {len(labels)} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise DatasetError(f"{str(path)!r}: labels must be whole class numbers")
    labels = labels.astype(np.int32)
    if len(labels) and labels.min() < 0:
        raise DatasetError(f"{str(path)!r}: labels must not be negative")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    if names is None:
        if n_classes <= len(CIFAR10_CLASSES):
            names = list(CIFAR10_CLASSES)
            logger.info("%s has no class_names: using the CIFAR-10 names", path)
        else:
            names = [str(i) for i in range(n_classes)]
    if n_classes > len(names):
        raise DatasetError(f"{str(path)!r}: label {n_classes - 1} has no class name")
    return ImageDataset(images, labels, names, str(path))


def align_classes(dataset: ImageDataset, class_names: Sequence[str]) -> ImageDataset:
    """``dataset`` with labels renumbered to ``class_names`` (the training classes).

    :raises DatasetError: when ``dataset`` has a class the training data lacks.
    """
    if list(dataset.class_names) == list(class_names):
        return dataset
    index = {name: i for i, name in enumerate(class_names)}
    present = sorted({dataset.class_names[i] for i in np.unique(dataset.labels)})
    unknown = [name for name in present if name not in index]
    if unknown:
        raise DatasetError(
            f"{dataset.source}: classes {unknown} are not among the training classes "
            f"{list(class_names)}"
        )
    mapping = np.array([index.get(name, -1) for name in dataset.class_names], dtype=np.int32)
    return ImageDataset(dataset.images, mapping[dataset.labels], list(class_names), dataset.source)


def split_holdout(
    dataset: ImageDataset, fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset]:
    """Split off ``fraction`` of ``dataset`` for evaluation, deterministic in ``seed``."""
    if not 0 < fraction < 1:
        raise DatasetError(f"holdout fraction must be between 0 and 1, not {fraction!r}")
    held = max(1, round(len(dataset) * fraction))
    if held >= len(dataset):
        raise DatasetError(f"{len(dataset)} images are too few to hold {fraction:.0%} out")
    order = np.random.RandomState(seed).permutation(len(dataset))
    return dataset.subset(np.sort(order[held:])), dataset.subset(np.sort(order[:held]))


# --- finding the source --------------------------------------------------------------


def _resolve(path: Path, split: str) -> tuple[str, Path]:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".npz", ".zip"):
            return suffix[1:], path
        raise DatasetError(f"{str(path)!r} is neither a .npz, a .zip nor a folder")
    for suffix in (".npz", ".zip"):
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == suffix and p.is_file())
        named = [p for p in found if p.stem.lower() == split]
        if named:
            return suffix[1:], named[0]
        if len(found) == 1:
            return suffix[1:], found[0]
        if found:
            raise DatasetError(
                f"{str(path)!r} holds several {suffix} files and no {split}{suffix}: "
                f"{[p.name for p in found]}"
            )
    return "folder", path


def _zip_entries(path: Path) -> list[tuple[str, int, int]]:
    """``(member, size, crc)`` of the zip's images."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sorted(
                (info.filename, info.file_size, info.CRC)
                for info in archive.infolist()
                if not info.is_dir() and _is_image(info.filename)
            )
    except (OSError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{str(path)!r} is not a readable zip: {error}") from None


def _folder_entries(path: Path) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of the folder's images."""
    entries = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if _is_image(name) and not name.startswith("."):
                full = Path(root) / name
                stat = full.stat()
                entries.append((full.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(entries)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and "__MACOSX" not in name


def _only_split(entries: list[tuple[str, int, int]], split: str) -> list[tuple[str, int, int]]:
    """Keep ``split/...`` when the tree's top folders separate splits."""
    tops = {PurePosixPath(e[0]).parts[0] for e in entries if len(PurePosixPath(e[0]).parts) >= 3}
    if len(tops) > 1 and split in tops:
        return [e for e in entries if PurePosixPath(e[0]).parts[0] == split]
    return entries


def _class_of(member: str) -> str:
    parts = PurePosixPath(member).parts
    if len(parts) < 2:
        raise DatasetError(f"image {member!r} is not inside a class folder")
    return parts[-2]


# --- decoding ------------------------------------------------------------------------


def _decode(
    kind: str, source: Path, entries: list[tuple[str, int, int]], workers: int | None
) -> ImageDataset:
    members = [e[0] for e in entries]
    class_names = sorted({_class_of(m) for m in members})
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[_class_of(m)] for m in members], dtype=np.int32)
    if workers is None:
        workers = (os.cpu_count() or 1) if len(members) >= POOL_THRESHOLD else 1
    workers = max(1, min(workers, len(members) // 1000 or 1))
    if workers > 1 and "mpi4py.MPI" in sys.modules:
        # Forking an MPI process is unsafe, and spawn would re-run the caller's
        # unguarded main script; an MPI rank decodes alone (once: then it's cached).
        workers = 1
    if workers == 1:
        images = decode_members(kind, str(source), members)
    else:
        chunks = np.array_split(np.arange(len(members)), workers * 4)
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            parts = pool.map(
                decode_members,
                [kind] * len(chunks),
                [str(source)] * len(chunks),
                [[members[i] for i in chunk] for chunk in chunks],
            )
            images = np.concatenate(list(parts))
    return ImageDataset(images, labels, class_names, str(source))


def decode_members(kind: str, source: str, members: Sequence[str]) -> np.ndarray:
    """Decode images of a zip (``kind="zip"``) or folder as uint8 N x 3 x 32 x 32."""
    from PIL import Image, UnidentifiedImageError

    images = np.empty((len(members), *IMAGE_SHAPE), dtype=np.uint8)
    archive = zipfile.ZipFile(source) if kind == "zip" else None
    resized = 0
    try:
        for position, member in enumerate(members):
            if archive is not None:
                raw = archive.read(member)
            else:
                raw = (Path(source) / member).read_bytes()
            try:
                with Image.open(io.BytesIO(raw)) as image:
                    if image.mode != "RGB":
                        image = image.convert("RGB")
                    if image.size != IMAGE_SHAPE[1:][::-1]:
                        image = image.resize(IMAGE_SHAPE[1:][::-1], Image.Resampling.BILINEAR)
                        resized += 1
                    images[position] = np.asarray(image).transpose(2, 0, 1)
            except (UnidentifiedImageError, OSError) as error:
                raise DatasetError(f"cannot decode image {member!r} in {source}: {error}") from None
    finally:
        if archive is not None:
            archive.close()
    if resized:
        logger.warning("%s: %d images were not 32 x 32 and were resized", source, resized)
    return images


def _to_uint8_nchw(data: np.ndarray, path: Path) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim == 4 and data.shape[1:] == (32, 32, 3):
        data = data.transpose(0, 3, 1, 2)
    if data.ndim != 4 or data.shape[1:] != IMAGE_SHAPE:
        raise DatasetError(
            f"{str(path)!r}: data must be N x 3 x 32 x 32 images, not shape {data.shape}"
        )
    if data.dtype == np.uint8:
        return np.ascontiguousarray(data)
    if not np.issubdtype(data.dtype, np.floating):
        raise DatasetError(
            f"{str(path)!r}: data must be float in [0, 1] or uint8, not {data.dtype}"
        )
    if data.size and (data.min() < 0 or data.max() > 1):
        raise DatasetError(
            f"{str(path)!r}: float data must be scaled to [0, 1] "
            f"(found {data.min():g} .. {data.max():g})"
        )
    # CIFAR floats are k / 255, so this round trip is exact for them.
    return np.ascontiguousarray(np.rint(data * 255).astype(np.uint8))


# --- the cache -----------------------------------------------------------------------


def _cache_key(kind: str, source: Path, entries: list[tuple[str, int, int]]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, kind, IMAGE_SHAPE]).encode())
    if kind == "folder":
        # Sizes and mtimes identify files only together with where they are.
        digest.update(str(source.resolve()).encode())
    for entry in entries:
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()


def _safe_name(source: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name) or "data"


def _read_cache(cache_file: Path, key: str) -> ImageDataset | None:
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as archive:
            if str(archive["key"]) != key:
                return None
            images, labels = archive["images"], archive["labels"]
            class_names = [str(n) for n in archive["class_names"]]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logger.warning("ignoring the unreadable cache file %s: %s", cache_file, error)
        return None
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE or len(images) != len(labels):
        logger.warning("ignoring the malformed cache file %s", cache_file)
        return None
    return ImageDataset(images, labels.astype(np.int32), class_names)


def _write_cache(cache_file: Path, key: str, dataset: ImageDataset) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees half a file.
        handle, temporary = tempfile.mkstemp(
            dir=cache_file.parent, prefix=cache_file.name, suffix=".tmp"
        )
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(
                    stream,
                    key=np.array(key),
                    images=dataset.images,
                    labels=dataset.labels,
                    class_names=np.array(dataset.class_names),
                )
            os.replace(temporary, cache_file)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        logger.info("cached the decoded images in %s", cache_file)
    except OSError as error:
        logger.warning("could not write the decode cache %s: %s", cache_file, error)
