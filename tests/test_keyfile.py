"""Key files: round trips, sealing, tamper and corruption detection, atomic writes, compatibility."""
from __future__ import annotations

import json
import struct
import unicodedata

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffprivacy.inversion import keyfile as kf
from diffprivacy.inversion.keyfile import (KeyFileExistsError, is_sealed, key_bundle_metadata,
                                           read_key_file, write_key_file)

FAST_KDF = {"n": 2 ** 4, "r": 1, "p": 1}  # tests only: the default is memory-hard (n=2**17, r=8)
FINGERPRINT = "dp1-0123456789abcdef"


def make_tensors(seed=0, key_i_shape=(1, 4, 2, 2), key_e_shape=(10, 3, 2)):
    g = torch.Generator().manual_seed(seed)
    return {"key_i": torch.randn(key_i_shape, generator=g),
            "key_e": torch.randn(key_e_shape, generator=g).half()}


META = {"steps": "50", "model_fingerprint": FINGERPRINT}


def assert_same_tensors(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_unsealed_round_trip_is_plain_safetensors(tmp_path):
    tensors = make_tensors()
    path = write_key_file(tmp_path / "k.safetensors", tensors, META)
    got, meta = read_key_file(path)
    assert_same_tensors(got, tensors)
    assert meta == META
    assert not is_sealed(path)
    with safe_open(str(path), "pt") as f:  # readable by any safetensors tool
        assert torch.equal(f.get_tensor("key_i"), tensors["key_i"])


def test_sealed_round_trip_and_public_header(tmp_path):
    tensors = make_tensors()
    path = write_key_file(tmp_path / "k.safetensors", tensors, META, "correct horse", kdf_params=FAST_KDF)
    assert is_sealed(path)
    got, meta = read_key_file(path, "correct horse")
    assert_same_tensors(got, tensors)
    assert meta == META
    with safe_open(str(path), "pt") as f:  # itself a valid safetensors file, saying nothing about the keys
        assert list(f.keys()) == [kf.SEALED_PAYLOAD]
        assert set(f.metadata()) == {"format", "format_version", "sealed", "cipher", "kdf", "kdf_n", "kdf_r",
                                     "kdf_p", "kdf_salt", "nonce"}


def test_default_kdf_is_memory_hard(tmp_path):
    assert kf.DEFAULT_KDF_PARAMS["n"] >= 2 ** 15 and kf.DEFAULT_KDF_PARAMS["r"] >= 8
    path = write_key_file(tmp_path / "k.safetensors", make_tensors(), META, "pw")
    with safe_open(str(path), "pt") as f:
        assert int(f.metadata()["kdf_n"]) == kf.DEFAULT_KDF_PARAMS["n"]
    assert_same_tensors(read_key_file(path, "pw")[0], make_tensors())


def test_wrong_password_is_detected_and_unicode_forms_agree(tmp_path):
    composed = unicodedata.normalize("NFC", "café")
    path = write_key_file(tmp_path / "k.safetensors", make_tensors(), META, composed, kdf_params=FAST_KDF)
    with pytest.raises(ValueError, match="wrong password or tampered key file"):
        read_key_file(path, "cafe")
    read_key_file(path, unicodedata.normalize("NFD", composed))  # same password typed another way


def test_every_flipped_byte_of_a_sealed_file_is_detected(tmp_path):
    path = write_key_file(tmp_path / "k.safetensors", make_tensors(), META, "pw", kdf_params=FAST_KDF)
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    bad = tmp_path / "bad.safetensors"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        with pytest.raises(ValueError) as err:
            read_key_file(bad, "pw")
        if i >= header_end:  # payload bytes: only the authentication tag can tell
            assert "wrong password or tampered key file" in str(err.value)


def test_header_edits_that_stay_valid_json_are_detected(tmp_path):
    path = write_key_file(tmp_path / "k.safetensors", make_tensors(), META, "pw", kdf_params=FAST_KDF)
    data = path.read_bytes()
    end = 8 + struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:end])
    header["__metadata__"]["format_version"] = "0"  # a consistent, well-formed rewrite of the public header
    edited = kf._header_bytes(header["__metadata__"], len(data) - end) + data[end:]
    (tmp_path / "e.safetensors").write_bytes(edited)
    with pytest.raises(ValueError, match="wrong password or tampered key file"):
        read_key_file(tmp_path / "e.safetensors", "pw")
    header["__metadata__"]["kdf_n"] = str(2 ** 30)  # would need 128 GiB: refused before any derivation
    (tmp_path / "n.safetensors").write_bytes(kf._header_bytes(header["__metadata__"], len(data) - end) + data[end:])
    with pytest.raises(ValueError, match="scrypt parameters out of range"):
        read_key_file(tmp_path / "n.safetensors", "pw")


