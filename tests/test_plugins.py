"""The plugin manager: defaults, user modules, entry points, the facade."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from smchainer import hookimpl, hookspecs
from smchainer.errors import PluginError, UnsupportedMediaType
from smchainer.manager import Hooks, NoImplementation
from smchainer.plugins import get_plugin_manager, import_user_module, plugin_from_module
from tests.conftest import command, registered


class Doubler:
    """A model: a callable, no Chainer needed."""

    def __call__(self, x):
        return x * 2


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_serve_npy_end_to_end(plugin_manager) -> None:
    hooks = Hooks(plugin_manager)
    body, kind = hooks.transform(Doubler(), b"[[1, 2]]", "application/json", "text/csv")
    assert (body, kind) == (b"2,4\n", "text/csv")


def test_default_model_fn_asks_for_one(plugin_manager, tmp_path) -> None:
    with pytest.raises(Exception, match="model_fn"):
        Hooks(plugin_manager).model_fn(str(tmp_path))


def test_user_module_overrides_one_hook_and_defaults_serve_the_rest(tmp_path) -> None:
    script = write(tmp_path / "inference.py", """
        import numpy as np

        class Model:
            def __call__(self, x):
                return x + 1

        def model_fn(model_dir):
            return Model()

        def input_fn(request_body, request_content_type):
            # SageMaker names, not smchainer's: called positionally.
            return np.full((1, 2), float(request_body.decode()), dtype=np.float32)

        if __name__ == "__main__":
            raise SystemExit("training code must not run when served")
    """)
    hooks = Hooks(get_plugin_manager(user_module=script, load_entrypoints=False))
    model = hooks.model_fn(str(tmp_path))
    body, kind = hooks.transform(model, b"41", "text/plain", "application/json")
    assert json.loads(body) == [[42.0, 42.0]]
    assert kind == "application/json"


def test_hookimpl_marked_plugin_wins_over_defaults_whatever_the_order(plugin_manager) -> None:
    class Negate:
        @hookimpl
        def predict_fn(self, input_data, model):
            return -model(input_data)

    with registered(plugin_manager, Negate(), "negate"):
        body, _ = Hooks(plugin_manager).transform(Doubler(), b"[1]", "application/json",
                                                  "application/json")
    assert json.loads(body) == [-2.0]


def test_returning_none_passes_the_call_on(plugin_manager) -> None:
    class OnlyXml:
        @hookimpl
        def input_fn(self, input_data, content_type):
            return None if content_type != "application/xml" else np.zeros(1)

    with registered(plugin_manager, OnlyXml(), "xml"):
        hooks = Hooks(plugin_manager)
        assert hooks.input_fn(b"<a/>", "application/xml").shape == (1,)
        assert hooks.input_fn(b"[3]", "application/json").tolist() == [3.0]
        with pytest.raises(UnsupportedMediaType):
            hooks.input_fn(b"x", "text/plain")


def test_transform_fn_replaces_the_three(tmp_path) -> None:
    script = write(tmp_path / "inference.py", """
        def transform_fn(model, data, content_type, accept):
            return b"handled " + data, "text/plain"
    """)
    hooks = Hooks(get_plugin_manager(user_module=script, load_entrypoints=False))
    assert hooks.transform(None, b"x", "whatever/type", "text/plain") == (
        b"handled x", "text/plain")


def test_transform_fn_beside_input_fn_is_refused(tmp_path) -> None:
    script = write(tmp_path / "inference.py", """
        def transform_fn(model, data, content_type, accept): ...
        def input_fn(data, content_type): ...
    """)
    with pytest.raises(PluginError, match="transform_fn.*input_fn"):
        get_plugin_manager(user_module=script, load_entrypoints=False)


def test_misspelled_hook_in_user_module_is_an_error(tmp_path) -> None:
    script = write(tmp_path / "inference.py", """
        def predit_fn(data, model): ...
    """)
    with pytest.raises(PluginError, match="did you mean 'predict_fn'"):
        get_plugin_manager(user_module=script, load_entrypoints=False)


def test_misspelled_hookimpl_in_a_plugin_is_an_error() -> None:
    class Typo:
        @hookimpl
        def ouput_fn(self, prediction, accept): ...

    with pytest.raises(PluginError, match="ouput_fn"):
        get_plugin_manager(load_entrypoints=False, extra_plugins=[("typo", Typo())])


def test_user_module_that_fails_to_import_names_itself(tmp_path) -> None:
    script = write(tmp_path / "inference.py", "import not_a_module_anywhere\n")
    with pytest.raises(PluginError, match="inference.py.*ModuleNotFoundError"):
        import_user_module(script)


def test_a_hook_nobody_answers_is_a_clear_error(plugin_manager, tmp_path) -> None:
    from smchainer.training.env import TrainingEnv

    for impl in plugin_manager.hook.train.get_hookimpls():
        plugin_manager.unregister(name=impl.plugin_name)
    with pytest.raises(NoImplementation, match="no plugin answered train"):
        Hooks(plugin_manager).train(TrainingEnv(job_dir=tmp_path))


def test_every_hookspec_is_documented() -> None:
    for name in hookspecs.HOOK_NAMES:
        spec = getattr(hookspecs, name)
        doc = inspect.getdoc(spec) or ""
        assert "first non-None" in doc, name
        for parameter in inspect.signature(spec).parameters:
            assert f":param {parameter}:" in doc, (name, parameter)
        assert ":return:" in doc, name


def test_every_hook_is_reachable_from_a_user_module(tmp_path) -> None:
    # One function per hook name, each recording its call: all are wired.
    calls = []
    module = type(sys)("user_all_hooks")
    for name in hookspecs.HOOK_NAMES:
        if name == "transform_fn":
            continue
        # SageMaker's arguments: the spec's, without smchainer's own context.
        arity = len([p for p in inspect.signature(getattr(hookspecs, name)).parameters
                     if p != "context"])

        def impl(*args, _name=name, _arity=arity):
            assert len(args) == _arity
            calls.append(_name)
            return {"output_fn": b"out"}.get(_name, _name)

        setattr(module, name, impl)
    hooks = Hooks(get_plugin_manager(user_module=module, load_entrypoints=False))
    model = hooks.model_fn("dir")
    hooks.transform(model, b"", "a/b", "c/d")
    assert hooks.batch_fn("decoded", model, hooks.request_context(model)) == "batch_fn"
    hooks.train(None)  # type: ignore[arg-type]
    assert calls == ["model_fn", "input_fn", "predict_fn", "output_fn", "batch_fn", "train"]
    other = type(sys)("user_transform")
    other.transform_fn = lambda *args: b"t"
    assert Hooks(get_plugin_manager(user_module=other, load_entrypoints=False)).transform(
        None, b"", "a/b", "c/d") == (b"t", "c/d")


def test_plugin_from_module_keeps_marked_modules_as_they_are() -> None:
    module = type(sys)("marked")

    @hookimpl
    def model_fn(model_dir):
        return "model"

    module.model_fn = model_fn
    assert plugin_from_module(module) is module


# --- entry points, discovered for real by fresh processes -------------------

def fake_distribution(root: Path, name: str, version: str, module: str, body: str) -> None:
    """An installed distribution (a dist-info folder on sys.path) with an entry point."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[smchainer]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


