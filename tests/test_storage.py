"""S3 transfers against a real S3-compatible server, and safe tar extraction."""
from __future__ import annotations

import io
import tarfile

import pytest

from smchainer import storage
from smchainer.storage import StorageError

pytestmark = pytest.mark.s3


def test_upload_and_download_a_file_and_a_prefix(s3_bucket, tmp_path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("alpha")
    (source / "sub" / "b.txt").write_text("beta")
    prefix = storage.upload(source, f"s3://{s3_bucket}/data")
    assert prefix == f"s3://{s3_bucket}/data/"

    fetched = storage.download(f"s3://{s3_bucket}/data", tmp_path / "out")
    assert (fetched / "a.txt").read_text() == "alpha"
    assert (fetched / "sub" / "b.txt").read_text() == "beta"

    one = storage.download(f"s3://{s3_bucket}/data/sub/b.txt", tmp_path / "one")
    assert one == tmp_path / "one" / "b.txt" and one.read_text() == "beta"


def test_missing_bucket_and_prefix_are_named(s3_bucket, tmp_path) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.download("s3://no-such-bucket/x", tmp_path)
    with pytest.raises(StorageError, match="no object or prefix"):
        storage.download(f"s3://{s3_bucket}/nothing/here", tmp_path)


def test_pack_has_no_leading_folder_and_round_trips(tmp_path) -> None:
    source = tmp_path / "model"
    source.mkdir()
    (source / "model.npz").write_bytes(b"weights")
    (source / "code").mkdir()
    (source / "code" / "inference.py").write_text("x = 1\n")
    archive = storage.pack(source, tmp_path / "model.tar.gz")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["code", "code/inference.py", "model.npz"]
    out = storage.safe_extract(archive, tmp_path / "out")
    assert (out / "code" / "inference.py").read_text() == "x = 1\n"


def malicious(tmp_path, build) -> str:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        build(tar)
    return str(path)


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str, kind=tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


def add_device(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    tar.addfile(info)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda tar: add_file(tar, "../escape.txt"), "outside the target"),
        (lambda tar: add_file(tar, "/etc/evil"), "absolute path"),
        (lambda tar: add_link(tar, "link", "/etc/passwd"), "absolute"),
        (lambda tar: add_link(tar, "sub/link", "../../outside"), "outside the target"),
        (lambda tar: add_link(tar, "hard", "../x", tarfile.LNKTYPE), "outside the target"),
        (lambda tar: add_device(tar, "dev"), "special file"),
    ],
)
def test_malicious_archives_are_refused_and_nothing_escapes(tmp_path, build, message) -> None:
    archive = malicious(tmp_path, build)
    target = tmp_path / "target"
    with pytest.raises(StorageError, match=message):
        storage.safe_extract(archive, target)
    assert not (tmp_path / "escape.txt").exists()
    assert list(target.iterdir()) == []


def test_not_a_tar_is_a_clear_error(tmp_path) -> None:
    bogus = tmp_path / "model.tar.gz"
    bogus.write_bytes(b"not a tar")
    with pytest.raises(StorageError, match="not a readable tar"):
        storage.safe_extract(bogus, tmp_path / "out")
