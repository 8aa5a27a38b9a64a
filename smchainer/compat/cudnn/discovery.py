"""Finding and checking the cuDNN 9 library (``libcudnn.so.9``), without importing CuPy or torch.

Looked for in this order; the first that loads and reports major version 9
wins:

1. ``SMCHAINER_CUDNN_LIBRARY``: a path to ``libcudnn.so.9``. When it is set,
   nothing else is tried (a wrong path is reported, not worked around).
2. The ``nvidia-cudnn-cu13`` / ``nvidia-cudnn-cu12`` wheels:
   ``nvidia/cudnn/lib/libcudnn.so.9`` (``nvidia/cu13/lib`` too) on ``sys.path``.
3. torch's own copy, ``torch/lib/libcudnn.so.9``, when torch is installed.
4. The system: ``ctypes.util.find_library("cudnn")``, then ``libcudnn.so.9``.

cuDNN 9 is a small dispatcher (``libcudnn.so.9``) that loads ``libcudnn_ops``,
``libcudnn_cnn`` and the engines when needed; the legacy functions are
exported by the dispatcher itself. The check asks the dispatcher for its
version (``cudnnGetVersion()``, 91900 for 9.19.0) and, where the library has
them, runs ``cudnnOpsVersionCheck`` and ``cudnnCnnVersionCheck`` so that a
missing sub-library is found now rather than at the first convolution.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from dataclasses import dataclass, field

LIBRARY_ENV = "SMCHAINER_CUDNN_LIBRARY"
SONAME = "libcudnn.so.9"
REQUIRED_MAJOR = 9
_WHEEL_DIRS = (("nvidia", "cudnn", "lib"), ("nvidia", "cu13", "lib"))


@dataclass(frozen=True)
class Library:
    """A loaded cuDNN library that passed the checks."""

    path: str
    version: int
    source: str
    handle: ctypes.CDLL = field(repr=False, compare=False)

    @property
    def version_string(self) -> str:
        """``"9.19.0"`` for version 91900."""
        major, rest = divmod(self.version, 10000)
        return f"{major}.{rest // 100}.{rest % 100}"


@dataclass
class Discovery:
    """What the search found: a library, or why there is none (each candidate's reason)."""

    library: Library | None
    tried: list[tuple[str, str, str]] = field(default_factory=list)  # (source, path, outcome)

    @property
    def reason(self) -> str | None:
        """Why no library is in use, or None when one is."""
        if self.library is not None:
            return None
        if not self.tried:
            return "no libcudnn.so.9 found (nvidia-cudnn-cu13 wheel, torch, system)"
        return "; ".join(f"{path} ({source}): {outcome}" for source, path, outcome in self.tried)


def candidates(search_path: list[str] | None = None,
               environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """``(source, path or soname)`` pairs in the order they are tried."""
    env = os.environ if environ is None else environ
    explicit = env.get(LIBRARY_ENV)
    if explicit:
        return [(LIBRARY_ENV, explicit)]
    found: list[tuple[str, str]] = []
    entries = sys.path if search_path is None else search_path
    for entry in entries:
        for parts in _WHEEL_DIRS:
            path = os.path.join(entry or ".", *parts, SONAME)
            if os.path.exists(path):
                found.append(("nvidia-cudnn wheel", path))
    for location in _torch_locations(entries if search_path is not None else None):
        path = os.path.join(location, "lib", SONAME)
        if os.path.exists(path):
            found.append(("torch", path))
    system = ctypes.util.find_library("cudnn")
    if system:
        found.append(("system", system))
    found.append(("system", SONAME))
    unique: dict[str, tuple[str, str]] = {}
    for source, path in found:
        key = os.path.realpath(path) if os.path.isabs(path) else path
        unique.setdefault(key, (source, path))
    return list(unique.values())


def _torch_locations(search_path: list[str] | None) -> list[str]:
    if search_path is not None:  # a given path: look, do not ask the import system
        return [os.path.join(entry, "torch") for entry in search_path
                if os.path.isdir(os.path.join(entry, "torch"))]
    try:
        spec = importlib.util.find_spec("torch")  # finds the package without running it
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(spec.submodule_search_locations)


def check(path: str, source: str = "given") -> Library:
    """Load ``path`` and check it is cuDNN 9; ``OSError``/``RuntimeError`` say why not."""
    handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    try:
        get_version = handle.cudnnGetVersion
    except AttributeError:
        raise RuntimeError("not a cuDNN library (no cudnnGetVersion)") from None
    get_version.argtypes, get_version.restype = [], ctypes.c_size_t
    version = int(get_version())
    if version // 10000 != REQUIRED_MAJOR:
        raise RuntimeError(f"cuDNN version {version}: the binding needs major version 9")
    for name in ("cudnnOpsVersionCheck", "cudnnCnnVersionCheck"):
        function = getattr(handle, name, None)
        if function is None:
            continue
        function.argtypes, function.restype = [], ctypes.c_int
        status = function()
        if status != 0:
            raise RuntimeError(f"{name}() returned status {status} (a sub-library is missing "
                               "or from another cuDNN release)")
    resolved = path
    if not os.path.isabs(path):  # a soname: say which file it was
        resolved = _loaded_path(path) or path
    return Library(path=resolved, version=version, source=source, handle=handle)


def _loaded_path(soname: str) -> str | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if line.rstrip().endswith(soname) or f"/{soname}" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def discover(search_path: list[str] | None = None,
             environ: dict[str, str] | None = None) -> Discovery:
    """Try the candidates in order; the first cuDNN 9 wins."""
    result = Discovery(library=None)
    for source, path in candidates(search_path, environ):
        try:
            result.library = check(path, source)
            return result
        except (OSError, RuntimeError) as exc:
            result.tried.append((source, path, str(exc).splitlines()[0][:300]))
    return result
