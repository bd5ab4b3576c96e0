"""A ``daskinfer`` command in a child process, as a user runs it: :class:`Run` for ``daskinfer run``
(read its output until a line appears, Ctrl-C or SIGTERM it), :func:`serving` for ``serve`` and
``gateway``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from timing import poll, scaled

CLI = [sys.executable, "-m", "daskinfer.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class Run:
    """``daskinfer ARGS`` in its own session (so a test can Ctrl-C its whole process group).

    Reads stdout and stderr in threads; :meth:`wait_for` and :meth:`wait_until` wait for what it
    prints, with a deadline.  The deadlines are long (a command that starts a LocalCluster of
    two worker processes takes seconds here, and minutes on a machine whose cores are busy):
    they cost nothing when the line comes.
    """

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(s, into), daemon=True)
            for s, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def output(self) -> str:
        """The last lines of both streams, for a failure message."""
        return f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
        """Wait until ``condition()`` holds (it reads :attr:`out` / :attr:`err`); fail if the command exits first."""
        poll(lambda: condition() or self.proc.poll() is not None, timeout=timeout, interval=0.02, what=what)
        if not condition():
            for t in self._readers:  # the command exited: its last lines may still be on their way
                t.join(10)
        assert condition(), f"daskinfer exited ({self.proc.returncode}) before {what}:\n{self.output()}"

    def wait_for(self, text: str, timeout: float = 180) -> None:
        """Wait until the command prints ``text`` (on stdout or stderr)."""
        self.wait_until(lambda: text in self.stdout or text in self.stderr, f"{text!r} from daskinfer", timeout)

    def finish(self, timeout: float = 180) -> int:
        """Wait for the command to exit (it was told to stop); its status."""
        try:
            rc = self.proc.wait(scaled(timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"daskinfer did not exit within {scaled(timeout):g}s:\n{self.output()}", pytrace=False)
        finally:
            self.kill()
        for t in self._readers:
            t.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def serving(
    args: list[str], ready_marker: str, timeout: float = 120, env: dict[str, str] | None = None, log: list | None = None
) -> Iterator[tuple[int, int]]:
    """Run ``daskinfer ARGS`` until it logs ``ready_marker``; yield its (gRPC, REST) ports.

    ``env``: environment variables added to the test's; ``log``: a list that gets the lines
    the command logged up to ``ready_marker``.  On exit it sends SIGTERM and checks that the
    command ends with status 0.
    """
    proc = subprocess.Popen([*CLI, *args], stderr=subprocess.PIPE, text=True, env={**ENV, **(env or {})})
    try:
        lines: list[str] = [] if log is None else log
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if ready_marker in line:
                break
        m = re.search(r"gRPC grpc://127\.0\.0\.1:(\d+), REST http://127\.0\.0\.1:(\d+)", "".join(lines))
        assert m, "".join(lines)
        yield int(m.group(1)), int(m.group(2))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(scaled(60)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
