"""A real ``redis-server`` for tests: started on a free loopback port in a temporary directory.

Import the fixtures into a test module (``from redis_server import redis_server``).  When the
binary is missing the tests that use it are skipped with the reason, except where the environment
variable ``CI`` is set: there a missing server is a failure, so that CI never passes by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from server_process import ServerProcess, free_port


def redis_server_binary() -> str:
    """Path of ``redis-server``; skip the test (fail it under ``CI``) when there is none."""
    path = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.path.exists(p)), None
    )
    if path is None:
        reason = "redis-server is not installed (apt-get install redis-server) so the Redis tests cannot run"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    return path


class RedisServer(ServerProcess):
    """One ``redis-server`` process on ``127.0.0.1:port`` with its files in ``directory``.

    Parameters
    ----------
    directory : str
        Working directory (the append-only file lives there, so a restart keeps the data).
    appendonly : bool
        Persist every write to the append-only file (``appendfsync always``) so that a
        restarted server has the same streams, groups and pending entries.
    password : str, optional
        ``requirepass`` of the server.
    """

    def __init__(self, directory: str, *, appendonly: bool = True, password: str | None = None):
        self.binary = redis_server_binary()
        self.directory = directory
        self.appendonly = appendonly
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(directory, "redis.log")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            self.log_path,
            "--protected-mode",
            "yes",
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = open(self.log_path).read()[-2000:] if os.path.exists(self.log_path) else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start within {timeout}s:\n{log}")
            time.sleep(0.02)

    def ping(self) -> bool:
        """True once the server answers PING (and has loaded its data)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(64)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A session-wide ``redis-server`` with append-only persistence (so it can be restarted)."""
    server = RedisServer(str(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session ``redis-server`` (restarted by a test if that test stopped it)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    return redis_server.url
