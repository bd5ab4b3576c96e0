"""gRPC load generator of ``gateway.py``, run in its own process (``grpc.aio``).

Closed loop over one channel, ``--concurrency`` requests in flight all the time, each
replaced as soon as it is answered: ``--mode unary`` as that many concurrent ``ModelInfer``
calls, ``--mode stream`` as that many requests in flight on one ``ModelStreamInfer`` stream
(each answered under its id; the stream is half-closed at the end and drained).  Every
request is one row of the bundled MLP's input as raw FP32.  Prints one JSON line: requests,
errors, req/s.

    python _grpc_loadgen.py 127.0.0.1:8081 mlp --mode stream --concurrency 64 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc

from daskinfer import eventloop  # the loop distributed.admin.event-loop names, like the servers'
from daskinfer.remote.proto import grpc_predict_v2_pb2 as pb
from daskinfer.remote.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from daskinfer.testing import random_rows


def requests(model: str, n: int) -> list[pb.ModelInferRequest]:
    """``n`` one-row requests with distinct ids."""
    out = []
    for i in range(n):
        x = random_rows(1, seed=i)
        req = pb.ModelInferRequest(model_name=model, id=str(i))
        req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(x.tobytes())
        out.append(req)
    return out


async def unary(stub: pb_grpc.GRPCInferenceServiceStub, reqs: list, concurrency: int, duration: float) -> dict:
    """Closed loop of ``concurrency`` concurrent ModelInfer calls for ``duration`` seconds."""
    done = errors = 0
    end = time.perf_counter() + duration

    async def worker(k: int) -> None:
        nonlocal done, errors
        i = k
        while time.perf_counter() < end:
            try:
                await stub.ModelInfer(reqs[i % len(reqs)], timeout=30)
                done += 1
            except grpc.aio.AioRpcError:
                errors += 1
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return {"requests": done, "errors": errors, "req_s": round(done / (time.perf_counter() - start), 1)}


async def stream(stub: pb_grpc.GRPCInferenceServiceStub, reqs: list, concurrency: int, duration: float) -> dict:
    """Closed loop on one ModelStreamInfer stream: ``concurrency`` requests in flight for ``duration`` seconds."""
    done = errors = sent = 0
    call = stub.ModelStreamInfer(timeout=duration + 60)
    start = time.perf_counter()
    end = start + duration
    for sent in range(1, concurrency + 1):
        await call.write(reqs[(sent - 1) % len(reqs)])
    closed = False
    while done + errors < sent:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            break
        if resp.error_message:
            errors += 1
        else:
            done += 1
        if time.perf_counter() < end:
            await call.write(reqs[sent % len(reqs)])
            sent += 1
        elif not closed:
            await call.done_writing()
            closed = True
    if not closed:
        await call.done_writing()
    errors += sent - done - errors  # requests never answered
    return {"requests": done, "errors": errors, "req_s": round(done / (time.perf_counter() - start), 1)}


async def run(address: str, model: str, mode: str, concurrency: int, duration: float) -> dict:
    reqs = requests(model, 256)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(reqs[0], timeout=30)  # warm: the channel is connected before the clock starts
        measure = unary if mode == "unary" else stream
        return await measure(stub, reqs, concurrency, duration)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("address")
    p.add_argument("model")
    p.add_argument("--mode", choices=["unary", "stream"], default="unary")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0)
    args = p.parse_args()
    print(json.dumps(eventloop.run(run(args.address, args.model, args.mode, args.concurrency, args.duration))))


if __name__ == "__main__":
    main()
