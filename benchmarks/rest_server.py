"""A REST-per-request model server written the way users usually write one.

aiohttp + one onnxruntime session; each HTTP call carries one request as JSON and
runs the model once.  Used by ``throughput.py`` as the baseline.

    python benchmarks/rest_server.py --port 8080 --model daskinfer/data/mlp.onnx
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from aiohttp import web


def make_app(model_path: str) -> web.Application:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, sess_options=so, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    async def predict(request: web.Request) -> web.Response:
        body = await request.json()
        x = np.asarray(body["x"], dtype=np.float32)[None, :]
        (probs,) = session.run(None, {input_name: x})
        return web.json_response({"probabilities": probs[0].tolist()})

    app = web.Application()
    app.router.add_post("/predict", predict)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.model), host="127.0.0.1", port=args.port, print=None, access_log=None)
