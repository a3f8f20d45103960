"""The dataset command through Ray on a two-node cluster on this machine (Ray's own ``ray.cluster_utils.Cluster``,
each node one CPU, every process on 127.0.0.1): Diffusion De-ID through two actors equals the single-process run, an
image that kills its worker is retried a bounded number of times and then reported, and a run that loses a node
half-way completes with every image written once. The tests share the cluster, in this order (the last removes a
node)."""
from __future__ import annotations

import os
import shutil
import time
from collections import Counter

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only

import pytest  # noqa: E402

from conftest import require_package, shared_path  # noqa: E402

import anonymize_dataset as cli  # noqa: E402
import dataset_fixtures as fx  # noqa: E402
from diffprivacy.methods import dataset as dr  # noqa: E402

require_package("ray", "ray[data] from requirements-test.txt")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker_node = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    assert {n.node_ip_address for n in c.list_all_nodes()} == {"127.0.0.1"}, "Ray stays on loopback"
    yield c, worker_node
    c.shutdown()


def _quiet(**kw):
    return dict(progress=False, log=lambda m: None, **kw)


def test_deid_through_two_ray_actors_equals_the_single_process_run(cluster, tmp_path, tiny_checkpoint_path,
                                                                   tiny_clip_vision_path):
    import ip_adapter_fixtures as ipf
    import comfy.sd
    import torch
    from face_fixtures import casia_safetensors
    c, _ = cluster
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=False,
                                                      output_clip=False)[0]
    adapter = ipf.write_adapter(tmp_path / "ip-adapter-faceid_sd15.bin", "faceid", **ipf.tiny_shape(model))
    models = tmp_path / "models"
    (models / "facenet").mkdir(parents=True)
    (models / "facenet" / "facenet-casia-webface.safetensors").symlink_to(casia_safetensors())
    src = tmp_path / "in"
    fx.copy_faces(shared_path("data", "faces-13id"), src, 2)
    settings = {"checkpoint": str(tiny_checkpoint_path), "clip_vision": str(tiny_clip_vision_path),
                "adapter": str(adapter), "models": str(models), "identity_model": "mtcnn/facenet-casia",
                "resolution": "64", "steps": "2", "render_steps": "1", "iterations": "1", "pool_steps": "1",
                "cfg": "1.0", "prompt": "a photo of a face"}
    method = fx.tiny_deid_method()
    runs = {}
    for name, kw in (("local", {"use_ray": False}), ("ray", {"use_ray": True, "address": c.address, "actors": 2})):
        out, keys = tmp_path / f"out-{name}", tmp_path / f"keys-{name}"
        runs[name] = dr.run(method, src, out, keys, settings, seed=7, **_quiet(**kw))
        assert runs[name]["status"] == {"ok": 2}, dr.Manifest(out).read()
    assert runs["ray"]["ray"] and not runs["local"]["ray"]
    from diffprivacy.methods.diffusion_deid import Pool
    local, ray_pool = (Pool.load(tmp_path / f"keys-{n}" / "diffusion-de-id.pool.safetensors") for n in ("local", "ray"))
    for name in ("identity", "appearance", "latents", "recognizer", "has_face"):  # the actors' pool is the process's
        assert torch.equal(getattr(local, name), getattr(ray_pool, name)), name
    assert local.meta == ray_pool.meta and len(local) == 3
    import numpy
    from PIL import Image
    from diffprivacy.methods.pipeline import Plan
    rows = {n: dr.Manifest(tmp_path / f"out-{n}").read() for n in ("local", "ray")}
    for rel in ("img1.png", "img10.png"):
        a, b = ((tmp_path / f"out-{n}" / rel).read_bytes() for n in ("local", "ray"))
        assert a == b, rel
        row = rows["local"][rel.replace(".png", ".jpg")]
        with Image.open(src / rel.replace(".png", ".jpg")) as original, Image.open(tmp_path / "out-local" / rel) as out:
            original, out = (torch.from_numpy(numpy.asarray(im.convert("RGB")).copy()) for im in (original, out))
        outside = Plan.from_dict(row["face_crops"]).mask() == 0  # the face crops pasted back into the photo
        assert out.shape == original.shape and torch.equal(out[outside], original[outside]), rel
        assert row["receipt_error"] is None and row["receipt_crop_sizes"] and row["faces_protected"] >= 1, row
    assert {r: (v["pair"], v["seed"]) for r, v in rows["local"].items()} == \
        {r: (v["pair"], v["seed"]) for r, v in rows["ray"].items()}


def test_an_image_that_kills_its_worker_is_retried_then_reported_and_the_run_finishes(cluster, tmp_path):
    from PIL import Image
    c, _ = cluster
    src = tmp_path / "in"
    fx.small_faces(shared_path("data", "faces-13id"), src, 3, size=96)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(src / "poison.png")
    start = time.monotonic()
    summary = dr.run(fx.POISON, src, tmp_path / "out", tmp_path / "keys", use_ray=True, address=c.address,
                     actors=2, retries=1, **_quiet())
    assert time.monotonic() - start < 240
    assert summary["status"] == {"ok": 3, "error": 1}
    row = dr.Manifest(tmp_path / "out").read()["poison.png"]
    assert "died 2 times" in row["error"], row  # the first try and one retry


def test_a_run_that_loses_a_node_half_way_writes_every_image_once(cluster, tmp_path, monkeypatch):
    c, worker_node = cluster
    src = tmp_path / "in"
    rels = fx.small_faces(shared_path("data", "faces-13id"), src, 40)
    out, keys = tmp_path / "out", tmp_path / "keys"
    writes: Counter = Counter()
    write_file, append = dr.write_file, dr.Manifest.append

    def counting(path, data, run_id, mode=0o644):
        write_file(path, data, run_id, mode)
        writes[path] += 1

    def remove_mid_run(manifest, row):
        append(manifest, row)
        done_there = [r for r in manifest.lines() if r.get("node") == worker_node.node_id and "seconds" in r]
        if row.get("node") == c.head_node.node_id and len(done_there) >= 2 and len(c.list_all_nodes()) == 2:
            c.remove_node(worker_node)  # the other node works on its next image now: that image is lost with it
    monkeypatch.setattr(dr, "write_file", counting)
    monkeypatch.setattr(dr.Manifest, "append", remove_mid_run)
    said = []
    summary = cli.run("blur", src, out, keys, {"detect_size": "256"}, use_ray=True, address=c.address, actors=2,
                      progress=False, log=said.append)
    assert len(c.list_all_nodes()) == 1, "the node was removed during the run"
    lines = [r for r in dr.Manifest(out).lines() if r.get("status") in dr.FINAL]
    assert sorted(r["file"] for r in lines) == rels  # each input exactly one line: none missing, none twice
    ok = summary["status"].get("ok", 0)  # dlib misses a few faces at 224 px: those are no_face lines
    assert ok + summary["status"].get("no_face", 0) == 40 and ok >= 30, Counter(r.get("error") for r in lines)
    assert len(writes) == ok and set(writes.values()) == {1}, "every output written once"
    assert any("a worker died" in m for m in said), "an image in flight on the lost node was sent again"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")] and not list(keys.rglob("*.tmp"))
    again = cli.run("blur", src, out, keys, {"detect_size": "256"}, use_ray=True, address=c.address, **_quiet())
    assert again["ran"] == 0 and again["writes"] == {"output": 0, "key": 0} and sum(writes.values()) == ok
    shutil.rmtree(src)
