"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol, for report checks.

``with Browser(tmp) as b: b.open(url); b.js("..."); b.screenshot(path)`` loads a
page, evaluates JavaScript in it and saves a full-page PNG; nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium")


class Browser:
    def __init__(self, profile: Path, width: int = 1280, height: int = 900):
        self.profile, self.width, self.height = profile, width, height
        self.process = None
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            self._attach()
        except BaseException:
            self.process.kill()
            self.process.wait(10)
            self.loop.close()
            raise
        return self

    def _attach(self) -> None:
        deadline = time.time() + 60
        port = None
        while port is None and time.time() < deadline:
            line = self.process.stderr.readline()
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = found and int(found.group(1))
        assert port, "chromium did not open its DevTools port"
        # keep reading its log so a full pipe never blocks it
        threading.Thread(target=lambda: any(False for _ in self.process.stderr), daemon=True).start()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        self.loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
        self.call("Page.enable")

    async def _connect(self, url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)

    async def _call(self, method: str, params: dict, wait_event: str = "") -> dict:
        message_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        result, event_seen = None, not wait_event
        while result is None or not event_seen:
            message = json.loads((await asyncio.wait_for(self.ws.receive(), 60)).data)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result = message["result"]
            elif message.get("method") == wait_event:
                event_seen = True
        return result

    def call(self, method: str, params: dict | None = None, wait_event: str = "") -> dict:
        return self.loop.run_until_complete(self._call(method, params or {}, wait_event))

    def open(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        self.call("Page.navigate", {"url": url}, wait_event="Page.loadEventFired")

    def js(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression evaluated in the page."""
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in answer:
            raise RuntimeError(answer["exceptionDetails"])
        return answer["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page at device scale 1 (CSS pixels = screenshot pixels)."""
        height = int(self.js("document.documentElement.scrollHeight"))
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def __exit__(self, *exc) -> None:
        try:
            self.loop.run_until_complete(self.ws.close())
            self.loop.run_until_complete(self.session.close())
        finally:
            self.loop.close()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
