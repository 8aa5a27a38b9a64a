"""CheckpointSync against a real S3-compatible server: restore, passes, the thread."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smchainer.storage import StorageError, s3_client
from smchainer.testing import free_port
from smchainer.training.checkpoint_sync import CheckpointSync

pytestmark = pytest.mark.s3

LOGGER = "smchainer.training.checkpoint_sync"
DEADLINE = 10.0


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, attached to the module's logger itself (the package may not propagate)."""
    module_logger = logging.getLogger(LOGGER)
    level, propagate = module_logger.level, module_logger.propagate
    module_logger.addHandler(caplog.handler)
    module_logger.setLevel(logging.DEBUG)
    module_logger.propagate = False  # else the root's caplog handler sees each record twice
    caplog.handler.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        module_logger.removeHandler(caplog.handler)
        module_logger.setLevel(level)
        module_logger.propagate = propagate


@pytest.fixture
def syncers() -> Iterator[list[CheckpointSync]]:
    """Syncers whose threads are stopped at the end, whatever the test did."""
    made: list[CheckpointSync] = []
    yield made
    for syncer in made:
        syncer._stopping.set()
        syncer._wake.set()
        if syncer._thread is not None:
            syncer._thread.join(timeout=DEADLINE)


def keys(bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = s3_client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def put(bucket: str, key: str, body: bytes) -> None:
    s3_client().put_object(Bucket=bucket, Key=key, Body=body)


def write(path: Path, body: bytes, mtime_ns: int | None = None) -> Path:
    """Write ``path``; with ``mtime_ns``, give it that modification time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


T0 = 1_700_000_000 * 10**9


# -- restore ----------------------------------------------------------------

def test_restore_downloads_only_absent_files(s3_bucket, tmp_path) -> None:
    put(s3_bucket, "job/ckpt/snapshot_1", b"one")
    put(s3_bucket, "job/ckpt/deep/snapshot_2", b"two")
    put(s3_bucket, "job/ckpt/kept", b"remote")
    put(s3_bucket, "job/ckpt/partial.tmp", b"tmp")
    put(s3_bucket, "job/other", b"not under the prefix")
    folder = tmp_path / "ckpt"
    write(folder / "kept", b"local")

    syncer = CheckpointSync(folder, f"s3://{s3_bucket}/job/ckpt")
    assert syncer.restore() == 2
    assert (folder / "snapshot_1").read_bytes() == b"one"
    assert (folder / "deep" / "snapshot_2").read_bytes() == b"two"
    assert (folder / "kept").read_bytes() == b"local"
    assert not (folder / "partial.tmp").exists()
    assert not (tmp_path / "other").exists()
    assert syncer.restore() == 0  # everything is there now

    # Restored files count as uploaded: an unchanged one is not sent back...
    put(s3_bucket, "job/ckpt/snapshot_1", b"changed remotely")
    syncer.sync()
    syncer.sync()
    assert keys(s3_bucket)["job/ckpt/snapshot_1"] == b"changed remotely"
    # ...and one removed locally is removed remotely too.
    (folder / "deep" / "snapshot_2").unlink()
    syncer.sync()
    assert "job/ckpt/deep/snapshot_2" not in keys(s3_bucket)


def test_an_empty_or_absent_prefix_restores_nothing(s3_bucket, tmp_path) -> None:
    assert CheckpointSync(tmp_path / "a", f"s3://{s3_bucket}/nothing/here").restore() == 0
    assert CheckpointSync(tmp_path / "b", f"s3://{s3_bucket}").restore() == 0


def test_restore_names_a_missing_bucket(s3_server, tmp_path) -> None:
    syncer = CheckpointSync(tmp_path, "s3://no-such-bucket-here/ckpt")
    with pytest.raises(StorageError, match="s3://no-such-bucket-here/ckpt/.*'no-such-bucket-here'"
                                           " does not exist"):
        syncer.restore()


def test_restore_names_the_uri_when_the_server_refuses(s3_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    endpoint = f"http://127.0.0.1:{free_port()}"
    syncer = CheckpointSync(tmp_path, "s3://bucket/ckpt", endpoint_url=endpoint)
    with pytest.raises(StorageError, match="s3://bucket/ckpt/"):
        syncer.restore()


# -- passes -----------------------------------------------------------------

def test_a_pass_uploads_settled_files_only(s3_bucket, tmp_path) -> None:
    folder = tmp_path / "ckpt"
    write(folder / "a", b"alpha", T0)
    write(folder / "b", b"be", T0)
    syncer = CheckpointSync(folder, f"s3://{s3_bucket}/ckpt/")

    syncer.sync()  # first sight: nothing is known to be settled yet
    assert keys(s3_bucket) == {}

    write(folder / "b", b"beta", T0 + 1)  # still being written
    syncer.sync()
    assert keys(s3_bucket) == {"ckpt/a": b"alpha"}

    write(folder / "b", b"bet2", T0 + 2)  # same size, new mtime: still changing
    syncer.sync()
    assert keys(s3_bucket) == {"ckpt/a": b"alpha"}

    syncer.sync()  # b settled
    assert keys(s3_bucket) == {"ckpt/a": b"alpha", "ckpt/b": b"bet2"}

    # Unchanged files are not uploaded again; a changed one is, once settled.
    put(s3_bucket, "ckpt/a", b"overwritten remotely")
    write(folder / "b", b"bet3", T0 + 3)
    syncer.sync()
    syncer.sync()
    assert keys(s3_bucket) == {"ckpt/a": b"overwritten remotely", "ckpt/b": b"bet3"}


def test_settled_only_false_uploads_at_once(s3_bucket, tmp_path) -> None:
    write(tmp_path / "a", b"alpha")
    syncer = CheckpointSync(tmp_path, f"s3://{s3_bucket}")
    syncer.sync(settled_only=False)
    assert keys(s3_bucket) == {"a": b"alpha"}


def test_notify_uploads_at_once(s3_bucket, tmp_path, logs) -> None:
    folder = tmp_path / "ckpt"
    snapshot = write(folder / "snapshots" / "iter_100", b"weights")
    syncer = CheckpointSync(folder, f"s3://{s3_bucket}/p")
    syncer.notify(snapshot)
    assert keys(s3_bucket) == {"p/snapshots/iter_100": b"weights"}
    assert f"checkpoints: uploaded 1 file(s) to s3://{s3_bucket}/p/" in logs.text
    assert f"s3://{s3_bucket}/p/snapshots/iter_100" in logs.text

    logs.clear()
    syncer.notify(snapshot)  # unchanged: nothing to do
    assert "uploaded" not in logs.text
    syncer.notify(folder / "half.tmp")  # never synced, even when notified
    with pytest.raises(ValueError, match="not inside"):
        syncer.notify(tmp_path / "elsewhere")


def test_tmp_and_damaged_files_are_never_uploaded(s3_bucket, tmp_path) -> None:
    write(tmp_path / "snapshot.tmp", b"half")
    write(tmp_path / "sub" / "snapshot_3.damaged", b"bad")
    write(tmp_path / "snapshot_2", b"good")
    syncer = CheckpointSync(tmp_path, f"s3://{s3_bucket}/c")
    syncer.sync()
    syncer.sync()
    syncer.stop()
    assert keys(s3_bucket) == {"c/snapshot_2": b"good"}


def test_nested_folders_keep_their_paths(s3_bucket, tmp_path) -> None:
    write(tmp_path / "x" / "y" / "z.npz", b"deep")
    write(tmp_path / "top", b"top")
    CheckpointSync(tmp_path, f"s3://{s3_bucket}/a/b").sync(settled_only=False)
    assert keys(s3_bucket) == {"a/b/x/y/z.npz": b"deep", "a/b/top": b"top"}

    restored = tmp_path.parent / (tmp_path.name + "-restored")
    assert CheckpointSync(restored, f"s3://{s3_bucket}/a/b").restore() == 2
    assert (restored / "x" / "y" / "z.npz").read_bytes() == b"deep"


def test_removed_files_are_deleted_but_unknown_objects_kept(s3_bucket, tmp_path, logs) -> None:
    put(s3_bucket, "c/foreign", b"someone else's")
    write(tmp_path / "snapshot_1", b"1")
    write(tmp_path / "snapshot_2", b"2")
    syncer = CheckpointSync(tmp_path, f"s3://{s3_bucket}/c")
    syncer.sync(settled_only=False)
    assert set(keys(s3_bucket)) == {"c/foreign", "c/snapshot_1", "c/snapshot_2"}

    (tmp_path / "snapshot_1").unlink()
    syncer.sync()
    assert set(keys(s3_bucket)) == {"c/foreign", "c/snapshot_2"}
    assert "deleted 1 object(s)" in logs.text

    # A folder that vanished altogether deletes nothing (an unmounted disk, say).
    other = CheckpointSync(tmp_path / "gone", f"s3://{s3_bucket}/c")
    other.sync()
    assert set(keys(s3_bucket)) == {"c/foreign", "c/snapshot_2"}


# -- the thread -------------------------------------------------------------

def test_the_thread_uploads_new_files(s3_bucket, tmp_path, syncers) -> None:
    syncer = CheckpointSync(tmp_path, f"s3://{s3_bucket}/t", interval=0.2)
    syncers.append(syncer)
    syncer.start()
    write(tmp_path / "snapshot_1", b"one")
    wait_for(lambda: keys(s3_bucket) == {"t/snapshot_1": b"one"}, "the settled file")

    # notify() wakes the thread: no need to wait for the file to settle.
    syncer.interval = 60.0  # takes effect after the pass now scheduled
    time.sleep(0.5)
    write(tmp_path / "snapshot_2", b"two")
    syncer.notify(tmp_path / "snapshot_2")
    wait_for(lambda: "t/snapshot_2" in keys(s3_bucket), "the notified file", timeout=5)
    syncer.stop()
    assert syncer._thread is None


def test_stop_uploads_a_file_still_changing(s3_bucket, tmp_path, syncers) -> None:
    syncer = CheckpointSync(tmp_path, f"s3://{s3_bucket}", interval=60.0)
    syncers.append(syncer)
    syncer.start()
    write(tmp_path / "log.json", b"[1]", T0)
    syncer.sync()
    write(tmp_path / "log.json", b"[1, 2]", T0 + 1)  # changed since that pass
    syncer.sync()
    assert keys(s3_bucket) == {}
    syncer.stop()
    assert keys(s3_bucket) == {"log.json": b"[1, 2]"}


def test_the_thread_survives_an_outage(s3_bucket, tmp_path, syncers, logs) -> None:
    client = s3_client()
    syncer = CheckpointSync(tmp_path, f"s3://{s3_bucket}/o", interval=0.2)
    syncers.append(syncer)
    syncer.start()
    write(tmp_path / "snapshot_1", b"one")
    wait_for(lambda: "o/snapshot_1" in keys(s3_bucket), "the first upload")

    client.delete_object(Bucket=s3_bucket, Key="o/snapshot_1")
    client.delete_bucket(Bucket=s3_bucket)
    write(tmp_path / "snapshot_2", b"two")
    message = f"bucket '{s3_bucket}' does not exist"

    def warnings() -> list[logging.LogRecord]:
        return [r for r in logs.records
                if r.levelno == logging.WARNING and message in r.getMessage()]

    wait_for(lambda: bool(warnings()), "the warning")
    time.sleep(1.0)  # about five more failing passes
    assert len(warnings()) == 1, "the same error is logged once"
    assert syncer._thread is not None and syncer._thread.is_alive()

    client.create_bucket(Bucket=s3_bucket)
    wait_for(lambda: "o/snapshot_2" in keys(s3_bucket), "the upload after the outage")
    assert "works again" in logs.text
    syncer.stop()


def test_stop_raises_errors_of_the_final_pass(s3_server, tmp_path, syncers) -> None:
    write(tmp_path / "a", b"a")
    syncer = CheckpointSync(tmp_path, "s3://no-such-bucket-either/x", interval=0.2)
    syncers.append(syncer)
    syncer.start()
    with pytest.raises(StorageError, match="'no-such-bucket-either' does not exist"):
        syncer.stop()


def test_notify_from_another_thread_never_uploads_a_file_twice_at_once(
        s3_bucket, tmp_path, syncers) -> None:
    syncer = CheckpointSync(tmp_path, f"s3://{s3_bucket}/n", interval=0.05)
    syncers.append(syncer)
    upload_file = syncer.client.upload_file
    in_flight: set[str] = set()
    overlaps: list[str] = []
    guard = threading.Lock()

    def tracked(filename: str, bucket: str, key: str) -> None:
        with guard:
            if key in in_flight:
                overlaps.append(key)
            in_flight.add(key)
        try:
            time.sleep(0.01)
            upload_file(filename, bucket, key)
        finally:
            with guard:
                in_flight.discard(key)

    syncer.client.upload_file = tracked
    syncer.start()
    snapshot = tmp_path / "snapshot"
    for step in range(30):
        write(snapshot, str(step).encode(), T0 + step)
        syncer.notify(snapshot)
        time.sleep(0.01)
    syncer.stop()
    assert overlaps == []
    assert keys(s3_bucket) == {"n/snapshot": b"29"}
