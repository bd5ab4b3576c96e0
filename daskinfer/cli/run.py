"""``daskinfer run FILE``: deploy the models and pipelines of a deployment file and run them.

It prints the scheduler's address and its dashboard pages, deploys (see
:class:`daskinfer.cli.app.Deployment`), prints a line of figures per pipeline every
``--report-interval``, and on Ctrl-C, SIGTERM or ``--duration`` takes down what it deployed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

_PRELOAD_HELP = (
    "On a cluster you start yourself, --preload daskinfer.preload on `dask scheduler` and `dask worker` is "
    "optional: this command installs what the scheduler and workers need when it deploys; the preload only "
    "makes them ready (and says so in their logs) when they start."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Deploy the models and pipelines of a YAML file and run them until Ctrl-C or SIGTERM; then stop "
        "those pipelines and undeploy those models (also on an external scheduler). " + _PRELOAD_HELP
    )
    p.add_argument("file", help="deployment file (YAML: scheduler, cluster, config, models, pipelines; see conf/)")
    p.add_argument("--scheduler", default=None, help="scheduler address (overrides the file's; none: a LocalCluster)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument(
        "--report-interval",
        default=None,
        help="print each pipeline's figures this often, e.g. 5s (default: daskinfer.dashboard.report-interval;"
        " 0: never)",
    )


def _report_until(client: Any, stop: Any, duration: float | None, interval: float) -> None:
    """Wait for ``stop`` or ``duration`` seconds, printing every pipeline's line of figures each ``interval``."""
    import time

    from daskinfer.cli.status import figures_line, history

    end = None if duration is None else time.monotonic() + duration
    while True:
        left = None if end is None else max(end - time.monotonic(), 0.0)
        if interval <= 0 or (left is not None and left <= interval):
            stop.wait(left)
            return
        if stop.wait(interval):
            return
        try:
            pipelines = history(client)
        except Exception as e:  # a slow or restarting scheduler must not end the run
            logger.warning("cannot read the pipelines' figures: %s", e)
            continue
        for name, h in pipelines.items():
            print(f"daskinfer: {figures_line(name, h)}", flush=True)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so a Dask call it interrupts is cancelled."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C back while the LocalCluster starts.

    A terminal sends SIGINT to the whole foreground process group, worker processes
    included.  One that is still starting (importing ``site``, before its preload ignores
    SIGINT) dies with ``Fatal Python error: init_import_site`` and tracebacks, and a cluster
    interrupted half-made fails again at exit.  So SIGINT is ignored while the cluster
    starts: the processes it spawns inherit that (a disposition to ignore survives
    ``exec``, where a handler does not).  A Ctrl-C pressed meanwhile still counts: a
    ``sleep`` process started first, in the same process group, dies of it, and this
    raises :class:`KeyboardInterrupt` once the cluster is up (it then stops with one line).
    """
    if threading.current_thread() is not threading.main_thread() or os.name != "posix":
        yield
        return
    try:
        witness: subprocess.Popen | None = subprocess.Popen(
            ["sleep", "86400"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except OSError:  # no sleep here: a Ctrl-C during the start is only lost
        witness = None
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        pressed = witness is not None and witness.poll() is not None
        if witness is not None:
            witness.kill()
            witness.wait()
    if pressed:
        raise KeyboardInterrupt


def _say(line: str) -> None:
    print(f"daskinfer: {line}", flush=True)


def _pipelines_page(client: Any) -> str | None:
    """The URL of the pipelines page (``/daskinfer``, next to the dashboard's ``/status``), or None."""
    from daskinfer import settings
    from daskinfer.control.dashboard import PAGE

    link = client.dashboard_link
    if not link or not settings.get("dashboard.enabled"):
        return None
    return link[: -len("/status")] + PAGE if link.endswith("/status") else urllib.parse.urljoin(link, PAGE)


def _dashboard(client: Any) -> str:
    link = client.dashboard_link
    if not link:
        return "none"
    if importlib.util.find_spec("bokeh") is None:
        return f"{link} (its pages need bokeh: pip install bokeh; Prometheus metrics at /metrics)"
    return link


def run(args: argparse.Namespace) -> int:
    """Deploy, wait for Ctrl-C / SIGTERM / --duration, take down what was deployed.

    SIGTERM raises in the main thread like Ctrl-C, so that it also stops a deploy that waits
    (for a broker, say).  The LocalCluster's workers ignore SIGINT (a terminal's Ctrl-C
    reaches the whole process group), and are started with it held back (:func:`_sigint_held`):
    this command closes them once its pipelines stopped.
    """
    import dask
    from distributed import Client, LocalCluster

    from daskinfer import config_check, settings
    from daskinfer.cli.app import Deployment, flat_config, load_app
    from daskinfer.cli.config import deployment_problems
    from daskinfer.exceptions import DaskInferError

    try:
        spec = load_app(args.file)
    except DaskInferError as e:
        print(f"daskinfer run: {e}", file=sys.stderr)
        return 2
    problems = [f"{args.file}: {p}" for p in deployment_problems(spec)]
    problems += [f"the Dask config: {p}" for p in config_check.unknown_keys(dask.config.get("daskinfer", None))]
    if problems:  # a misspelt key would run with the default without a word
        print("\n".join(f"daskinfer run: {p}" for p in problems), file=sys.stderr)
        return 2
    address = args.scheduler or spec.get("scheduler")
    signal.signal(signal.SIGTERM, _raise_terminated)
    status = 0
    try:
        with dask.config.set(flat_config(spec.get("config") or {})), contextlib.ExitStack() as stack:
            if address:
                client = stack.enter_context(Client(address))
            else:
                kw = {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0", **(spec.get("cluster") or {})}
                kw["preload"] = [*(kw.get("preload") or []), "daskinfer.cli.quiet_worker"]
                with _sigint_held():
                    cluster = stack.enter_context(LocalCluster(**kw))
                client = stack.enter_context(Client(cluster))
            _say(f"scheduler {client.scheduler.address}, dashboard: {_dashboard(client)}")
            app = Deployment(client, spec, report=_say)
            try:
                handles = app.deploy()
                _say(
                    f"{len(handles)} pipeline(s) running on {client.scheduler.address}: "
                    + ", ".join(f"{h.name} (inbox {h.inbox!r})" for h in handles)
                )
                page = _pipelines_page(client)
                if page is not None:  # served once the controller is installed, i.e. from the first deploy on
                    _say(f"pipelines page: {page}")
                _report_until(
                    client,
                    threading.Event(),
                    args.duration,
                    settings.get_seconds("dashboard.report-interval", args.report_interval),
                )
            except DaskInferError as e:
                print(f"daskinfer run: {e}", file=sys.stderr)
                status = 1
            except KeyboardInterrupt as e:
                _say(
                    f"stopped ({'SIGTERM' if isinstance(e, _Terminated) else 'Ctrl-C'}); taking down what was deployed"
                )
            finally:
                app.teardown()
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM while starting or taking down
        _say("stopped")
    return status
