"""The pipelines page on the scheduler's dashboard, loaded in a real headless Chromium.

Set ``DASKINFER_SCREENSHOT=PATH`` to keep the screenshot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import urllib.request
import uuid

import numpy as np
from chromium import Chromium, chromium_binary

from daskinfer import InferenceClient, Pipeline, deploy_pipeline
from daskinfer.testing import random_rows


def _history(client, name: str) -> dict:
    return client.sync(client.scheduler.daskinfer_pipeline_history, name=name)[name]


def test_pipelines_page_renders_charts_and_redraws(client, mlp_deployed, poll, tmp_path):
    binary = chromium_binary()
    name = f"dash-{uuid.uuid4().hex[:6]}"
    handle = deploy_pipeline(client, Pipeline(name=name, model=mlp_deployed, inbox=name, partitions=2))
    stop = threading.Event()
    try:
        with InferenceClient(client, inbox=name) as ic:
            rows = random_rows(64, seed=1)

            def load() -> None:  # a steady trickle of requests, bounded in count and time
                for i in range(20_000):
                    if stop.is_set():
                        return
                    ic.submit(rows[i % 64]).result(timeout=30)
                    if i % 8 == 0:
                        stop.wait(0.005)

            sender = threading.Thread(target=load, daemon=True)
            sender.start()
            poll(
                lambda: sum(1 for p in _history(client, name)["points"] if p["requests_s"] > 0) >= 2,
                timeout=30,
                what="two samples with traffic",
            )
            ic.submit_many(np.concatenate([rows[:1].astype(np.float64)] * 3)).result(timeout=30)  # errors too
            url = client.dashboard_link.replace("/status", "/daskinfer")
            with urllib.request.urlopen(url.replace("/daskinfer", "/daskinfer/figures.json"), timeout=10) as resp:
                assert name in resp.read().decode()

            async def browse() -> tuple[dict, bytes]:
                async with Chromium(binary, str(tmp_path)) as browser:
                    await browser.open(url)
                    section = f"document.querySelector('section[data-pipeline=\"{name}\"]')"
                    seen = await browser.evaluate(f"""(() => {{
                        const s = {section};
                        if (!s) return null;
                        const charts = [...s.querySelectorAll("svg.chart")];
                        return {{
                            text: document.body.innerText,
                            charts: charts.length,
                            drawn: charts.filter(c => c.getBoundingClientRect().width > 100
                                                 && c.getBoundingClientRect().height > 100).length,
                            titles: charts.map(c => c.getAttribute("aria-label")),
                            lines: s.querySelectorAll("svg.chart polyline").length,
                            rows: s.querySelectorAll("table tr").length,
                            facts: s.querySelector(".facts").innerText,
                        }};
                    }})()""")
                    assert seen is not None, "the page has no section for the pipeline"
                    # the page redraws itself: the facts line follows the traffic
                    before = seen["facts"]
                    deadline = asyncio.get_running_loop().time() + 20
                    while await browser.evaluate(f"{section}.querySelector('.facts').innerText") == before:
                        assert asyncio.get_running_loop().time() < deadline, "the page did not redraw"
                        await asyncio.sleep(0.1)
                    return seen, await browser.screenshot()

            seen, png = asyncio.run(browse())
            stop.set()
            sender.join(30)
    finally:
        stop.set()
        handle.stop()
    assert name in seen["text"]
    assert seen["charts"] == 5 and seen["drawn"] == 5
    assert seen["titles"] == [
        "Throughput (requests/s)",
        "Lag (requests waiting)",
        "Batch size (mean rows)",
        "Latency, read to written (ms)",
        "Errors (requests/s)",
    ]
    assert seen["lines"] >= 5  # at least the pipeline's line of every chart
    assert seen["rows"] == 3  # header and the two partitions
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (tmp_path / "dashboard.png").write_bytes(png)
    keep = os.environ.get("DASKINFER_SCREENSHOT")
    if keep:
        shutil.copyfile(tmp_path / "dashboard.png", keep)
