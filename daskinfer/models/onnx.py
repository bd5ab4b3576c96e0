"""ONNX models run in-process with onnxruntime: the fast path.

The model file is read when the :class:`OnnxModel` is made (so it ships to
workers that do not share the client's file system); each worker builds its own
``onnxruntime.InferenceSession`` in ``setup``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from daskinfer import settings
from daskinfer.exceptions import ConfigError, ModelLoadError
from daskinfer.models.device import CPU, device_index, device_memory
from daskinfer.models.loaded import LoadedModel
from daskinfer.models.onnx_providers import (
    CPU_PROVIDER,
    check_providers,
    check_used,
    runs_on_gpu,
    session_providers,
)
from daskinfer.models.spec import Model
from daskinfer.tensors import TensorSpec

ONNX_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _spec(arg: Any) -> TensorSpec:
    dtype = ONNX_DTYPES.get(arg.type)
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape) if arg.shape is not None else None
    if shape:
        shape = (None, *shape[1:])  # the first dimension is the batch
    return TensorSpec(arg.name, None if dtype is None or dtype is np.str_ else np.dtype(dtype), shape)


def _is_tensor(arg: Any) -> bool:
    return str(arg.type).startswith("tensor(")


def check_outputs(model: str, source: str, session: ort.InferenceSession, selected: list[str] | None) -> list[Any]:
    """The session's outputs to run (``selected``, or all); raise :class:`ModelLoadError` for an
    unknown name or an output that is not a tensor (skl2onnx's ZipMap), with what to do."""
    outputs = session.get_outputs()
    by_name = {o.name: o for o in outputs}
    tensors = [o.name for o in outputs if _is_tensor(o)]
    if selected is not None:
        unknown = [n for n in selected if n not in by_name]
        if unknown:
            raise ModelLoadError(
                f"ONNX model {source} (model {model!r}) has no output {unknown[0]!r} asked for by outputs=; "
                f"its outputs: {list(by_name)}",
                model=model,
            )
    chosen = [by_name[n] for n in selected] if selected is not None else outputs
    for o in chosen:
        if not _is_tensor(o):
            zipmap = "map(" in str(o.type)
            why = (
                "a skl2onnx ZipMap (a list of dicts, about 3x slower); convert the classifier with "
                "options={'zipmap': False} (skl2onnx.to_onnx(clf, X, options={'zipmap': False})) to get a "
                "probability tensor"
                if zipmap
                else "not a tensor"
            )
            keep = f"; or keep only tensor outputs with outputs={tensors}" if tensors else ""
            raise ModelLoadError(
                f"ONNX model {source} (model {model!r}): output {o.name!r} is {o.type}: {why}{keep}",
                model=model,
            )
    return chosen


class LoadedOnnx(LoadedModel):
    """An onnxruntime session plus the model's signature (``outputs``: the ones it runs).

    ``io_binding``: run through an ``IOBinding`` (inputs bound from host memory, outputs allocated
    by onnxruntime on the session's device, then copied back in one step).
    """

    fresh_outputs = True  # new arrays on every call: sent without a copy

    def __init__(
        self,
        name: str,
        version: str,
        session: ort.InferenceSession,
        outputs: list[Any] | None = None,
        io_binding: bool = False,
    ):
        outputs = session.get_outputs() if outputs is None else outputs
        super().__init__(
            name,
            version,
            inputs=[_spec(i) for i in session.get_inputs()],
            outputs=[_spec(o) for o in outputs],
        )
        self.session = session
        self._output_names = [o.name for o in outputs]
        self.inline_rows = 0  # set from the spec (OnnxModel.inline_rows)
        self.providers = list(session.get_providers())  # the providers in use, first the one that runs
        self.io_binding = io_binding

    def describe(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "provider": self.providers[0] if self.providers else None,
            "providers": self.providers,
            "io_binding": self.io_binding,
            "device_memory": device_memory(self.device),
        }

    def _run(self, block: dict[str, np.ndarray]) -> Any:
        if self.io_binding:
            return self._run_bound(block)
        values = self.session.run(self._output_names, block)
        return dict(zip(self._output_names, values))

    def _run_bound(self, block: dict[str, np.ndarray]) -> Any:
        on_gpu = runs_on_gpu(self.providers)
        binding = self.session.io_binding()
        for name, arr in block.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self._output_names:
            binding.bind_output(name, "cuda" if on_gpu else "cpu", device_index(self.device) if on_gpu else 0)
        self.session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu()))


