"""smchainer.serializers.load_npz: Chainer's npz format, with no code run from the file."""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import chainer
import chainer.links as L
import numpy as np
import pytest
from chainer import serializers, training

from smchainer.serializers import SafeNpz, UnsafeFileError, load_npz


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def trainer(out: str) -> tuple[training.Trainer, chainer.Link]:
    link = L.Classifier(L.Linear(1, 2))
    optimizer = chainer.optimizers.SGD()
    optimizer.setup(link)
    iterator = chainer.iterators.SerialIterator(np.arange(10, dtype=np.float32)[:, None], 2)
    updater = training.updaters.StandardUpdater(
        iterator, optimizer,
        converter=lambda batch, device=None: (np.stack(batch), np.zeros(len(batch), np.int32)))
    return training.Trainer(updater, (3, "iteration"), out=out), link


def test_a_model_loads_as_with_chainers_loader(tmp_path) -> None:
    np.random.seed(0)
    saved = L.Classifier(L.Linear(3, 2))
    serializers.save_npz(str(tmp_path / "model.npz"), saved)
    mine, chainers = L.Classifier(L.Linear(3, 2)), L.Classifier(L.Linear(3, 2))
    load_npz(tmp_path / "model.npz", mine)
    serializers.load_npz(str(tmp_path / "model.npz"), chainers)
    for name, param in mine.namedparams():
        np.testing.assert_array_equal(param.array, dict(chainers.namedparams())[name].array)
        np.testing.assert_array_equal(param.array, dict(saved.namedparams())[name].array)


def test_a_trainer_snapshot_resumes_where_it_was(tmp_path) -> None:
    first, link = trainer(str(tmp_path))
    first.run()
    serializers.save_npz(str(tmp_path / "snapshot.npz"), first)
    second, resumed = trainer(str(tmp_path))
    load_npz(tmp_path / "snapshot.npz", second)
    assert second.updater.iteration == 3
    np.testing.assert_array_equal(resumed.predictor.W.array, link.predictor.W.array)


def test_object_members_of_plain_values_load(tmp_path) -> None:
    np.savez(tmp_path / "values.npz", none=np.asarray(None),
             mixed=np.asarray([1, "two", 3.0, None], dtype=object))
    with SafeNpz(tmp_path / "values.npz") as npz:
        assert npz["none"][()] is None
        assert npz["mixed"].tolist() == [1, "two", 3.0, None]


def test_a_pickle_named_npz_is_refused_and_runs_nothing(tmp_path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "model.npz").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(UnsafeFileError, match=r"model\.npz is not an \.npz archive"):
        load_npz(tmp_path / "model.npz", L.Linear(3, 2))
    assert not marker.exists()
    # The payload is real: unpickling the file does run it.
    pickle.loads((tmp_path / "model.npz").read_bytes())
    assert marker.exists()


def test_a_pickled_callable_inside_a_member_is_refused_and_runs_nothing(tmp_path) -> None:
    marker = tmp_path / "ran"
    np.savez(tmp_path / "model.npz", W=np.asarray([Payload(str(marker))], dtype=object),
             b=np.zeros(2, np.float32))
    with pytest.raises(UnsafeFileError, match=r"member W\.npy\) holds a pickled .*makedirs"):
        load_npz(tmp_path / "model.npz", L.Linear(3, 2))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "not-npy-member", "empty"])
def test_damaged_files_are_errors_naming_the_file(tmp_path, damage) -> None:
    path = tmp_path / "model.npz"
    serializers.save_npz(str(path), L.Linear(3, 2))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "not-npy-member":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("W.npy", b"not an array")
            archive.writestr("b.npy", b"")
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(b"")
    with pytest.raises(UnsafeFileError, match=str(path)):
        load_npz(path, L.Linear(3, 2))
