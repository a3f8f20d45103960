"""The dataset command in one process: every input gets exactly one manifest line whatever it is, the command
never deletes or replaces a file it did not write, settings are checked before anything starts, one run per folder.

Real photos (faces-13id), the real dlib detector for the baselines, the tiny SD checkpoint for a diffusion
method. Ray (a two-node cluster, a dying worker, De-ID through actors) is in test_dataset_ray.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from conftest import REPO, shared_path

import anonymize_dataset as cli
from diffprivacy.methods import dataset as dr

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


def _rows(out: Path) -> dict[str, dict]:
    return dr.Manifest(out).read()


def _final_lines(out: Path) -> list[dict]:
    return [r for r in dr.Manifest(out).lines() if r.get("status") in dr.FINAL]


def _run(method, src, out, keys, settings=SETTINGS, **kw):
    kw.setdefault("use_ray", False)
    return cli.run(method, src, out, keys, settings, progress=False, log=kw.pop("log", lambda m: None), **kw)


def test_a_run_killed_half_way_and_rerun_loses_nothing_and_writes_nothing_twice(tmp_path):
    src = _dataset(tmp_path)
    out, keys = tmp_path / "out", tmp_path / "keys"
    args = ["--method", "blur", "--input", str(src), "--output", str(out), "--keys", str(keys), "--no-ray",
            "--set", "detect_size=640"]
    proc = _cli(*args, start_new_session=True)
    manifest = out / dr.MANIFEST
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and len(_final_lines(out)) >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_final_lines(out))
    assert 3 <= done_before < 8, "the run was killed half-way"
    killed_run = [r["run"] for r in dr.Manifest(out).lines() if r.get("event") == "start"][0]
    (out / f".img99.png.dp-{killed_run}.tmp").write_bytes(b"half an image")  # what a kill during a write leaves
    rerun = _cli(*args)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == {"ok": 8} and summary["ran"] == 8 - done_before
    assert sorted(r["file"] for r in _final_lines(out)) == dr.list_dataset(src)  # each once: none lost, none twice
    assert len(_outputs(out)) == 8 and not list(out.rglob("*.tmp")) and "removed 1 temporary file" in stderr
    assert "took over the lock" in stderr  # the killed run's lock: its process is gone


def test_files_the_command_did_not_write_are_never_deleted_or_replaced(tmp_path):
    src = _dataset(tmp_path, n=1)
    shutil.copy(next(src.rglob("*.jpg")), src / "holiday.jpg")
    out, keys = tmp_path / "out", tmp_path / "keys"
    (keys / "keys").mkdir(parents=True)
    out.mkdir()
    planted = {out / ".thesis.partial-draft.txt": b"my thesis", out / ".config.party": b"[party]",
               keys / "keys" / ".vault.part": b"secret", out / "holiday.png": b"my own holiday photo",
               out / ".holiday.png.dp-0123456789ab.tmp": b"a temp name of no run of this folder"}
    for path, data in planted.items():
        path.write_bytes(data)
    summary = _run("pixelate", src, out, keys)
    assert summary["status"] == {"ok": 2}
    for path, data in planted.items():
        assert path.read_bytes() == data, f"{path.name} was touched"
    row = _rows(out)["holiday.jpg"]
    assert row["output"] == "holiday~2.png" and "holiday.png exists and was not written" in row["renamed"]
    assert (out / "holiday~2.png").stat().st_size > 1000
    again = _run("pixelate", src, out, keys)  # a rerun (whose clean-up knows a run id now) keeps them all
    assert again["ran"] == 0 and _rows(out)["holiday.jpg"]["output"] == "holiday~2.png"
    for path, data in planted.items():
        assert path.read_bytes() == data, f"{path.name} was touched by the rerun"


def test_two_inputs_with_the_same_output_name_get_one_output_each_recorded(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    face = next(shared_path("data", "faces-13id").glob("img1*.jpg"))
    shutil.copy(face, src / "same.jpg")
    from PIL import Image
    Image.open(face).save(src / "same.png")
    out = tmp_path / "out"
    summary = _run("blur", src, out, tmp_path / "keys")
    assert summary["status"] == {"ok": 2} and summary["writes"]["output"] == 2
    rows = _rows(out)
    assert rows["same.png"]["output"] == "same.png" and rows["same.jpg"]["output"] == "same.jpg.png"
    assert "also the output name of another input" in rows["same.jpg"]["renamed"]
    assert _outputs(out) == ["same.jpg.png", "same.png"]
    assert _run("blur", src, out, tmp_path / "keys")["ran"] == 0


def _bomb_png(path: Path, side: int) -> None:
    """A valid tiny PNG whose header says side x side: Pillow would try to expand it."""
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = side.to_bytes(4, "big") * 2
    data[ihdr + 17:ihdr + 21] = zlib.crc32(bytes(data[ihdr:ihdr + 17])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def _explode_on_img10(settings):
    from diffprivacy.methods.dataset import Protected, image_seed

    def protect(image, seed):
        if seed == image_seed(0, "img10.jpg"):
            raise RuntimeError("CUDA out of memory (simulated)")
        return Protected(1 - image)
    return protect


def test_any_per_file_failure_becomes_that_files_line_and_the_run_goes_on(tmp_path):
    src = _dataset(tmp_path, n=2)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    from PIL import Image
    Image.new("RGB", (200, 200), (128, 128, 128)).save(src / "wall.png")
    shutil.copy(next(src.rglob("img1.jpg")), src / os.fsdecode(b"caf\xe9-latin1.jpg"))  # a name that is not UTF-8
    _bomb_png(src / "bomb.png", 12000)  # 144 megapixels: over the command's bound (100), under Pillow's (179)
    _bomb_png(src / "big-bomb.png", 40000)
    os.mkfifo(src / "b-pipe.jpg")
    signal.alarm(300)  # a hang (the pipe) fails the test instead of the suite
    try:
        summary = _run("pixelate", src, tmp_path / "out", tmp_path / "keys")
    finally:
        signal.alarm(0)
    assert summary["status"] == {"ok": 3, "error": 5, "no_face": 1}
    rows = _rows(tmp_path / "out")
    assert "cannot read image" in rows["notes.txt"]["error"] and "cannot read image" in rows["broken.jpg"]["error"]
    assert "No face" in rows["wall.png"]["error"]
    assert "12000x12000 = 144 megapixels, over the bound of 100" in rows["bomb.png"]["error"]
    assert "decompression bomb" in rows["big-bomb.png"]["error"] and "not decoded" in rows["big-bomb.png"]["error"]
    assert "named pipe" in rows["b-pipe.jpg"]["error"]
    latin = os.fsdecode(b"caf\xe9-latin1.jpg")
    assert rows[latin]["status"] == "ok" and (tmp_path / "out" / os.fsdecode(b"caf\xe9-latin1.png")).is_file()
    # any exception of the method on one image (here a RuntimeError) is that image's line
    method = dr.Method("explode", _explode_on_img10, {})
    summary = dr.run(method, _dataset(tmp_path / "b", n=3), tmp_path / "out2", tmp_path / "k2", use_ray=False,
                     progress=False, log=lambda m: None)
    assert summary["status"] == {"ok": 2, "error": 1}
    assert _rows(tmp_path / "out2")["img10.jpg"]["error"] == "RuntimeError: CUDA out of memory (simulated)"


def test_settings_are_checked_before_anything_starts_naming_the_setting(tmp_path, tiny_checkpoint_path):
    src = _dataset(tmp_path, n=1)
    ckpt = {"checkpoint": str(tiny_checkpoint_path)}
    cases = [("mosaic", {"margin": "-5"}, "margin='-5' must be >= 0"),
             ("blur", {"detect_size": "0"}, "detect_size='0' must be >= 64"),
             ("pixelate", {"strength": "nan"}, "strength='nan' must be a finite number"),
             ("blur", {"strength": "inf"}, "strength='inf' must be a finite number"),
             ("mosaic", {"strength": "0.5"}, "strength='0.5' must be >= 2"),
             ("blur", {"strenght": "5"}, "has no setting 'strenght'"),
             ("blur", {"face_model": "mtcnn/nobody"}, "face_model='mtcnn/nobody' is not a face model"),
             ("diff-privacy-anonymize", {**ckpt, "steps": "nan"}, "steps='nan' must be a finite number"),
             ("diff-privacy-anonymize", {**ckpt, "steps": "2.5"}, "steps='2.5' must be a whole number"),
             ("diff-privacy-anonymize", {**ckpt, "strength": "0"}, "strength='0' must be > 0"),
             ("diff-privacy-anonymize", {**ckpt, "crop_factor": "0.5"}, "crop_factor='0.5' must be >= 1"),
             ("diff-privacy-anonymize", {**ckpt, "mask_grow": "4"}, "mask_grow must be between 1 .* crop_factor"),
             ("diff-privacy-anonymize", {**ckpt, "resolution": "4096"}, "resolution='4096' must be <= 2048"),
             ("diffusion-de-id", {**ckpt, "resolution": "4096"}, "resolution='4096' must be <= 2048"),
             ("diffusion-de-id", {**ckpt, "mode": "squash"}, "mode='squash' must be one of face crops, whole frame"),
             ("diffusion-de-id", {**ckpt, "faces": "3"}, "faces='3' must be one of all, largest"),
             ("diffusion-de-id", {**ckpt, "lr": "nan"}, "lr='nan' must be a finite number"),
             ("diffusion-de-id", {**ckpt, "steps": "4", "render_steps": "9"}, "render_steps \\(9\\) cannot exceed")]
    for method, settings, message in cases:
        with pytest.raises(ValueError, match=message):
            _run(method, src, tmp_path / "out", tmp_path / "keys", settings)
    assert not (tmp_path / "out").exists(), "a refused run wrote nothing"


def test_diffusion_methods_check_their_files_first_and_run_on_the_cpu_without_a_gpu(tmp_path, monkeypatch):
    src = _dataset(tmp_path, n=1)
    not_sd = tmp_path / "not-sd.safetensors"
    import safetensors.torch
    import torch
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(not_sd))
    fake_sd = tmp_path / "fake-sd.safetensors"  # the right header, but no model ComfyUI can load
    safetensors.torch.save_file({"model.diffusion_model.x": torch.zeros(2)}, str(fake_sd))
    (tmp_path / "notes.ckpt").write_text("hello")
    for settings, message in [({}, "needs an SD 1.5 checkpoint"),
                              ({"checkpoint": str(tmp_path / "missing.safetensors")}, "is not an existing file"),
                              ({"checkpoint": str(not_sd)}, "is not an SD checkpoint"),
                              ({"checkpoint": str(tmp_path / "notes.ckpt")}, "neither a .safetensors"),
                              ({"checkpoint": str(not_sd), "models": str(tmp_path / "nowhere")},
                               "models=.* is not an existing folder"),
                              ({"checkpoint": str(fake_sd)}, "the method could not load: RuntimeError")]:
        with pytest.raises(ValueError, match=message):
            _run("diff-privacy-anonymize", src, tmp_path / "out", tmp_path / "keys", settings)
    import comfy.cli_args
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(comfy.cli_args.args, "cpu", False)
    said = []
    assert dr.pick_device(said.append) == "cpu" and comfy.cli_args.args.cpu is True
    assert "no GPU found" in said[0] and "minutes per image" in said[0]


def test_the_diffusion_method_writes_sealed_keys_to_their_own_folder(tmp_path, tiny_checkpoint_path, monkeypatch):
    src = _dataset(tmp_path, n=2)
    monkeypatch.setenv("TEST_KEY_PASSWORD", "correct horse")
    settings = {"checkpoint": str(tiny_checkpoint_path), "steps": "4", "resolution": "64"}
    summary = _run("diff-privacy-anonymize", src, tmp_path / "out", tmp_path / "keys", settings,
                   password_env="TEST_KEY_PASSWORD")
    assert summary["status"] == {"ok": 2} and summary["writes"] == {"output": 2, "key": 2}
    from diffprivacy.inversion.keyfile import is_sealed, read_key_file
    key_files = sorted((tmp_path / "keys").rglob("*" + dr.KEY_SUFFIX))
    assert len(key_files) == 2 and all(is_sealed(k) for k in key_files)
    assert all(k.stat().st_mode & 0o077 == 0 for k in key_files), "keys are readable by their owner only"
    tensors, meta = read_key_file(key_files[0], "correct horse")
    assert tensors["key_i"].shape[-1] == 8 and meta["steps"] == "4"
    assert not list((tmp_path / "out").rglob("*" + dr.KEY_SUFFIX)), "no key next to the published images"


def _two_faces(folder: Path) -> Path:
    """Two people of group-6-faces.jpg as they stand (a 440x360 cut of the photo, not square), as a PNG: its pixels
    are read back exactly."""
    from PIL import Image
    folder.mkdir(parents=True)
    with Image.open(shared_path("data", "photos", "group-6-faces.jpg")) as im:
        im.convert("RGB").crop((0, 120, 440, 480)).save(folder / "pair.png")
    return folder


def _pixels(path: Path):
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_diff_privacy_anonymize_protects_each_face_at_the_photos_size_and_its_key_recovers_the_whole_photo(
        tmp_path, tiny_checkpoint_path, tiny_sd):
    """Through the face pipeline: each face cut, protected, pasted back; the output is the photo's size with every
    pixel outside the plan's masks the input's, its receipt measured on it, its key records the plan (format 2) and
    Recover returns the whole photo."""
    import numpy as np
    import torch
    from safetensors import safe_open
    from diffprivacy.inversion.key_bundle import bundle_from_tensors
    from diffprivacy.inversion.keyfile import read_key_file
    from diffprivacy.methods.pipeline import Plan
    from diffprivacy.nodes.recover_nodes import DiffPrivacyMakeKeyI, DiffPrivacyRecover
    src, out, keys = _two_faces(tmp_path / "in"), tmp_path / "out", tmp_path / "keys"
    from PIL import Image
    Image.new("RGB", (120, 90), (128, 128, 128)).save(src / "wall.png")  # no face: its line, and the run goes on
    settings = {"checkpoint": str(tiny_checkpoint_path), "steps": "4", "resolution": "64"}
    assert _run("diff-privacy-anonymize", src, out, keys, settings)["status"] == {"ok": 1, "no_face": 1}, _rows(out)
    (src / "wall.png").unlink()
    row = _rows(out)["pair.png"]
    original, delivered = _pixels(src / "pair.png"), _pixels(out / row["output"])
    assert delivered.shape == original.shape == (360, 440, 3)
    key_path = keys / row["key_file"]
    with safe_open(str(key_path), "pt") as f:
        assert f.metadata()["format_version"] == "2"             # a face-crop key, as the nodes write them
    tensors, meta = read_key_file(key_path)
    plan = Plan.from_json(meta["face_crops"])
    assert Plan.from_dict(row["face_crops"]) == plan                # the manifest says where the photo was cut
    assert (plan.width, plan.height, plan.resolution, len(plan.crops)) == (440, 360, 64, 2)
    outside = (plan.mask() == 0).numpy()
    assert np.array_equal(delivered[outside], original[outside]) and not np.array_equal(delivered, original)
    assert row["faces_protected"] == 2 and row["receipt_error"] is None, row
    assert row["receipt_recognizer"].startswith("dlib") and row["receipt_faces"] == 2
    assert row["receipt_crop_sizes"] == sorted({c.side for c in plan.crops})
    assert row["receipt_min_distance"] is not None
    model, _, vae = tiny_sd
    protected = torch.from_numpy(delivered.copy()).float()[None] / 255
    latent, key_e = bundle_from_tensors(tensors, meta)
    truth = torch.from_numpy(original.copy()).float() / 255
    noise = {**latent, "samples": torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(3))
             * latent["samples"].std()}                           # a wrong Key-I of the same size and spread
    with torch.inference_mode():
        (node_key_i,) = DiffPrivacyMakeKeyI().make_key_i(model, key_e, vae, truth[None], 4, crops=[plan])
        recovered, photo = DiffPrivacyRecover().recover(model, key_e, latent, 4, vae=vae, protected=protected)
        wrong, _ = DiffPrivacyRecover().recover(model, key_e, noise, 4)
        target = vae.encode(torch.cat(plan.cut(truth)))
    assert torch.allclose(node_key_i["samples"], latent["samples"], atol=1e-4)  # the node's Key-I of the same crops
    assert photo.shape == (1, 360, 440, 3)
    assert torch.equal(photo[0][torch.from_numpy(outside)], protected[0][torch.from_numpy(outside)])
    # inside: the faces recovered, within Key-I's recovery error (in latent space: the tiny VAE's round trip is poor)
    right, wrong = (float((z["samples"] - target).pow(2).mean().sqrt()) for z in (recovered, wrong))
    assert right < 0.4 * float(target.std()) and wrong > 2.5 * right, (right, wrong, float(target.std()))
    _run("diff-privacy-anonymize", src, tmp_path / "whole", tmp_path / "keys-whole",
         {**settings, "mode": "whole frame"})
    row = _rows(tmp_path / "whole")["pair.png"]                  # letterboxed to one square, never squashed
    assert _pixels(tmp_path / "whole" / row["output"]).shape == (360, 440, 3) and row["receipt_crop_sizes"] == [440]
    tensors, meta = read_key_file(tmp_path / "keys-whole" / row["key_file"])
    assert Plan.from_json(meta["face_crops"]).mode == "whole frame" and tensors["key_i"].shape == (1, 4, 8, 8)


def test_one_run_per_folder_at_a_time(tmp_path):
    src = _dataset(tmp_path, n=2)
    out, keys = tmp_path / "out", tmp_path / "keys"
    args = ["--method", "blur", "--input", str(src), "--output", str(out), "--keys", str(keys), "--no-ray",
            "--set", "detect_size=640"]
    first = _cli(*args)
    deadline = time.monotonic() + 120
    while not (out / dr.LOCK).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = _cli(*args)
    _, err2 = second.communicate(timeout=120)
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1
    assert second.returncode == 2 and "another run is working in" in err2 and dr.LOCK in err2, err2
    assert sorted(r["file"] for r in _final_lines(out)) == dr.list_dataset(src)  # 2 lines, not 4
    assert not (out / dr.LOCK).exists() and not (keys / dr.LOCK).exists()
    # a lock whose process is gone (same host) is taken over, with a message; a live one is refused
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (out / dr.LOCK).write_text(json.dumps({"run": "aaaaaaaaaaaa", "host": socket.gethostname(), "pid": dead.pid}))
    said = []
    assert _run("blur", src, out, keys, log=said.append)["ran"] == 0
    assert any("took over the lock of run aaaaaaaaaaaa" in m for m in said)
    (out / dr.LOCK).write_text(json.dumps({"run": "bbbbbbbbbbbb", "host": "other-host", "pid": 1}))
    with pytest.raises(ValueError, match="run bbbbbbbbbbbb on other-host.*delete .*lock"):
        _run("blur", src, out, keys)


def test_symlinked_folders_are_followed_and_loops_reported(tmp_path):
    src = _dataset(tmp_path, n=3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(next(src.rglob("img1.jpg")), elsewhere / "linked-face.jpg")
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    (src / "sub" / "loop").symlink_to(src, target_is_directory=True)
    (src / "twice").symlink_to(src / "sub", target_is_directory=True)
    summary = _run("blur", src, tmp_path / "out", tmp_path / "keys")
    rows = _rows(tmp_path / "out")
    assert rows["linked/linked-face.jpg"]["status"] == "ok"
    assert "a loop" in rows["sub/loop"]["error"]
    assert "listed already" in rows["twice"]["error"]
    assert summary["status"] == {"ok": 4, "error": 2} and summary["files"] == 6


def test_layouts_that_would_eat_their_input_or_leak_keys_are_refused(tmp_path):
    src = _dataset(tmp_path, n=1)
    with pytest.raises(ValueError, match="inside the input folder"):
        _run("blur", src, src / "out", tmp_path / "keys")
    with pytest.raises(ValueError, match="inside the output folder"):
        _run("blur", src, tmp_path / "out", tmp_path / "out" / "keys")
    with pytest.raises(ValueError, match="unknown method 'sharpen'"):
        _run("sharpen", src, tmp_path / "out", tmp_path / "keys")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.access(read_only, os.W_OK):  # root ignores permission bits: make the folder a file's child instead
        read_only = tmp_path / "a-file" / "out"
        (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="cannot write|File exists|Not a directory"):
        _run("blur", src, read_only, tmp_path / "keys")


def test_a_cluster_address_that_does_not_answer_fails_clearly_and_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match="does not answer"):
        dr.check_ray_address("127.0.0.1:9", timeout=5)
    assert time.monotonic() - start < 30


def test_every_ok_line_carries_its_outputs_receipt_which_tells_a_light_blur_from_a_wipe(tmp_path):
    """The receipt (dlib, which no method is guided by) is measured on each delivered image: a 1 % blur leaves every
    face recognised; one pixelation block across the face leaves none recognised."""
    src = _dataset(tmp_path, n=3)
    rows = {}
    for method, strength in (("blur", "1"), ("pixelate", "1")):
        out = tmp_path / method
        _run(method, src, out, tmp_path / f"keys-{method}", dict(SETTINGS, strength=strength))
        rows[method] = [r for r in _rows(out).values() if r["status"] == "ok"]
        assert len(rows[method]) == 3
        for r in rows[method]:
            assert r["receipt_recognizer"].startswith("dlib") and r["receipt_error"] is None, r
            assert r["receipt_faces"] >= 1 and r["receipt_threshold"] == 0.6
    assert all(r["receipt_still_recognised"] == r["receipt_faces"] for r in rows["blur"]), rows["blur"]
    assert all(r["receipt_still_recognised"] == 0 for r in rows["pixelate"]), rows["pixelate"]
    assert min(r["receipt_min_distance"] for r in rows["pixelate"]) > max(r["receipt_min_distance"]
                                                                          for r in rows["blur"])
    _run("blur", src, tmp_path / "off", tmp_path / "keys-off", dict(SETTINGS, receipt="false"))
    assert all("receipt_faces" not in r for r in _rows(tmp_path / "off").values())
