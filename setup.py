"""Installs ``smchainer-compat.pth`` beside the packages (wheel and editable install alike).

Everything else about the project is in ``pyproject.toml``. The ``.pth`` file
imports ``_smchainer_startup`` at interpreter start, so that ``import chainer``
works without importing smchainer first (see that module).
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "smchainer-compat.pth"  # sorts after setuptools' __editable__ .pth files
PTH_LINE = 'import _smchainer_startup, sys; sys.modules.pop("_smchainer_startup", None)\n'


class BuildPyWithStartup(build_py):
    """``build_py`` that also writes the ``.pth`` file at the top of the install."""

    def run(self) -> None:
        super().run()
        # An editable build installs top-level files from the install folder it set up.
        folder = (self.get_finalized_command("install").install_lib
                  if getattr(self, "editable_mode", False) else self.build_lib)
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, PTH_NAME).write_text(PTH_LINE)


setup(cmdclass={"build_py": BuildPyWithStartup})
