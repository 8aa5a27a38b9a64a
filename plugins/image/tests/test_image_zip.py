"""A zip of images as one batch: name order, limits, and 400s that name the member."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
from image_helpers import encode, forged_png, make_zip, pixels, png
from PIL import Image
from smchainer_image import InputSpec, decode_zip
from smchainer_image.archive import MAX_MEMBER_BYTES

from smchainer.errors import BadRequest

RESIZE = InputSpec((3, 32, 32))


def solid(value: int, size: tuple[int, int] = (32, 32)) -> bytes:
    return encode(Image.new("RGB", size, (value, value, value)))


def needs_version(archive: bytes, version: int) -> bytes:
    """``archive`` with its first central-directory entry's "version needed" set."""
    data = bytearray(archive)
    entry = data.find(b"PK\x01\x02")
    data[entry + 6:entry + 8] = version.to_bytes(2, "little")
    return bytes(data)


def test_members_come_in_name_order_whatever_the_zip_order(cifar10) -> None:
    with zipfile.ZipFile(cifar10 / "test.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith("/0007.jpg"))
        members = [(name, archive.read(name)) for name in reversed(names)]
    batch, got = decode_zip(make_zip(members), RESIZE, max_images=16)
    assert got == names and len(names) == 10
    expected = np.stack([pixels(data) for _, data in reversed(members)])
    np.testing.assert_allclose(batch, expected)


def test_folders_hidden_files_and_macos_metadata_are_skipped() -> None:
    body = make_zip([
        ("b.png", solid(20)), ("pics/", b""), ("pics/a.png", solid(10)),
        ("__MACOSX/pics/._a.png", b"\x00\x05\x16\x07 resource fork"), (".DS_Store", b"junk"),
    ])
    batch, names = decode_zip(body, RESIZE, max_images=2)
    assert names == ["b.png", "pics/a.png"]
    np.testing.assert_allclose(batch[:, 0, 0, 0], [20 / 255, 10 / 255])


def test_sizes_are_resized_with_a_spec_and_must_match_without() -> None:
    body = make_zip([("a.png", solid(0, (32, 32))), ("b.png", solid(255, (64, 48)))])
    batch, _ = decode_zip(body, RESIZE, max_images=8)
    assert batch.shape == (2, 3, 32, 32)
    with pytest.raises(BadRequest, match=r"b.png is 64x48 but a.png is 32x32.*share one size"):
        decode_zip(body, InputSpec(), max_images=8)
    same = make_zip([("a.png", solid(0, (40, 24))), ("b.png", solid(255, (40, 24)))])
    batch, _ = decode_zip(same, InputSpec(), max_images=8)
    assert batch.shape == (2, 3, 24, 40)


def crc_damaged_zip() -> bytes:
    body = bytearray(make_zip([("a.png", solid(1)), ("b.png", solid(2))], zipfile.ZIP_STORED))
    start = body.index(b"IDAT", body.index(b"b.png"))  # inside b.png's stored bytes
    body[start + 8] ^= 0xFF
    return bytes(body)


@pytest.mark.parametrize(
    ("make_body", "message"),
    [
        (lambda: b"PK\x03\x04 not really", "not a readable zip"),
        # A member that says it needs zip version 6.4 (the fuzz test found this 500).
        (lambda: needs_version(make_zip([("a.png", solid(1))]), 64),
         "not a readable zip archive: zip file version 6.4"),
        (lambda: png(np.zeros((4, 4), np.uint8)), "not a readable zip"),
        (lambda: make_zip([("empty/", b"")]), "holds no images"),
        (lambda: make_zip([("a.png", solid(1)), ("b.jpg", solid(2)[:60])]),
         "^b.jpg is not a readable"),
        (lambda: make_zip([("a.png", solid(1)), ("notes.txt", b"hello")]),
         "^notes.txt is not a readable"),
        (lambda: make_zip([("a.png", solid(1)), ("z.png", b"")]), "^z.png is empty"),
        (lambda: make_zip([("big.png", forged_png(9000))]), "^big.png is too large"),
        (lambda: make_zip([(f"{i:02}.png", solid(i)) for i in range(5)]),
         "holds 5 images; at most 4"),
        (lambda: make_zip([("a.png", solid(1)), ("bomb.png", bytes(MAX_MEMBER_BYTES + 1))]),
         "^bomb.png is too large"),
        (crc_damaged_zip, "^b.png cannot be read from the zip: Bad CRC-32"),
    ],
    ids=["not-zip", "newer-zip-version", "png-body", "no-images", "truncated-member", "text-member",
         "empty-member", "huge-member", "too-many", "zip-bomb", "bad-crc"],
)
def test_bad_batches_are_400s_that_name_the_member(make_body, message) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_zip(make_body(), RESIZE, max_images=4)


def test_a_member_that_inflates_past_its_declared_size_is_stopped() -> None:
    # The header claims a small size; the compressed stream holds far more.
    body = bytearray(make_zip([("lie.png", bytes(MAX_MEMBER_BYTES + 10))]))
    true_size = (MAX_MEMBER_BYTES + 10).to_bytes(4, "little")
    small = (1000).to_bytes(4, "little")
    assert body.count(true_size) == 2  # local header and central directory
    body = body.replace(true_size, small)
    # zipfile stops at the declared size, and the CRC then disagrees.
    with pytest.raises(BadRequest, match="^lie.png cannot be read from the zip"):
        decode_zip(bytes(body), RESIZE, max_images=4)


def test_images_at_their_own_size_have_a_pixel_budget() -> None:
    side = 3000  # 9 M pixels each: two are over the 16.7 M budget
    big = encode(Image.new("L", (side, side)))
    with pytest.raises(BadRequest, match="pixels in all .at b.png"):
        decode_zip(make_zip([("a.png", big), ("b.png", big)]), InputSpec(), max_images=4)
