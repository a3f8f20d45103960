"""DIFP keys on the tiny model: F_i by DDIM inversion to S_n*T, F_e (text condition + the original's identity),
recovery with the adapted Eq. 17 correction, the sealed key file with its kind tag, and the refusals."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from diffprivacy.guidance.identity_streams import face_identity
from diffprivacy.methods import difp_keys as dk
from diffprivacy.inversion.key_bundle import bundle_from_tensors
from diffprivacy.inversion.keyfile import key_bundle_metadata, read_key_file, write_key_file
from toy_models import ToyFaceModel

FACE = ToyFaceModel()
FAST_KDF = {"n": 2 ** 10, "r": 8, "p": 1}
STEPS, SN = 10, 0.8


def _image(seed):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=64, mode="bicubic").clamp(0, 1).permute(0, 2, 3, 1)


def _cond(seed=None):
    if seed is None:
        return [[torch.zeros(1, 77, 64), {}]]
    return [[torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(seed)), {}]]


def _key(tiny_sd, image, cond):
    """A key whose identity is the embedding of the VAE round trip of the image: the tiny VAE has random weights,
    so the round trip is far from the photo; with a trained VAE the two agree and the photo's own embedding is used."""
    model, _, vae = tiny_sd
    with torch.inference_mode():
        z0 = vae.encode(image)
        found = face_identity(FACE, vae.decode(z0)[..., :3])
        return dk.make_difp_key(model, cond, z0, STEPS, SN, found["embedding"], found["landmarks"], FACE.name), z0


@pytest.fixture(scope="module")
def keys(tiny_sd):
    a, z_a = _key(tiny_sd, _image(1), _cond())
    b, _ = _key(tiny_sd, _image(2), _cond())
    return a, b, z_a


def _score(tiny_sd, key, z0, reference, lam):
    model, _, vae = tiny_sd
    with torch.inference_mode():
        z = dk.recover(model, vae, FACE, key, guidance_scale=lam)
        emb = FACE.embed(vae.decode(z)[..., :3].permute(0, 3, 1, 2), None)
    return float((z - z0).pow(2).mean()), float(1 - F.cosine_similarity(emb, reference))


def test_recovery_with_the_right_key_beats_wrong_f_i_wrong_f_e_and_no_guidance(tiny_sd, keys):
    right, other, z0 = keys
    ref = right.identity
    lam = 0.05
    ok = _score(tiny_sd, right, z0, ref, lam)
    wrong_fi = _score(tiny_sd, dataclasses.replace(right, f_i=other.f_i), z0, ref, lam)
    wrong_fe = _score(tiny_sd, dataclasses.replace(right, conditioning=_cond(9), identity=other.identity), z0, ref, lam)
    unguided = _score(tiny_sd, right, z0, ref, 0.0)
    # (latent error, identity distance). The toy recognizer on the random tiny VAE's images separates identities
    # only weakly (distances ~1e-4), so the margins are relative.
    assert ok[0] < wrong_fi[0] / 3 and ok[1] < wrong_fi[1] / 2, (ok, wrong_fi)
    assert ok[0] < wrong_fe[0] / 2 and ok[1] < wrong_fe[1] / 2, (ok, wrong_fe)
    assert ok[1] < 0.85 * unguided[1] and ok[0] < 1.05 * unguided[0], (ok, unguided)  # Eq. 17 pulls the identity


def test_key_file_is_sealed_round_trips_and_carries_its_kind(tmp_path, tiny_sd, keys):
    key = keys[0]
    path = dk.write_difp_key(tmp_path / "k.safetensors", key, "pw", kdf_params=FAST_KDF)
    raw = path.read_bytes()
    assert b"difp" not in raw[:2000] and b"key_kind" not in raw  # the kind is inside the sealed payload
    with pytest.raises(ValueError, match="wrong password"):
        dk.read_difp_key(path, "nope")
    back = dk.read_difp_key(path, "pw")
    torch.testing.assert_close(back.f_i["samples"], key.f_i["samples"])
    torch.testing.assert_close(back.identity, key.identity)
    assert (back.steps, back.strength, back.face_model) == (STEPS, SN, FACE.name)
    model, _, vae = tiny_sd
    with torch.inference_mode():  # the loaded key recovers exactly as the in-memory one
        torch.testing.assert_close(dk.recover(model, vae, FACE, back, guidance_scale=0.0),
                                   dk.recover(model, vae, FACE, key, guidance_scale=0.0))


def test_each_loader_refuses_the_other_kind_naming_the_right_node(tmp_path, keys):
    difp_path = dk.write_difp_key(tmp_path / "difp.safetensors", keys[0])
    tensors, metadata = read_key_file(difp_path)
    with pytest.raises(ValueError, match="Load DIFP Key"):
        bundle_from_tensors(tensors, metadata)
    tensors = {"key_i": torch.zeros(1, 4, 8, 8), "key_e": torch.zeros(10, 77, 64)}
    dp = write_key_file(tmp_path / "dp.safetensors", tensors,
                        key_bundle_metadata(steps=50, tau=0.4, strength=0.6, image_width=64, image_height=64,
                                            model_fingerprint="dp2-x", clip_fingerprint="dp2-y"))
    with pytest.raises(ValueError, match=r"Diff-Privacy' key file.*Load Key \(Diff-Privacy\)"):
        dk.read_difp_key(dp)


def test_recovery_refuses_another_model_step_count_size_or_face_model(tiny_sd, keys):
    model, _, vae = tiny_sd
    key = keys[0]
    patched = model.clone()
    name = next(k for k in model.model.state_dict() if k.endswith("out.2.weight"))
    patched.add_patches({name: (torch.ones_like(model.model.state_dict()[name]) * 1e-3,)}, 1.0)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="another diffusion model"):
            dk.recover(patched, vae, FACE, key, guidance_scale=0.0)
        with pytest.raises(ValueError, match=f"made with {STEPS} DDIM steps"):
            dk.recover(model, vae, FACE, key, steps=STEPS + 5, guidance_scale=0.0)
        small = dataclasses.replace(key, f_i={**key.f_i, "samples": key.f_i["samples"][..., :4, :4]})
        with pytest.raises(ValueError, match="resized or replaced"):
            dk.recover(model, vae, FACE, small, guidance_scale=0.0)
        other_face = ToyFaceModel()
        other_face.name = "facenet-casia"
        with pytest.raises(ValueError, match="face model the key was made with"):
            dk.recover(model, vae, other_face, key, guidance_scale=1.0)
    with pytest.raises(ValueError, match="beyond the last timestep"):
        dk.make_difp_key(model, _cond(), torch.zeros(1, 4, 8, 8), STEPS, 1.2, key.identity, key.landmarks, FACE.name)