@pytest.mark.parametrize("sealed", [False, True])
def test_truncated_or_extended_files_are_refused(tmp_path, sealed):
    password = "pw" if sealed else None
    path = write_key_file(tmp_path / "k.safetensors", make_tensors(), META, password, kdf_params=FAST_KDF)
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    bad = tmp_path / "bad.safetensors"
    for cut in (0, 5, 8, header_end - 1, header_end, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            read_key_file(bad, password)
    bad.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError):
        read_key_file(bad, password)


def test_unsealed_corruption_is_caught_by_the_checksum(tmp_path):
    tensors = make_tensors()
    path = write_key_file(tmp_path / "k.safetensors", tensors, META)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a bit of Key-E's data: still parses as safetensors
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_key_file(path)


def test_files_that_are_not_key_files(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("just some text, long enough to hold a header length")
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    for path, message in ((text, "not a key file"), (other, "not a Diff-Privacy key file"),
                          (tmp_path / "missing.safetensors", "not found")):
        with pytest.raises(ValueError, match=message):
            read_key_file(path)
        with pytest.raises(ValueError, match=message):
            is_sealed(path)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    newer = str(kf.FORMAT_VERSION + 1)
    save_file({"key_i": torch.zeros(1)}, str(path), metadata={"format": kf.FORMAT, "format_version": newer,
                                                               "sealed": "0"})
    with pytest.raises(ValueError, match=f"format version {newer}"):
        read_key_file(path)


def test_password_given_to_unsealed_file_and_missing_for_sealed_one(tmp_path):
    plain = write_key_file(tmp_path / "plain.safetensors", make_tensors(), META)
    sealed = write_key_file(tmp_path / "sealed.safetensors", make_tensors(), META, "pw", kdf_params=FAST_KDF)
    with pytest.raises(ValueError, match="not sealed"):
        read_key_file(plain, "pw")
    for missing in (None, ""):
        with pytest.raises(ValueError, match="sealed with a password"):
            read_key_file(sealed, missing)


def test_sealed_bytes_hide_the_keys_and_the_fingerprint(tmp_path):
    tensors = make_tensors(key_i_shape=(1, 4, 8, 8), key_e_shape=(10, 77, 8))
    path = write_key_file(tmp_path / "k.safetensors", tensors, key_bundle_metadata(
        steps=50, tau=0.4, strength=0.6, image_width=64, image_height=64,
        model_fingerprint=FINGERPRINT, clip_fingerprint="dp1-fedcba9876543210"), "pw", kdf_params=FAST_KDF)
    data = path.read_bytes()
    plain = write_key_file(tmp_path / "plain.safetensors", tensors, {}).read_bytes()
    for name, t in tensors.items():
        raw = t.numpy().tobytes()
        assert raw in plain  # the check below would find the bytes if they were there
        for start in range(0, len(raw) - 16, 16):
            assert raw[start:start + 16] not in data, name
    for secret in (FINGERPRINT, "dp1-fedcba9876543210", "steps", "image_width", "key_i", "key_e"):
        assert secret.encode() not in data


def test_refuses_to_overwrite_unless_asked(tmp_path):
    path = write_key_file(tmp_path / "k.safetensors", make_tensors(0), META)
    before = path.read_bytes()
    with pytest.raises(KeyFileExistsError, match="already exists"):
        write_key_file(path, make_tensors(1), META)
    assert path.read_bytes() == before
    assert isinstance(KeyFileExistsError("x"), FileExistsError) and isinstance(KeyFileExistsError("x"), ValueError)
    write_key_file(path, make_tensors(1), META, overwrite=True)
    assert_same_tensors(read_key_file(path)[0], make_tensors(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


def test_a_file_appearing_during_the_write_is_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "k.safetensors"
    real_mkstemp = kf.tempfile.mkstemp

    def mkstemp_then_other_writer(*args, **kwargs):
        fd_and_name = real_mkstemp(*args, **kwargs)
        target.write_bytes(b"someone else's key")  # after the existence check, before the rename
        return fd_and_name

    monkeypatch.setattr(kf.tempfile, "mkstemp", mkstemp_then_other_writer)
    with pytest.raises(KeyFileExistsError):
        write_key_file(target, make_tensors(), META)
    assert target.read_bytes() == b"someone else's key"
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]


class _DiskFullMidway:
    """A file object that writes half of what it is given, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    real_fdopen = kf.os.fdopen
    existing = write_key_file(tmp_path / "old.safetensors", make_tensors(0), META)
    before = existing.read_bytes()
    monkeypatch.setattr(kf.os, "fdopen", lambda *a, **k: _DiskFullMidway(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        write_key_file(tmp_path / "new.safetensors", make_tensors(1), META)
    with pytest.raises(OSError, match="No space left"):
        write_key_file(existing, make_tensors(1), META, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]  # no temp files, no new.safetensors
    assert existing.read_bytes() == before


def test_reserved_and_non_string_metadata_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        write_key_file(tmp_path / "k.safetensors", make_tensors(), {"sealed": "0"})
    with pytest.raises(ValueError, match="str to str"):
        write_key_file(tmp_path / "k.safetensors", make_tensors(), {"steps": 50})
    assert not (tmp_path / "k.safetensors").exists()
