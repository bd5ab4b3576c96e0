"""onnxruntime execution providers: the ones an :class:`~daskinfer.OnnxModel` asks for, their
options, and the ones its session really uses.

A model lists providers in order of preference (``["CUDAExecutionProvider"]``,
``["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]``), with one dict
of options per provider.  The CPU is a fallback only where the list names
``CPUExecutionProvider``: without it, a GPU model that cannot run on its GPU fails to load (with
the providers this onnxruntime has), instead of running slowly on the CPU unnoticed.

A GPU provider (CUDA, TensorRT, ROCm, MIGraphX) runs on device 0 of what the worker sees, unless
its options name a ``device_id``: with one worker per GPU and ``CUDA_VISIBLE_DEVICES`` set per
worker, as dask-cuda does, that is the worker's own GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from daskinfer.exceptions import ConfigError, ModelLoadError
from daskinfer.models.device import device_index

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = (
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
)
_FALLBACK_HINT = (
    f"list {CPU_PROVIDER!r} after it to fall back to the CPU where it is missing; "
    "CUDA and TensorRT need the gpu extra (pip install 'daskinfer[gpu]': onnxruntime-gpu)"
)


def check_providers(
    model: str, providers: Any, options: Any, available: Sequence[str], known: Sequence[str]
) -> tuple[list[str], list[dict[str, str]]]:
    """The providers and their options as given (one dict per provider; ``[]`` or None: none),
    checked where the spec is made: a name onnxruntime does not know is refused, and so is one
    this onnxruntime lacks unless the list names the CPU as a fallback.  Raise
    :class:`ConfigError` naming the providers at fault and the ones available."""
    if isinstance(providers, str) or not isinstance(providers, Sequence) or not providers:
        raise ConfigError(
            f"model {model!r}: providers must be a non-empty list of execution providers, got {providers!r}; "
            f"available: {list(available)}"
        )
    names = list(providers)
    if not all(isinstance(p, str) for p in names) or len(set(names)) != len(names):
        raise ConfigError(f"model {model!r}: providers must be distinct provider names, got {names!r}")
    unknown = [p for p in names if p not in known]
    missing = [p for p in names if p in known and p not in available]
    if unknown or (missing and CPU_PROVIDER not in names):
        why = "onnxruntime knows no provider of that name" if unknown else _FALLBACK_HINT
        raise ConfigError(
            f"model {model!r}: execution providers {unknown or missing} are not available in this onnxruntime; "
            f"available: {list(available)} ({why})"
        )
    return names, _options(model, names, options)


def _options(model: str, names: list[str], options: Any) -> list[dict[str, str]]:
    if options is None or (isinstance(options, Sequence) and not isinstance(options, str) and not options):
        return [{} for _ in names]
    if isinstance(options, str) or not isinstance(options, Sequence) or len(options) != len(names):
        raise ConfigError(
            f"model {model!r}: provider_options must be a list of one dict per provider ({len(names)} for "
            f"{names}), got {options!r}"
        )
    out = []
    for name, opts in zip(names, options):
        if not isinstance(opts, Mapping):
            raise ConfigError(f"model {model!r}: provider_options for {name} must be a dict, got {opts!r}")
        out.append({str(k): _option_text(v) for k, v in opts.items()})
    return out


def _option_text(value: Any) -> str:
    """onnxruntime takes option values as strings (``True`` as ``"1"``, as its own parsers read it)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def session_providers(
    model: str, names: list[str], options: list[dict[str, str]], available: Sequence[str], device: str, where: str
) -> tuple[list[str], list[dict[str, str]]]:
    """The providers and options to open a session with on this process (``where``: a worker's
    address, or "this process"): those this onnxruntime has, GPU providers on ``device`` unless
    their options name a ``device_id``.  A provider it lacks is a :class:`ModelLoadError` naming
    the available ones, unless the list names the CPU as a fallback (then it is left out, logged)."""
    missing = [p for p in names if p not in available]
    if missing and CPU_PROVIDER not in names:
        raise ModelLoadError(
            f"model {model!r}: execution providers {missing} are not available in onnxruntime on {where}; "
            f"available: {list(available)} ({_FALLBACK_HINT})",
            model=model,
        )
    if missing:
        logger.warning("model %r: %s not available on %s; using %s", model, missing, where, names)
    use, use_options = [], []
    for name, opts in zip(names, options):
        if name in missing:
            continue
        opts = dict(opts)
        if name in GPU_PROVIDERS:
            opts.setdefault("device_id", str(device_index(device)))
        use.append(name)
        use_options.append(opts)
    return use, use_options


def check_used(model: str, asked: list[str], used: Sequence[str], where: str) -> None:
    """The session runs on the provider asked for first, or on the CPU only where the list allows it
    (onnxruntime falls back to the CPU by itself when, say, CUDA cannot start: no GPU, no driver)."""
    if not asked or asked[0] in used:
        return
    if CPU_PROVIDER in asked:
        logger.warning("model %r on %s: onnxruntime could not start %s; it runs on %s", model, where, asked[0], used)
        return
    raise ModelLoadError(
        f"model {model!r}: onnxruntime on {where} could not start {asked[0]} (asked for {asked}); it could "
        f"start only {list(used)}, and the CPU is no fallback for this model ({_FALLBACK_HINT})",
        model=model,
    )


def runs_on_gpu(used: Sequence[str]) -> bool:
    """The session's first provider in use is a GPU one."""
    return bool(used) and used[0] in GPU_PROVIDERS
