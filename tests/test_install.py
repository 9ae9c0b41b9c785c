"""`pip install .` and `pip install -e .` (the default editable mode) both give
a `twistd` that knows the eventstreams plugin, run from any directory, and
print no setuptools warnings.

Each install goes into a fresh virtualenv that sees the test environment's
packages (Twisted, setuptools) through a .pth line, with --no-deps and
--no-build-isolation: nothing is fetched, and the build runs the same
setuptools that `make` installs.
"""
from __future__ import annotations

import os
import site
import subprocess
import sys

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from .support import async_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONFIG_FILE")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


class Install(unittest.TestCase):
    timeout = 400

    def install(self, *how: str) -> str:
        """A virtualenv with the project installed `how`; returns its python."""
        home = os.path.abspath(self.mktemp())
        made = run([sys.executable, "-m", "venv", "--without-pip", home], cwd=REPO)
        self.assertEqual(made.returncode, 0, made.stderr)
        python = os.path.join(home, "bin", "python")
        purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=home)
        with open(os.path.join(purelib.stdout.strip(), "test-env.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")  # Twisted, setuptools, pip of the test venv
        pip = run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", *how], cwd=REPO)
        self.assertEqual(pip.returncode, 0, pip.stdout + pip.stderr)
        output = pip.stdout + pip.stderr
        for word in ("warning", "deprecat", "!!"):
            self.assertNotIn(word, output.lower(), output)
        return python

    def assertKnowsThePlugin(self, python: str) -> None:
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        twistd = run([python, "-c", "from twisted.scripts.twistd import run; run()", "eventstreams", "--help"], cwd=elsewhere)
        self.assertEqual(twistd.returncode, 0, twistd.stdout + twistd.stderr)
        self.assertIn("eventstreams [-c FILE] [--set SECTION.KEY=VALUE ...]", twistd.stdout)

    @async_test
    async def test_plain_install(self):
        python = await deferToThread(self.install, ".")
        await deferToThread(self.assertKnowsThePlugin, python)

    @async_test
    async def test_editable_install_in_the_default_mode(self):
        python = await deferToThread(self.install, "-e", ".")
        await deferToThread(self.assertKnowsThePlugin, python)
