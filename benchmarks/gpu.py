"""GPU workers: raw onnxruntime on CUDA against the pipeline on a GPU worker, and the same pipeline
on the CPU, in one run.

The model is an MLP 1024 -> 4096 -> 4096 -> 16 (float32, about 84 MB of weights) made with the
``onnx`` helper (:func:`daskinfer.testing.make_mlp_onnx`); ``--small`` makes it
1024 -> 256 -> 256 -> 16, to check the script on a small machine.  At batch ``--batch`` (4096 rows):

1. raw onnxruntime on CUDA: one session in this process, plain ``run`` and with I/O binding;
2. the pipeline on a GPU worker (``dask worker --resources GPU=1``, ``CUDA_VISIBLE_DEVICES`` set to
   one GPU), its model deployed with ``resources={"GPU": 1}`` and ``providers=["CUDAExecutionProvider"]``:
   blocks of ``--batch`` rows sent by ``--producers`` client processes, ``--window`` in flight each;
3. raw onnxruntime on the CPU and the same pipeline on a CPU worker (CPU provider, ``--cpu-threads``
   intra-op threads), pinned there by a worker resource of its own.

Where this onnxruntime has no CUDA provider, or it cannot start, one line says so and only (3) runs;
the CUDA figures are then null and the exit status is 0.  The last line is one JSON object:
``raw_cuda_rows_s``, ``pipeline_cuda_rows_s``, ``ratio_vs_raw_cuda`` (the goal: >= 0.7) and
``cuda_vs_cpu`` (pipeline on CUDA over pipeline on CPU), with the other figures and the provider
the GPU worker's model really used (``status()``).

Needs ``onnx`` and, for the CUDA part, ``onnxruntime-gpu`` in place of ``onnxruntime``
(``pip install -e ".[gpu]"``, see the README's "GPU workers")::

    python benchmarks/gpu.py                   # on a machine with a GPU
    python benchmarks/gpu.py --quick --small   # a short check anywhere
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
from _cluster import process_cluster  # noqa: E402
from _load import run_spawned  # noqa: E402

from daskinfer import InferenceClient, OnnxModel, Pipeline, deploy, deploy_pipeline  # noqa: E402
from daskinfer.testing import make_mlp_onnx, random_rows  # noqa: E402

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
N_IN, N_OUT = 1024, 16


def cuda_missing(model: bytes) -> str | None:
    """Why CUDA cannot run ``model`` here (None: it can)."""
    if CUDA not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no {CUDA} (providers: {ort.get_available_providers()})"
    try:
        used = ort.InferenceSession(model, providers=[CUDA]).get_providers()
    except Exception as e:  # no device, no driver, a CUDA library missing
        return f"{CUDA} could not start: {type(e).__name__}: {e}"
    return None if used[0] == CUDA else f"{CUDA} could not start (onnxruntime fell back to {used})"


def bench_raw(model: bytes, block: np.ndarray, seconds: float, provider: str, threads: int, binding: bool) -> float:
    """Rows/s of one onnxruntime session running ``block`` again and again for ``seconds``."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model, sess_options=so, providers=[provider])

    def once() -> None:
        if not binding:
            sess.run(None, {"x": block})
            return
        io = sess.io_binding()
        io.bind_cpu_input("x", block)
        io.bind_output("probabilities", "cuda" if provider == CUDA else "cpu", 0)
        sess.run_with_iobinding(io)
        io.copy_outputs_to_cpu()

    once()
    once()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        once()
        n += 1
    return n * len(block) / (time.perf_counter() - t0)


def _produce(address: str, inbox: str, batch: int, window: int, seconds: float, ready: Any, out: Any) -> None:
    """One producer process: ``window`` blocks in flight for ``seconds``; puts (rows answered, seconds)."""
    from distributed import Client

    block = {"x": random_rows(batch, N_IN, seed=os.getpid())}
    with Client(address) as client, InferenceClient(client, inbox=inbox) as ic:
        assert ic.submit_many(block).result(300).ok  # connected, routes known, model warm
        ready.wait(300)  # every producer starts at once
        t0 = time.perf_counter()
        inflight = [ic.submit_many(block) for _ in range(window)]
        done = 0
        while inflight:
            result = inflight.pop(0).result(300)
            assert result.ok, result.error
            done += batch
            if time.perf_counter() - t0 < seconds:
                inflight.append(ic.submit_many(block))
        out.put((done, time.perf_counter() - t0))


def bench_pipeline(address: str, inbox: str, batch: int, producers: int, window: int, seconds: float) -> float:
    """Rows/s answered by the pipeline on ``inbox``, ``producers`` client processes together."""
    ready = mp.get_context("spawn").Barrier(producers)
    figures = run_spawned(_produce, [(address, inbox, batch, window, seconds, ready)] * producers)
    return sum(rows for rows, _ in figures) / max(elapsed for _, elapsed in figures)


