"""The per-request baseline of ``gateway.py``: FastAPI + uvicorn + onnxruntime, written as users write one.

One onnxruntime session; each v2 REST call (JSON tensors) runs the model once on its
own rows.  ``gateway.py`` starts it with uvicorn in its own process:

    DASKINFER_BENCH_MODEL=daskinfer/data/mlp.onnx uvicorn fastapi_server:app --app-dir benchmarks --port 8090
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_options = ort.SessionOptions()
_options.intra_op_num_threads = 1
session = ort.InferenceSession(
    os.environ["DASKINFER_BENCH_MODEL"], sess_options=_options, providers=["CPUExecutionProvider"]
)
app = FastAPI()


@app.get("/v2/health/ready")
async def ready() -> dict:
    return {"ready": True}


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request) -> JSONResponse:
    body = await request.json()
    inputs = {t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"]) for t in body["inputs"]}
    outputs = session.run(None, inputs)
    names = [o.name for o in session.get_outputs()]
    return JSONResponse(
        {
            "model_name": name,
            "outputs": [
                {"name": n, "datatype": "FP32", "shape": list(o.shape), "data": o.ravel().tolist()}
                for n, o in zip(names, outputs)
            ],
        }
    )
