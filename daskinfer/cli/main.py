"""The ``daskinfer`` command line (also ``dask infer ...`` through Dask's CLI).

Subcommands live in :data:`SUBCOMMANDS`: each is a pair of functions, one that adds
its arguments to an :class:`argparse.ArgumentParser` and one that runs it with the
parsed arguments and returns an exit status.  Add a subcommand by adding an entry.

>>> main(["serve", "--onnx", "mlp=model.onnx", "--grpc-port", "8001"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from daskinfer.cli import admin, config, predict, run
from daskinfer.cli.models import build_models

logger = logging.getLogger(__name__)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve models over the KServe v2 protocol (gRPC and REST). The models run in this process: "
        "no Dask cluster is involved, so no --preload either."
    )
    p.add_argument(
        "--onnx",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="serve an ONNX model file, under NAME (default: the file's name without .onnx); repeatable",
    )
    p.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="[NAME=]MODULE:FUNCTION",
        help="serve a Python callable f(batch) -> outputs, or a class with predict(), under NAME (default: the "
        "function's name); repeatable; the current directory is importable",
    )
    p.add_argument("--host", default=None, help="interface to bind (default: daskinfer.remote.server.host, 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=None, help="KServe v2 gRPC port (default 8001; 0: any free port)")
    p.add_argument("--http-port", type=int, default=None, help="KServe v2 REST port (default 8000; 0: any free port)")
    p.add_argument("--no-grpc", action="store_true", help="do not serve gRPC")
    p.add_argument("--no-http", action="store_true", help="do not serve REST")
    p.add_argument(
        "--max-batch-size", type=int, default=None, help="most rows per model call (batching across callers)"
    )
    p.add_argument("--max-delay", default=None, help="longest wait for a batch to fill, e.g. 2ms (default 0)")
    p.add_argument("--max-inflight", type=int, default=None, help="model calls running at once per model")
    p.add_argument("--instances", type=int, default=None, help="model instances (parallel model calls)")
    _front_door_arguments(p)


def _front_door_arguments(p: argparse.ArgumentParser) -> None:
    """TLS and limits that ``serve`` and ``gateway`` share."""
    p.add_argument(
        "--max-concurrent-calls", type=int, default=None, help="inference calls in flight at once (more: 503)"
    )
    p.add_argument("--tls-cert", default=None, help="PEM server certificate: gRPC and REST over TLS only")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM roots for client certificates (mutual TLS, both ports)")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def _serve_until_stopped(command: str, server: Any) -> int:
    """Run a model server or gateway until SIGINT/SIGTERM; one clean line for what stops it."""
    from daskinfer.exceptions import DaskInferError

    try:
        server.serve_forever()
    except (DaskInferError, OSError) as e:
        print(f"daskinfer {command}: {e}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from daskinfer.exceptions import DaskInferError
    from daskinfer.server import ModelServer

    try:
        models = build_models(args.onnx, args.python, args.instances)
    except (argparse.ArgumentTypeError, ImportError, AttributeError, DaskInferError, OSError) as e:
        print(f"daskinfer serve: {e}", file=sys.stderr)
        return 2
    if not models:
        print(
            "daskinfer serve: give at least one --onnx [NAME=]PATH or --python [NAME=]MODULE:FUNCTION", file=sys.stderr
        )
        return 2
    try:
        server = ModelServer(
            models,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            serve_grpc=not args.no_grpc,
            serve_http=not args.no_http,
            max_batch_size=args.max_batch_size,
            max_delay=args.max_delay,
            max_inflight=args.max_inflight,
            max_concurrent_calls=args.max_concurrent_calls,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
        )
    except (DaskInferError, OSError) as e:
        print(f"daskinfer serve: {e}", file=sys.stderr)
        return 2
    return _serve_until_stopped("serve", server)


def _gateway_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", required=True, help="address of the Dask scheduler the pipelines run on")
    p.add_argument(
        "--pipeline",
        action="append",
        default=[],
        metavar="NAME=INBOX[:MODEL]",
        help="v2 model NAME in front of the pipeline reading INBOX (MODEL: a deployed model that requests "
        "name, default none: the pipeline's own); repeatable",
    )
    p.add_argument("--host", default=None, help="interface to bind (default: daskinfer.gateway.host, 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=None, help="KServe v2 REST port (default 8080; 0: any free port)")
    p.add_argument("--grpc-port", type=int, default=None, help="KServe v2 gRPC port (default 8081; 0: any free port)")
    p.add_argument("--no-grpc", action="store_true", help="do not serve gRPC")
    p.add_argument("--no-http", action="store_true", help="do not serve REST")
    p.add_argument("--timeout", default=None, help="longest wait for a pipeline's answer, e.g. 5s (then 504)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes sharing the ports (SO_REUSEPORT; default 1; one per core is a good start)",
    )
    p.add_argument("--share-ports", action="store_true", help=argparse.SUPPRESS)  # set for the processes of --workers
    _front_door_arguments(p)


def _gateway(args: argparse.Namespace) -> int:
    from daskinfer.exceptions import DaskInferError
    from daskinfer.server.gateway import Gateway

    if not args.pipeline:
        print("daskinfer gateway: give at least one --pipeline NAME=INBOX", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"daskinfer gateway: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.workers > 1:
        from daskinfer import settings
        from daskinfer.cli.workers import run_gateway_workers

        host = args.host or settings.get("gateway.host")
        http = settings.get("gateway.http-port") if args.http_port is None else args.http_port
        grpc = settings.get("gateway.grpc-port") if args.grpc_port is None else args.grpc_port
        return run_gateway_workers(args, host, int(http), int(grpc))
    try:
        gateway = Gateway(
            args.scheduler,
            args.pipeline,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            serve_grpc=not args.no_grpc,
            serve_http=not args.no_http,
            timeout=args.timeout,
            max_concurrent_calls=args.max_concurrent_calls,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
        )
    except (DaskInferError, OSError, ValueError) as e:
        print(f"daskinfer gateway: {e}", file=sys.stderr)
        return 2
    gateway.share_ports = args.share_ports
    return _serve_until_stopped("gateway", gateway)


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", required=True, help="address of the Dask scheduler the pipelines run on")
    p.add_argument("--pipeline", default=None, help="show only this pipeline")
    p.add_argument("--watch", action="store_true", help="redraw every --interval until Ctrl-C")
    p.add_argument("--interval", default=None, help="seconds between redraws (default: daskinfer.dashboard.refresh)")
    p.add_argument("--count", type=int, default=None, help="with --watch: stop after this many redraws")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


def _status(args: argparse.Namespace) -> int:
    import time

    from distributed import Client

    from daskinfer import settings
    from daskinfer.cli.status import NoController, history, status_table

    interval = settings.get_seconds("dashboard.refresh", args.interval)
    try:
        client = Client(args.scheduler, timeout=settings.get_seconds("pipeline.control-timeout") * 2)
    except (OSError, ValueError) as e:
        print(f"daskinfer status: cannot reach the scheduler {args.scheduler}: {e}", file=sys.stderr)
        return 1
    with client:
        shown = 0
        try:
            while True:
                pipelines = history(client, args.pipeline)
                if args.watch and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                if args.watch:
                    print(time.strftime("%H:%M:%S"), args.scheduler)
                print(
                    status_table(pipelines)
                    if pipelines
                    else f"no pipeline {args.pipeline!r}"
                    if args.pipeline
                    else "no pipelines",
                    flush=True,
                )
                shown += 1
                if not args.watch or (args.count is not None and shown >= args.count):
                    return 0 if pipelines or not args.pipeline else 1
                time.sleep(interval)
        except NoController as e:
            print(f"daskinfer status: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


def _quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    p.add_argument("--requests", type=int, default=20_000, help="single-row requests to send")
    p.add_argument("--blocks", type=int, default=100, help="4096-row blocks to send")


def _quickstart(args: argparse.Namespace) -> int:
    from daskinfer.quickstart import main as quickstart

    return quickstart(["--workers", str(args.workers), "--requests", str(args.requests), "--blocks", str(args.blocks)])


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "serve": ("serve models over the KServe v2 protocol (gRPC and REST)", _serve_arguments, _serve),
    "gateway": ("KServe v2 (REST and gRPC) in front of pipelines on a Dask cluster", _gateway_arguments, _gateway),
    "run": ("deploy the models and pipelines of a YAML file and run them", run.add_arguments, run.run),
    "status": (
        "the pipelines on a scheduler: partitions, owners, rows/s, lag, p99, errors",
        _status_arguments,
        _status,
    ),
    "quickstart": (
        "run the bundled model through a local pipeline and print throughput",
        _quickstart_arguments,
        _quickstart,
    ),
    "pipelines": ("list the pipelines running on a Dask cluster", admin.pipelines_arguments, admin.pipelines_command),
    "topics": (
        "list the embedded broker's topics, or delete one (topics delete NAME)",
        admin.topics_arguments,
        admin.topics_command,
    ),
    "predict": (
        "score a parquet dataset with a model and write the scores as parquet",
        predict.add_arguments,
        predict.run,
    ),
    "config": ("check configuration: config check [FILE] names misspelt keys", config.add_arguments, config.run),
}
"""name -> (help, add_arguments(parser), run(args) -> exit status)."""


def parser(prog: str = "daskinfer") -> argparse.ArgumentParser:
    """The ``daskinfer`` argument parser with every subcommand of :data:`SUBCOMMANDS`.

    ``prog`` is the command's name in usage lines (``dask infer`` under Dask's CLI).
    """
    p = argparse.ArgumentParser(prog=prog, description="High-throughput streaming model inference on Dask.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return p


def main(argv: Sequence[str] | None = None, prog: str = "daskinfer") -> int:
    """Entry point of the ``daskinfer`` command; returns the exit status."""
    p = parser(prog)
    args = p.parse_args(argv)
    if not args.command:
        p.print_help()
        return 2
    level = getattr(args, "log_level", "INFO")
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return SUBCOMMANDS[args.command][2](args)


try:
    import click
except ImportError:  # pragma: no cover - click ships with dask
    dask_cli = None
else:

    @click.command(
        name="infer",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
        add_help_option=False,
        short_help="Streaming model inference (daskinfer): dask infer --help",
        help="daskinfer: streaming model inference. Run 'dask infer --help' for its commands.",
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def dask_cli(args: tuple[str, ...]) -> None:
        # click shows its help= text, not a docstring (which would show RST markup as it is)
        sys.exit(main(list(args), prog="dask infer"))


if __name__ == "__main__":
    sys.exit(main())
