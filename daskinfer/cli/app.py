"""Run a deployment described by a YAML file: models, pipelines, and Dask config.

The file (see ``conf/local.yaml``)::

    scheduler: null              # address of a running scheduler; null starts a LocalCluster
    cluster: {n_workers: 2, threads_per_worker: 1}   # LocalCluster arguments when scheduler is null
    config: {daskinfer: {batching: {max-batch-size: 2048}}}   # dask config overrides
    models:
      - {kind: onnx, name: mlp, path: bundled}       # "bundled" = daskinfer's small MLP
      - {kind: python, name: clf, directory: models/clf, module: handler, function: predict}
    pipelines:
      - {model: mlp, inbox: requests, outbox: results, partitions: 2}

Paths are relative to the file.  Errors name the file and the entry at fault.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import yaml

from daskinfer.exceptions import ConfigError

if TYPE_CHECKING:
    from distributed import Client

    from daskinfer.models.spec import Model
    from daskinfer.dataflow.pipeline import Pipeline, PipelineHandle

_TOP_KEYS = {"scheduler", "cluster", "config", "models", "pipelines"}


def load_app(path: str) -> dict[str, Any]:
    """Read and check a deployment file; raise :class:`ConfigError` naming the file and the problem."""
    try:
        with open(path) as f:
            spec = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read deployment file {path!r}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"deployment file {path!r} is not valid YAML: {e}") from e
    if not isinstance(spec, dict):
        raise ConfigError(f"deployment file {path!r}: expected a mapping at the top, got {type(spec).__name__}")
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"deployment file {path!r}: unknown keys {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
    for key in ("models", "pipelines"):
        if not isinstance(spec.get(key, []), list):
            raise ConfigError(f"deployment file {path!r}: '{key}' must be a list")
    spec["_base"] = os.path.dirname(os.path.abspath(path))
    spec["_path"] = path
    return spec


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, so that ``dask.config.set`` updates keys, not subtrees."""
    out: dict[str, Any] = {}
    for k, v in (config or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def build_model(entry: dict[str, Any], base: str, where: str) -> Model:
    """A model from one ``models:`` entry."""
    from daskinfer.models import OnnxModel, PythonModel
    from daskinfer.testing import bundled_model_path

    entry = dict(entry)
    kind = entry.pop("kind", None)
    name = entry.pop("name", None)
    if not name:
        raise ConfigError(f"{where}: a model needs a 'name'")

    def rel(p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(base, p)

    try:
        if kind == "onnx":
            path = entry.pop("path", None)
            if not path:
                raise ConfigError(f"{where}: an onnx model needs a 'path' (or 'bundled')")
            return OnnxModel(name, bundled_model_path() if path == "bundled" else rel(path), **entry)
        if kind == "python":
            for k in ("directory", "wheels"):
                if entry.get(k):
                    entry[k] = rel(entry[k])
            if "predict" in entry:
                raise ConfigError(f"{where}: a python model in a file takes directory/module/function, not predict")
            return PythonModel(name, **entry)
        if kind == "remote":
            from daskinfer.models.remote import RemoteModel

            return RemoteModel(name, **entry)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
    raise ConfigError(f"{where}: unknown model kind {kind!r}; expected onnx, python or remote")


def build_pipeline(entry: dict[str, Any], where: str) -> Pipeline:
    """A pipeline from one ``pipelines:`` entry."""
    from daskinfer.dataflow.pipeline import Pipeline

    known = {f.name for f in dataclasses.fields(Pipeline)}
    unknown = set(entry) - known
    if unknown:
        raise ConfigError(f"{where}: unknown pipeline keys {sorted(unknown)}; expected some of {sorted(known)}")
    return Pipeline(**entry)


def deploy_app(client: Client, spec: dict[str, Any]) -> list[PipelineHandle]:
    """Deploy the models, then start the pipelines, of a loaded deployment file."""
    from daskinfer.models.deploy import deploy
    from daskinfer.dataflow.pipeline import deploy_pipeline

    path = spec["_path"]
    for i, entry in enumerate(spec.get("models", [])):
        deploy(client, build_model(entry, spec["_base"], f"{path}: models[{i}]"))
    return [
        deploy_pipeline(client, build_pipeline(entry, f"{path}: pipelines[{i}]"))
        for i, entry in enumerate(spec.get("pipelines", []))
    ]
