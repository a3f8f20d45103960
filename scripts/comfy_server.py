"""A throw-away ComfyUI server: start it, read /object_info, post workflows to /prompt, read
/history, stop it.

The server is the host that scripts/setup_env.sh installs (DP_COMFY), run from a throw-away base
directory whose custom_nodes/ links this pack (and any other node packs asked for). Used by
scripts/make_workflows.py and, through tests/harness.py (which adds the test node pack and
fixture files), by the tests' ``comfy_server`` fixture.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "diff-privacy-nodes"


class ExecutionFailed(AssertionError):
    """A prompt ended in an execution error; carries ComfyUI's error message."""

    def __init__(self, message: str, error: dict | None):
        super().__init__(message)
        self.error = error or {}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI serving this pack from ``base_dir`` on a free local port; ``custom_nodes`` maps the
    folder names of further node packs to link beside it to their folders."""

    def __init__(self, base_dir: Path, python: str | None = None, comfy: str | None = None,
                 extra_args: tuple[str, ...] = (), custom_nodes: dict[str, Path] | None = None):
        self.base = Path(base_dir)
        self.python = python or os.environ.get("DP_PYTHON") or sys.executable
        self.comfy = Path(comfy or os.environ["DP_COMFY"])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args
        self.custom_nodes = {PACK_LINK_NAME: REPO, **(custom_nodes or {})}
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self.log_path = self.base / "server.log"
        for sub in ("models/checkpoints", "models/clip_vision", "models/insightface/models", "models/facenet",
                    "input", "output", "custom_nodes", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)

    # -- life cycle -------------------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> "ComfyServer":
        for name, target in self.custom_nodes.items():
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        import torch
        args = [self.python, str(self.comfy / "main.py"), "--base-directory", str(self.base),
                "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                "--database-url", "sqlite:///:memory:", "--disable-api-nodes", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if not torch.cuda.is_available():
            args.append("--cpu")
            # Two busy torch threads on a 2-core machine slow small convolutions a hundredfold.
            env.setdefault("OMP_NUM_THREADS", "1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                self.object_info = self.get_json("/object_info", timeout=60)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    # -- HTTP ---------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_prompt(self, api: dict) -> tuple[int, dict]:
        """POST /prompt; returns (HTTP status, body). Validation errors come back as 400."""
        data = json.dumps({"prompt": api, "client_id": self.client_id}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait(self, prompt_id: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.25)
        self.interrupt()
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def interrupt(self):
        req = urllib.request.Request(self.url + "/interrupt", data=b"{}", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()

    def run(self, api: dict, timeout: float = 300, expect_error: bool = False) -> dict:
        """Queue an API-format workflow and wait for it. Raises with ComfyUI's error unless expected."""
        status, body = self.post_prompt(api)
        if status != 200:
            raise AssertionError(f"/prompt refused the workflow ({status}): {json.dumps(body, indent=1)[:4000]}")
        entry = self.wait(body["prompt_id"], timeout)
        error = execution_error(entry)
        if error and not expect_error:
            raise ExecutionFailed(f"workflow failed: {error.get('exception_type')}: {error.get('exception_message')}\n"
                                  f"in node {error.get('node_type')}\n--- server log ---\n{self.log_tail()}", error)
        if expect_error and not error:
            raise AssertionError("the workflow was expected to fail, but it succeeded")
        return entry

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{q}", timeout=30) as r:
            return r.read()

    def output_images(self, entry: dict, node_id: str | None = None) -> list[bytes]:
        out = []
        for nid, o in entry.get("outputs", {}).items():
            if node_id is None or nid == node_id:
                out += [self.view(img) for img in o.get("images", [])]
        return out


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None
