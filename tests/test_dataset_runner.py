"""The dataset command: every image of a folder protected once, resumable and idempotent, with Ray or without.

Real photos (faces-13id), the real dlib detector for the baselines, the tiny SD checkpoint for a diffusion
method. Local Ray with two CPU actors; a run killed half-way and rerun loses nothing and writes nothing twice.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, require_package, shared_path

import dataset_runner as dr

SETTINGS = {"detect_size": "640"}


def _dataset(tmp_path, n=8):
    src = shared_path("data", "faces-13id")
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    names = sorted(p.name for p in src.glob("*.jpg"))[:n]
    for i, name in enumerate(names):
        shutil.copy(src / name, (folder / "sub" if i % 3 == 0 else folder) / name)
    return folder


def _cli(*args, **popen):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.environ["DP_COMFY"], str(REPO / "build" / "import-root"),
                                                         str(REPO / "tests"), str(REPO / "scripts")]))
    (REPO / "build" / "import-root").mkdir(parents=True, exist_ok=True)
    link = REPO / "build" / "import-root" / "diffprivacy"
    if not link.exists():
        link.symlink_to(REPO)
    cmd = [sys.executable, str(REPO / "scripts" / "anonymize_dataset.py"), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _outputs(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))


def test_ray_with_two_cpu_actors_protects_every_image_and_a_second_run_does_nothing(tmp_path):
    require_package("ray", "ray[data] from requirements-test.txt")
    src = _dataset(tmp_path)
    out, keys = tmp_path / "out", tmp_path / "keys"
    first = dr.run("blur", src, out, keys, SETTINGS, use_ray=True, actors=2, progress=False, log=lambda m: None)
    assert first == {"files": 8, "ran": 8, "status": {"ok": 8}, "ray": True}
    rels = dr.list_dataset(src)
    assert _outputs(out) == sorted(str(Path(r).with_suffix(".png").as_posix()) for r in rels)
    rows = [json.loads(line) for line in (out / dr.MANIFEST).read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == rels and all(r["method"] == "blur" and "seed" in r for r in rows)
    again = dr.run("blur", src, out, keys, SETTINGS, use_ray=True, progress=False, log=lambda m: None)
    assert again["ran"] == 0 and again["status"] == {"ok": 8}
    assert len((out / dr.MANIFEST).read_text().splitlines()) == 8


def test_without_ray_the_same_command_gives_the_same_outputs(tmp_path):
    src = _dataset(tmp_path, n=4)
    a = dr.run("mosaic", src, tmp_path / "a", tmp_path / "ka", SETTINGS, seed=3, use_ray=False, progress=False,
               log=lambda m: None)
    b = dr.run("mosaic", src, tmp_path / "b", tmp_path / "kb", SETTINGS, seed=3, use_ray=True, actors=2,
               progress=False, log=lambda m: None) if _has_ray() else None
    assert a["status"] == {"ok": 4}
    if b is not None:
        for rel in _outputs(tmp_path / "a"):
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def _has_ray() -> bool:
    require_package("ray", "ray[data] from requirements-test.txt")
    return True


def test_a_run_killed_half_way_and_rerun_loses_nothing_and_writes_nothing_twice(tmp_path):
    src = _dataset(tmp_path)
    out, keys = tmp_path / "out", tmp_path / "keys"
    args = ["--method", "blur", "--input", str(src), "--output", str(out), "--keys", str(keys), "--no-ray",
            "--set", "detect_size=640"]
    proc = _cli(*args, start_new_session=True)
    manifest = out / dr.MANIFEST
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(manifest.read_text().splitlines())
    assert 3 <= done_before < 8, "the run was killed half-way"
    (out / ".img99.png.a1b2c3.part.png").write_bytes(b"half an image")  # what a kill during a write leaves
    rerun = _cli(*args)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == {"ok": 8} and summary["ran"] == 8 - done_before
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == dr.list_dataset(src)  # each image once: none lost, none twice
    assert len(_outputs(out)) == 8 and not list(out.rglob("*.part*"))


def test_bad_files_and_faceless_images_are_reported_per_image_and_never_abort(tmp_path):
    src = _dataset(tmp_path, n=2)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    from PIL import Image
    Image.new("RGB", (200, 200), (128, 128, 128)).save(src / "wall.png")
    summary = dr.run("pixelate", src, tmp_path / "out", tmp_path / "keys", SETTINGS, use_ray=False, progress=False,
                     log=lambda m: None)
    assert summary["status"] == {"ok": 2, "error": 2, "no_face": 1}
    rows = {r["file"]: r for r in map(json.loads, (tmp_path / "out" / dr.MANIFEST).read_text().splitlines())}
    assert "cannot read image" in rows["notes.txt"]["error"] and "cannot read image" in rows["broken.jpg"]["error"]
    assert "No face" in rows["wall.png"]["error"]


def test_the_diffusion_method_writes_sealed_keys_to_their_own_folder(tmp_path, tiny_checkpoint_path, monkeypatch):
    src = _dataset(tmp_path, n=2)
    monkeypatch.setenv("TEST_KEY_PASSWORD", "correct horse")
    settings = {"checkpoint": str(tiny_checkpoint_path), "steps": "4", "resolution": "64"}
    summary = dr.run("diff-privacy-anonymize", src, tmp_path / "out", tmp_path / "keys", settings, use_ray=False,
                     password_env="TEST_KEY_PASSWORD", progress=False, log=lambda m: None)
    assert summary["status"] == {"ok": 2}
    from diffprivacy.inversion.keyfile import is_sealed, read_key_file
    key_files = sorted((tmp_path / "keys").rglob("*" + dr.KEY_SUFFIX))
    assert len(key_files) == 2 and all(is_sealed(k) for k in key_files)
    tensors, meta = read_key_file(key_files[0], "correct horse")
    assert tensors["key_i"].shape[-1] == 8 and meta["steps"] == "4"
    assert not list((tmp_path / "out").rglob("*" + dr.KEY_SUFFIX)), "no key next to the published images"


def test_layouts_that_would_eat_their_input_or_leak_keys_are_refused(tmp_path):
    src = _dataset(tmp_path, n=1)
    with pytest.raises(ValueError, match="inside the input folder"):
        dr.run("blur", src, src / "out", tmp_path / "keys", use_ray=False, log=lambda m: None)
    with pytest.raises(ValueError, match="inside the output folder"):
        dr.run("blur", src, tmp_path / "out", tmp_path / "out" / "keys", use_ray=False, log=lambda m: None)
    with pytest.raises(ValueError, match="unknown method 'sharpen'"):
        dr.run("sharpen", src, tmp_path / "out", tmp_path / "keys", use_ray=False, log=lambda m: None)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.access(read_only, os.W_OK):  # root ignores permission bits: make the folder a file's child instead
        read_only = tmp_path / "a-file" / "out"
        (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="cannot write|File exists|Not a directory"):
        dr.run("blur", src, read_only, tmp_path / "keys", use_ray=False, log=lambda m: None)


def test_a_cluster_address_that_does_not_answer_fails_clearly_and_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match="does not answer"):
        dr.check_ray_address("127.0.0.1:9", timeout=5)
    assert time.monotonic() - start < 30