class OnnxModel(Model):
    """An ONNX model held by every worker.

    Parameters
    ----------
    name : str
        Model name.
    model : str, os.PathLike or bytes
        Path to an ``.onnx`` file, or its bytes.
    outputs : list of str, optional
        The graph outputs to run and return (default: all); a name the graph lacks is a
        ``ModelLoadError`` at deploy.  Every output returned must be a tensor: a skl2onnx
        classifier's default ZipMap output is refused with the conversion option that avoids it.
    version, instances, warmup, allow_nan, cast_inputs, resources, max_batch_size
        See :class:`~daskinfer.models.spec.Model`.
    intra_op_num_threads, inter_op_num_threads : int, optional
        onnxruntime threads; config ``daskinfer.onnx.*`` (1 suits one-thread Dask workers).
    providers : list of str, optional
        Execution providers in order of preference, e.g. ``["CUDAExecutionProvider"]`` or
        ``["TensorrtExecutionProvider", "CUDAExecutionProvider"]``; config ``daskinfer.onnx.providers``.
        The CPU is a fallback only where the list names ``"CPUExecutionProvider"``: without it a
        model whose provider is missing, or cannot start on the worker (no GPU, no driver), fails
        to load, naming the providers available there.  A provider this onnxruntime lacks is
        refused here, naming the available ones (unless the CPU is listed as a fallback).  The
        provider in use shows in ``status()`` and in the ``daskinfer_model_info`` metric.
    provider_options : list of dict, optional
        One dict of options per provider (onnxruntime's, e.g. ``{"device_id": 1}``,
        ``{"trt_fp16_enable": True}``); config ``daskinfer.onnx.provider-options``.  GPU
        providers run on device 0 of what their worker sees (its own GPU where each worker
        sees one, through ``CUDA_VISIBLE_DEVICES``) unless the options name a ``device_id``.
    io_binding : bool, optional
        Run through an onnxruntime ``IOBinding``: inputs bound from host memory, outputs left to
        onnxruntime on the session's device and copied back in one step.  Meant for GPU
        sessions; on the CPU it runs the same path with nothing to save.  Config
        ``daskinfer.onnx.io-binding`` (default off).
    graph_optimization_level : {"disable", "basic", "extended", "all"}, optional

    Examples
    --------
    >>> from daskinfer import OnnxModel, deploy, bundled_model_path
    >>> model = OnnxModel("mlp", bundled_model_path())
    >>> deploy(client, model)  # doctest: +SKIP
    >>> big = OnnxModel("big", "big.onnx", resources={"GPU": 1},  # doctest: +SKIP
    ...                 providers=["CUDAExecutionProvider"], max_batch_size=16384)
    """

    kind = "onnx"

    def __init__(
        self,
        name: str,
        model: str | os.PathLike | bytes,
        *,
        version: str | int = "1",
        instances: int | None = None,
        warmup: bool | None = None,
        allow_nan: bool | None = None,
        cast_inputs: bool | None = None,
        outputs: list[str] | None = None,
        intra_op_num_threads: int | None = None,
        inter_op_num_threads: int | None = None,
        providers: list[str] | None = None,
        provider_options: list[Mapping[str, Any]] | None = None,
        io_binding: bool | None = None,
        graph_optimization_level: str | None = None,
        resources: Mapping[str, float] | None = None,
        max_batch_size: int | None = None,
    ):
        super().__init__(
            name,
            version=version,
            instances=instances,
            warmup=warmup,
            allow_nan=allow_nan,
            cast_inputs=cast_inputs,
            outputs=outputs,
            resources=resources,
            max_batch_size=max_batch_size,
        )
        if isinstance(model, (bytes, bytearray, memoryview)):
            self.path = None
            self.model_bytes = bytes(model)
        else:
            self.path = os.fspath(model)
            try:
                with open(self.path, "rb") as f:
                    self.model_bytes = f.read()
            except OSError as e:
                raise ModelLoadError(
                    f"cannot read ONNX model file {self.path!r} for model {name!r}: {e.strerror or e}",
                    model=name,
                    path=self.path,
                ) from e
        self.intra_op_num_threads = int(settings.get("onnx.intra-op-num-threads", intra_op_num_threads))
        self.inter_op_num_threads = int(settings.get("onnx.inter-op-num-threads", inter_op_num_threads))
        self.providers, self.provider_options = check_providers(
            name,
            settings.get("onnx.providers", providers),
            settings.get("onnx.provider-options", provider_options),
            ort.get_available_providers(),
            ort.get_all_providers(),
        )
        binding = settings.get("onnx.io-binding", io_binding)
        if not isinstance(binding, bool):
            raise ConfigError(f"model {name!r}: io_binding must be true or false, got {binding!r}")
        self.io_binding = binding
        level = settings.get("onnx.graph-optimization-level", graph_optimization_level)
        if level not in OPT_LEVELS:
            raise ConfigError(
                f"model {name!r}: graph_optimization_level must be one of {sorted(OPT_LEVELS)}, got {level!r}"
            )
        self.graph_optimization_level = level
        self.inline_rows = int(settings.get("onnx.inline-rows"))  # read here: settings travel with the spec

    @property
    def source(self) -> str:
        return repr(self.path) if self.path else f"<{len(self.model_bytes)} bytes>"

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_num_threads
        so.inter_op_num_threads = self.inter_op_num_threads
        so.graph_optimization_level = OPT_LEVELS[self.graph_optimization_level]
        return so

    def load(self, *, device: str = CPU) -> LoadedOnnx:
        """An onnxruntime session on ``device`` (the device the worker holds: GPU providers run on
        its index unless their options name a ``device_id``)."""
        where = _where()
        providers, options = session_providers(
            self.name, self.providers, self.provider_options, ort.get_available_providers(), device, where
        )
        session = self._session(providers, options)
        used = session.get_providers()
        check_used(self.name, providers, used, where)
        outputs = check_outputs(self.name, self.source, session, self.selected_outputs)
        runs_on = CPU
        if runs_on_gpu(used):  # the GPU its provider runs on: the worker's, or the options' device_id
            runs_on = f"cuda:{dict(zip(providers, options))[used[0]]['device_id']}"
        loaded = LoadedOnnx(self.name, self.version, session, outputs, io_binding=self.io_binding)
        loaded = self._configure(loaded, runs_on)
        loaded.inline_rows = self.inline_rows
        return loaded

    def _session(self, providers: list[str], options: list[dict[str, str]]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                self.model_bytes, sess_options=self.session_options(), providers=providers, provider_options=options
            )
        except Exception as e:
            raise ModelLoadError(
                f"ONNX model {self.source} (model {self.name!r}) cannot be loaded by onnxruntime: "
                f"{type(e).__name__}: {e}",
                model=self.name,
                path=self.path,
            ) from e

    def validate(self) -> None:
        """On the deploying client: the graph loads in onnxruntime (on its CPU: the workers open
        the model on their own providers) and its outputs are tensors."""
        session = self._session([CPU_PROVIDER], [{}])
        check_outputs(self.name, self.source, session, self.selected_outputs)


def _where() -> str:
    """This process, as errors name it: the worker's address, or the host."""
    try:
        from distributed import get_worker

        return f"worker {get_worker().address}"
    except ValueError:
        return f"{socket.gethostname()} (pid {os.getpid()})"
