"""``daskinfer gateway --workers N``: N gateway processes on the same ports.

Each process is a whole gateway (its own event loop, JSON parsing and
:class:`~daskinfer.InferenceClient`); they bind with ``SO_REUSEPORT`` and the kernel spreads the
connections over them.  This process checks that the ports are free (a port in use is an error
naming it, as with one process), starts the N processes, and stops them on SIGINT or SIGTERM.  A
gateway keeps no state beyond its calls in flight, so when one process dies the others go on
serving.
"""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import subprocess
import sys
import time

STOP_GRACE = 15.0  # seconds the processes get to finish their calls after SIGTERM


def _check_free(host: str, port: int, what: str) -> str | None:
    """None when ``host:port`` can be bound, else why not."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # as the servers bind: a port whose closed connections wait in TIME_WAIT is free, a listening one is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            reason = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            return f"cannot bind the {what} front end to {host}:{port}: {reason}"
    return None


def child_arguments(args: argparse.Namespace) -> list[str]:
    """The ``gateway`` arguments of one process of ``args`` (``--workers 1``, ports shared)."""
    out = ["gateway", "--scheduler", args.scheduler]
    for p in args.pipeline:
        out += ["--pipeline", p]
    for flag, value in (
        ("--host", args.host),
        ("--http-port", args.http_port),
        ("--grpc-port", args.grpc_port),
        ("--timeout", args.timeout),
        ("--max-concurrent-calls", args.max_concurrent_calls),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--tls-client-ca", args.tls_client_ca),
        ("--log-level", args.log_level),
    ):
        if value is not None:
            out += [flag, str(value)]
    out += [f for f, on in (("--no-grpc", args.no_grpc), ("--no-http", args.no_http)) if on]
    return [*out, "--workers", "1", "--share-ports"]


def run_gateway_workers(args: argparse.Namespace, host: str, http_port: int, grpc_port: int) -> int:
    """Start ``args.workers`` gateway processes sharing ``http_port``/``grpc_port``; wait for a signal."""
    ports = [("REST", http_port, not args.no_http), ("gRPC", grpc_port, not args.no_grpc)]
    for what, port, on in ports:
        if on and port == 0:
            print(f"daskinfer gateway: --workers {args.workers} needs a fixed {what} port, not 0", file=sys.stderr)
            return 2
        problem = _check_free(host, port, what) if on else None
        if problem is not None:
            print(f"daskinfer gateway: {problem}", file=sys.stderr)
            return 2
    cmd = [sys.executable, "-m", "daskinfer.cli", *child_arguments(args)]
    procs = [subprocess.Popen(cmd) for _ in range(args.workers)]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        while not stopping and any(p.poll() is None for p in procs):
            time.sleep(0.2)  # a supervisor's wait for a signal or for its processes to end
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE
        for p in procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    return 0 if stopping or all(c == 0 for c in codes) else next(c for c in codes if c != 0)
