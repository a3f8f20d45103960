"""Key files: one safetensors file per key bundle (Key-I, Key-E and what is needed to use them).

Two layouts, both valid safetensors files:

**Unsealed** (no password): the tensors themselves, with string metadata: the caller's fields
plus ``format``/``format_version``/``sealed`` = "0" and ``content_sha256``, a checksum of every
tensor's name, dtype, shape and bytes and of the metadata, so a corrupted file is reported
rather than decoded into wrong keys. Anyone holding the file can use the keys.

**Sealed** (a password): the unsealed file's bytes, encrypted with AES-256-GCM under a key
derived from the password by scrypt (default n=2**17, r=8, p=1: 128 MiB and about half a second
per derivation, so guessing passwords is expensive). The file holds a single uint8 tensor,
``sealed_payload`` (ciphertext and 16-byte tag); its public header says only the format, the
version and the cipher/KDF parameters (salt, nonce), nothing about the keys: no shapes, no
step count, no fingerprint. The fingerprint is deliberately not public: the loader asks for the
password anyway, and checking the model after decryption loses nothing, while a public
fingerprint would tell anyone which checkpoint a person uses. The payload's length (about the
file size) is not hidden. The whole header as stored (length prefix and JSON bytes) is the
associated data of the cipher, so editing any byte of the header or the payload is detected,
as is a wrong password; both give "wrong password or tampered key file" and never garbage.

Files are written atomically (a 0600 temp file in the same folder, fsync, then a hard link or
``os.replace``) and an existing file is never replaced unless ``overwrite=True``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
import unicodedata
from pathlib import Path

import torch

from ..guidance.weights import require_finite

FORMAT = "diffprivacy-key"
FORMAT_VERSION = 2        # the newest this module reads
WHOLE_FRAME_VERSION = 1   # written for keys of one working image (every key before face crops)
FACE_CROPS_VERSION = 2    # written for keys of a photo's face crops (readers of version 1 refuse them by version)

# Fields this module writes itself; callers may not set them.
F_FORMAT = "format"
F_VERSION = "format_version"
F_SEALED = "sealed"
F_CHECKSUM = "content_sha256"
RESERVED_FIELDS = (F_FORMAT, F_VERSION, F_SEALED, F_CHECKSUM)

# Tensor names and metadata fields of a key bundle (written by DiffPrivacySaveKey).
KEY_I = "key_i"                # DDIM-inverted latent z_T, [1, C, h, w]
KEY_E = "key_e"                # the ten stage conditionings C^0..C^9, [10, tokens, width]
KEY_E_POOLED = "key_e_pooled"  # their pooled outputs, when the conditioning carried them
META_STEPS = "steps"
META_TAU = "tau"
META_STRENGTH = "strength"
META_IMAGE_WIDTH = "image_width"
META_IMAGE_HEIGHT = "image_height"
META_MODEL_FINGERPRINT = "model_fingerprint"
META_CLIP_FINGERPRINT = "clip_fingerprint"
META_SCHEDULE = "schedule"
META_FACE_CROPS = "face_crops"  # JSON: where the photo was cut (methods.pipeline.Plan); Key-I holds one latent per crop

SEALED_PAYLOAD = "sealed_payload"
CIPHER = "AES-256-GCM"
KDF = "scrypt"
DEFAULT_KDF_PARAMS = {"n": 2 ** 17, "r": 8, "p": 1}
_SALT_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_MAX_SCRYPT_MEMORY = 1 << 30           # refuse headers asking for more than 1 GiB (tampering must not exhaust RAM)


class KeyFileExistsError(FileExistsError, ValueError):
    """The target key file exists; key files are never overwritten silently."""


# ---------------------------------------------------------------- writing

def write_key_file(path, tensors: dict, metadata: dict, password: str | None = None, *,
                   kdf_params: dict | None = None, overwrite: bool = False) -> Path:
    """Write a key file atomically and return its path.

    ``tensors``: name -> tensor (any device/dtype; stored on CPU as is). ``metadata``: str -> str.
    ``password``: None or "" writes an unsealed file. ``kdf_params``: scrypt ``{"n", "r", "p"}``
    (defaults to DEFAULT_KDF_PARAMS; lower only in tests). Raises KeyFileExistsError when ``path``
    exists and ``overwrite`` is false.
    """
    path = Path(path)
    _atomic_write(path, key_file_bytes(tensors, metadata, password, kdf_params=kdf_params), overwrite)
    return path


def key_file_bytes(tensors: dict, metadata: dict, password: str | None = None, *,
                   kdf_params: dict | None = None) -> bytes:
    """The bytes :func:`write_key_file` writes, for a caller that names and writes its files itself."""
    version = FACE_CROPS_VERSION if META_FACE_CROPS in metadata else WHOLE_FRAME_VERSION
    plain = _serialize_unsealed(tensors, metadata, version)
    return _seal(plain, password, kdf_params, version) if password else plain


def key_bundle_metadata(*, steps: int, tau: float, strength: float, image_width: int, image_height: int,
                        model_fingerprint: str, clip_fingerprint: str) -> dict:
    """The standard metadata of a key bundle, as strings (what key_check.check_key_file reads)."""
    schedule = {"sampler": "ddim", "eta": 0.0, "stages": 10, "stage_width": 100, "tau": float(tau),
                "strength": float(strength)}
    return {META_STEPS: str(int(steps)), META_TAU: repr(float(tau)), META_STRENGTH: repr(float(strength)),
            META_IMAGE_WIDTH: str(int(image_width)), META_IMAGE_HEIGHT: str(int(image_height)),
            META_MODEL_FINGERPRINT: model_fingerprint, META_CLIP_FINGERPRINT: clip_fingerprint,
            META_SCHEDULE: json.dumps(schedule, sort_keys=True)}


def _serialize_unsealed(tensors: dict, metadata: dict, version: int = WHOLE_FRAME_VERSION) -> bytes:
    from safetensors.torch import save

    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("a key file needs at least one tensor")
    clean = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name.startswith("__") or name == SEALED_PAYLOAD:
            raise ValueError(f"invalid tensor name for a key file: {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"key file entry {name!r} is a {type(t).__name__}, not a tensor")
        clean[name] = t.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
    meta = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"key file metadata must map str to str, got {k!r}: {type(v).__name__}")
        if k in RESERVED_FIELDS:
            raise ValueError(f"key file metadata field {k!r} is reserved")
        meta[k] = v
    meta.update({F_FORMAT: FORMAT, F_VERSION: str(version), F_SEALED: "0"})
    meta[F_CHECKSUM] = _content_digest(clean, meta)
    return save(clean, metadata=meta)


def _content_digest(tensors: dict, meta: dict) -> str:
    h = hashlib.sha256()
    fields = {k: v for k, v in meta.items() if k != F_CHECKSUM}
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _crypto():
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    except ImportError as e:
        raise ImportError("password-sealed key files need the Python package 'cryptography': "
                          "pip install cryptography (in ComfyUI's Python environment)") from e
    return AESGCM, Scrypt, InvalidTag


def _derive_key(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    _, Scrypt, _ = _crypto()
    # NFC: the same password typed on different systems may arrive composed or decomposed
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def _check_kdf_params(n, r, p) -> None:
    ok = all(isinstance(v, int) and v >= 1 for v in (n, r, p))
    if not ok or n < 2 or n & (n - 1) or r > 32 or p > 16 or 128 * n * r > _MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt parameters out of range (n={n}, r={r}, p={p}): n must be a power of two "
                         f"and 128*n*r at most {_MAX_SCRYPT_MEMORY} bytes")


def _header_bytes(meta: dict, payload_len: int) -> bytes:
    header = {"__metadata__": meta,
              SEALED_PAYLOAD: {"dtype": "U8", "shape": [payload_len], "data_offsets": [0, payload_len]}}
    js = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)  # safetensors aligns tensor data to 8 bytes
    return struct.pack("<Q", len(js)) + js


def _seal(plain: bytes, password: str, kdf_params: dict | None, version: int = WHOLE_FRAME_VERSION) -> bytes:
    AESGCM, _, _ = _crypto()
    params = dict(DEFAULT_KDF_PARAMS if kdf_params is None else kdf_params)
    n, r, p = params.get("n"), params.get("r"), params.get("p")
    _check_kdf_params(n, r, p)
    salt, nonce = os.urandom(_SALT_BYTES), os.urandom(_NONCE_BYTES)
    public = {F_FORMAT: FORMAT, F_VERSION: str(version), F_SEALED: "1", "cipher": CIPHER, "kdf": KDF,
              "kdf_n": str(n), "kdf_r": str(r), "kdf_p": str(p), "kdf_salt": salt.hex(), "nonce": nonce.hex()}
    header = _header_bytes(public, len(plain) + _TAG_BYTES)
    ciphertext = AESGCM(_derive_key(password, salt, n, r, p)).encrypt(nonce, plain, header)
    return header + ciphertext


def _atomic_write(path: Path, data: bytes, overwrite: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise KeyFileExistsError(f"{path} already exists: key files are never overwritten")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600: keys are secrets
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _move_no_clobber(tmp: str, path: Path) -> None:
    """Give the finished temp file its name without replacing a file that appeared meanwhile."""
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists
    except FileExistsError:
        raise KeyFileExistsError(f"{path} already exists: key files are never overwritten") from None
    except (OSError, NotImplementedError, AttributeError):  # a filesystem without hard links
        if path.exists():
            raise KeyFileExistsError(f"{path} already exists: key files are never overwritten") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- reading

def is_sealed(path) -> bool:
    """True for a password-sealed key file; ValueError when ``path`` is not a key file."""
    meta = _key_header(_read_bytes(Path(path)), Path(path))[1]
    return meta.get(F_SEALED) == "1"


def read_key_file(path, password: str | None = None) -> tuple[dict, dict]:
    """Read a key file: (tensors on CPU, metadata as written). ValueError on any bad input."""
    path = Path(path)
    data = _read_bytes(path)
    header, meta, header_end = _key_header(data, path)
    if meta.get(F_SEALED) == "1":
        if not password:
            raise ValueError(f"key file {path.name} is sealed with a password: enter the password to open it")
        data = _unseal(data, header, meta, header_end, password, path)
        header, meta, header_end = _key_header(data, path, inner=True)
        if meta.get(F_SEALED) != "0":
            raise ValueError(f"key file {path.name} is corrupted: its sealed contents are not an unsealed key")
    elif password:
        raise ValueError(f"key file {path.name} is not sealed, so it needs no password (anyone holding it can use "
                         "it): leave the password empty, or save the key again with a password")
    return _load_unsealed(data, meta, path)


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise ValueError(f"key file not found: {path}")
    return path.read_bytes()


def _key_header(data: bytes, path: Path, inner: bool = False):
    """Parse a safetensors header and check it is ours: (header, metadata, end of header)."""
    what = f"the sealed contents of {path.name}" if inner else str(path.name)
    if len(data) < 8:
        raise ValueError(f"{what} is not a key file: it is empty or truncated")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER_BYTES or 8 + size > len(data):
        raise ValueError(f"{what} is not a key file, or it is truncated: its safetensors header is cut short")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{what} is not a key file, or it is corrupted: its header is not safetensors JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get(F_FORMAT) != FORMAT:
        raise ValueError(f"{what} is not a Diff-Privacy key file (no '{FORMAT}' header)")
    version = meta.get(F_VERSION)
    if not (isinstance(version, str) and version.isdigit()):
        raise ValueError(f"{what} is corrupted: bad format version {version!r}")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"{what} uses key-file format version {version}; this version of the nodes reads up to "
                         f"{FORMAT_VERSION}: update Diff-Privacy nodes")
    if meta.get(F_SEALED) not in ("0", "1"):
        raise ValueError(f"{what} is corrupted: bad 'sealed' field")
    return header, meta, 8 + size


def _unseal(data: bytes, header: dict, meta: dict, header_end: int, password: str, path: Path) -> bytes:
    AESGCM, _, InvalidTag = _crypto()
    if meta.get("cipher") != CIPHER or meta.get("kdf") != KDF:
        raise ValueError(f"key file {path.name}: unsupported cipher/KDF {meta.get('cipher')!r}/{meta.get('kdf')!r} "
                         "(wrong password or tampered key file)")
    try:
        n, r, p = (int(meta[k]) for k in ("kdf_n", "kdf_r", "kdf_p"))
        salt, nonce = bytes.fromhex(meta["kdf_salt"]), bytes.fromhex(meta["nonce"])
        offsets = header[SEALED_PAYLOAD]["data_offsets"]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"key file {path.name} is tampered or corrupted: its public header is incomplete") from None
    _check_kdf_params(n, r, p)
    payload = data[header_end:]
    if len(salt) != _SALT_BYTES or len(nonce) != _NONCE_BYTES or offsets != [0, len(payload)] \
            or len(payload) <= _TAG_BYTES or set(header) != {"__metadata__", SEALED_PAYLOAD}:
        raise ValueError(f"key file {path.name} is truncated, tampered or corrupted (payload size or header mismatch)")
    key = _derive_key(password, salt, n, r, p)
    try:
        return AESGCM(key).decrypt(nonce, payload, data[:header_end])
    except InvalidTag:
        raise ValueError(f"wrong password or tampered key file: {path.name}") from None


def _load_unsealed(data: bytes, meta: dict, path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"key file {path.name} is corrupted or truncated ({e})") from None
    if meta.get(F_CHECKSUM) != _content_digest(tensors, meta):
        raise ValueError(f"key file {path.name} is corrupted: its contents do not match their checksum")
    for name, tensor in tensors.items():  # a NaN key recovers a black image that looks like success
        require_finite(tensor, f"key file {path.name}: tensor '{name}'", "the key is damaged or was made from a run "
                       "that diverged; use a key file written by a run that succeeded")
    return tensors, {k: v for k, v in meta.items() if k not in RESERVED_FIELDS}


# ---------------------------------------------------------------- fields

def metadata_number(metadata: dict, field: str, kind=float):
    """A numeric metadata field, or a ValueError naming it."""
    try:
        value = kind(metadata[field])
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"the key file does not record a valid '{field}'") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"the key file records a non-finite '{field}'")
    return value


# -- kinds of key file: the tag sits inside the (sealed) metadata -----------------------------------------------------
KIND_FIELD = "key_kind"
KIND_DIFP = "difp"
KIND_DIFF_PRIVACY = "diff-privacy"  # what a file without the field is


def key_kind(metadata: dict) -> str:
    return metadata.get(KIND_FIELD, KIND_DIFF_PRIVACY)


def refuse_difp(metadata: dict) -> None:
    """For Diff-Privacy's key loader: a DIFP key file is refused with the node that reads it."""
    if key_kind(metadata) == KIND_DIFP:
        raise ValueError("this is a DIFP key file (F_i + F_e), not a Diff-Privacy key bundle: load it with Load DIFP "
                         "Key and recover with DIFP Recover")
