"""A real headless Chromium for tests, driven over the DevTools protocol (aiohttp websocket).

``chromium_binary()`` finds Debian's ``chromium`` (``apt-get install chromium``); when it is
missing the test is skipped with the reason, except where the environment variable ``CI`` is
set: there it is a failure, so that CI never passes by skipping (as ``redis_server.py``).

>>> async with Chromium(chromium_binary(), tmp_path) as browser:   # doctest: +SKIP
...     await browser.open("http://127.0.0.1:8787/daskinfer")
...     await browser.evaluate("document.title")
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import subprocess
import time
from typing import Any

import aiohttp
from optional import missing

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def chromium_binary() -> str:
    """Path of Chromium; skip the test (fail it under ``CI``) when there is none."""
    for path in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if path and os.path.exists(path):
            return path
    missing("chromium is not installed (apt-get install chromium) so the dashboard page cannot be rendered")


class Chromium:
    """One headless Chromium process with a new empty profile in ``directory``, and its first page."""

    def __init__(self, binary: str, directory: str, width: int = 1400, height: int = 1000):
        self.profile = os.path.join(directory, "chromium-profile")
        os.makedirs(self.profile)
        self.args = [
            binary,
            *FLAGS,
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc: subprocess.Popen | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: Any = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Chromium:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit status {self.proc.poll()})")
            await asyncio.sleep(0.05)
        port = int(open(port_file).read().split()[0])
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        i = next(self._ids)
        await self._ws.send_json({"id": i, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self._ws.receive_json(), 30)
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def open(self, url: str, timeout: float = 30) -> None:
        """Go to ``url`` and wait until the document has loaded."""
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while await self.evaluate("document.readyState") != "complete" or await self.evaluate("location.href") != url:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load within {timeout}s")
            await asyncio.sleep(0.05)

    async def screenshot(self) -> bytes:
        """The page as PNG bytes (the whole page, not only the window)."""
        size = await self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        result = await self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1},
        )
        return base64.b64decode(result["data"])