def run_plugins_command(extra_path: Path | None = None, **env: str):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SMCHAINER_")}
    if extra_path is not None:
        environment["PYTHONPATH"] = str(extra_path)
    environment.update(env)
    return subprocess.run([command("smchainer"), "plugins"], capture_output=True, text=True,
                          env=environment, timeout=120)


def test_installed_plugins_are_discovered_by_a_fresh_process() -> None:
    result = run_plugins_command()
    assert result.returncode == 0, result.stderr
    listed = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert listed["smchainer.default_plugins.serving"]["kind"] == "default"
    assert set(listed["smchainer.default_plugins.serving"]["hooks"]) >= {
        "model_fn", "input_fn", "predict_fn", "output_fn"}
    image = listed["image"]
    assert image["kind"] == "entrypoint"
    assert image["distribution"] == "smchainer-image"
    assert "input_fn" in image["hooks"]


def test_broken_plugin_is_reported_by_name_distribution_and_version(tmp_path) -> None:
    fake_distribution(tmp_path, "smchainer-broken", "1.2.3", "broken_plugin",
                      "raise ImportError('needs libfoo')\n")
    result = run_plugins_command(tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: Error importing plugin 'broken_plugin'")
    assert "smchainer-broken 1.2.3" in result.stderr
    assert "needs libfoo" in result.stderr


def test_load_plugins_restricts_and_autoload_switch_disables(tmp_path) -> None:
    fake_distribution(tmp_path, "smchainer-broken", "1.2.3", "broken_plugin",
                      "raise ImportError('needs libfoo')\n")
    only_image = run_plugins_command(tmp_path, SMCHAINER_LOAD_PLUGINS="image")
    assert only_image.returncode == 0, only_image.stderr
    names = [entry["name"] for entry in json.loads(only_image.stdout)]
    assert "image" in names and "broken_plugin" not in names

    off = run_plugins_command(tmp_path, SMCHAINER_DISABLE_PLUGIN_AUTOLOAD="1")
    assert off.returncode == 0, off.stderr
    assert {entry["kind"] for entry in json.loads(off.stdout)} == {"default"}

    missing = run_plugins_command(tmp_path, SMCHAINER_LOAD_PLUGINS="nope")
    assert missing.returncode == 1
    assert "nope" in missing.stderr and "image" in missing.stderr


def test_plugins_command_includes_the_user_module(tmp_path) -> None:
    script = write(tmp_path / "inference.py", "def model_fn(model_dir):\n    return 1\n")
    result = subprocess.run([command("smchainer"), "plugins", "--user-module", str(script)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    user = json.loads(result.stdout)[-1]
    assert user == {"name": "user:inference", "kind": "user", "hooks": ["model_fn"],
                    "path": str(script)}


def test_command_usage_errors_exit_2() -> None:
    result = subprocess.run([command("smchainer"), "plugins", "--nope"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("Error: unrecognized arguments: --nope")
    version = subprocess.run([command("smchainer"), "--version"], capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip().endswith("0.1.0")


def test_positional_adapters_have_the_spec_argument_names() -> None:
    from smchainer.plugins import positional_adapter

    for name in hookspecs.HOOK_NAMES:
        spec = inspect.signature(getattr(hookspecs, name)).parameters
        sagemaker = [p for p in spec if p != "context"]
        adapter = positional_adapter(name, print)
        assert list(inspect.signature(adapter).parameters) == sagemaker, name


class PlainText:
    """A plugin that reads and writes text/plain and says so through media_types."""

    @hookimpl
    def media_types(self):
        from smchainer.content import MediaTypes

        return MediaTypes(decodes=("text/plain",), encodes=("text/plain",))

    @hookimpl
    def input_fn(self, input_data, content_type):
        if content_type != "text/plain":
            return None
        return np.asarray([float(input_data.decode())], dtype=np.float32)

    @hookimpl
    def output_fn(self, prediction, accept):
        if accept != "text/plain":
            return None
        return f"{float(np.asarray(prediction)[0]):g}", "text/plain"


def test_supported_types_are_gathered_from_the_registered_plugins(plugin_manager) -> None:
    from smchainer import content

    with registered(plugin_manager, PlainText(), "text"):
        hooks = Hooks(plugin_manager)
        assert hooks.media_types().decodes == (*content.NUMPY_TYPES, "text/plain")
        assert hooks.media_types().encodes == (*content.NUMPY_TYPES, "text/plain")
        # A 415 names the plugin's type beside the NumPy ones.
        with pytest.raises(UnsupportedMediaType, match=r"supported: .*text/csv, text/plain"):
            hooks.transform(Doubler(), b"x", "application/xml", "application/json")
        # text/* covers every registered text type, NumPy's first; the wildcard is resolved
        # there and not passed on, so that no later step can pick a type q=0 excluded.
        accepts = content.acceptable_types("text/*", content.JSON, hooks.media_types().encodes)
        assert accepts == ["text/csv", "text/plain"]
        assert content.acceptable_types("text/*, text/csv;q=0", content.JSON,
                                        hooks.media_types().encodes) == ["text/plain"]
        # A 406 names what the plugins encode.
        from smchainer.errors import NotAcceptable

        with pytest.raises(NotAcceptable, match="supported: .*text/plain"):
            hooks.transform(Doubler(), b"[1]", "application/json", "image/png")
        assert hooks.transform(Doubler(), b"21", "text/plain", "text/plain") == (
            b"42", "text/plain")
    # Without the plugin, only the NumPy types are named.
    with pytest.raises(UnsupportedMediaType) as refused:
        Hooks(plugin_manager).transform(Doubler(), b"x", "application/xml", "application/json")
    assert "text/plain" not in str(refused.value)


def test_a_request_past_its_deadline_stops_between_hooks(plugin_manager) -> None:
    import time

    from smchainer.errors import RequestTimeout, http_status_of

    calls: list[str] = []

    class Slow:
        @hookimpl
        def input_fn(self, input_data, content_type):
            calls.append("input_fn")
            time.sleep(0.2)
            return np.ones((1, 2), np.float32)

        @hookimpl
        def predict_fn(self, input_data, model):
            calls.append("predict_fn")
            return input_data

    with registered(plugin_manager, Slow(), "slow"):
        hooks = Hooks(plugin_manager)
        with pytest.raises(RequestTimeout, match="while decoding the request") as stopped:
            hooks.transform(Doubler(), b"[1]", "application/json", "application/json",
                            deadline=time.monotonic() + 0.1)
        assert http_status_of(stopped.value) == 504
        assert calls == ["input_fn"]  # predict_fn never ran for the abandoned request
        assert hooks.transform(Doubler(), b"[1]", "application/json", "application/json",
                               deadline=time.monotonic() + 30)[1] == "application/json"
