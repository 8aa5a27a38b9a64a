"""Where a transform reads and writes: local files and folders, or S3.

Inputs
    A file is one input, named by its base name. A folder is every file
    under it, recursively, in sorted order, each named by its path relative
    to the folder. ``s3://bucket/key`` is that object when it exists, else
    every object under the prefix ``key/`` (a whole folder: ``s3://b/in``
    does not pick up ``s3://b/input2/...``, where SageMaker matches raw key
    prefixes), named relative to it.
Outputs
    The answer for input ``<name>`` is ``<output path>/<name>.out``, as
    SageMaker names it, in a folder or under an ``s3://`` prefix. A local
    file is written to a temporary name first and renamed, so a ``.out``
    is never seen half written.

When the output folder lies inside the input folder, the files under it are
no inputs: a second run does not transform the first one's answers.
"""
from __future__ import annotations

import gzip
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from smchainer import storage
from smchainer.errors import SmchainerError, UsageError
from smchainer.storage import StorageError, is_s3_uri, parse_s3_uri

logger = logging.getLogger(__name__)

FILE_PREFIX = "file://"
OUT_SUFFIX = ".out"
#: The failure report's name in the output location.
REPORT_NAME = "_failures.json"


def local(location: str | os.PathLike[str]) -> Path:
    """A local location as an absolute path (``file://`` URIs as the SDK writes them)."""
    text = str(location)
    if text.startswith(FILE_PREFIX):
        text = text[len(FILE_PREFIX):]
    return Path(text).expanduser().resolve()


@dataclass(frozen=True)
class InputFile:
    """One input: its relative name, where it is, and its stored size in bytes."""

    name: str
    location: str
    size: int


class Store:
    """Reads inputs and writes outputs, locally or on S3 (one boto3 client, made when needed)."""

    def __init__(self, endpoint_url: str | None = None) -> None:
        self.endpoint_url = endpoint_url
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = storage.s3_client(self.endpoint_url)
        return self._client

    # -- inputs ---------------------------------------------------------------

    def list_inputs(self, data: str, output_path: str) -> list[InputFile]:
        """The input files of ``data`` (see the module docstring), in order.

        A missing local input is a :class:`UsageError`; a missing S3 object
        or prefix, or an empty one, a :class:`StorageError`.
        """
        if is_s3_uri(data):
            return self._list_s3(data, output_path)
        root = local(data)
        if root.is_file():
            self._check_readable(root, data)
            return [InputFile(root.name, str(root), root.stat().st_size)]
        if not root.is_dir():
            raise UsageError(f"input {data} does not exist")
        skip = None if is_s3_uri(output_path) else local(output_path)
        found = []
        for path in root.rglob("*"):
            if not path.is_file():
                continue
            if skip is not None and (path == skip or skip in path.parents):
                continue
            self._check_readable(path, data)
            relative = path.relative_to(root).as_posix()
            found.append(InputFile(relative, str(path), path.stat().st_size))
        if not found:
            raise UsageError(f"input folder {data} holds no files")
        if skip is not None and (skip == root or root in skip.parents):
            logger.info("files under the output folder %s are left out of the inputs", skip)
        return sorted(found, key=lambda item: item.name)

    @staticmethod
    def _check_readable(path: Path, data: str) -> None:
        if not os.access(path, os.R_OK):
            raise UsageError(f"input {path} cannot be read (permission denied)")

    def _list_s3(self, uri: str, output_path: str) -> list[InputFile]:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = parse_s3_uri(uri)
        skip = None
        if is_s3_uri(output_path):
            out_bucket, out_key = parse_s3_uri(output_path)
            if out_bucket == bucket:
                skip = out_key.rstrip("/") + "/"
        try:
            if key and not key.endswith("/"):
                try:
                    head = self.client.head_object(Bucket=bucket, Key=key)
                except ClientError as error:
                    if error.response.get("Error", {}).get("Code") not in {"404", "NoSuchKey"}:
                        raise
                else:
                    name = PurePosixPath(key).name
                    return [InputFile(name, uri, int(head.get("ContentLength", 0)))]
            prefix = key if not key or key.endswith("/") else key + "/"
            found = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                          Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    relative = item["Key"][len(prefix):]
                    if not relative or relative.endswith("/"):
                        continue
                    if skip is not None and skip != "/" and item["Key"].startswith(skip):
                        continue
                    found.append(InputFile(relative, f"s3://{bucket}/{item['Key']}",
                                           int(item.get("Size", 0))))
        except (ClientError, BotoCoreError) as error:
            raise storage.storage_error(error, uri, bucket) from None
        if not found:
            raise StorageError(f"{uri}: no object or prefix of that name in bucket {bucket!r}")
        return sorted(found, key=lambda item: item.name)

    def read(self, item: InputFile, compression: str | None) -> bytes:
        """The bytes of one input, gunzipped for ``compression="Gzip"``.

        Raises :class:`SmchainerError` with the reason when it cannot be read.
        """
        if is_s3_uri(item.location):
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = parse_s3_uri(item.location)
            try:
                data = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except (ClientError, BotoCoreError) as error:
                raise storage.storage_error(error, item.location, bucket) from None
        else:
            try:
                data = Path(item.location).read_bytes()
            except OSError as error:
                raise SmchainerError(f"cannot be read: {error.strerror or error}") from None
        if compression is not None:
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as error:
                raise SmchainerError(f"is not gzip data (compression_type Gzip): "
                                     f"{error}") from None
        return data

    # -- outputs --------------------------------------------------------------

    def prepare_output(self, output_path: str) -> None:
        """Make the output folder, or check that the output bucket exists."""
        if is_s3_uri(output_path):
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, _ = parse_s3_uri(output_path)
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code in {"404", "NoSuchBucket"}:
                    raise StorageError(f"output {output_path}: bucket {bucket!r} does not "
                                       "exist") from None
                raise storage.storage_error(error, output_path, bucket) from None
            except BotoCoreError as error:
                raise storage.storage_error(error, output_path, bucket) from None
            return
        folder = local(output_path)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"output path {output_path} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"output path {output_path} cannot be made: "
                             f"{error.strerror or error}") from None

    def output_location(self, output_path: str, name: str) -> str:
        """Where the file ``name`` (relative) goes under ``output_path``."""
        if is_s3_uri(output_path):
            bucket, key = parse_s3_uri(output_path)
            prefix = key.strip("/")
            return f"s3://{bucket}/{prefix + '/' if prefix else ''}{name}"
        return str(storage.path_inside(local(output_path), name, output_path))

    def write(self, location: str, data: bytes) -> None:
        """Write ``data`` to a local path (atomically) or an S3 URI."""
        if is_s3_uri(location):
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = parse_s3_uri(location)
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data)
            except (ClientError, BotoCoreError) as error:
                raise storage.storage_error(error, location, bucket) from None
            return
        path = Path(location)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(data)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as error:
            raise SmchainerError(f"{location} cannot be written: "
                                 f"{error.strerror or error}") from None

    def remove(self, location: str) -> None:
        """Remove a file or object when it exists (a stale failure report)."""
        if is_s3_uri(location):
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = parse_s3_uri(location)
            try:
                self.client.delete_object(Bucket=bucket, Key=key)
            except (ClientError, BotoCoreError) as error:
                logger.warning("could not remove %s: %s", location, error)
            return
        Path(location).unlink(missing_ok=True)
