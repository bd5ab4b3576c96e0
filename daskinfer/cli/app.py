"""Run a deployment described by a YAML file: models, pipelines, and Dask config.

The file (see ``conf/local.yaml``)::

    scheduler: null              # address of a running scheduler; null starts a LocalCluster
    cluster: {n_workers: 2, threads_per_worker: 1}   # LocalCluster arguments when scheduler is null
    config: {daskinfer: {batching: {max-batch-size: 2048}}}   # dask config overrides
    models:
      - {kind: onnx, name: mlp, path: bundled}       # "bundled" = daskinfer's small MLP
      - {kind: onnx, name: big, path: big.onnx, resources: {GPU: 1}, providers: [CUDAExecutionProvider]}
      - {kind: python, name: clf, directory: models/clf, module: handler, function: predict}
    pipelines:
      - {model: mlp, inbox: requests, outbox: results, partitions: 2}

Paths are relative to the file.  Errors name the file and the entry at fault.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml

from daskinfer.exceptions import ConfigError

if TYPE_CHECKING:
    from distributed import Client

    from daskinfer.control.deploy import PipelineHandle
    from daskinfer.dataflow.pipeline import Pipeline
    from daskinfer.models.spec import Model

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

    if kind == "onnx":
        path = entry.pop("path", None)
        if not path:
            raise ConfigError(f"{where}: an onnx model needs a 'path' (or 'bundled')")
        entry["model"] = bundled_model_path() if path == "bundled" else rel(path)
        return _made(OnnxModel, name, entry, where)
    if kind == "python":
        for k in ("directory", "wheels"):
            if entry.get(k):
                entry[k] = rel(entry[k])
        if "predict" in entry:
            raise ConfigError(f"{where}: a python model in a file takes directory/module/function, not predict")
        return _made(PythonModel, name, entry, where)
    if kind == "remote":
        from daskinfer.models.remote import RemoteModel

        return _made(RemoteModel, name, entry, where)
    raise ConfigError(f"{where}: unknown model kind {kind!r}; expected onnx, python or remote")


def _made(cls: type[Model], name: str, entry: dict[str, Any], where: str) -> Model:
    """``cls(name, **entry)``; a wrong key or value (``resources: GPU``) is a :class:`ConfigError`
    naming the file's entry."""
    try:
        return cls(name, **entry)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def build_pipeline(entry: dict[str, Any], where: str) -> Pipeline:
    """A pipeline from one ``pipelines:`` entry."""
    from daskinfer.dataflow.pipeline import Pipeline

    known = {f.name for f in dataclasses.fields(Pipeline)}
    unknown = set(entry) - known
    if unknown:
        raise ConfigError(f"{where}: unknown pipeline keys {sorted(unknown)}; expected some of {sorted(known)}")
    return Pipeline(**entry)


class Deployment:
    """What one deployment file puts on a cluster, and how to take exactly that down again.

    :meth:`deploy` records each model and pipeline before it deploys it, so that
    :meth:`teardown` also cleans up after a deploy that failed or was interrupted half-way.
    Models (name and version) and pipelines that ran before are left alone.

    Parameters
    ----------
    client : distributed.Client
    spec : dict
        A loaded deployment file (:func:`load_app`).
    report : callable, optional
        Called with one line of progress for each step (``daskinfer run`` prints them).
    """

    def __init__(self, client: Client, spec: dict[str, Any], report: Callable[[str], None] | None = None):
        self.client = client
        self.spec = spec
        self.report = report or (lambda line: None)
        self.handles: list[PipelineHandle] = []
        self.models: list[tuple[str, str]] = []  # (name, version) that were not deployed before
        self.pipelines: list[str] = []  # names of pipelines that were not running before

    def deploy(self) -> list[PipelineHandle]:
        """Deploy the models, then start the pipelines; return the pipelines' handles."""
        from daskinfer.control.admin import pipelines
        from daskinfer.control.deploy import deploy_pipeline
        from daskinfer.models.deploy import deploy, deployed_models

        path = self.spec["_path"]
        models = [
            build_model(e, self.spec["_base"], f"{path}: models[{i}]")
            for i, e in enumerate(self.spec.get("models", []))
        ]
        pipes = [build_pipeline(e, f"{path}: pipelines[{i}]") for i, e in enumerate(self.spec.get("pipelines", []))]
        had_models = deployed_models(self.client)
        had_pipelines = set(pipelines(self.client))
        for model in models:
            if model.version not in had_models.get(model.name, []):
                self.models.append((model.name, model.version))
            self.report(f"deploying model {model.name!r} (version {model.version})")
            deploy(self.client, model)
        for pipe in pipes:
            name = pipe.name or pipe.inbox
            if name not in had_pipelines:
                self.pipelines.append(name)
            self.report(f"deploying pipeline {name!r} (inbox {pipe.inbox!r}, connector {pipe.connector})")
            self.handles.append(deploy_pipeline(self.client, pipe))
        return self.handles

    def teardown(self) -> None:
        """Stop the pipelines and undeploy the models that :meth:`deploy` started."""
        from daskinfer.control.admin import get_pipeline, pipelines
        from daskinfer.models.deploy import deployed_models, undeploy

        running = pipelines(self.client)
        for name in reversed(self.pipelines):
            if name in running:
                get_pipeline(self.client, name).stop()
                self.report(f"stopped pipeline {name!r}")
        deployed = deployed_models(self.client)
        for name, version in reversed(self.models):
            if version in deployed.get(name, []):
                undeploy(self.client, name, version)
                self.report(f"undeployed model {name!r} (version {version})")
        self.handles, self.pipelines, self.models = [], [], []


def deploy_app(client: Client, spec: dict[str, Any]) -> list[PipelineHandle]:
    """Deploy the models, then start the pipelines, of a loaded deployment file."""
    return Deployment(client, spec).deploy()
