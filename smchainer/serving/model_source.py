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
                      endpoint_url: str | None = None, max_bytes: int | None = None) -> Path:
    """A local model directory for ``source``.

    ``source`` is a directory (used in place), a tar archive (extracted into
    ``work_dir/model``) or an ``s3://`` URI of an archive or of a prefix
    (downloaded into ``work_dir`` first). A directory that holds nothing but
    ``model.tar.gz`` (what a training job's output path, or a storage
    initializer copying it, leaves) is that archive. An archive may hold at most
    ``max_bytes`` once extracted. A missing local source is a
    :class:`UsageError`; an unsafe, oversized or unreadable archive and S3
    failures are :class:`smchainer.storage.StorageError`.
    """
    work = Path(work_dir)
    if storage.is_s3_uri(source):
        fetched = storage.download(source, work / "download", endpoint_url=endpoint_url)
        logger.info("fetched %s to %s", source, fetched)
        if fetched.is_dir():
            return _archive_alone(fetched, work, max_bytes) or fetched
        return _extract(fetched, work / "model", max_bytes)
    path = Path(source).expanduser()
    if path.is_dir():
        return _archive_alone(path, work, max_bytes) or path.resolve()
    if path.is_file():
        return _extract(path, work / "model", max_bytes)
    raise UsageError(
        f"--model-dir {source!r} does not exist: give a directory, a model.tar.gz "
        "or an s3:// URI"
    )


def _archive_alone(folder: Path, work: Path, max_bytes: int | None) -> Path | None:
    """The extracted ``model.tar.gz`` of a folder that holds only it (hidden files aside)."""
    entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    if len(entries) == 1 and entries[0].name == "model.tar.gz" and entries[0].is_file():
        return _extract(entries[0], work / "model", max_bytes)
    return None


def _extract(archive: Path, destination: Path, max_bytes: int | None) -> Path:
    if not tarfile.is_tarfile(archive):
        raise storage.StorageError(
            f"{archive} is neither a directory nor a tar archive (expected model.tar.gz)"
        )
    storage.safe_extract(archive, destination, max_bytes)
    logger.info("extracted %s to %s", archive, destination)
    return destination


def find_user_module(model_dir: Path, entry_point: str | None = None,
                     program: str | None = None) -> Path | None:
    """The user's script: ``entry_point``, else ``code/<program>``, else ``code/inference.py``.

    ``program`` defaults to ``SAGEMAKER_PROGRAM`` and must resolve inside
    ``code/`` (``../../evil.py`` and links out of it are refused): it may
    come with the model. ``entry_point`` is the operator's own path, given
    on the command line, and may be anywhere. A script that was asked for and
    is missing is a :class:`UsageError`; without any, None (the installed and
    built-in plugins serve alone).
    """
    if entry_point:
        path = Path(entry_point).expanduser()
        if not path.is_file():
            raise UsageError(f"--entry-point {entry_point!r} is not a file")
        return path.resolve()
    program = program if program is not None else os.environ.get(PROGRAM_ENV, "").strip()
    if program:
        code_dir = (model_dir / "code").resolve()
        path = (code_dir / program).resolve()
        if code_dir not in path.parents:
            raise UsageError(
                f"{PROGRAM_ENV}={program!r} resolves to {path}, outside the model's code "
                f"folder {code_dir}: it names a file inside that folder"
            )
        if not path.is_file():
            raise UsageError(
                f"{PROGRAM_ENV}={program!r} but {path} does not exist "
                "(it names a file inside the model's code/ folder)"
            )
        return path
    default = model_dir / "code" / DEFAULT_PROGRAM
    return default.resolve() if default.is_file() else None
