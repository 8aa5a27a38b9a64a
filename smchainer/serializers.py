"""Loading Chainer ``.npz`` files without running code from them.

Chainer's :func:`chainer.serializers.load_npz` opens files with
``allow_pickle=True``: a pickle saved under the name ``model.npz`` (or a
snapshot) then runs whatever it carries as soon as it is loaded. smchainer
reads model files and snapshots that come from model archives, S3 and
checkpoint folders, so it loads them with :func:`load_npz` here instead:

- the file must be a zip of ``.npy`` members (an ``.npz``); anything else,
  a bare pickle included, is refused with an error naming the file;
- numeric members are read with ``allow_pickle=False``;
- members that hold Python objects (Chainer writes ``None`` values, such as
  an iterator's unset state, as object arrays) are unpickled by an
  unpickler that can build nothing but NumPy's own arrays and dtypes, so
  ``None``, numbers and strings load and any other object, a payload's
  callable included, is refused before it exists.

The result is what Chainer's deserializer (:class:`NpzDeserializer`) makes
of the members, so :func:`load_npz` is a drop-in replacement:
``from smchainer.serializers import load_npz``.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np

from smchainer.errors import SmchainerError

#: The only globals a member's pickle may name: how NumPy pickles an object array.
ALLOWED_GLOBALS = frozenset({
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class UnsafeFileError(SmchainerError):
    """A file holds something that loading it would have to execute."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy object arrays of plain values, and nothing that needs another global."""

    def __init__(self, file: IO[bytes], where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"{self.where} holds a pickled {module}.{name}, which is never loaded: "
            "only arrays and plain values are read from model files and snapshots"
        )


class SafeNpz(Mapping[str, np.ndarray]):
    """The members of an ``.npz`` file, read without running code (see the module docstring)."""

    def __init__(self, file: str | os.PathLike[str] | IO[bytes]) -> None:
        self.name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file)
        try:
            self._zip = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise UnsafeFileError(
                f"{self.name} is not an .npz archive ({error}); it is not loaded, since "
                "anything else (a pickle, say) could run code"
            ) from None
        self._members = {
            name[:-4] if name.endswith(".npy") else name: name
            for name in self._zip.namelist()
        }

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> SafeNpz:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __getitem__(self, key: str) -> np.ndarray:
        member = self._members[key]
        where = f"{self.name} (member {member})"
        try:
            data = self._zip.read(member)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as error:
            raise UnsafeFileError(f"{where} cannot be read: {error}") from None
        buffer = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(buffer)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(buffer)
            else:
                _, _, dtype = np.lib.format.read_array_header_2_0(buffer)
        except ValueError as error:
            raise UnsafeFileError(f"{where} is not an .npy array: {error}") from None
        if not dtype.hasobject:
            try:
                return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
            except ValueError as error:
                raise UnsafeFileError(f"{where} cannot be read: {error}") from None
        try:
            array = _ArrayUnpickler(buffer, where).load()
        except UnsafeFileError:
            raise
        except Exception as error:  # a damaged pickle: any of pickle's many errors
            raise UnsafeFileError(f"{where} cannot be read: {type(error).__name__}: "
                                  f"{error}") from None
        if not isinstance(array, np.ndarray):
            raise UnsafeFileError(f"{where} holds a {type(array).__name__}, not an array")
        return array


def read_npz(file: str | os.PathLike[str] | IO[bytes]) -> dict[str, np.ndarray]:
    """Every member of an ``.npz`` file, read as :class:`SafeNpz` reads them.

    :raises UnsafeFileError: as :func:`load_npz`.
    """
    with SafeNpz(file) as npz:
        return {key: npz[key] for key in npz}


def load_npz(file: str | os.PathLike[str] | IO[bytes], obj: Any, path: str = "",
             strict: bool = True, ignore_names: Any = None) -> None:
    """Load ``obj`` from an ``.npz`` file as :func:`chainer.serializers.load_npz` does, safely.

    :raises UnsafeFileError: for a file that is not an ``.npz`` archive, or
        a member that is not an array of numbers or plain values.
    """
    from chainer.serializers.npz import NpzDeserializer

    with SafeNpz(file) as npz:
        NpzDeserializer(npz, path=path, strict=strict, ignore_names=ignore_names).load(obj)
