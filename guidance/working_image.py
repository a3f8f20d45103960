"""The working image: the one picture that Key-E learning, protection, guidance and Key-I all see.

Key-E is learned on the photo brought to resolution² and every later stage must see exactly the same pixels,
or the key and the protected image disagree. One definition here, used by all of them.

The photo is never squashed: a photo that is not square is letterboxed (padded to a square around its
centre by repeating its edge pixels, :func:`square_region` / :func:`cut_square`) and then resized, and
:func:`uncut_square` takes the padding away again on the way back. (The reference squashed its inputs, but
its inputs were aligned square face images; :mod:`methods.pipeline` crops such squares out of any photo.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# The largest working image, per side. SD 1.5 works at 512; time and memory of every step grow with the square of the
# pixel count (self-attention), so a 4096x4096 key kept a CPU server busy for over 14 minutes, deaf to Cancel.
MAX_SIDE = 2048


def check_working_size(width: int, height: int, what: str, advice: str) -> None:
    """Refuse a working image (or a key made for one) larger than :data:`MAX_SIDE` a side, before any work."""
    if max(int(width), int(height)) > MAX_SIDE:
        raise ValueError(f"{what} is {int(width)}x{int(height)} pixels, above the {MAX_SIDE} pixels a side these "
                         f"nodes work at (SD 1.5 works at 512; time and memory grow with the square of the pixel "
                         f"count): {advice}")


def check_resolution(resolution: int) -> int:
    """0 (keep the photo's size) or a multiple of 8 of at least 64."""
    resolution = int(resolution)
    if resolution and (resolution < 64 or resolution % 8 or resolution > MAX_SIDE):
        raise ValueError(f"resolution must be 0 (keep the image's size) or a multiple of 8 from 64 to {MAX_SIDE}, "
                         f"got {resolution}")
    return resolution


def square_region(height: int, width: int) -> tuple[int, int, int]:
    """(x, y, side): the square centred on a height x width photo that holds all of it (its letterbox)."""
    side = max(height, width)
    return -((side - width) // 2), -((side - height) // 2), side


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic (antialiased) resize of square IMAGEs (B, S, S, 3) to size², clamped to [0, 1]."""
    if image.shape[1] == size and image.shape[2] == size:
        return image
    x = F.interpolate(image.movedim(-1, 1), size=(size, size), mode="bicubic", antialias=True)
    return x.clamp(0, 1).movedim(1, -1)


def cut_square(image: torch.Tensor, x: int, y: int, side: int, size: int | None = None) -> torch.Tensor:
    """The side x side square at (x, y) of IMAGEs (B, H, W, 3), the parts outside the photo padded by repeating
    its edge pixels (never stretched), resized to size² when ``size`` is given."""
    _, h, w, _ = image.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, w), min(y + side, h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"the square ({x}, {y}, side {side}) lies outside the {w}x{h} photo")
    inner = image[:, y0:y1, x0:x1].movedim(-1, 1)
    pads = (x0 - x, x + side - x1, y0 - y, y + side - y1)
    if any(pads):
        inner = F.pad(inner, pads, mode="replicate")
    square = inner.movedim(1, -1)
    return resize_square(square, size) if size else square


def uncut_square(square: torch.Tensor, x: int, y: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`cut_square` for a square that was resized back to its side: the part that lies
    inside the height x width photo, (B, h', w', 3), and its place (x0, y0) in the photo."""
    side = square.shape[1]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, width), min(y + side, height)
    return square[:, y0 - y:y1 - y, x0 - x:x1 - x], (x0, y0)


def resize_for_training(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """The photo letterboxed to a square (edges repeated, never squashed) and resized to resolution² (bicubic,
    antialiased), or cropped to a multiple of 8 when resolution is 0."""
    if image.ndim != 4 or image.shape[0] < 1 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an IMAGE [B, H, W, 3], got {tuple(image.shape)}")
    image = image[..., :3].float()
    if resolution:
        return cut_square(image, *square_region(image.shape[1], image.shape[2]), resolution)
    h, w = image.shape[1] // 8 * 8, image.shape[2] // 8 * 8
    if h < 64 or w < 64:
        raise ValueError(f"the image is too small ({image.shape[1]}x{image.shape[2]}); at least 64x64 is needed")
    check_working_size(w, h, "with resolution 0 the working image", f"set the working resolution to {MAX_SIDE} or "
                       "less (512 is SD 1.5's own), or downscale the photo first")
    return image[:, :h, :w]


def crop_to_latent_grid(image: torch.Tensor, vae) -> torch.Tensor:
    """Centre-crop an IMAGE to a multiple of the VAE's downscale, exactly as VAE.encode does,
    so that face landmarks found on the crop line up with the decoded predictions."""
    ratio = getattr(vae, "downscale_ratio", 8)
    ratio = ratio if isinstance(ratio, int) else 8
    for dim in (1, 2):
        size = image.shape[dim]
        keep = (size // ratio) * ratio
        if keep == 0:
            raise ValueError(f"the image ({image.shape[1]}x{image.shape[2]}) is smaller than one latent cell")
        image = image.narrow(dim, (size % ratio) // 2, keep)
    return image


MIN_SIDE = 16  # pixels: below this no detector finds a face, whatever the working resolution


def single_image(image: torch.Tensor) -> torch.Tensor:
    """The one image of a batch of one (RGB); a larger batch is refused with what to do instead."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"Diff-Privacy protects one image at a time (its Key-E belongs to one image); got a batch of "
                         f"{image.shape[0] if image.dim() == 4 else '?'} images. Split the batch and run each image "
                         "with its own Key-E.")
    if min(image.shape[1], image.shape[2]) < MIN_SIDE:
        raise ValueError(f"the image is {image.shape[2]}x{image.shape[1]} pixels: far too small to hold a face a "
                         f"detector can find (at least {MIN_SIDE} pixels a side; a face needs about 40 across). "
                         "Resizing it up does not add the missing detail: use the original photo")
    return image[..., :3]


def working_image(image: torch.Tensor, vae, resolution: int) -> torch.Tensor:
    """The one image protection, guidance and Key-I work on, resized as Key-E learning resizes it."""
    resolution = check_resolution(resolution)
    return crop_to_latent_grid(resize_for_training(single_image(image), resolution), vae)


def photo_mask(mask: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """Image ``index``'s MASK, (H, W), from a MASK (B, H, W) or (H, W) (the last one serves every later image)."""
    if mask is None:
        return None
    m = mask.float()
    m = m[None] if m.dim() == 2 else m
    if m.dim() != 3:
        raise ValueError(f"a MASK is (H, W) or (B, H, W), got {tuple(mask.shape)}")
    return m[min(index, m.shape[0] - 1)]


def working_mask(mask: torch.Tensor | None, index: int, size: tuple[int, int]) -> torch.Tensor | None:
    """Image ``index``'s MASK brought to the working image's (h, w) as the image is (letterboxed when the
    working image is square and the mask is not, then resized), so it covers the same faces."""
    m = photo_mask(mask, index)
    if m is None:
        return None
    h, w = m.shape
    if size[0] == size[1] and h != w:
        return cut_square(m[None, :, :, None], *square_region(h, w), size[0])[0, :, :, 0]
    return F.interpolate(m[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
