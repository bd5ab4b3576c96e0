"""Where a model runs: the Dask worker resources it asks for, and the device a worker holds.

A model spec may ask for worker resources (``resources={"GPU": 1}``; a worker declares what it
has with ``dask worker --resources "GPU=1"``).  It is loaded only on workers that have at least
that much of each: a requirement on what a worker has, not a reservation (two models that ask
for ``GPU=1`` both load on a worker with ``GPU=1``), and the partitions of a pipeline that uses it
run only there.

A worker with a ``GPU`` resource holds device ``"cuda:0"``: device 0 of the GPUs it sees.  Run one
worker per GPU with ``CUDA_VISIBLE_DEVICES`` set for each, as dask-cuda's ``LocalCUDACluster``
does, and device 0 is that worker's own GPU.  Any other worker holds ``"cpu"``.

Device memory is read with NVML (``nvidia-ml-py``, in the ``gpu`` extra) where it is installed;
elsewhere it is ``None``.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from daskinfer.exceptions import ConfigError

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"  # the worker resource that makes a worker hold a GPU ("cuda:0")
CPU = "cpu"


def check_resources(model: str, resources: Any) -> dict[str, float]:
    """``resources`` as ``{name: amount}`` (names non-empty strings, amounts numbers > 0); else a
    :class:`ConfigError` naming the model and what came."""
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise ConfigError(
            f"model {model!r}: resources must be a mapping of Dask worker resources to amounts, "
            f"e.g. {{'GPU': 1}}; got {type(resources).__name__} {resources!r}"
        )
    out: dict[str, float] = {}
    for name, amount in resources.items():
        ok = isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0
        if not isinstance(name, str) or not name or not ok:
            raise ConfigError(
                f"model {model!r}: resources must map resource names to amounts > 0, e.g. {{'GPU': 1}}; "
                f"got {name!r}: {amount!r}"
            )
        out[name] = float(amount)
    return out


def merge_resources(*many: Mapping[str, float]) -> dict[str, float]:
    """What a worker needs to hold all of ``many``: the largest amount of each resource."""
    out: dict[str, float] = {}
    for res in many:
        for name, amount in res.items():
            out[name] = max(out.get(name, 0.0), float(amount))
    return dict(sorted(out.items()))


def missing_resources(have: Mapping[str, float], need: Mapping[str, float]) -> dict[str, float]:
    """The resources of ``need`` that ``have`` lacks or holds too little of."""
    return {name: amount for name, amount in need.items() if float(have.get(name, 0.0)) < amount}


def format_resources(resources: Mapping[str, float]) -> str:
    """``GPU=1, memory=2e+09`` as ``dask worker --resources`` writes them; ``none`` when empty."""
    return ", ".join(f"{name}={amount:g}" for name, amount in resources.items()) or "none"


def worker_resources(worker: Worker) -> dict[str, float]:
    """The resources ``worker`` declared (``dask worker --resources``)."""
    return dict(worker.state.total_resources)


def device_of(resources: Mapping[str, float]) -> str:
    """The device a worker with ``resources`` holds: ``"cuda:0"`` with a GPU resource, else ``"cpu"``."""
    return "cuda:0" if float(resources.get(GPU_RESOURCE, 0.0)) > 0 else CPU


def device_index(device: str) -> int:
    """The index of ``device`` (``"cuda:1"`` -> 1; ``"cuda"`` and ``"cpu"`` -> 0)."""
    _, _, index = device.partition(":")
    try:
        return int(index) if index else 0
    except ValueError:
        raise ConfigError(f"a device is 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None


def call_load(obj: Any, device: str) -> None:
    """Call ``obj.load(device)`` when its ``load`` takes the device (a parameter named ``device``, or
    one without a default: ``load(self, device)``), else ``obj.load()``."""
    try:
        params = list(inspect.signature(obj.load).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and (positional[0].name == "device" or positional[0].default is inspect.Parameter.empty):
        obj.load(device)
    elif any(p.name == "device" and p.kind == p.KEYWORD_ONLY for p in params):
        obj.load(device=device)
    else:
        obj.load()


_nvml_lock = threading.Lock()
_nvml: Any = None  # the pynvml module once initialised; False where NVML cannot be used


def _nvml_module() -> Any:
    global _nvml
    with _nvml_lock:
        if _nvml is None:
            try:
                import pynvml  # nvidia-ml-py: the gpu extra

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception as e:  # not installed, or no NVIDIA driver here
                logger.debug("device memory is not available: %r", e)
                _nvml = False
        return _nvml


def visible_device(index: int, visible: str | None) -> int | str | None:
    """The physical GPU behind device ``index`` of a process whose ``CUDA_VISIBLE_DEVICES`` is
    ``visible``: an NVML index or a UUID (``GPU-...``, ``MIG-...``); None when it sees no such device."""
    if visible is None:
        return index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        return None
    entry = entries[index]
    return int(entry) if entry.isdigit() else entry


def device_memory(device: str) -> dict[str, int] | None:
    """``{"used": bytes, "total": bytes}`` of a CUDA ``device`` as NVML reads it (the whole GPU,
    every process on it); None for the CPU, or where NVML is not available."""
    if not device.startswith("cuda"):
        return None
    nvml = _nvml_module()
    if not nvml:
        return None
    physical = visible_device(device_index(device), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if physical is None:
        return None
    try:
        if isinstance(physical, int):
            handle = nvml.nvmlDeviceGetHandleByIndex(physical)
        else:
            handle = nvml.nvmlDeviceGetHandleByUUID(physical)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception as e:  # pragma: no cover - a driver error must not break status
        logger.debug("reading the memory of %s failed: %r", device, e)
        return None
    return {"used": int(info.used), "total": int(info.total)}
