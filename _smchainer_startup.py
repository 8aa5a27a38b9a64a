"""Makes ``import chainer`` work in every interpreter of an environment with smchainer.

``smchainer-compat.pth`` (installed beside this module, in site-packages)
imports it when the interpreter starts. It only puts a small finder first on
``sys.meta_path`` that waits for the first import of ``chainer`` or
``chainermn``; then it steps aside and installs :mod:`smchainer.compat`
(which makes Chainer 7.8.1 import on NumPy 2), before Chainer's own modules
load. An interpreter that never imports Chainer pays for this module alone
(``benchmarks/startup.py`` measures it). ``SMCHAINER_NO_COMPAT_HOOK=1``
switches it off; ``import smchainer`` still installs the compat hook.

The ``.pth`` line takes the module out of ``sys.modules`` once it has run: it
is a start-up script, not a module to import, and tools that look there
(pytest warns about a plugin distribution's modules imported before it could
rewrite their asserts) should not see it.
"""
import os
import sys

_WATCHED = frozenset({"chainer", "chainermn"})


class ChainerImportWatcher:
    """A meta path finder that installs smchainer's compat hook on the first Chainer import."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in _WATCHED:
            return None
        try:
            sys.meta_path.remove(cls)
        except ValueError:
            pass
        from smchainer import compat  # installs the hook (idempotent)

        compat.install()
        return None  # the path finders load Chainer, now through the hook


if os.environ.get("SMCHAINER_NO_COMPAT_HOOK", "") in ("", "0") and not any(
        getattr(finder, "__name__", "") == "ChainerImportWatcher" for finder in sys.meta_path):
    sys.meta_path.insert(0, ChainerImportWatcher)
