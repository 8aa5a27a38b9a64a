"""Where artifacts live: S3 (through boto3) and tar archives, for both paths.

S3 URIs are ``s3://bucket/key``. The endpoint is ``endpoint_url`` when given,
else ``AWS_ENDPOINT_URL`` (boto3 reads it), so any S3-compatible store works.
Archives are extracted safely: members that would land outside the target,
links pointing outside it and device files are refused.
"""
from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from smchainer.errors import SmchainerError

logger = logging.getLogger(__name__)

S3_PREFIX = "s3://"


class StorageError(SmchainerError):
    """An artifact or data location that cannot be read or written."""


def is_s3_uri(location: str | os.PathLike[str]) -> bool:
    return str(location).startswith(S3_PREFIX)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    if not is_s3_uri(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket")
    return bucket, key


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client for ``endpoint_url`` (else ``AWS_ENDPOINT_URL`` / AWS)."""
    import boto3

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint_url)


def storage_error(error: Exception, uri: str, bucket: str) -> StorageError:
    """A boto3 error as a :class:`StorageError` that names the bucket or URI."""
    # upload_file wraps the ClientError (NoSuchBucket...) in an S3UploadFailedError.
    cause = error.__cause__ or error.__context__
    source: BaseException = error
    if not hasattr(error, "response") and cause is not None and hasattr(cause, "response"):
        source = cause
    code = getattr(source, "response", {}).get("Error", {}).get("Code", "")
    if code == "NoSuchBucket":
        return StorageError(f"{uri}: bucket {bucket!r} does not exist")
    return StorageError(f"{uri}: {code or source}")


def download(uri: str, destination: str | os.PathLike[str], *,
             endpoint_url: str | None = None) -> Path:
    """Download an object, or every object under a prefix, into ``destination``.

    An object lands as ``destination/<its file name>`` and that path is
    returned; a prefix keeps its objects' paths relative to the prefix and
    ``destination`` is returned. Nothing found is a :class:`StorageError`.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_uri(uri)
    target = Path(destination)
    target.mkdir(parents=True, exist_ok=True)
    client = s3_client(endpoint_url)
    try:
        if key and not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in {"404", "NoSuchKey"}:
                    raise
            else:
                file = target / PurePosixPath(key).name
                client.download_file(bucket, key, str(file))
                return file
        prefix = key if not key or key.endswith("/") else key + "/"
        count = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix):]
                if not relative or relative.endswith("/"):
                    continue
                file = path_inside(target, relative, uri)
                file.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, item["Key"], str(file))
                count += 1
    except (ClientError, BotoCoreError) as error:
        raise storage_error(error, uri, bucket) from None
    if count == 0:
        raise StorageError(f"{uri}: no object or prefix of that name in bucket {bucket!r}")
    logger.info("downloaded %d object(s) from %s to %s", count, uri, target)
    return target


def upload(path: str | os.PathLike[str], uri: str, *, endpoint_url: str | None = None) -> str:
    """Upload a file to ``uri`` (a key, or a prefix ending in ``/``), or a folder's files.

    Returns the URI of the uploaded file, or of the prefix for a folder.
    """
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_uri(uri)
    source = Path(path)
    client = s3_client(endpoint_url)
    try:
        if source.is_file():
            if not key or key.endswith("/"):
                key = key + source.name
            client.upload_file(str(source), bucket, key)
            return f"{S3_PREFIX}{bucket}/{key}"
        if not source.is_dir():
            raise StorageError(f"{source} does not exist")
        prefix = key if not key or key.endswith("/") else key + "/"
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            client.upload_file(str(file), bucket, prefix + file.relative_to(source).as_posix())
        return f"{S3_PREFIX}{bucket}/{prefix}"
    except (ClientError, BotoCoreError, S3UploadFailedError) as error:
        raise storage_error(error, uri, bucket) from None


def path_inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, refusing anything that would land outside ``root``."""
    if os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise StorageError(f"{what}: refusing absolute path {relative!r}")
    resolved_root = root.resolve()
    candidate = (resolved_root / relative).resolve()
    if candidate != resolved_root and resolved_root not in candidate.parents:
        raise StorageError(f"{what}: refusing {relative!r}, which points outside the target")
    return candidate


def check_tar_members(archive: tarfile.TarFile, destination: Path, name: str) -> None:
    """Refuse members that escape ``destination``, outside links and special files."""
    for member in archive.getmembers():
        target = path_inside(destination, member.name, name)
        if member.issym():
            link = member.linkname
            if os.path.isabs(link):
                raise StorageError(f"{name}: refusing link {member.name!r} -> absolute {link!r}")
            path_inside(destination, str(Path(member.name).parent / link), name)
        elif member.islnk():
            path_inside(destination, member.linkname, name)
        elif not (member.isfile() or member.isdir()):
            raise StorageError(f"{name}: refusing special file {member.name!r} (device or fifo)")
        del target


def safe_extract(archive_path: str | os.PathLike[str], destination: str | os.PathLike[str],
                 max_bytes: int | None = None) -> Path:
    """Extract a (gzipped) tar into ``destination`` after checking every member.

    With ``max_bytes``, an archive whose members add up to more is refused
    from their headers, before anything is written: a gzip bomb of a few MB
    that would inflate to gigabytes never reaches the disk.
    """
    target = Path(destination)
    target.mkdir(parents=True, exist_ok=True)
    name = str(archive_path)
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            check_tar_members(archive, target, name)
            if max_bytes is not None:
                total = sum(member.size for member in archive.getmembers())
                if total > max_bytes:
                    raise StorageError(
                        f"{name} holds {total} bytes once extracted, over the limit of "
                        f"{max_bytes} (--max-model-size, SMCHAINER_MAX_MODEL_SIZE)"
                    )
            if hasattr(tarfile, "data_filter"):
                archive.extractall(target, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                archive.extractall(target)
    except tarfile.TarError as error:
        raise StorageError(f"{name} is not a readable tar archive: {error}") from None
    return target


def pack(source_dir: str | os.PathLike[str], archive_path: str | os.PathLike[str]) -> Path:
    """Pack a folder's contents into ``archive_path`` (``.tar.gz``), no leading folder."""
    source = Path(source_dir)
    archive = Path(archive_path)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(source.iterdir()):
            if path.resolve() == archive.resolve():
                continue
            tar.add(path, arcname=path.name)
    return archive
