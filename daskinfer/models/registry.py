"""Models loaded in one process (a Dask worker, or the client for local streams).

Each name has a *current* deployment; a new version is loaded and warmed up
before it becomes current, and batches that already hold the old one finish on
it (a deployment is closed only when its last batch returns).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from daskinfer.exceptions import ModelLoadError, ModelNotFoundError
from daskinfer.models.device import CPU
from daskinfer.tensors import rows_of

if TYPE_CHECKING:
    from distributed import Worker

    from daskinfer.models.loaded import LoadedModel
    from daskinfer.models.spec import Model

logger = logging.getLogger(__name__)

EXTENSION_NAME = "daskinfer-models"


class Deployment:
    """One version of a model loaded in this process: its instances and usage count."""

    def __init__(self, model: Model, instances: list[LoadedModel]):
        self.model = model
        self.name = model.name
        self.version = model.version
        self.seq = model.deploy_seq
        self.instances = instances
        self.first = instances[0]
        self._pool: queue.SimpleQueue[LoadedModel] = queue.SimpleQueue()
        for inst in instances:
            self._pool.put(inst)
        self._executor = ThreadPoolExecutor(len(instances), thread_name_prefix=f"daskinfer-{self.name}")
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False
        self._closed = False

    @property
    def inputs(self):
        return self.first.inputs

    @property
    def outputs(self):
        return self.first.outputs

    def _enter(self) -> None:
        with self._lock:
            self._users += 1

    def _exit(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self._close()

    def predict(self, batch: Any) -> dict[str, np.ndarray]:
        """Run a batch on a free instance (blocking; call from a thread)."""
        self._enter()
        try:
            return self._run_on(self._pool.get(), batch)
        finally:
            self._exit()

    def _run_on(self, inst: LoadedModel, batch: Any) -> dict[str, np.ndarray]:
        """Run a batch on ``inst``, taken from the pool, and give it back."""
        try:
            return inst.predict(batch)
        finally:
            self._pool.put(inst)

    async def apredict(self, batch: Any, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Run a batch without blocking the event loop.

        ``deadline``: seconds the batch may take; asynchronous models (remote services)
        give up after it, in-process models ignore it.
        """
        if self.first.is_async:
            self._enter()
            try:
                return await self.first.apredict(batch, deadline=deadline)
            finally:
                self._exit()
        if self.first.inline_rows and rows_of(batch) <= self.first.inline_rows:
            # a few rows through a microsecond model: a thread hop would cost more than the call.
            # Only with an instance in hand: the event loop must never wait for one.
            self._enter()
            try:
                try:
                    inst = self._pool.get_nowait()
                except queue.Empty:
                    pass  # every instance is busy on a thread: queue behind them there
                else:
                    return self._run_on(inst, batch)
            finally:
                self._exit()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.predict, batch)

    def retire(self) -> None:
        """Stop taking new batches; close once the running ones return."""
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False)
        for inst in self.instances:
            try:
                inst.close()
            except Exception:  # pragma: no cover - best effort
                logger.exception("closing model %s version %s failed", self.name, self.version)

    def __repr__(self) -> str:
        return f"<Deployment {self.name!r} version {self.version!r} x{len(self.instances)}>"


class ModelRegistry:
    """The models of one process, by name."""

    def __init__(self) -> None:
        self._current: dict[str, Deployment] = {}
        self._all: dict[tuple[str, str], Deployment] = {}
        self._lock = threading.Lock()

    async def install(self, model: Model, device: str = CPU) -> Deployment:
        """Load on ``device``, warm up and make ``model`` current (unless a newer deployment already is)."""
        dep = await asyncio.to_thread(load_deployment, model, device)
        self._add(dep)
        return dep

    def install_sync(self, model: Model, device: str = CPU) -> Deployment:
        dep = load_deployment(model, device)
        self._add(dep)
        return dep

    def _add(self, dep: Deployment) -> None:
        with self._lock:
            old = self._all.get((dep.name, dep.version))
            self._all[(dep.name, dep.version)] = dep
            cur = self._current.get(dep.name)
            if cur is None or cur is old or dep.seq >= cur.seq:
                self._current[dep.name] = dep
        if old is not None and old is not dep:
            old.retire()
        logger.info("model %s version %s ready", dep.name, dep.version)

    def retire(self, name: str, version: str) -> None:
        """Remove one version; if it was current, the newest remaining version takes over."""
        with self._lock:
            dep = self._all.pop((name, version), None)
            if dep is None:
                return
            if self._current.get(name) is dep:
                rest = [d for (n, _), d in self._all.items() if n == name]
                if rest:
                    self._current[name] = max(rest, key=lambda d: d.seq)
                else:
                    del self._current[name]
        dep.retire()

    def get(self, name: str) -> Deployment:
        """The current deployment of ``name``; raises :class:`ModelNotFoundError`."""
        try:
            return self._current[name]
        except KeyError:
            raise ModelNotFoundError(name, list(self._current)) from None

    def get_or_install(self, model: Model) -> Deployment:
        """The current deployment of ``model``'s name at its version; loaded here (blocking) if missing."""
        dep = self._current.get(model.name)
        if dep is not None and dep.version == model.version:
            return dep
        return self.install_sync(model)

    def names(self) -> dict[str, str]:
        """Current version of every model here."""
        return {n: d.version for n, d in self._current.items()}

    def describe(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """The current deployment of each of ``names`` (default: all) that is loaded here: version,
        kind, device, and what its kind knows (ONNX: the providers in use, device memory)."""
        current = dict(self._current)
        out = {}
        for name in current if names is None else names:
            dep = current.get(name)
            if dep is not None:
                out[name] = {"version": dep.version, "kind": dep.model.kind, **dep.first.describe()}
        return out

    def close(self) -> None:
        with self._lock:
            deps = list(self._all.values())
            self._all.clear()
            self._current.clear()
        for d in deps:
            d.retire()


def load_deployment(model: Model, device: str = CPU) -> Deployment:
    """Load ``model.instances`` instances on ``device`` and warm them up."""
    instances = [model.load(device=device) for _ in range(model.instances)]
    if model.warmup:
        for inst in instances:
            block = inst.warmup_block(model.warmup_rows)
            if block is None:
                continue
            try:
                inst.predict(block)
            except Exception as e:
                for i in instances:
                    i.close()
                raise ModelLoadError(
                    f"model {model.name!r} version {model.version!r} failed its warm-up batch: {type(e).__name__}: {e}",
                    model=model.name,
                    path=getattr(model, "path", None),
                ) from e
    return Deployment(model, instances)


_process_registry = ModelRegistry()


def registry_for(worker: Worker | None = None) -> ModelRegistry:
    """The registry of ``worker``, or of the current worker, or of this process."""
    if worker is None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except ValueError:
            return _process_registry
    reg = worker.extensions.get(EXTENSION_NAME)
    if reg is None:
        reg = worker.extensions[EXTENSION_NAME] = ModelRegistry()
    return reg


def local_registry() -> ModelRegistry:
    """The registry used outside Dask workers (local streams, tests, notebooks)."""
    return _process_registry
