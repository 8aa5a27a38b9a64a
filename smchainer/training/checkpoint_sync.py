"""Mirror a job's checkpoint folder to S3 while it runs, and restore it first.

SageMaker syncs ``/opt/ml/checkpoints`` with the job's ``checkpoint_s3_uri``:
what is there when the job starts is downloaded, and what training writes is
uploaded as it goes, so that a stopped or preempted job resumes from its last
snapshot. :class:`CheckpointSync` does the same for a local folder::

    sync = CheckpointSync(folder, "s3://bucket/jobs/my-job/checkpoints")
    sync.restore()          # objects under the prefix -> absent local files
    sync.start()            # a thread uploads new and changed files
    ...                     # training writes snapshots; sync.notify(path) when one is done
    sync.stop()             # a last pass uploads whatever is left

How a pass decides:

* A file's object key is the prefix plus its path relative to the folder
  (``snapshots/iter_100`` under ``s3://bucket/ckpt`` is ``ckpt/snapshots/iter_100``).
* Names ending in ``.tmp`` (a snapshot being written) and ``.damaged`` (a
  snapshot set aside as unreadable) are never uploaded nor restored.
* A file is uploaded when its size or modification time differs from what was
  last uploaded. The thread's passes (every ``interval`` seconds) also wait
  until a file is unchanged since the previous pass, so that a file a script
  is still writing is not uploaded half-written; a file given to
  :meth:`CheckpointSync.notify` is uploaded at once, and the final pass of
  :meth:`CheckpointSync.stop` uploads everything.
* When a file this syncer uploaded (or restored) disappears from the folder,
  its object is deleted: pruning old snapshots prunes the bucket too. Objects
  it never saw are left alone.

Errors in the thread are logged (once per distinct message) and the thread
keeps going: a brief S3 outage does not stop training, and the files are
uploaded once the store answers again. :meth:`CheckpointSync.restore`,
:meth:`CheckpointSync.sync` and :meth:`CheckpointSync.stop` raise
:class:`~smchainer.storage.StorageError` instead.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from smchainer.storage import S3_PREFIX, StorageError, parse_s3_uri, path_inside, storage_error
from smchainer.storage import s3_client as _s3_client

logger = logging.getLogger(__name__)

#: Suffixes of files that are never synced: a snapshot being written, one set aside.
SKIPPED_SUFFIXES = (".tmp", ".damaged")
#: The most keys one ``DeleteObjects`` request takes.
_DELETE_BATCH = 1000

Signature = tuple[int, int]


def _skipped(relative: str) -> bool:
    return relative.endswith(SKIPPED_SUFFIXES)


def _signature(path: Path) -> Signature | None:
    """``(size, mtime_ns)`` of a regular file, or None when it is gone or not a file."""
    try:
        info = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return info.st_size, info.st_mtime_ns


class CheckpointSync:
    """Keep ``folder`` and the S3 prefix ``uri`` in step while a job runs."""

    def __init__(self, folder: Path, uri: str, *, endpoint_url: str | None = None,
                 interval: float = 2.0) -> None:
        self.folder = Path(folder)
        self.bucket, key = parse_s3_uri(uri)
        self.prefix = key if not key or key.endswith("/") else key + "/"
        self.uri = f"{S3_PREFIX}{self.bucket}/{self.prefix}"
        self.endpoint_url = endpoint_url
        self.interval = interval
        self._client: Any = None
        # _lock guards what notify() and the thread share; _pass_lock makes
        # passes (and notify's own uploads) one at a time, so that no file is
        # uploaded twice at once.
        self._lock = threading.Lock()
        self._pass_lock = threading.Lock()
        self._uploaded: dict[str, Signature] = {}
        self._seen: dict[str, Signature] = {}
        self._notified: set[str] = set()
        self._warned: set[str] = set()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- S3 -----------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use (boto3 clients are thread-safe)."""
        with self._lock:
            if self._client is None:
                self._client = _s3_client(self.endpoint_url)
            return self._client

    def _error(self, error: Exception) -> StorageError:
        """A boto3 error as a :class:`StorageError` naming the URI (and bucket)."""
        return storage_error(error, self.uri, self.bucket)

    def _key(self, relative: str) -> str:
        return self.prefix + relative

    # -- restore --------------------------------------------------------------

    def restore(self) -> int:
        """Download the objects under the prefix whose file is absent locally; return how many.

        An empty or absent prefix is 0 (a first run), not an error; a missing
        bucket or an unreachable server is a :class:`StorageError` naming the URI.
        """
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        count = 0
        with self._pass_lock:
            root = self.folder.resolve()
            try:
                paginator = self.client.get_paginator("list_objects_v2")
                for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                    for item in page.get("Contents", []):
                        relative = item["Key"][len(self.prefix):]
                        if not relative or relative.endswith("/") or _skipped(relative):
                            continue
                        file = path_inside(root, relative, self.uri)
                        if file.exists() or file.is_symlink():
                            continue
                        file.parent.mkdir(parents=True, exist_ok=True)
                        self.client.download_file(self.bucket, item["Key"], str(file))
                        signature = _signature(file)
                        if signature is not None:
                            local = file.relative_to(root).as_posix()
                            self._uploaded[local] = signature
                        logger.debug("checkpoints: restored %s", item["Key"])
                        count += 1
            except (ClientError, BotoCoreError, Boto3Error) as error:
                raise self._error(error) from None
            except OSError as error:
                raise StorageError(f"{self.uri}: cannot restore into {self.folder}: {error}"
                                   ) from None
        if count:
            logger.info("checkpoints: restored %d file(s) from %s to %s",
                        count, self.uri, self.folder)
        return count

    # -- the thread -----------------------------------------------------------

    def start(self) -> None:
        """Start a daemon thread that syncs every ``interval`` seconds (settled files only)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name="checkpoint-sync", daemon=True)
        self._thread.start()

    def _running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()
                and not self._stopping.is_set())

    def _run(self) -> None:
        # Full passes stay ``interval`` apart even when notify() wakes the
        # thread in between (it then uploads only the notified files), so
        # that "unchanged since the previous pass" always spans an interval.
        next_pass = time.monotonic() + self.interval
        while not self._stopping.is_set():
            self._wake.wait(max(0.0, next_pass - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                if time.monotonic() >= next_pass:
                    next_pass = time.monotonic() + self.interval
                    self.sync(settled_only=True)
                    self._recovered()
                else:
                    self._upload_notified()
            except Exception as error:  # the thread must survive an outage
                self._warn(error)

    def _warn(self, error: Exception) -> None:
        message = str(error) or type(error).__name__
        with self._lock:
            if message in self._warned:
                return
            self._warned.add(message)
        # A StorageError says all there is; anything else is a bug worth its traceback.
        logger.warning("checkpoints: syncing to %s failed, will retry: %s", self.uri, message,
                       exc_info=not isinstance(error, StorageError))

    def _recovered(self) -> None:
        with self._lock:
            if not self._warned:
                return
            self._warned.clear()
        logger.info("checkpoints: syncing to %s works again", self.uri)

    def notify(self, path: Path) -> None:
        """``path`` (a file inside the folder) is complete: upload it soon, without waiting
        for it to settle.

        The running thread is woken to upload it; when no thread runs, it is
        uploaded now, in the caller's thread (errors raised as
        :class:`StorageError`). A path outside the folder is a ``ValueError``.
        """
        relative = self._relative(Path(path))
        if relative == "." or _skipped(relative):
            return
        with self._lock:
            self._notified.add(relative)
        if self._running():
            self._wake.set()
        else:
            self._upload_notified()

    def stop(self) -> None:
        """Stop the thread (join it), then one final pass that uploads every changed file.

        Errors of the final pass are raised as :class:`StorageError`.
        """
        thread = self._thread
        if thread is not None:
            self._stopping.set()
            self._wake.set()
            thread.join()
            self._thread = None
        self.sync(settled_only=False)

    # -- passes ---------------------------------------------------------------

    def _walk(self) -> dict[str, Signature] | None:
        """Every file to sync, by relative posix path; None when the folder is absent."""
        if not self.folder.is_dir():
            return None
        files: dict[str, Signature] = {}
        for directory, _, names in os.walk(self.folder):
            for name in names:
                path = Path(directory, name)
                relative = path.relative_to(self.folder).as_posix()
                if _skipped(relative):
                    continue
                signature = _signature(path)
                if signature is not None:
                    files[relative] = signature
        return files

    def _take_notified(self) -> set[str]:
        with self._lock:
            notified, self._notified = self._notified, set()
        return notified

    def _give_back_notified(self, relatives: set[str]) -> None:
        with self._lock:
            self._notified |= relatives

    def _relative(self, path: Path) -> str:
        """``path``'s posix path relative to the folder; ValueError when outside it."""
        for absolute, root in ((Path(os.path.abspath(path)), Path(os.path.abspath(self.folder))),
                               (path.resolve(), self.folder.resolve())):
            try:
                return absolute.relative_to(root).as_posix()
            except ValueError:
                pass
        raise ValueError(f"{path} is not inside the checkpoint folder {self.folder}")

    def _upload(self, relative: str, signature: Signature) -> bool:
        """Upload one file and record its signature; False when it vanished meanwhile.

        Called under ``_pass_lock``.
        """
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        path = self.folder / relative
        key = self._key(relative)
        try:
            self.client.upload_file(str(path), self.bucket, key)
        except (ClientError, BotoCoreError, Boto3Error) as error:
            raise self._error(error) from None
        except OSError as error:
            if not path.exists():
                return False
            raise StorageError(f"{path}: cannot be read for {self.uri}: {error}") from None
        self._uploaded[relative] = signature
        logger.debug("checkpoints: uploaded %s to %s%s/%s", path, S3_PREFIX, self.bucket, key)
        return True

    def _upload_all(self, pending: list[tuple[str, Signature]], notified: set[str]) -> int:
        """Upload ``pending`` in order; on an error, notified files not done stay notified."""
        done: set[str] = set()
        count = 0
        try:
            for relative, signature in pending:
                count += self._upload(relative, signature)
                done.add(relative)
        except BaseException:
            self._give_back_notified({r for r, _ in pending if r in notified} - done)
            raise
        return count

    def _upload_notified(self) -> None:
        """Upload the notified files now, settled or not."""
        with self._pass_lock:
            notified = self._take_notified()
            pending = []
            for relative in sorted(notified):
                signature = _signature(self.folder / relative)
                if signature is not None and self._uploaded.get(relative) != signature:
                    pending.append((relative, signature))
            count = self._upload_all(pending, notified)
        if count:
            logger.info("checkpoints: uploaded %d file(s) to %s", count, self.uri)

    def sync(self, *, settled_only: bool = True) -> None:
        """One pass: upload new and changed files, delete objects of removed ones.

        With ``settled_only``, a file is uploaded only once it is unchanged
        since the previous pass (unless given to :meth:`notify`). Raises
        :class:`StorageError` on S3 errors.
        """
        with self._pass_lock:
            files = self._walk()
            if files is None:
                return  # no folder (yet): nothing to upload, and nothing is deleted
            previous, self._seen = self._seen, files
            notified = self._take_notified()
            pending = [
                (relative, signature) for relative, signature in sorted(files.items())
                if self._uploaded.get(relative) != signature
                and (not settled_only or relative in notified
                     or previous.get(relative) == signature)
            ]
            count = self._upload_all(pending, notified)
            deleted = self._delete_vanished(files)
        if count:
            logger.info("checkpoints: uploaded %d file(s) to %s", count, self.uri)
        if deleted:
            logger.info("checkpoints: deleted %d object(s) under %s (files removed locally)",
                        deleted, self.uri)

    def _delete_vanished(self, files: dict[str, Signature]) -> int:
        """Delete the objects of files this syncer uploaded that are gone; how many."""
        from botocore.exceptions import BotoCoreError, ClientError

        vanished = sorted(relative for relative in self._uploaded if relative not in files)
        count = 0
        for start in range(0, len(vanished), _DELETE_BATCH):
            batch = vanished[start:start + _DELETE_BATCH]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(r)} for r in batch], "Quiet": True},
                )
            except (ClientError, BotoCoreError) as error:
                raise self._error(error) from None
            failed = {error.get("Key"): error for error in response.get("Errors", [])}
            for relative in batch:
                key = self._key(relative)
                if key in failed:
                    continue
                del self._uploaded[relative]
                logger.debug("checkpoints: deleted %s%s/%s", S3_PREFIX, self.bucket, key)
                count += 1
            if failed:
                first = next(iter(failed.values()))
                raise StorageError(f"{self.uri}: cannot delete {first.get('Key')}: "
                                   f"{first.get('Code')} {first.get('Message', '')}".rstrip())
        return count
