"""Drive ComfyUI's real front end (the comfyui-frontend-package the server serves) in headless
Chromium over the Chrome DevTools Protocol: no browser-automation package needed, only aiohttp
(a ComfyUI requirement) for the protocol's websocket."""
from __future__ import annotations

import asyncio
import base64
import json
import re
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

    def send(self, *commands: tuple[str, dict], timeout: float = 60) -> list[dict]:
        """DevTools-protocol commands ``(method, params)`` sent in order over one connection (settings such
        as a device-size override last as long as it); their results."""
        async def call():
            results = []
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.ws_url, max_msg_size=0) as ws:
                    for n, (method, params) in enumerate(commands, 1):
                        await ws.send_json({"id": n, "method": method, "params": params})
                        async for msg in ws:
                            reply = json.loads(msg.data)
                            if reply.get("id") == n:
                                break
                        if "error" in reply:
                            raise RuntimeError(f"{method}: {reply['error']}")
                        results.append(reply.get("result", {}))
            return results
        return asyncio.run(asyncio.wait_for(call(), timeout))

    def evaluate(self, expression: str, timeout: float = 60):
        """Value of a JavaScript expression (promises awaited); raises with the page's exception."""
        (result,) = self.send(("Runtime.evaluate", _evaluate(expression)), timeout=timeout)
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

    def inspect(self, ui_workflow: dict) -> dict:
        """Load a UI-format workflow as a drag-and-drop does, let the front end draw it, and return what
        it made of it: ``prompt`` (what "Queue" would post), ``nodes`` (id, type, title, the size stored in
        the file and the one the front end settled on, the bounding box with the title bar, and every
        widget's name, type, value and, for a list, its choices) and ``groups`` (title, bounding box and
        title-bar height)."""
        return json.loads(self.evaluate(
            f"(async () => {{ await app.loadGraphData({json.dumps(ui_workflow)});" + _INSPECT + "})()"))

    def screenshot(self, ui_workflow: dict, width: int, height: int, margin: int = 40) -> bytes:
        """PNG of a workflow as the front end draws it: the page set to ``width`` x ``height``, the graph
        canvas alone (menus and side bars hidden), zoomed to fit every node and group."""
        results = self.send(
            ("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                    "mobile": False}),
            ("Runtime.evaluate", _evaluate(f"(async () => {{ await app.loadGraphData({json.dumps(ui_workflow)});"
                                           f" }})()")),
            ("Runtime.evaluate", _evaluate(_FIT % {"margin": margin})),
            ("Page.captureScreenshot", {"format": "png", "fromSurface": True}),
            ("Emulation.clearDeviceMetricsOverride", {}), timeout=120)
        for r in results[1:3]:
            if "exceptionDetails" in r:
                raise RuntimeError(f"page exception: {json.dumps(r['exceptionDetails'])[:2000]}")
        return base64.b64decode(results[3]["data"])

    def opening_views(self, ui_workflows: dict[str, dict], width: int, height: int) -> dict[str, dict]:
        """How each workflow opens in a ``width`` x ``height`` window, loaded as a drag-and-drop or the
        template browser loads it (the view stored in the file restored): per name, ``scale``,
        ``low_quality`` (the front end draws nodes as blank boxes), ``window`` and the on-screen boxes
        ``[x, y, w, h]`` of the ``note`` (the Read me) and of the ``groups`` in reading order;
        ``note_covered``: points of the Read me's title bar that a bar of the front end covers."""
        results = self.send(
            ("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                    "mobile": False}),
            ("Runtime.evaluate", _evaluate(_OPENING % {"workflows": json.dumps(ui_workflows)})),
            ("Emulation.clearDeviceMetricsOverride", {}), timeout=180)
        if "exceptionDetails" in results[1]:
            raise RuntimeError(f"page exception: {json.dumps(results[1]['exceptionDetails'])[:2000]}")
        return json.loads(results[1]["result"]["value"])

    def client_id(self) -> str:
        """The id the page's websocket has with the server: a prompt posted with it reports to this page."""
        return self.evaluate("window.comfyAPI.api.api.clientId")

    def drawn_node_text(self, node_ids: list[int], timeout: float = 30) -> dict[str, dict]:
        """Per node: the text this pack's front-end extension holds for it after a run (``held``) and the
        strings the canvas drew while drawing it centred on screen (``drawn``)."""
        return json.loads(self.evaluate(_DRAWN_TEXT % {"ids": json.dumps(node_ids), "ms": int(timeout * 1000)},
                                        timeout=timeout + 30))

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


# -- what a person would see wrong in a loaded workflow ---------------------------------------------------------
def _intersect(a, b) -> bool:
    """Two [x, y, w, h] boxes share some area (touching edges do not count)."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(a, b) -> bool:
    return b[0] <= a[0] and b[1] <= a[1] and a[0] + a[2] <= b[0] + b[2] and a[1] + a[3] <= b[1] + b[3]


def layout_problems(seen: dict) -> list[str]:
    """Overlaps in a workflow as the front end laid it out (``FrontEnd.inspect``): node on node, node on a
    group's title bar, group on group; and a node outside every group when the workflow has groups (the
    Note excepted)."""
    problems = []
    nodes, groups = seen["nodes"], seen["groups"]
    name = {n["id"]: f"node {n['id']} ({n['title']})" for n in nodes}
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if _intersect(a["bounding"], b["bounding"]):
                problems.append(f"{name[a['id']]} overlaps {name[b['id']]}")
        for g in groups:
            x, y, w, _ = g["bounding"]
            if _intersect(a["bounding"], [x, y, w, g["title_height"]]):
                problems.append(f"{name[a['id']]} covers the title of group {g['title']!r}")
        if groups and a["type"] not in ("Note", "MarkdownNote") and \
                not any(_inside(a["bounding"], g["bounding"]) for g in groups):
            problems.append(f"{name[a['id']]} lies in no group")
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            if _intersect(g["bounding"], h["bounding"]):
                problems.append(f"group {g['title']!r} overlaps group {h['title']!r}")
    return problems


FILE_NAME = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|onnx|gguf|png|jpe?g|webp|bmp|tiff?)$", re.IGNORECASE)


def named_files(seen: dict) -> list[tuple[int, str, str, bool]]:
    """(node id, widget, value, in the list) for every widget value that names a file: a choice of a list
    widget that is not a plain word of the node's own, or a text value ending in a file extension. ``in
    the list``: the front end offers it (the server has that file now)."""
    found = []
    for n in seen["nodes"]:
        if n["type"] in ("Note", "MarkdownNote"):
            continue
        for w in n["widgets"]:
            v = w["value"]
            if not isinstance(v, str) or not v:
                continue
            if w["choices"] is not None and (FILE_NAME.search(v) or v not in w["choices"]):
                found.append((n["id"], w["name"], v, v in w["choices"]))
            elif w["choices"] is None and FILE_NAME.search(v):
                found.append((n["id"], w["name"], v, False))
    return found


def _evaluate(expression: str) -> dict:
    return {"expression": expression, "awaitPromise": True, "returnByValue": True}


# Drawn after loading: LiteGraph measures every node's bounding box while drawing.
_INSPECT = """
  await new Promise(r => setTimeout(r, 300));  // loaded photos show their preview
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);
  const choices = (w) => { const v = w.options && w.options.values;
    return Array.isArray(v) ? v : (typeof v === 'function' ? v() : null); };
  const nodes = app.graph._nodes.map(n => ({
    id: n.id, type: n.type, title: n.title, size: Array.from(n.size), bounding: Array.from(n.getBounding()),
    widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type,
      value: (typeof w.value === 'object' && w.value !== null) ? null : w.value, choices: choices(w)}))}));
  const groups = app.graph._groups.map(g => ({title: g.title, bounding: Array.from(g._bounding),
    title_height: g.titleHeight}));
  const p = await app.graphToPrompt();
  return JSON.stringify({prompt: p.output, nodes, groups});
