"""``daskinfer predict DATA.parquet --model SPEC --out OUT.parquet``: batch scoring from a shell.

Starts a LocalCluster (or joins ``--scheduler``), deploys the model, scores the
parquet dataset with :func:`daskinfer.predict` under a terminal progress bar, writes
the result as parquet and prints one summary line.  On a cluster it joined, the
model is undeployed again at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [c for c in text.split(",") if c]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="parquet file or directory to score")
    p.add_argument(
        "--model",
        required=True,
        metavar="[NAME=]PATH.onnx|[NAME=]MODULE:FUNCTION",
        help="an ONNX file, or a Python callable f(batch) -> outputs (the current directory is importable)",
    )
    p.add_argument("--out", required=True, help="parquet directory to write the scores to")
    p.add_argument("--columns", default=None, help="comma-separated feature columns (default: all but --keep)")
    p.add_argument("--keep", default=None, help="comma-separated input columns copied to the output (an id)")
    p.add_argument("--output", default=None, help="comma-separated model outputs to write (default: all)")
    p.add_argument(
        "--errors", choices=["raise", "column"], default=None, help="a row the model fails on: stop, or an error column"
    )
    p.add_argument("--max-batch-size", type=int, default=None, help="most rows per model call")
    p.add_argument("--scheduler", default=None, help="scheduler address (default: a LocalCluster)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


def build_model(spec: str) -> Any:
    """An OnnxModel for ``[NAME=]PATH.onnx``, a PythonModel for ``[NAME=]MODULE:FUNCTION``."""
    from daskinfer.cli.models import build_models

    target = spec.partition("=")[2] or spec
    if target.endswith(".onnx") or os.path.isfile(target):
        return build_models([spec], [])[0]
    (model,) = build_models([], [spec])
    return _shipped(model.name, target)


def _shipped(name: str, target: str) -> Any:
    """A PythonModel that ships the code of ``MODULE:FUNCTION`` to the workers: the module lives
    in the directory the command runs in, which workers may not see.  Its top-level module
    (a file, or a package directory) is copied alone, so nothing else there travels."""
    import shutil
    import tempfile

    from daskinfer.models import PythonModel

    module, _, function = target.partition(":")
    top = sys.modules[module.split(".")[0]]
    source = top.__file__ or ""
    with tempfile.TemporaryDirectory(prefix="daskinfer-predict-") as code:
        if os.path.basename(source) == "__init__.py":
            shutil.copytree(
                os.path.dirname(source), os.path.join(code, top.__name__), ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(source, os.path.join(code, os.path.basename(source)))
        return PythonModel(name, directory=code, module=module, function=function)


def run(args: argparse.Namespace) -> int:
    from daskinfer.exceptions import DaskInferError

    try:
        model = build_model(args.model)
    except (argparse.ArgumentTypeError, ImportError, AttributeError, DaskInferError) as e:
        print(f"daskinfer predict: {e}", file=sys.stderr)
        return 2
    if "://" not in args.data and not os.path.exists(args.data):  # said before dask.dataframe and a cluster start
        print(f"daskinfer predict: no such file or directory: {args.data}", file=sys.stderr)
        return 2
    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    import daskinfer
    from daskinfer import settings

    with contextlib.ExitStack() as stack:
        if args.scheduler:
            client = stack.enter_context(Client(args.scheduler))
        else:
            cluster = stack.enter_context(
                LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0")
            )
            client = stack.enter_context(Client(cluster))
        t0 = time.perf_counter()
        try:
            daskinfer.deploy(client, model)
            stack.callback(daskinfer.undeploy, client, model.name)
            daskinfer.predict(
                args.data,
                model.name,
                columns=_split(args.columns),
                keep=_split(args.keep),
                output=_split(args.output),
                errors=args.errors,
                max_batch_size=args.max_batch_size,
                out=args.out,
                progress=not args.no_progress,
                client=client,
            )
        except (DaskInferError, OSError, ValueError) as e:
            print(f"\ndaskinfer predict: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - t0
        written = dd.read_parquet(args.out)
        rows = len(written)
        column = settings.get("scoring.error-column")
        failed = (
            int(written[column].count().compute()) if settings.get("scoring.errors", args.errors) == "column" else 0
        )
    note = f", {failed} rows failed (see the error column)" if failed else ""
    print(
        f"\nscored {rows} rows of {args.data} with model {model.name!r} into {args.out} in {elapsed:.1f}s "
        f"({rows / max(elapsed, 1e-9):,.0f} rows/s){note}"
    )
    return 0
