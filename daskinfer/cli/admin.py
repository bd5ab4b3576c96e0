"""``daskinfer pipelines`` and ``daskinfer topics``: look at a running cluster, delete topics.

Both talk to the scheduler given by ``--scheduler`` (else Dask's ``scheduler-address``
config, e.g. ``DASK_SCHEDULER_ADDRESS``) through the Python admin API
(:func:`daskinfer.pipelines`, :func:`daskinfer.topics`, :func:`daskinfer.delete_topic`)::

    daskinfer pipelines --scheduler tcp://127.0.0.1:8786
    daskinfer topics --scheduler tcp://127.0.0.1:8786
    daskinfer topics delete requests --scheduler tcp://127.0.0.1:8786
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any


def _scheduler_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler", default=None, help="address of the Dask scheduler (default: dask config scheduler-address)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the scheduler (default 10)")


class _Fail(Exception):
    """A one-line error for the command's user, with the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def _connect(args: argparse.Namespace) -> Iterator[Any]:
    import dask
    from distributed import Client

    address = args.scheduler or dask.config.get("scheduler-address", None)
    if not address:
        raise _Fail(
            "give --scheduler ADDRESS (the scheduler the pipelines run on), or set DASK_SCHEDULER_ADDRESS", status=2
        )
    try:
        client = Client(address, timeout=args.timeout)
    except (OSError, TimeoutError) as e:
        raise _Fail(f"cannot reach the Dask scheduler at {address}: {e}") from e
    with client:
        yield client


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def pipelines_arguments(p: argparse.ArgumentParser) -> None:
    _scheduler_argument(p)


def pipelines_command(args: argparse.Namespace) -> int:
    """List the running pipelines: name, inbox, connector, partitions, partitions running, model."""
    from daskinfer.control.admin import pipelines

    def run() -> int:
        with _connect(args) as client:
            listed = pipelines(client)
            if not listed:
                print(f"no pipelines running on {client.scheduler.address}")
                return 0
            rows = [
                (name, p["inbox"], p["connector"], p["partitions"], len(p["assigned"]), p.get("model") or "-")
                for name, p in sorted(listed.items())
            ]
            print(_table(("NAME", "INBOX", "CONNECTOR", "PARTITIONS", "RUNNING", "MODEL"), rows))
            return 0

    return _reporting_failures("pipelines", run)


def topics_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        nargs="?",
        choices=("list", "delete"),
        default="list",
        help="list the embedded broker's topics (default), or delete one",
    )
    p.add_argument("name", nargs="?", help="the topic to delete")
    _scheduler_argument(p)


def topics_command(args: argparse.Namespace) -> int:
    """List the embedded broker's topics, or delete one (not the inbox of a running pipeline)."""
    from daskinfer.control.admin import delete_topic, topics

    def run() -> int:
        if args.action == "delete" and not args.name:
            raise _Fail("topics delete needs the topic's NAME", status=2)
        if args.action == "list" and args.name:
            raise _Fail(f"unexpected {args.name!r}: did you mean `daskinfer topics delete {args.name}`?", status=2)
        with _connect(args) as client:
            address = client.scheduler.address
            if args.action == "delete":
                if not delete_topic(client, args.name):
                    raise _Fail(f"no topic {args.name!r} on {address}")
                print(f"deleted topic {args.name!r}")
                return 0
            listed = topics(client)
            if not listed:
                print(f"no topics on {address}")
                return 0
            rows = [
                (name, t["kind"], t["partitions"], t["messages"], t["bytes"], t["dropped"])
                for name, t in sorted(listed.items())
            ]
            print(_table(("NAME", "KIND", "PARTITIONS", "MESSAGES", "BYTES", "DROPPED"), rows))
            return 0

    return _reporting_failures("topics", run)


def _reporting_failures(command: str, run: Any) -> int:
    from daskinfer.exceptions import DaskInferError

    try:
        return run()
    except _Fail as e:
        print(f"daskinfer {command}: {e}", file=sys.stderr)
        return e.status
    except DaskInferError as e:
        print(f"daskinfer {command}: {e}", file=sys.stderr)
        return 1
