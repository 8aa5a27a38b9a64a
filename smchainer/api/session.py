"""``Session``: where data and artifacts live, S3 or this machine's disk.

With a bucket (``Session(default_bucket=...)``, ``SMCHAINER_DEFAULT_BUCKET``
or the ``bucket`` argument) ``upload_data`` puts files on S3 through boto3,
at ``endpoint_url`` (else ``AWS_ENDPOINT_URL``, so any S3-compatible store
works). Without one it returns the local path, which the estimator uses as a
channel as it is: the same notebook runs with or without a store.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from smchainer import storage

logger = logging.getLogger(__name__)

BUCKET_ENV = "SMCHAINER_DEFAULT_BUCKET"
FILE_PREFIX = "file://"


def local_path(location: str | os.PathLike[str]) -> Path:
    """A local location as a path (``file://`` URIs as the SDK's local mode writes them)."""
    text = str(location)
    return Path(text[len(FILE_PREFIX):] if text.startswith(FILE_PREFIX) else text).expanduser()


class Session:
    """The SageMaker ``Session`` calls a notebook makes, against S3 or local disk.

    :param default_bucket: the bucket of :meth:`upload_data` when it names none
        (default ``$SMCHAINER_DEFAULT_BUCKET``; without either, data stays local).
    :param endpoint_url: the S3-compatible endpoint (default ``$AWS_ENDPOINT_URL``, else AWS).
    """

    def __init__(self, default_bucket: str | None = None, endpoint_url: str | None = None,
                 **aws_only: object) -> None:
        from smchainer.api.local_mode import warn_ignored

        warn_ignored(aws_only, "Session")
        self._bucket = default_bucket or os.environ.get(BUCKET_ENV) or None
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    def default_bucket(self) -> str | None:
        """The configured bucket, or None when data stays on this machine."""
        return self._bucket

    def environment(self) -> dict[str, str]:
        """Variables that point a child process (training, serving) at this session's store."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url} if self.endpoint_url else {}

    def upload_data(self, path: str | os.PathLike[str], bucket: str | None = None,
                    key_prefix: str = "data", extra_args: object = None) -> str:
        """Upload a file or folder; return its ``s3://`` URI, or its local path without a bucket.

        A folder's files keep their relative paths under ``key_prefix`` and
        the URI of the prefix is returned; a file lands at
        ``key_prefix/<its name>`` and its own URI is returned (as the SDK does).
        """
        source = local_path(path).resolve()
        if not source.exists():
            raise FileNotFoundError(f"upload_data: {path} does not exist")
        bucket = bucket or self._bucket
        if not bucket:
            logger.info("no bucket configured: %s is used in place", source)
            return str(source)
        prefix = key_prefix.strip("/")
        uri = f"{storage.S3_PREFIX}{bucket}/{prefix + '/' if prefix else ''}"
        uploaded = storage.upload(source, uri, endpoint_url=self.endpoint_url)
        return uploaded.rstrip("/") if source.is_dir() else uploaded

    def download_data(self, path: str | os.PathLike[str], bucket: str, key_prefix: str = "",
                      extra_args: object = None) -> Path:
        """Download the object ``key_prefix`` or every object under it into the folder ``path``."""
        return storage.download(f"{storage.S3_PREFIX}{bucket}/{key_prefix}", local_path(path),
                                endpoint_url=self.endpoint_url)

    def extract_artifact(self, source: str | os.PathLike[str],
                         destination: str | os.PathLike[str]) -> Path:
        """Extract an artifact archive (a path or ``s3://`` URI) into ``destination``.

        Archives are checked member by member first
        (:func:`smchainer.storage.safe_extract`).
        """
        target = local_path(destination)
        if storage.is_s3_uri(source):
            with tempfile.TemporaryDirectory(prefix="smchainer-artifact-") as scratch:
                archive = storage.download(str(source), scratch, endpoint_url=self.endpoint_url)
                if archive.is_dir():
                    raise storage.StorageError(f"{source} is a prefix, not an archive")
                return storage.safe_extract(archive, target)
        archive = local_path(source)
        if not archive.is_file():
            raise FileNotFoundError(f"extract_artifact: {source} does not exist")
        return storage.safe_extract(archive, target)


def get_execution_role(sagemaker_session: object = None) -> str:
    """A stand-in for ``sagemaker.get_execution_role()``: no role is needed locally."""
    return "smchainer-local"
