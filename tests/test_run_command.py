"""The README's run command: a ComfyUI with this pack, its nodes listed, no import errors, and a clear
list of the model files a user still has to place; ``--models DIR`` (an existing ComfyUI's models folder)
maps every folder the pack reads to DIR and the hints point there."""
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

from conftest import REPO
from comfy_server import free_port


def test_run_command_starts_comfyui_with_the_pack_and_says_which_models_are_missing(tmp_path):
    from check_models import FOLDERS
    port = free_port()
    env = dict(os.environ, DIFFPRIVACY_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    log = tmp_path / "run.log"
    user_models = tmp_path / "ComfyUI" / "models"  # a user's own ComfyUI models folder: an IP-Adapter only
    (user_models / "ipadapter").mkdir(parents=True)
    (user_models / "ipadapter" / "ip-adapter-faceid_sd15.bin").write_bytes(b"not read until loaded")
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "run.sh"), "--port", str(port),
                                 "--models", str(user_models)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        info = None
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=30) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        text = log.read_text(errors="replace")
        assert info is not None, f"the run command did not serve /object_info:\n{text[-4000:]}"
        from diffprivacy.nodes import NODE_CLASS_MAPPINGS
        assert set(NODE_CLASS_MAPPINGS) <= set(info)
        assert re.search(r"IMPORT FAILED.*diff-privacy-nodes", text) is None, text[-4000:]
        assert re.search(r"seconds: .*custom_nodes/diff-privacy-nodes", text), \
            "the pack is not in ComfyUI's import list"
        assert f"open http://127.0.0.1:{port}" in text
        # no checkpoint in the user's folder: the user is told exactly what goes where, in the folder they gave
        assert "v1-5-pruned-emaonly.safetensors" in text and f"into {user_models / 'checkpoints'}/" in text
        # every folder the pack reads is mapped to it: the IP-Adapter there is offered by the adapter loader
        adapters = info["DiffPrivacyIdentityAdapterLoader"]["input"]["required"]["adapter_name"][0]
        assert "ip-adapter-faceid_sd15.bin" in adapters, adapters
        mapped = (tmp_path / "home" / "extra_model_paths.yaml").read_text()
        assert all(f"    {folder}: {folder}/" in mapped for folder in FOLDERS), mapped
        assert {"ipadapter", "facedetection", "vae_approx", "mediapipe", "loras", "lpips"} <= set(FOLDERS)
        assert (tmp_path / "home" / "custom_nodes" / "diff-privacy-nodes").resolve() == REPO
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
