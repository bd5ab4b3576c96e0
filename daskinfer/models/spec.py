"""Model specs: small, picklable descriptions of a model (paths, bytes, names).

A :class:`Model` knows how to build a :class:`~daskinfer.models.loaded.LoadedModel`
in a process (``load``); it knows nothing of workers or registries.  On a cluster a
:class:`~daskinfer.models.plugin.ModelPlugin` carries it to every worker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, TypeVar

from daskinfer import settings
from daskinfer.exceptions import ConfigError
from daskinfer.models.device import CPU, check_resources

if TYPE_CHECKING:
    from daskinfer.models.loaded import LoadedModel


L = TypeVar("L", bound="LoadedModel")


class Model:
    """Base class of deployable models: a named, versioned model spec.

    Parameters
    ----------
    name : str
        Model name used by ``infer(name)`` and in results.
    version : str
        Version label; deploying another version of the same name swaps it in
        once loaded and warmed up, with no downtime.

        Names and versions are plain names (they become directory and plugin names):
        1 to 128 letters, digits, ``_``, ``.``, ``+`` or ``-``, starting with a letter,
        digit or ``_``, without ``..``; anything else is a :class:`ConfigError`.
    instances : int, optional
        Instances loaded per worker (parallel calls). Config ``daskinfer.models.instances``.
    warmup : bool, optional
        Run a small batch through a new instance before it takes traffic.
        Config ``daskinfer.models.warmup``.
    allow_nan : bool, optional
        False rejects float inputs holding NaN or infinity (an error result for those
        requests). Config ``daskinfer.models.allow-nan``.
    cast_inputs : bool, optional
        True casts inputs to the dtypes the model declares where no value changes kind
        (float64 rows or Python lists to float32, ints to floats; never floats to ints or
        text to numbers). False refuses a mismatch with an ``InputValidationError`` that
        says so. Config ``daskinfer.models.cast-inputs``.
    outputs : list of str, optional
        The outputs to return, in this order (others are dropped; a name the model does
        not have is an error at deploy where the model declares its outputs, else on the
        first batch). Default: all.
    resources : dict, optional
        Dask worker resources the model needs, e.g. ``{"GPU": 1}``: it is loaded only on
        workers that have at least that much of each (``dask worker --resources "GPU=1"``), and
        the partitions of a pipeline that uses it run only there.  A requirement on what a
        worker has, not a reservation: two models asking for ``GPU=1`` both load on a worker
        with ``GPU=1``.  Config ``daskinfer.models.resources`` (default: none).
    max_batch_size : int, optional
        Most rows in one call of this model: a stage cuts larger batches into calls of this
        size, and a pipeline that does not set its own ``max_batch_size`` forms batches up to
        the largest of its models' (a GPU model wants bigger batches).  Default: the pipeline's.

    Notes
    -----
    A model with exactly one input takes it under any name: a bare array, or a dict with
    one entry, goes to that input.

    A model is loaded with the device its worker holds (see :mod:`daskinfer.models.device`):
    ``"cuda:0"`` on a worker with a ``GPU`` resource, else ``"cpu"``.
    """

    kind: ClassVar[str] = "model"

    def __init__(
        self,
        name: str,
        *,
        version: str | int = "1",
        instances: int | None = None,
        warmup: bool | None = None,
        allow_nan: bool | None = None,
        cast_inputs: bool | None = None,
        outputs: Sequence[str] | None = None,
        resources: Mapping[str, float] | None = None,
        max_batch_size: int | None = None,
    ):
        self.name = check_plain_name("name", name)
        self.version = check_plain_name("version", version if isinstance(version, str) else str(version))
        self.instances = int(settings.get("models.instances", instances))
        if self.instances < 1:
            raise ConfigError(f"model {name!r}: instances must be >= 1, got {self.instances}")
        self.warmup = bool(settings.get("models.warmup", warmup))
        self.allow_nan = bool(settings.get("models.allow-nan", allow_nan))
        self.cast_inputs = bool(settings.get("models.cast-inputs", cast_inputs))
        self.warmup_rows = int(settings.get("models.warmup-rows"))  # (read here: settings travel with the spec)
        self.selected_outputs = _output_names(name, outputs)
        self.resources = check_resources(name, settings.get("models.resources", resources))
        self.max_batch_size = _batch_size(name, max_batch_size)
        self.deploy_seq = 0  # set by deploy(); newer deployments win on every worker

    @property
    def plugin_name(self) -> str:
        return plugin_name(self.name, self.version)

    @property
    def call_rows(self) -> int | None:
        """Most rows a stage passes to this model in one call (None: the pipeline's limit)."""
        return self.max_batch_size

    def load(self, *, device: str = CPU) -> LoadedModel:
        """Build one runnable instance in this process, on ``device`` (``"cpu"``, ``"cuda:0"``)."""
        raise NotImplementedError

    def _configure(self, loaded: L, device: str = CPU) -> L:
        """Give a freshly built instance this spec's input and output handling, and its device."""
        loaded.device = device
        loaded.allow_nan = self.allow_nan
        loaded.cast_inputs = self.cast_inputs
        loaded.select_outputs = self.selected_outputs
        return loaded

    def validate(self) -> None:
        """Cheap checks run by ``deploy`` on the client before shipping the model."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"


def _batch_size(model: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model {model!r}: max_batch_size must be an integer >= 1, got {value!r}")
    return value


def _output_names(model: str, outputs: Sequence[str] | None) -> list[str] | None:
    if outputs is None:
        return None
    names = [outputs] if isinstance(outputs, str) else list(outputs)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"model {model!r}: outputs must be a list of distinct output names, got {outputs!r}")
    return names


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")


def check_plain_name(what: str, value: object) -> str:
    """``value`` if it is a plain model name or version (see :class:`Model`); else a :class:`ConfigError`."""
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"model {what} must be a plain name: 1 to 128 letters, digits, '_', '.', '+' or '-', "
            f"starting with a letter, digit or '_', without '..' (it names a directory on each worker), got {value!r}"
        )
    return value


PLUGIN_PREFIX = "daskinfer-model:"


def plugin_name(model: str, version: str) -> str:
    """Name of the worker plugin that holds ``model`` at ``version``."""
    return f"{PLUGIN_PREFIX}{model}:{version}"


def parse_plugin_name(name: str) -> tuple[str, str] | None:
    """Inverse of :func:`plugin_name`; None for plugins that are not daskinfer models."""
    if not name.startswith(PLUGIN_PREFIX):
        return None
    model, _, version = name[len(PLUGIN_PREFIX) :].rpartition(":")
    return model, version
