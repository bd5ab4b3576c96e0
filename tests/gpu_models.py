"""Python models for tests/test_resources.py, importable by the worker processes (their
``PYTHONPATH`` holds tests/): a real onnxruntime MLP that reports the rows of each call, and a class
model whose ``load(self, device)`` keeps the device its worker holds."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from daskinfer.testing import bundled_model_path


class SizedMLP:
    """The bundled MLP in onnxruntime; ``call_rows`` gives each row the row count of its call."""

    def load(self) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(bundled_model_path(), sess_options=so, providers=["CPUExecutionProvider"])

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        (probabilities,) = self.session.run(["probabilities"], {"x": x})
        return {"probabilities": probabilities, "call_rows": np.full(len(x), len(x), np.int64)}


class DeviceProbe:
    """Answers each row with the device its ``load`` was given."""

    def load(self, device: str) -> None:
        self.device = device

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.array([self.device] * len(x))


def double(x: np.ndarray) -> np.ndarray:
    return x * 2


def loaded_models(dask_worker=None) -> dict[str, str]:
    """The models loaded on this worker (``client.run``): name -> version."""
    from daskinfer.models.registry import registry_for

    return registry_for(dask_worker).names()


def probe_device(name: str, dask_worker=None) -> str:
    """The device the first instance of class model ``name`` got in its ``load`` on this worker."""
    from daskinfer.models.registry import registry_for

    return registry_for(dask_worker).get(name).first.fn.__self__.device
