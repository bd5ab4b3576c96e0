"""A ``daskinfer`` command in a child process, for the CLI tests of ``serve`` and ``gateway``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def serving(args: list[str], ready_marker: str, timeout: float = 60) -> Iterator[tuple[int, int]]:
    """Run ``daskinfer ARGS`` until it logs ``ready_marker``; yield its (gRPC, REST) ports.

    On exit it sends SIGTERM and checks that the command ends with status 0.
    """
    cmd = [sys.executable, "-m", "daskinfer.cli", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines: list[str] = []
        deadline = time.monotonic() + timeout
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
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
