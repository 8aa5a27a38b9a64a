"""Shared pieces of the notebook-API tests: CIFAR-10 channels, the example script, processes."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.api.cifar import make_channels
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "cifar10"
#: a VGG small enough for a CPU test: 1/8 of the channels, one convolution per stage
TINY_VGG = {"epochs": 1, "batch-size": 32, "width": 0.125, "depth": 8}


@pytest.fixture(scope="session")
def cifar_channels(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> dict[str, Path]:
    """``train`` (250 images) and ``test`` (100) channels in the SageMaker example's format."""
    folder = shared_dir / "data" / "cifar10"
    if not (folder / "test.zip").exists():
        pytest.skip(f"CIFAR-10 not found at {folder} (set SMCHAINER_SHARED)")
    return make_channels(folder, tmp_path_factory.mktemp("cifar"), train_per_class=25,
                         test_per_class=10)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs and servers here see neither SageMaker nor smchainer settings of the caller."""
    for name in list(os.environ):
        if name.startswith(("SM_", "SAGEMAKER_", "SMCHAINER_", "OMPI_COMM", "PMIX")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SMCHAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")


def load_script(path: Path) -> ModuleType:
    """Import a training script as the model server does (its folder on ``sys.path``)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"
