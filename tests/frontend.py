"""Drive ComfyUI's real front end (the comfyui-frontend-package the server serves) in headless
Chromium over the Chrome DevTools Protocol: no browser-automation package needed, only aiohttp
(a ComfyUI requirement) for the protocol's websocket."""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


class FrontEnd:
    """One headless Chromium page showing the ComfyUI at ``url``."""

    def __init__(self, url: str, chromium: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.profile = tempfile.mkdtemp(prefix="dp-chromium-")
        # The flags keep Chromium off the network (this machine reaches none) and out of the sandbox (root).
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws_url = self._page_socket()

    def _page_socket(self, timeout: float = 60) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2) as r:
                    pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError("headless Chromium did not open its DevTools port")

    def evaluate(self, expression: str, timeout: float = 60):
        """Value of a JavaScript expression (promises awaited); raises with the page's exception."""
        async def call():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.ws_url, max_msg_size=0) as ws:
                    await ws.send_json({"id": 1, "method": "Runtime.evaluate", "params": {
                        "expression": expression, "awaitPromise": True, "returnByValue": True}})
                    async for msg in ws:
                        reply = json.loads(msg.data)
                        if reply.get("id") == 1:
                            return reply
        reply = asyncio.run(asyncio.wait_for(call(), timeout))
        result = reply.get("result", {})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page exception: {json.dumps(result['exceptionDetails'])[:2000]}")
        return result["result"].get("value")

    def wait_for_app(self, timeout: float = 120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.evaluate("!!(window.app && window.app.graph)"):
                return
            time.sleep(0.5)
        raise RuntimeError("ComfyUI's front end did not start in the page")

    def prompt_of(self, ui_workflow: dict) -> dict:
        """Load a UI-format workflow as a user's drag-and-drop does; return what "Queue" would post."""
        return json.loads(self.evaluate(
            f"(async () => {{ await app.loadGraphData({json.dumps(ui_workflow)});"
            f" const p = await app.graphToPrompt(); return JSON.stringify(p.output); }})()"))

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
