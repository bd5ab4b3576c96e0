"""The ``daskinfer`` command line (also ``dask infer ...``) and deployment files."""

from daskinfer.cli.main import dask_cli, main

__all__ = ["dask_cli", "main"]