"""

# The canvas over the whole page (every other element hidden), scaled and moved so the graph fills it.
_FIT = """(async () => {
  const ui = app.extensionManager;
  if (!window.__dpFocus) {  // once per page: the graph alone (focus mode hides menus and side bars)
    if (!ui.focusMode) await ui.command.execute('Workspace.ToggleFocusMode');
    for (const [id, value] of [['Comfy.NodeBadge.NodeSourceBadgeMode', 'None'],
        ['Comfy.NodeBadge.NodeIdBadgeMode', 'None'], ['Comfy.Minimap.Visible', false],
        ['Comfy.Graph.CanvasMenu', false], ['Comfy.TutorialCompleted', true]]) await ui.setting.set(id, value);
    const style = document.createElement('style');  // dialogs (templates, missing models), toasts, the menu button
    style.textContent = '.p-dialog-mask, .p-toast, button[aria-label="Show Menu"] {display: none !important}';
    document.head.appendChild(style);
    window.__dpFocus = true;
  }
  app.canvas.show_info = false;
  app.canvas.min_font_size_for_lod = 0;  // draw titles and widgets at any zoom
  await new Promise(r => setTimeout(r, 300));
  app.canvas.resize();
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const items = [...app.graph._nodes.map(n => n.getBounding()), ...app.graph._groups.map(g => g._bounding)];
  const x0 = Math.min(...items.map(b => b[0])), y0 = Math.min(...items.map(b => b[1]));
  const x1 = Math.max(...items.map(b => b[0] + b[2])), y1 = Math.max(...items.map(b => b[1] + b[3]));
  const m = %(margin)d, ds = app.canvas.ds;
  ds.scale = Math.min((window.innerWidth - 2 * m) / (x1 - x0), (window.innerHeight - 2 * m) / (y1 - y0));
  ds.offset[0] = (window.innerWidth / ds.scale - (x1 - x0)) / 2 - x0;
  ds.offset[1] = (window.innerHeight / ds.scale - (y1 - y0)) / 2 - y0;
  app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);
  await new Promise(r => setTimeout(r, 500));
})()"""

# Each workflow loaded as a user opens it (its stored view restored), drawn once, and measured on screen.
_OPENING = """(async () => {
  const frames = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  if (!document.getElementById('dp-no-dialogs')) {  // the first start's template browser, closed as a user does
    const style = Object.assign(document.createElement('style'), {id: 'dp-no-dialogs'});
    style.textContent = '.p-dialog-mask {display: none !important}';
    document.head.appendChild(style);
  }
  await new Promise(r => setTimeout(r, 300)); app.canvas.resize(); await frames();
  const seen = {};
  for (const [name, workflow] of Object.entries(%(workflows)s)) {
    await app.loadGraphData(workflow);
    await frames(); app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);
    const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
    const screen = (b) => [c.left + (b[0] + ds.offset[0]) * ds.scale, c.top + (b[1] + ds.offset[1]) * ds.scale,
                           b[2] * ds.scale, b[3] * ds.scale];
    const note = app.graph._nodes.find(n => n.type === 'Note' || n.type === 'MarkdownNote');
    const box = note ? screen(Array.from(note.getBounding())) : null;  // its title bar: drawn on the canvas
    const bar = box ? [0.02, 0.5, 0.98].map(f => [box[0] + f * box[2], box[1] + 15 * ds.scale]) : [];
    seen[name] = {scale: ds.scale, low_quality: !!app.canvas.low_quality, window: [innerWidth, innerHeight],
                  note: box,
                  note_covered: bar.filter(([x, y]) => document.elementFromPoint(x, y) !== app.canvas.canvas),
                  groups: app.graph._groups.map(g => ({title: g.title, box: screen(Array.from(g._bounding))}))};
  }
  return JSON.stringify(seen);
})()"""

# Wait for the nodes' reported text to arrive, then draw each node on screen and record every fillText.
_DRAWN_TEXT = """(async () => {
  const ids = %(ids)s, deadline = Date.now() + %(ms)d;
  const nodes = ids.map(id => app.graph.getNodeById(id));
  while (nodes.some(n => !n.diffPrivacyText) && Date.now() < deadline) await new Promise(r => setTimeout(r, 200));
  const seen = {}, fillText = CanvasRenderingContext2D.prototype.fillText;
  try {
    for (const node of nodes) {
      const drawn = [];
      CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
        drawn.push(String(text)); return fillText.call(this, text, ...rest); };
      app.canvas.centerOnNode(node); app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);
      CanvasRenderingContext2D.prototype.fillText = fillText;
      seen[node.id] = {held: node.diffPrivacyText || null, drawn};
    }
  } finally { CanvasRenderingContext2D.prototype.fillText = fillText; }
  return JSON.stringify(seen);
})()"""
