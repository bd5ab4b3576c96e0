"""Python models: any callable, a class with ``load()``/``predict()``, or a handler
module in a code directory (with its requirements) shipped to every worker.

A directory model is zipped when the :class:`PythonModel` is made; each worker
unpacks it under its local directory, installs the requirements there with pip
(``--target``, so the worker's own environment is left alone), and imports the
handler so that each version runs its own modules (:mod:`daskinfer.models.code`).
Workers that join later do the same when the plugin reaches them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import tempfile
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from daskinfer.exceptions import ConfigError, ModelLoadError
from daskinfer.models import code
from daskinfer.models.contract import zero_block
from daskinfer.models.device import CPU, call_load
from daskinfer.models.loaded import LoadedModel
from daskinfer.models.spec import Model
from daskinfer.tensors import TensorSpec

logger = logging.getLogger(__name__)

BATCH_FORMATS = ("numpy", "dict", "pandas", "list")


def _specs(value: Any) -> list[TensorSpec] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        out = []
        for name, v in value.items():
            dtype, shape = v if isinstance(v, tuple) and len(v) == 2 else (v, None)
            out.append(
                TensorSpec(name, None if dtype is None else np.dtype(dtype), None if shape is None else tuple(shape))
            )
        return out
    return [v if isinstance(v, TensorSpec) else TensorSpec(str(v)) for v in value]


class LoadedPython(LoadedModel):
    """A loaded Python model: a callable and the batch format it wants."""

    def __init__(self, name, version, fn: Callable[[Any], Any], batch_format: str, inputs, outputs, sample=None):
        super().__init__(name, version, inputs=inputs, outputs=outputs)
        self.fn = fn
        self.batch_format = batch_format
        self.sample = sample
        self._closers: list[Callable[[], Any]] = []

    def warmup_block(self, rows: int) -> Any:
        """The model's ``sample``, else zeros from its declared inputs (None: neither)."""
        return self.sample if self.sample is not None else super().warmup_block(rows)

    def add_closer(self, closer: Callable[[], Any] | None) -> None:
        """Call ``closer`` when this instance is closed (in reverse order of adding)."""
        if closer is not None:
            self._closers.append(closer)

    def _run(self, block: dict[str, np.ndarray]) -> Any:
        fmt = self.batch_format
        if fmt == "dict":
            return self.fn(block)
        if fmt == "numpy":
            return self.fn(next(iter(block.values())) if len(block) == 1 else block)
        if fmt == "pandas":
            import pandas as pd

            if len(block) == 1:
                (arr,) = block.values()
                frame = pd.DataFrame(arr if arr.ndim == 2 else {next(iter(block)): arr})
            else:
                frame = pd.DataFrame({k: list(v) if v.ndim > 1 else v for k, v in block.items()})
            return self.fn(frame)
        # "list": one item per row, as Jet's handle(list) -> list
        if len(block) == 1:
            rows = list(next(iter(block.values())))
        else:
            n = len(next(iter(block.values())))
            rows = [{k: v[i] for k, v in block.items()} for i in range(n)]
        result = self.fn(rows)
        if isinstance(result, (list, tuple)) and result and isinstance(result[0], Mapping):
            return {k: np.asarray([r[k] for r in result]) for k in result[0]}
        if isinstance(result, (list, tuple)):
            return np.asarray(result)
        return result

    def close(self) -> None:
        closers, self._closers = self._closers[::-1], []
        for closer in closers:
            closer()


