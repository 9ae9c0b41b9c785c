"""The README's shell examples, run as written: the daemon its `make run`
starts (on free ports, through ARGS), then every curl, the IRC and the
browser-page examples against it, each filter example within 10 s of the demo
feed at its default rate; its `twistd` and `make run ARGS=…` lines start a
daemon of their own. A new kind of command in the README fails here until it
is run here (or listed in NOT_RUN with the reason), so the README cannot drift.

Commands run in a new session (killed as a group) with a terminal as stdout,
as a person would run them: `jq` then writes each line at once.
"""
from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Callable, Optional

from twisted.trial import unittest

from .support import free_port, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
FIRST_EVENT = 10.0  # seconds a README example may take to show its first event
START = 30.0  # seconds for a daemon to start (make, twistd, the demo's file)

# Commands of the README not run here, and why.
NOT_RUN = {
    "make test": "this suite is what it runs",
    "apt-get": "root and a Debian build: debian/tests/install-check",
    "dpkg-buildpackage": "a Debian build: debian/tests/install-check",
    "debian/build-for-suite": "a Debian build: debian/tests/install-check and chroot-check",
    "apt": "root: debian/tests/install-check",
}


def shell_examples(text: str) -> list[list[str]]:
    """The ```sh blocks of the README, each as its commands (continuation
    lines joined)."""
    blocks = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        commands: list[str] = []
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = pending + line
            pending = ""
            if line.strip():
                commands.append(line.strip())
        blocks.append(commands)
    return blocks


