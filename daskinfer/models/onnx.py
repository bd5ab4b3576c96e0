"""ONNX models run in-process with onnxruntime: the fast path.

The model file is read when the :class:`OnnxModel` is made (so it ships to
workers that do not share the client's file system); each worker builds its own
``onnxruntime.InferenceSession`` in ``setup``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnxruntime as ort

from daskinfer import settings
from daskinfer.exceptions import ConfigError, ModelLoadError
from daskinfer.models.loaded import LoadedModel
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
    """An onnxruntime session plus the model's signature (``outputs``: the ones it runs)."""

    def __init__(self, name: str, version: str, session: ort.InferenceSession, outputs: list[Any] | None = None):
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

    def _run(self, block: dict[str, np.ndarray]) -> Any:
        values = self.session.run(self._output_names, block)
        return dict(zip(self._output_names, values))


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
    version, instances, warmup, allow_nan, cast_inputs
        See :class:`~daskinfer.models.spec.Model`.
    intra_op_num_threads, inter_op_num_threads : int, optional
        onnxruntime threads; config ``daskinfer.onnx.*`` (1 suits one-thread Dask workers).
    providers : list of str, optional
        Execution providers in order of preference; config ``daskinfer.onnx.providers``.
    graph_optimization_level : {"disable", "basic", "extended", "all"}, optional

    Examples
    --------
    >>> from daskinfer import OnnxModel, deploy, bundled_model_path
    >>> model = OnnxModel("mlp", bundled_model_path())
    >>> deploy(client, model)  # doctest: +SKIP
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
        graph_optimization_level: str | None = None,
    ):
        super().__init__(
            name,
            version=version,
            instances=instances,
            warmup=warmup,
            allow_nan=allow_nan,
            cast_inputs=cast_inputs,
            outputs=outputs,
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
        self.providers = list(settings.get("onnx.providers", providers))
        level = settings.get("onnx.graph-optimization-level", graph_optimization_level)
        if level not in OPT_LEVELS:
            raise ConfigError(
                f"model {name!r}: graph_optimization_level must be one of {sorted(OPT_LEVELS)}, got {level!r}"
            )
        self.graph_optimization_level = level
        self.inline_rows = int(settings.get("onnx.inline-rows"))  # read here: settings travel with the spec
        available = ort.get_available_providers()
        unknown = [p for p in self.providers if p not in available]
        if unknown or not self.providers:
            raise ConfigError(
                f"model {name!r}: execution providers {unknown or self.providers} are not available "
                f"in this onnxruntime; available: {available}"
            )

    @property
    def source(self) -> str:
        return repr(self.path) if self.path else f"<{len(self.model_bytes)} bytes>"

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_num_threads
        so.inter_op_num_threads = self.inter_op_num_threads
        so.graph_optimization_level = OPT_LEVELS[self.graph_optimization_level]
        return so

    def load(self) -> LoadedOnnx:
        providers = [p for p in self.providers if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(self.model_bytes, sess_options=self.session_options(), providers=providers)
        except Exception as e:
            raise ModelLoadError(
                f"ONNX model {self.source} (model {self.name!r}) cannot be loaded by onnxruntime: "
                f"{type(e).__name__}: {e}",
                model=self.name,
                path=self.path,
            ) from e
        outputs = check_outputs(self.name, self.source, session, self.selected_outputs)
        loaded = self._configure(LoadedOnnx(self.name, self.version, session, outputs))
        loaded.inline_rows = self.inline_rows
        return loaded

    def validate(self) -> None:
        self.load().close()
