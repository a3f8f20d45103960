"""Image files <-> ComfyUI's (H, W, 3) float layout, whatever the file's mode; decoding from bytes with a pixel bound
checked on the header, before any pixel is decoded (a decompression bomb is refused, never expanded)."""
from __future__ import annotations

import io

import numpy as np
import torch


def pil_to_rgb_array(img) -> np.ndarray:
    """A Pillow image in any mode -> (H, W, 3) float32 in [0, 1].

    16-bit and 32-bit integer modes (``I;16``, ``I``) are scaled by their real range, float
    mode ``F`` is taken as [0, 1] when it fits, alpha is dropped (the pixels under it are kept,
    as ComfyUI's LoadImage does), palettes and CMYK are converted.
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak, 0.0, 1.0)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 255.0 if arr.max() > 1.0 else arr
        arr = np.clip(arr, 0.0, 1.0)
    else:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(arr[..., None], 3, axis=2).astype(np.float32)


def decode_image(data: bytes, name: str, max_pixels: int) -> torch.Tensor:
    """An image file's bytes -> (H, W, 3) float tensor in [0, 1], EXIF rotation applied. ``ValueError`` naming
    ``name`` when the bytes are not an image, or when the header announces more than ``max_pixels`` pixels."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with warnings.catch_warnings():  # Pillow warns above 89 megapixels: the bound below is the check
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(f"{name} is {width}x{height} = {width * height / 1e6:.0f} megapixels, over the bound "
                                 f"of {max_pixels / 1e6:.0f} (a decompression bomb, or a larger bound is needed: "
                                 "--max-megapixels); it was not decoded")
            arr = pil_to_rgb_array(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as e:  # Pillow's own bound (179 megapixels) met first
        raise ValueError(f"{name} is a decompression bomb ({e}); it was not decoded") from e
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(arr))


def encode_png(image: torch.Tensor) -> bytes:
    """(H, W, 3) float [0, 1] -> the bytes of an 8-bit PNG (lossless: perturbations survive)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float [0, 1] -> uint8 array, rounded as every saved file is."""
    return (image.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
