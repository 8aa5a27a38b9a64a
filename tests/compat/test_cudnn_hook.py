"""Finding cuDNN 9, and the import hook putting the binding in place of CuPy 14's missing modules.

The hook tests run in a subprocess with a fake CuPy 14 (no ``cupy.cudnn``) on
``PYTHONPATH`` and the stub library as ``SMCHAINER_CUDNN_LIBRARY``, so that
Chainer's own ``chainer.backends.cuda`` decides ``cudnn_enabled`` and this
process keeps its real (absent) CuPy.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from smchainer.compat.cudnn import discovery
from tests.compat.cudnn_fakes import Stub, build_stub, compiler, write_fake_cupy

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler to build the stub")


@pytest.fixture(scope="module")
def stub_path(tmp_path_factory):
    return build_stub(tmp_path_factory.mktemp("cudnn-stub"))


@pytest.fixture(scope="module")
def fake_cupy(tmp_path_factory):
    return write_fake_cupy(tmp_path_factory.mktemp("fake-cupy"))


def test_discovery_order(tmp_path, stub_path):
    site = tmp_path / "site"
    wheel = site / "nvidia" / "cudnn" / "lib"
    torch_lib = site / "torch" / "lib"
    for folder in (wheel, torch_lib):
        folder.mkdir(parents=True)
        shutil.copy(stub_path, folder / "libcudnn.so.9")
    found = discovery.candidates([str(site)], environ={})
    assert found[0] == ("nvidia-cudnn wheel", str(wheel / "libcudnn.so.9"))
    assert found[1] == ("torch", str(torch_lib / "libcudnn.so.9"))
    assert found[-1] == ("system", "libcudnn.so.9")
    # the variable wins, alone
    explicit = {discovery.LIBRARY_ENV: "/nowhere/libcudnn.so.9"}
    assert discovery.candidates([str(site)], environ=explicit) == [
        (discovery.LIBRARY_ENV, "/nowhere/libcudnn.so.9")]
    result = discovery.discover([str(site)], environ={})
    assert result.library is not None and result.library.source == "nvidia-cudnn wheel"
    assert result.library.version == 91900 and result.library.version_string == "9.19.0"
    missing = discovery.discover([str(site)], environ=explicit)
    assert missing.library is None and "/nowhere/libcudnn.so.9" in missing.reason


def test_version_must_be_9(tmp_path, stub_path):
    copy = tmp_path / "libcudnn.so.9"  # its own copy: its own version switch
    shutil.copy(stub_path, copy)
    Stub(copy).set_version(80907)
    with pytest.raises(RuntimeError, match="cuDNN version 80907: the binding needs major"):
        discovery.check(str(copy))
    result = discovery.discover([], environ={discovery.LIBRARY_ENV: str(copy)})
    assert result.library is None and "80907" in result.reason
    Stub(copy).set_version(91900)
    assert discovery.check(str(copy)).version == 91900


PROBE = textwrap.dedent('''
    import io, json, sys
    import smchainer, chainer
    import chainer.backends.cuda as cuda
    import chainer.functions as F
    from chainer.functions.noise import dropout
    from chainer.functions.rnn import n_step_lstm
    from chainer.functions.connection import convolution_2d
    from smchainer.compat import cudnn
    from smchainer.compat.cupy import describe_gpu_stack
    from smchainer.device import cudnn_in_use

    out = io.StringIO()
    chainer.print_runtime_info(out)
    result = {
        "cudnn_enabled": cuda.cudnn_enabled,
        "version": cuda._cudnn_version,
        "modules_are_cupys": getattr(cuda, "cudnn", None) is sys.modules.get("cupy.cudnn")
            is not None and cuda.libcudnn is sys.modules.get("cupy.cuda.cudnn"),
        "bn_min_epsilon": getattr(cuda.libcudnn, "CUDNN_BN_MIN_EPSILON", None),
        "should_use": chainer.should_use_cudnn(">=auto", 5000),
        "conv_sees": convolution_2d.chainer.should_use_cudnn(">=auto"),
        "dropout_sees": dropout.chainer.should_use_cudnn(">=auto", 5000),
        "lstm_sees": n_step_lstm.chainer.should_use_cudnn(">=auto", 5000),
        "stack": describe_gpu_stack()["cudnn"],
        "in_use": cudnn_in_use(),
        "runtime_info": out.getvalue(),
    }
    class Array:  # what Dropout.forward_gpu looks at before choosing its path
        shape = (2, 3)
        dtype = "float32"
        class flags:
            c_contiguous = True
    try:
        dropout.Dropout(0.5).forward_gpu((Array(),))
    except Exception as exc:
        result["dropout_path"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result))
''')


def run_probe(fake_cupy, stub_path, **env):
    environ = {**os.environ, "PYTHONPATH": f"{fake_cupy}:{os.getcwd()}",
               discovery.LIBRARY_ENV: str(stub_path), **env}
    done = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_hook_enables_cudnn_in_chainer(fake_cupy, stub_path):
    result = run_probe(fake_cupy, stub_path)
    assert result["cudnn_enabled"] is True and result["version"] == 91900
    assert result["modules_are_cupys"] is True
    assert result["bn_min_epsilon"] == 0.0
    assert result["should_use"] is True and result["conv_sees"] is True
    # not bound: these take Chainer's own path
    assert result["dropout_sees"] is False and result["lstm_sees"] is False
    assert "non-cuDNN path" in result["dropout_path"]
    stack = result["stack"]
    assert stack["active"] and stack["library"] == str(stub_path) and stack["version"] == 91900
    assert stack["binding"] == "smchainer ctypes binding"
    assert result["in_use"] == f"cuDNN 9.19.0 (smchainer ctypes binding, {stub_path})"
    assert f"cuDNN: 9.19.0 (smchainer ctypes binding, {stub_path})" in result["runtime_info"]


def test_switches(fake_cupy, stub_path):
    off = run_probe(fake_cupy, stub_path, SMCHAINER_CUDNN="0")
    assert off["cudnn_enabled"] is False and off["stack"]["reason"] == "SMCHAINER_CUDNN=0"
    assert off["dropout_sees"] is False  # Chainer's own answer: no cuDNN at all
    assert "cuDNN:" not in off["runtime_info"]
    chainer_off = run_probe(fake_cupy, stub_path, CHAINER_CUDNN="0")
    assert chainer_off["cudnn_enabled"] is False and chainer_off["stack"]["active"] is True
    assert chainer_off["in_use"].startswith("no cuDNN (CHAINER_CUDNN=0; available: cuDNN 9.19.0")
    wrong = run_probe(fake_cupy, stub_path, SMCHAINER_CUDNN_LIBRARY="/nowhere/libcudnn.so.9")
    assert wrong["cudnn_enabled"] is False and "/nowhere" in wrong["stack"]["reason"]
