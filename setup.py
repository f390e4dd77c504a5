"""Build hooks only; all metadata is in setup.cfg.

``modewatch.pth`` must land at the root of site-packages, where the interpreter reads it at
start-up (MODEWATCH=1). setuptools installs package files only, and an editable install
(``pip install -e``) builds a wheel of its own that would drop the file, so both builds copy it.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "modewatch.pth"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)


class BuildPyWithPth(build_py):
    """A regular build: the .pth goes to the root of build_lib, hence of the wheel."""

    def run(self):
        super().run()
        self.copy_file(SOURCE, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):
    """An editable build: the .pth goes into the editable wheel beside setuptools' own .pth."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(SOURCE, os.path.join(unpacked_wheel, PTH))
        return result


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
