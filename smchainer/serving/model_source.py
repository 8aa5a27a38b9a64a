"""Where the model comes from: a directory, a ``model.tar.gz``, or ``s3://`` either.

The master process resolves the source once, before forking workers, into a
local model directory; the workers only ever see that directory. Archives are
extracted with :func:`smchainer.storage.safe_extract`, which refuses members
that escape the target, links pointing outside it and device files.
"""
from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

from smchainer import storage
from smchainer.errors import UsageError
from smchainer.serving.settings import PROGRAM_ENV

logger = logging.getLogger(__name__)

DEFAULT_PROGRAM = "inference.py"


def prepare_model_dir(source: str, work_dir: str | os.PathLike[str], *,
                      endpoint_url: str | None = None) -> Path:
    """A local model directory for ``source``.

    ``source`` is a directory (used in place), a tar archive (extracted into
    ``work_dir/model``) or an ``s3://`` URI of an archive or of a prefix
    (downloaded into ``work_dir`` first). A missing local source is a
    :class:`UsageError`; an unsafe or unreadable archive and S3 failures are
    :class:`smchainer.storage.StorageError`.
    """
    work = Path(work_dir)
    if storage.is_s3_uri(source):
        fetched = storage.download(source, work / "download", endpoint_url=endpoint_url)
        logger.info("fetched %s to %s", source, fetched)
        if fetched.is_dir():
            return fetched
        return _extract(fetched, work / "model")
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_file():
        return _extract(path, work / "model")
    raise UsageError(
        f"--model-dir {source!r} does not exist: give a directory, a model.tar.gz "
        "or an s3:// URI"
    )


def _extract(archive: Path, destination: Path) -> Path:
    if not tarfile.is_tarfile(archive):
        raise storage.StorageError(
            f"{archive} is neither a directory nor a tar archive (expected model.tar.gz)"
        )
    storage.safe_extract(archive, destination)
    logger.info("extracted %s to %s", archive, destination)
    return destination


def find_user_module(model_dir: Path, entry_point: str | None = None,
                     program: str | None = None) -> Path | None:
    """The user's script: ``entry_point``, else ``code/<program>``, else ``code/inference.py``.

    ``program`` defaults to ``SAGEMAKER_PROGRAM``. A script that was asked for
    and is missing is a :class:`UsageError`; without any, None (the installed
    and built-in plugins serve alone).
    """
    if entry_point:
        path = Path(entry_point).expanduser()
        if not path.is_file():
            raise UsageError(f"--entry-point {entry_point!r} is not a file")
        return path.resolve()
    program = program if program is not None else os.environ.get(PROGRAM_ENV, "").strip()
    if program:
        path = model_dir / "code" / program
        if not path.is_file():
            raise UsageError(
                f"{PROGRAM_ENV}={program!r} but {path} does not exist "
                "(it names a file inside the model's code/ folder)"
            )
        return path.resolve()
    default = model_dir / "code" / DEFAULT_PROGRAM
    return default.resolve() if default.is_file() else None
