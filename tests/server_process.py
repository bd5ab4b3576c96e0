"""A server process that a test starts, and may crash and start again (``redis-server``, a Kafka broker)."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """What a server process has in common: stop it (cleanly or as a crash) and start it again.

    Subclasses set ``proc`` in :meth:`start`; ``stop_timeout`` is how long a clean stop may take.
    """

    proc: subprocess.Popen | None = None
    stop_timeout: float = 10.0

    def start(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        """Stop the server: ``kill`` sends SIGKILL (a crash), else SIGTERM (a clean shutdown)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, kill: bool = True) -> None:
        """Stop (by default as a crash) and start again, on the same port(s) and data."""
        self.stop(kill=kill)
        self.start()
