"""Build hooks (everything else is in pyproject.toml): the wheel and the editable install both carry
``subspace_peft-autoregister.pth``, the start-up line that registers our methods with peft in processes that never
``import subspace_peft`` (see _subspace_peft_autoregister.py). Uninstalling removes it with the rest (it is in RECORD).
"""

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "subspace_peft-autoregister.pth"
# site.py runs a .pth line that starts with "import"; a missing or failing hook module is ignored, never an error
PTH_LINE = 'import sys; exec("try:\\n import _subspace_peft_autoregister\\nexcept Exception:\\n pass")\n'


class BuildPyWithHook(build_py):
    """The wheel: the .pth at the root of build_lib, so it lands in site-packages."""

    def run(self):
        super().run()
        Path(self.build_lib, PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


class EditableWheelWithHook(editable_wheel):
    """``pip install -e``: the .pth at the root of the editable wheel (setuptools writes every file of that folder;
    ``_run_build_commands`` is the step that fills it)."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        Path(unpacked_wheel, PTH_NAME).write_text(PTH_LINE)
        return result


setup(cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