class PythonModel(Model):
    """A Python model held by every worker.

    Give exactly one of ``predict`` (a callable ``f(batch) -> outputs``, a class
    with ``predict`` and optional ``load``/``close``, or such an instance, e.g. a fitted
    scikit-learn estimator) or ``directory`` (a code directory with a handler ``module``
    and ``function``).

    Parameters
    ----------
    name : str
        Model name.
    predict : callable, class or object, optional
        What runs a batch.
    directory : str, optional
        Code directory shipped to every worker (see the handler contract below).
    module : str, optional
        Dotted name of the handler module inside ``directory``.
    function : str
        Name of the handler in ``module``: a function ``f(batch) -> outputs``, or a
        class with ``predict`` (and optional ``load``), instantiated once per instance.
    method : str, optional
        The method of an object or class that runs a batch, e.g. ``"predict_proba"`` or
        ``"transform"`` for a scikit-learn estimator (default ``"predict"``).  A name the
        object lacks is a ``ConfigError`` (``ModelLoadError`` for a handler class).
    requirements : list of str, optional
        pip requirements installed on each worker (into the model's own directory),
        with progress log lines (``daskinfer.models.code`` logger, INFO) and credentials
        in URLs masked.
    pip_options : list of str, optional
        Extra pip arguments, e.g. ``["--index-url", URL]``.
    wheels : str, optional
        A local folder of wheels shipped with the model and used as ``--find-links``
        (with ``--no-index``), for clusters without package index access.
    inputs : dict or list, optional
        Declared inputs: ``{"x": ("float32", (None, 16))}`` or a list of names.
        Batches are checked against it; ``None`` checks only row counts.
    outputs : list of str, optional
        Output names: of the arrays when the model returns an array or a tuple (default
        ``["output"]``), or the entries kept (in this order) when it returns a dict.
    sample : array or dict of arrays, optional
        A small batch of real inputs (rows first): the warm-up batch that deploy runs
        through each new instance, so a model that fails on real data fails at deploy.
    batch_format : {"numpy", "dict", "pandas", "list"}
        What the model receives: an array (single input) or dict, always a dict,
        a ``pandas.DataFrame``, or a list of rows (Jet's ``handle(list) -> list``).
    version, instances, warmup, allow_nan, cast_inputs, resources, max_batch_size
        See :class:`~daskinfer.models.spec.Model`.

    Notes
    -----
    **When a Python model is checked.** ``deploy`` runs one batch through every new
    instance (``warmup=True``, the default) when it can form one: the ``sample``, or
    else zeros made from ``inputs`` that give every input's dtype and full shape.  A
    model that raises on it fails ``deploy`` with a ``ModelLoadError`` and nothing stays
    deployed.  Without either, nothing can be run before traffic comes: ``deploy`` logs
    a warning, and a broken model fails on its first batch (an error result per request).

    **The handler contract** (``directory=``).  On each worker the directory is unpacked
    once per version, ``requirements`` are installed next to it, and ``module`` is
    imported with the directory first on ``sys.path`` for the import only: import
    sibling modules at the top of the handler module (a sibling first imported inside a
    function, at call time, is not found).  Each version runs its own modules, even when
    two versions both have a ``helpers.py``; requirements are shared by name within a
    worker process, as Python imports are.  ``function`` names either

    - a function ``f(batch) -> outputs``, called once per batch, or
    - a class, created once per instance with no arguments; its ``load()`` (optional)
      runs once before any batch (``load(self, device)`` receives the device its worker holds:
      ``"cuda:0"`` on a worker with a ``GPU`` resource, else ``"cpu"``; e.g. for
      ``torch.device(device)``), its ``predict(batch)`` (or ``method``) once per batch,
      and its ``close()`` (optional) when the version is replaced or undeployed.

    ``batch`` is what ``batch_format`` says.  Return an array with one row per input
    row, a tuple of such arrays (named by ``outputs``), or a dict of them; any other
    number of rows is an ``OutputCountError``.  One instance runs one batch at a time;
    ``instances=n`` runs up to n batches at once, each on its own instance.  An exception
    fails that batch only (an error result for each of its requests); raised while
    importing, in ``load()`` or in the warm-up, it fails ``deploy``.

    Examples
    --------
    >>> import numpy as np
    >>> from daskinfer import PythonModel
    >>> model = PythonModel("double", lambda x: x * 2, sample=np.ones((1, 4), np.float32))
    >>> model.load().predict(np.arange(4.0).reshape(2, 2))["output"].tolist()
    [[0.0, 2.0], [4.0, 6.0]]
    >>> from sklearn.linear_model import LogisticRegression  # doctest: +SKIP
    >>> clf = LogisticRegression().fit(X, y)  # doctest: +SKIP
    >>> PythonModel("clf", clf, method="predict_proba", outputs=["probabilities"])  # doctest: +SKIP
    >>> PythonModel("clf", directory="models/clf", module="handler",  # doctest: +SKIP
    ...             function="predict", requirements=["scikit-learn"])
    """

    kind = "python"

    def __init__(
        self,
        name: str,
        predict: Callable[[Any], Any] | type | object | None = None,
        *,
        directory: str | os.PathLike | None = None,
        module: str | None = None,
        function: str = "predict",
        method: str | None = None,
        requirements: Sequence[str] | None = None,
        pip_options: Sequence[str] | None = None,
        wheels: str | os.PathLike | None = None,
        inputs: Mapping[str, Any] | Sequence[Any] | None = None,
        outputs: Sequence[str] | None = None,
        sample: Any = None,
        batch_format: str = "numpy",
        version: str | int = "1",
        instances: int | None = None,
        warmup: bool | None = None,
        allow_nan: bool | None = None,
        cast_inputs: bool | None = None,
        resources: Mapping[str, float] | None = None,
        max_batch_size: int | None = None,
    ):
        output_specs = _specs(outputs)
        super().__init__(
            name,
            version=version,
            instances=instances,
            warmup=warmup,
            allow_nan=allow_nan,
            cast_inputs=cast_inputs,
            outputs=None if output_specs is None else [s.name for s in output_specs],
            resources=resources,
            max_batch_size=max_batch_size,
        )
        if (predict is None) == (directory is None):
            raise ConfigError(f"model {name!r}: give exactly one of predict= or directory=")
        if batch_format not in BATCH_FORMATS:
            raise ConfigError(f"model {name!r}: batch_format must be one of {BATCH_FORMATS}, got {batch_format!r}")
        if method is not None and (not isinstance(method, str) or not method.isidentifier()):
            raise ConfigError(f"model {name!r}: method must be the name of a method, got {method!r}")
        self.predict_obj = predict
        self.function = function
        self.method = method
        self.module = module
        self.path: str | None = None
        self.code_zip: bytes | None = None
        if directory is not None:
            self.path = os.fspath(directory)
            if not os.path.isdir(self.path):
                raise ModelLoadError(
                    f"model {name!r}: code directory {self.path!r} does not exist", model=name, path=self.path
                )
            if not module:
                raise ConfigError(f"model {name!r}: directory= needs module= (the handler module's name)")
            rel = module.replace(".", os.sep)
            if not (
                os.path.isfile(os.path.join(self.path, rel + ".py"))
                or os.path.isfile(os.path.join(self.path, rel, "__init__.py"))
            ):
                raise ModelLoadError(
                    f"model {name!r}: handler module {module!r} not found in {self.path!r} "
                    f"(looked for {rel}.py and {rel}/__init__.py)",
                    model=name,
                    path=self.path,
                )
            self.code_zip = code.zip_directory(self.path)
        else:
            _check_target(name, predict, method)
        self.requirements = list(requirements or [])
        self.pip_options = list(pip_options or [])
        self.wheels_zip: bytes | None = None
        if wheels is not None:
            wheels = os.fspath(wheels)
            if not os.path.isdir(wheels):
                raise ModelLoadError(f"model {name!r}: wheel folder {wheels!r} does not exist", model=name, path=wheels)
            self.wheels_zip = code.zip_directory(wheels)
        self.inputs = _specs(inputs)
        self.outputs = output_specs
        self.sample = _sample(name, sample)
        self.batch_format = batch_format
        self._workdir: str | None = None

    def validate(self) -> None:
        """On the deploying client: warn when deploy cannot run the model before traffic comes."""
        if self.warmup and self.sample is None and zero_block(self.inputs, 1) is None:
            logger.warning(
                "model %r: no sample= and no inputs= with every dtype and shape, so deploy cannot run it "
                "before it takes traffic; a broken model will fail on its first batch instead",
                self.name,
            )

    # -- where code lives on the worker ---------------------------------------------------
    def _digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.code_zip, self.wheels_zip, "\n".join(self.requirements + self.pip_options).encode()):
            h.update(part or b"")
        return h.hexdigest()[:12]

    def _root(self, base: str) -> str:
        """This version's folder under ``base`` (name and version are plain names: see :class:`Model`)."""
        return os.path.join(base, f"{self.name}-{self.version}-{self._digest()}")

    def _import_handler(self, env: code.CodeEnv) -> Any:
        assert self.module
        rel = os.path.join(env.code_dir, self.module.replace(".", os.sep))
        file = rel + ".py" if os.path.isfile(rel + ".py") else os.path.join(rel, "__init__.py")
        try:
            mod = env.handler_module(self.module)
        except Exception as e:
            raise ModelLoadError(
                f"model {self.name!r}: importing handler {file!r} failed: {type(e).__name__}: {e}",
                model=self.name,
                path=file,
            ) from e
        try:
            return getattr(mod, self.function)
        except AttributeError:
            raise ModelLoadError(
                f"model {self.name!r}: handler module {mod.__file__!r} has no {self.function!r}",
                model=self.name,
                path=mod.__file__,
            ) from None

    def _base_dir(self) -> str:
        try:
            from distributed import get_worker

            return os.path.join(get_worker().local_directory, "daskinfer-models")
        except ValueError:
            if self._workdir is None:
                self._workdir = tempfile.mkdtemp(prefix="daskinfer-models-")
            return self._workdir

    def load(self, base_dir: str | None = None, *, device: str = CPU) -> LoadedPython:
        """One instance; a class's ``load`` runs here, given ``device`` where it takes one."""
        target: Any = self.predict_obj
        env = None
        if self.code_zip is not None or self.requirements:
            root = self._root(base_dir or self._base_dir())
            code.prepare(
                root,
                model=self.name,
                code_zip=self.code_zip,
                wheels_zip=self.wheels_zip,
                requirements=self.requirements,
                pip_options=self.pip_options,
            )
            env = code.CodeEnv.acquire(root)
        try:
            if env is not None and self.code_zip is not None:
                target = self._import_handler(env)
            fn, closer = self._bind(target, device)
        except BaseException:
            if env is not None:
                env.release()
            raise
        loaded = LoadedPython(self.name, self.version, fn, self.batch_format, self.inputs, self.outputs, self.sample)
        self._configure(loaded, device)
        loaded.add_closer(closer)
        if env is not None:
            loaded.add_closer(env.release)
        return loaded

    def _bind(self, target: Any, device: str = CPU) -> tuple[Callable[[Any], Any], Callable[[], None] | None]:
        """Turn a function, class or instance into a bound batch callable (and its close)."""
        method = self.method or "predict"
        obj = target
        if isinstance(target, type):
            try:
                obj = target()
            except Exception as e:
                raise ModelLoadError(
                    f"model {self.name!r}: creating {target.__name__}() failed: {type(e).__name__}: {e}",
                    model=self.name,
                ) from e
        elif hasattr(target, method):
            obj = copy.deepcopy(target) if self.instances > 1 else target
        if hasattr(obj, method) and not _is_function(obj):
            if hasattr(obj, "load"):
                try:
                    call_load(obj, device)
                except Exception as e:
                    raise ModelLoadError(
                        f"model {self.name!r}: load() failed: {type(e).__name__}: {e}", model=self.name
                    ) from e
            return getattr(obj, method), getattr(obj, "close", None)
        if self.method is not None:
            raise ModelLoadError(
                f"model {self.name!r}: {type(obj).__name__} has no method {self.method!r} (method=)", model=self.name
            )
        if callable(obj):
            return obj, None
        raise ModelLoadError(f"model {self.name!r}: {obj!r} is neither callable nor has predict()", model=self.name)


def _is_function(obj: Any) -> bool:
    return isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial))


def _check_target(name: str, target: Any, method: str | None) -> None:
    """Refuse a ``predict=`` that cannot run a batch, before it is shipped."""
    if method is None:
        if not callable(target) and not hasattr(target, "predict"):
            raise ConfigError(
                f"model {name!r}: predict= must be callable or have a predict() method, got {type(target).__name__}"
            )
        return
    if _is_function(target):
        raise ConfigError(f"model {name!r}: method={method!r} needs an object or a class, but predict= is a function")
    if not callable(getattr(target, method, None)):
        what = target.__name__ if isinstance(target, type) else type(target).__name__
        raise ConfigError(f"model {name!r}: {what} has no method {method!r} (method=)")


def _sample(name: str, sample: Any) -> dict[str, np.ndarray] | np.ndarray | None:
    if sample is None:
        return None
    try:
        if isinstance(sample, Mapping):
            return {str(k): np.asarray(v) for k, v in sample.items()}
        return np.asarray(sample)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model {name!r}: sample= must be an array or a dict of arrays ({e})") from None
