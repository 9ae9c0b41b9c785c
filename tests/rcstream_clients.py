"""The real Socket.IO clients of the RCStream bridge tests, each in its own
environment under .cache/ (not committed), installed on first use:

- .cache/rcstream-py/sio09: Python socketIO-client 0.5.7.4 (Socket.IO 0.9);
- .cache/rcstream-py/sio5: python-socketio 5.x client (Engine.IO 4);
- .cache/rcstream-py/sio4: python-socketio 4.x client (Engine.IO 3, binary
  payload framing over polling);
- .cache/rcstream-js: socket.io-client 0.9.16, 1.7.x, 2.x and 4.x from
  tests/rcstream-clients/package-lock.json (npm ci).

`python -m tests.rcstream_clients` installs them all (Makefile, CI).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "tests" / "rcstream-clients"
CACHE = ROOT / ".cache"

PYTHON_ENVS = {
    # socketIO-client 0.5.7.4 predates requests 2.x limits; these are the
    # versions verified with it.
    "sio09": ["socketIO-client==0.5.7.4", "requests==2.34.2", "websocket-client==1.9.2", "six==1.17.0"],
    "sio5": ["python-socketio[client]==5.18.1", "python-engineio==4.15.1", "websocket-client==1.9.2"],
    "sio4": ["python-socketio[client]==4.6.1", "python-engineio==3.14.2", "websocket-client==1.9.2",
             "requests==2.34.2"],
}


class Unavailable(Exception):
    """A client environment could not be installed."""


def _stamp(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _locked_install(target: Path, stamp: str, install) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # trial -j runs tests in parallel
        marker = target / ".installed"
        if marker.exists() and marker.read_text() == stamp:
            return target
        shutil.rmtree(target, ignore_errors=True)
        try:
            install(target)
        except (OSError, subprocess.CalledProcessError) as e:
            shutil.rmtree(target, ignore_errors=True)
            output = getattr(e, "output", b"") or b""
            raise Unavailable(f"cannot install {target.name}: {e} {output[-2000:]!r}") from None
        marker.write_text(stamp)
    return target


def python_env(name: str) -> Path:
    """The python executable of a client venv."""
    requirements = PYTHON_ENVS[name]

    def install(target: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, capture_output=True)
        subprocess.run([str(target / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", *requirements], check=True, capture_output=True)

    target = _locked_install(CACHE / "rcstream-py" / name, _stamp(requirements), install)
    return target / "bin" / "python"


def node_modules() -> Path:
    """The directory holding the Node clients (and client.js)."""
    files = ["package.json", "package-lock.json", "client.js"]
    stamp = _stamp([(CLIENTS / f).read_text() for f in files])

    def install(target: Path) -> None:
        npm = shutil.which("npm")
        if npm is None:
            raise OSError("npm is not installed")
        target.mkdir(parents=True)
        for f in files:
            shutil.copy(CLIENTS / f, target / f)
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=target,
                       check=True, capture_output=True)

    return _locked_install(CACHE / "rcstream-js", stamp, install)


def install_all() -> None:
    for name in PYTHON_ENVS:
        print("rcstream clients:", python_env(name))
    print("rcstream clients:", node_modules())


if __name__ == "__main__":
    os.chdir(ROOT)
    install_all()