def _provider_in_use(handle: Any, model: str) -> str | None:
    runners = handle.status()["runners"]
    return next((r["models"][model].get("provider") for r in runners if model in r.get("models", {})), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    parser.add_argument("--small", action="store_true", help="an MLP 1024 -> 256 -> 256 -> 16 instead")
    parser.add_argument("--batch", type=int, default=4096, help="rows per block (default 4096)")
    parser.add_argument("--producers", type=int, default=4, help="client processes sending blocks (default 4)")
    parser.add_argument("--window", type=int, default=4, help="blocks in flight per producer (default 4)")
    parser.add_argument("--instances", type=int, default=2, help="sessions of the model on the GPU worker")
    parser.add_argument("--cpu-threads", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="CPU intra-op")
    parser.add_argument("--io-binding", action="store_true", help="the GPU worker's model runs with I/O binding")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else 10.0
    hidden = 256 if args.small else 4096
    model = make_mlp_onnx(N_IN, hidden, N_OUT)
    block = random_rows(args.batch, N_IN, seed=1)
    figures: dict[str, Any] = {"model": f"mlp {N_IN}-{hidden}-{hidden}-{N_OUT} float32", "batch": args.batch}

    why = cuda_missing(model)
    figures["cuda"] = why is None
    if why is not None:
        print(f"CUDA is not available here: {why}; measuring the CPU part only")
    else:
        figures["raw_cuda_rows_s"] = bench_raw(model, block, seconds, CUDA, 1, binding=False)
        figures["raw_cuda_iobinding_rows_s"] = bench_raw(model, block, seconds, CUDA, 1, binding=True)
        print(f"raw onnxruntime on CUDA, batch {args.batch}: {figures['raw_cuda_rows_s']:,.0f} rows/s "
              f"({figures['raw_cuda_iobinding_rows_s']:,.0f} with I/O binding)")  # fmt: skip
    figures["raw_cpu_rows_s"] = bench_raw(model, block, seconds, CPU, args.cpu_threads, binding=False)
    print(f"raw onnxruntime on the CPU (intra-op threads: {args.cpu_threads}): {figures['raw_cpu_rows_s']:,.0f} rows/s")

    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    workers = [(["--resources", "bench-cpu=1"], {"CUDA_VISIBLE_DEVICES": ""})]  # this one sees no GPU
    if why is None:
        workers.append((["--resources", "GPU=1"], {"CUDA_VISIBLE_DEVICES": gpu}))  # one worker, one GPU
    with process_cluster(len(workers), 1, [w[0] for w in workers], [w[1] for w in workers]) as client:
        address = client.scheduler.address
        timeout = 300.0
        if why is None:
            on_gpu = OnnxModel(
                "bench-gpu", model, resources={"GPU": 1}, providers=[CUDA], instances=args.instances,
                io_binding=args.io_binding, max_batch_size=args.batch,
            )  # fmt: skip
            deploy(client, on_gpu)
            handle = deploy_pipeline(client, Pipeline(model="bench-gpu", inbox="bench-gpu"), timeout=timeout)
            figures["pipeline_cuda_provider"] = _provider_in_use(handle, "bench-gpu")
            rate = bench_pipeline(address, "bench-gpu", args.batch, args.producers, args.window, seconds)
            figures["pipeline_cuda_rows_s"] = rate
            figures["ratio_vs_raw_cuda"] = rate / figures["raw_cuda_rows_s"]
            print(f"pipeline on the GPU worker ({figures['pipeline_cuda_provider']}): {rate:,.0f} rows/s, "
                  f"{figures['ratio_vs_raw_cuda']:.2f}x raw CUDA")  # fmt: skip
            handle.stop()
        on_cpu = OnnxModel(
            "bench-cpu", model, resources={"bench-cpu": 1}, providers=[CPU], intra_op_num_threads=args.cpu_threads,
            max_batch_size=args.batch,
        )  # fmt: skip
        deploy(client, on_cpu)
        handle = deploy_pipeline(client, Pipeline(model="bench-cpu", inbox="bench-cpu"), timeout=timeout)
        rate = bench_pipeline(address, "bench-cpu", args.batch, min(args.producers, 2), 2, seconds)
        figures["pipeline_cpu_rows_s"] = rate
        print(f"pipeline on the CPU worker ({_provider_in_use(handle, 'bench-cpu')}): {rate:,.0f} rows/s")
        handle.stop()
    if why is None:
        figures["cuda_vs_cpu"] = figures["pipeline_cuda_rows_s"] / figures["pipeline_cpu_rows_s"]
    for key in ("raw_cuda_rows_s", "pipeline_cuda_rows_s", "ratio_vs_raw_cuda", "cuda_vs_cpu"):
        figures.setdefault(key, None)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
