"""A zip of images as one batch, in the order of the members' names.

Why a zip and not ``multipart/form-data``: the server hands ``input_fn`` the
bare media type (SageMaker's contract drops Content-Type parameters), and a
multipart body cannot be split without its ``boundary`` parameter. A zip
describes itself, keeps names for the answer, is made by any ``zip`` tool,
and is the form the CIFAR-10 data already comes in.
"""
from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath

import numpy as np

from smchainer.errors import BadRequest
from smchainer_image.decode import MAX_PIXELS, InputSpec, decode_pixels, open_image

#: A member that inflates beyond this is refused (a zip bomb guard).
MAX_MEMBER_BYTES = 64 * 1024 * 1024
#: And so is a zip whose members inflate to more than this in all.
MAX_TOTAL_BYTES = 256 * 1024 * 1024
#: Images passed at their own size may hold this many pixels in all (the batch's memory).
MAX_BATCH_PIXELS = MAX_PIXELS
#: And images resized to the model's input this many, counted before decoding (its time:
#: 256 images of 4096 x 4096 would take a minute to decode on two cores).
MAX_DECODE_PIXELS = 256 * 1024 * 1024


def image_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The members that are images, sorted by name.

    Folders are skipped, and so are hidden files and the ``__MACOSX/`` folder
    that macOS adds (any path part starting with ``.`` or named
    ``__MACOSX``); every other file must be an image.
    """
    members = []
    for info in archive.infolist():
        parts = PurePosixPath(info.filename).parts
        if info.is_dir() or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        members.append(info)
    return sorted(members, key=lambda info: info.filename)


def read_members(body: bytes, max_images: int) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each image member, in name order, within the limits.

    :raises BadRequest: for a body that is not a zip, one with no image or
        more than ``max_images``, and (naming it) a member that is too large,
        damaged, encrypted or compressed with an unsupported method.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError,
            EOFError) as error:  # NotImplementedError: a member needs a newer zip version
        raise BadRequest(f"body is not a readable zip archive: {error}") from None
    with archive:
        members = image_members(archive)
        if not members:
            raise BadRequest("the zip holds no images")
        if len(members) > max_images:
            raise BadRequest(
                f"the zip holds {len(members)} images; at most {max_images} per request "
                "(SMCHAINER_IMAGE_MAX_BATCH)"
            )
        total = 0
        for info in members:
            name = info.filename
            if info.file_size > MAX_MEMBER_BYTES:
                raise BadRequest(f"{name} is too large: {info.file_size} bytes uncompressed; "
                                 f"at most {MAX_MEMBER_BYTES}")
            try:
                with archive.open(info) as member:
                    # Read one byte past the limit: a member may inflate beyond its header.
                    data = member.read(MAX_MEMBER_BYTES + 1)
            except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError,
                    ValueError, EOFError, OSError) as error:
                raise BadRequest(f"{name} cannot be read from the zip: {error}") from None
            if len(data) > MAX_MEMBER_BYTES:
                raise BadRequest(f"{name} is too large: more than {MAX_MEMBER_BYTES} bytes "
                                 "uncompressed")
            total += len(data)
            if total > MAX_TOTAL_BYTES:
                raise BadRequest(f"the zip inflates to more than {MAX_TOTAL_BYTES} bytes "
                                 f"(at {name})")
            yield name, data


def decode_zip(body: bytes, spec: InputSpec, max_images: int,
               check: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """A zip of images as an ``N x C x H x W`` float32 batch and the members' names.

    Each image is decoded as :func:`smchainer_image.decode.decode_image`
    does. The images may hold at most :data:`MAX_DECODE_PIXELS` pixels in
    all, counted from their headers before each is decoded; without a shape
    in ``spec`` every image must have the size of the first, and the batch
    at most :data:`MAX_BATCH_PIXELS` pixels. ``check(name)`` runs before each
    image: the server's deadline check, which abandons the work once the
    request has timed out.

    :raises BadRequest: as :func:`read_members`, for any member that is not a
        good image (naming it), for images of different sizes, and over the
        pixel budgets.
    """
    arrays: list[np.ndarray] = []
    names: list[str] = []
    members = list(read_members(body, max_images))
    # Every header first (cheap), so the budget holds before one image is decoded.
    pixels = 0
    budget = MAX_BATCH_PIXELS if spec.shape is None else MAX_DECODE_PIXELS
    for name, data in members:
        with open_image(data, name) as image:
            pixels += image.size[0] * image.size[1]
        if pixels > budget:
            raise BadRequest(f"the images hold more than {budget} pixels in all "
                             f"(at {name}); send fewer or smaller images")
    for name, data in members:
        if check is not None:
            check(name)
        array = decode_pixels(open_image(data, name), spec, name)
        if arrays and array.shape != arrays[0].shape:
            # Only without a shape in the spec: sizes are compared once EXIF rotation is applied.
            raise BadRequest(
                f"{name} is {array.shape[2]}x{array.shape[1]} but {names[0]} is "
                f"{arrays[0].shape[2]}x{arrays[0].shape[1]}: the model's metadata gives no "
                "input size to resize to, so the images of a batch must share one size"
            )
        arrays.append(array)
        names.append(name)
    return np.stack(arrays), names
