"""What pyproject.toml cannot say on its own: the top-level targets/ folder (the one copy of the target
files) goes into the wheel as edgellm/_targets, where edgellm.targets.bundled_dir() finds it. An editable
install (or a checkout on PYTHONPATH) reads targets/ in place."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithTargets(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        out = Path(self.build_lib) / "edgellm" / "_targets"
        self.mkpath(str(out))
        for toml in sorted(Path(__file__).resolve().parent.joinpath("targets").glob("*.toml")):
            self.copy_file(str(toml), str(out / toml.name))


setup(cmdclass={"build_py": BuildPyWithTargets})