class Command:
    """`bash -c SCRIPT` in its own session, stdout and stderr on a terminal."""

    def __init__(self, script: str, cwd: str = REPO):
        self.script = script
        master, slave = pty.openpty()
        self.process = subprocess.Popen(
            ["bash", "-c", script], cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.output = b""
        self.started = time.monotonic()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> Optional[float]:
        """Seconds from the start until predicate(output) held, or None."""
        deadline = self.started + timeout
        while not predicate(self.text):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: every writer is gone
                    data = b""
                if not data:
                    return time.monotonic() - self.started if predicate(self.text) else None
                self.output += data
        return time.monotonic() - self.started

    def finish(self, timeout: float = 10) -> int:
        """The exit status, once the command has ended (or was stopped)."""
        self.wait_for(lambda _: False, timeout)  # reads until every writer is gone
        try:
            self.process.wait(max(0.1, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        self.stop()
        return self.process.returncode

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace").replace("\r\n", "\n")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        try:
            os.close(self.master)
        except OSError:
            pass


class Daemon:
    """A daemon started by a README command, its output in a file (it may log
    much more than anyone reads)."""

    def __init__(self, case: unittest.TestCase, argv: list[str]):
        self.ports = {role: free_port() for role in ("api", "intake", "metrics", "irc")}
        directory = os.path.abspath(case.mktemp())
        os.makedirs(directory)
        self.log = os.path.join(directory, "daemon.log")
        self.overrides = [
            f"eventstreams.listen=tcp:{self.ports['api']}:interface=127.0.0.1",
            f"intake.listen=tcp:{self.ports['intake']}:interface=127.0.0.1",
            f"metrics.listen=tcp:{self.ports['metrics']}:interface=127.0.0.1",
            f"irc.listen=tcp:{self.ports['irc']}:interface=127.0.0.1",
            f"embedded.path={directory}/log.sqlite",
        ]
        if argv[:2] == ["make", "run"]:  # the ports go through ARGS, after the README's own
            args = next((a[len("ARGS="):] for a in argv if a.startswith("ARGS=")), "")
            argv = ["make", "--no-print-directory", "run",
                    "ARGS=" + " ".join([args] + [f"--set {o}" for o in self.overrides]).strip()]
        else:
            argv = argv + [x for o in self.overrides for x in ("--set", o)]
        self.argv = argv
        # A fresh `make`, not a sub-make of the `make test` running this suite.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        case.addCleanup(self.stop)

    @property
    def output(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_started(self) -> str:
        """The listener line, once the daemon has logged it."""

        def started() -> Optional[str]:
            line = next((ln for ln in self.output.splitlines() if "EventStreams http" in ln), None)
            if line is None and self.process.poll() is not None:
                raise AssertionError(f"{shlex.join(self.argv)} exited:\n{self.output[-3000:]}")
            return line

        try:
            line = wait_until(started, "the listener line", START, 0.1)
        except AssertionError as e:
            raise AssertionError(f"{shlex.join(self.argv)} did not start ({e}):\n{self.output[-3000:]}") from None
        assert line is not None  # (wait_until returns a true value)
        return line

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def local(self, command: str) -> str:
        """The command aimed at this daemon instead of the README's ports."""
        return (command.replace("localhost:8092", f"127.0.0.1:{self.ports['api']}")
                .replace("localhost:8192", f"127.0.0.1:{self.ports['intake']}"))


def irc_join(port: int, channel: str, timeout: float) -> Optional[float]:
    """Seconds until the first PRIVMSG to `channel` after joining it, or None."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"NICK readme\r\nUSER readme 0 * :README example\r\n")
        buffer = b""
        joined = False
        while time.monotonic() - started < timeout:
            s.settimeout(max(0.1, timeout - (time.monotonic() - started)))
            try:
                data = s.recv(65536)
            except socket.timeout:
                return None
            if not data:
                return None
            buffer += data
            *lines, buffer = buffer.split(b"\r\n")
            for line in lines:
                words = line.split(b" ")
                if words[0] == b"PING":
                    s.sendall(b"PONG " + b" ".join(words[1:]) + b"\r\n")
                elif len(words) > 1 and words[1] == b"001" and not joined:
                    s.sendall(f"JOIN {channel}\r\n".encode())
                    joined = True
                elif len(words) > 2 and words[1] == b"PRIVMSG" and words[2].decode() == channel:
                    return time.monotonic() - started
    return None


class ReadmeExamples(unittest.TestCase):
    def setUp(self) -> None:
        with open(README, encoding="utf-8") as f:
            self.readme = f.read()
        self.commands = [c for block in shell_examples(self.readme) for c in block]
        if not os.access(os.path.join(REPO, ".venv", "bin", "twistd"), os.X_OK):
            self.fail("the README's examples run the checkout's .venv: run `make .venv/.installed` first")

    def test_every_shell_command_is_covered(self):
        covered = ("make run", "curl ", "id=", ".venv/bin/twistd ", "irssi ")
        uncovered = [c for c in self.commands
                     if not c.startswith(covered) and not any(c.startswith(n) for n in NOT_RUN)]
        self.assertEqual(uncovered, [], "README commands that no test runs")
        # The daemon commands say where twistd is: the README is followed from a fresh clone.
        self.assertEqual([c for c in self.commands if c.startswith("twistd")], [])

    def test_examples_against_the_daemon_of_make_run(self):
        make_run = [c for c in self.commands if c.split("#")[0].strip() == "make run"]
        self.assertEqual(len(make_run), 1, self.commands)
        daemon = Daemon(self, ["make", "run"])
        line = daemon.wait_started()
        api = daemon.ports["api"]
        self.assertIn(f"EventStreams http://127.0.0.1:{api}/v2/ui", line)
        failures: list[str] = []
        timings: dict[str, float] = {}

        for block in shell_examples(self.readme):
            assignments = [c for c in block if re.match(r"^[a-z_]+=", c)]
            for command in block:
                if not command.startswith("curl "):
                    continue
                script = "\n".join(assignments + [daemon.local(command)])
                run = Command(script)
                try:
                    if "-X POST" in command:
                        code = run.finish()
                        try:
                            body = json.loads(run.text)
                        except ValueError:
                            body = None
                        if code != 0 or not body or body.get("accepted") != 1 or body.get("invalid"):
                            failures.append(f"{command}: exit {code}, {run.text!r}")
                        continue
                    # A stream: its first event (SSE `data:`, or jq's first line) within FIRST_EVENT s.
                    if "| jq" in command:
                        first = run.wait_for(lambda t: bool(t.strip()), FIRST_EVENT)
                    else:
                        first = run.wait_for(lambda t: "\ndata: " in t, FIRST_EVENT)
                    if first is None:
                        failures.append(f"no event within {FIRST_EVENT} s: {command}; output {run.text[-500:]!r}")
                    else:
                        timings[command] = first
                finally:
                    run.stop()

        # The browser page's address and its example view (the URL hash).
        with urllib.request.urlopen(f"http://127.0.0.1:{api}/v2/ui", timeout=10) as response:
            self.assertEqual(response.status, 200)
        hashes = re.findall(r"`#(stream=[^`]+)`", self.readme)
        self.assertTrue(hashes, "the README shows no /v2/ui#… view")
        for example in hashes:
            params = dict(p.split("=", 1) for p in example.split("&"))
            stream = params.pop("stream")
            query = "&".join(f"{k}={v}" for k, v in params.items())
            run = Command(f"curl -sN 'http://127.0.0.1:{api}/v2/stream/{stream}?{query}'")
            try:
                first = run.wait_for(lambda t: "\ndata: " in t, FIRST_EVENT)
            finally:
                run.stop()
            if first is None:
                failures.append(f"the view #{example} shows no event within {FIRST_EVENT} s")
            else:
                timings["#" + example] = first

        # The IRC example: the channel it names gets a line within seconds.
        for command in self.commands:
            if command.startswith("irssi "):
                channel = re.search(r"/join (#\S+)", command).group(1)
                first = irc_join(daemon.ports["irc"], channel, FIRST_EVENT)
                if first is None:
                    failures.append(f"no line in {channel} within {FIRST_EVENT} s: {command}")
                else:
                    timings[channel] = first

        self.assertEqual(failures, [])
        filters = [c for c in timings if "filter." in c]
        self.assertGreaterEqual(len(filters), 3, timings)  # the curl examples and the view
        print("README examples, seconds to the first event:", json.dumps(timings, indent=1))

    def test_daemon_commands_start(self):
        """`.venv/bin/twistd …` and `make run ARGS=…` as written start a
        daemon (on free ports: --set after the README's own)."""
        started = []
        for command in self.commands:
            if not (command.startswith(".venv/bin/twistd ") or command.startswith("make run ARGS=")):
                continue
            argv = shlex.split(command.split(" #")[0])
            daemon = Daemon(self, argv)
            line = daemon.wait_started()
            self.assertIn(f"EventStreams http://127.0.0.1:{daemon.ports['api']}/v2/ui", line)
            self.assertNotIn("Traceback", daemon.output)
            daemon.stop()
            started.append(argv[0])
        self.assertEqual(sorted(set(started)), [".venv/bin/twistd", "make"])
