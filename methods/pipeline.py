"""One pipeline around every protection method: protect the faces, keep the photo.

What ComfyUI users know from Impact Pack's FaceDetailer, for every method of the pack:

1. **detect** the faces with the method's face model and **choose** them with the one face choice
   (:func:`guidance.face.base.select_faces`: all / largest / indices / the faces a MASK covers). A photo larger
   than the detector looks at (:func:`detection_side`) is shrunk to that size first and the boxes and landmarks
   scaled back: the detector would shrink it itself, so it finds the same faces, without the full-size copy;
2. **crop** each chosen face: the square of side ``crop_factor`` x the longer side of its box, centred on the
   box (FaceDetailer's default factor 3.0), at most the photo's letterbox square (a face filling a portrait gets
   the whole portrait, not a square of padding) and moved inside that square. Where the square runs past the
   photo's border the missing part is padded by repeating the edge pixels: the face is never stretched;
3. **resize** the crop to the working resolution (bicubic, antialiased): the aligned square face image the
   papers work on (CelebA-HQ / FFHQ at 512²);
4. the **method** protects the crops; in each crop it steers the face the crop was built around
   (:meth:`Crop.face_mask`, a ``mask`` face choice);
5. **resize back** to the crop's side and **paste** into the photo at its own size through a feathered mask:
   the face box grown by ``mask_grow``, ramping from 0 to 1 over ``feather`` pixels inside its edge.

Every pixel outside the pasted masks is the input's, bit for bit (the mask is exactly 0 there and the paste
keeps the input's value, it does not compute a blend). Whole-frame mode (``mode = "whole frame"``) is one
crop: the photo's letterbox square (padded, never squashed), pasted back over the whole photo.

A :class:`Plan` (the photo's size, the working resolution, each :class:`Crop`'s square, face box and mask)
is plain data: keys record it (``as_dict``/``from_dict``) so that Recover puts the recovered faces back into
the photo, and receipts (:mod:`.receipt`) say per face which crop size was used.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from ..guidance.face.base import SELECT_MODES, Face, NoFaceError, select_faces
from ..guidance.working_image import (MIN_SIDE, cut_square, photo_mask, resize_square, square_region,
                                      uncut_square)

MODES = ("face crops", "whole frame")
FULL_SIZE = "full size"     # the plan of a method that works on the photo itself (hiding from detectors)
DEFAULT_CROP_FACTOR = 3.0   # Impact Pack FaceDetailer's default
DEFAULT_FEATHER = 5         # pixels, FaceDetailer's default
DEFAULT_MASK_GROW = 1.3     # the pasted mask: the face box grown by this factor (forehead, chin, ears)
PLAN_VERSION = 1            # of the Plan's dict, as keys record it
MIN_CROP_SIDE = 16
SELECT_GROW = 1.5           # in a crop, the method steers the faces whose box this grown face box mostly covers


@dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline crops and pastes (the FACE_PIPELINE type): one value every protect node accepts."""
    mode: str = MODES[0]
    crop_factor: float = DEFAULT_CROP_FACTOR
    feather: int = DEFAULT_FEATHER
    mask_grow: float = DEFAULT_MASK_GROW
    faces: str = "all"
    face_indices: str = ""
    face_mask: torch.Tensor | None = field(default=None, compare=False)
    receipt_model: object = field(default=None, compare=False)  # a FACE_MODEL for the receipt (default: dlib)

    def validated(self) -> "PipelineOptions":
        if self.mode not in MODES:
            raise ValueError(f"pipeline mode must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.crop_factor, (int, float)) and math.isfinite(self.crop_factor)
                and 1.0 <= self.crop_factor <= 10.0):
            raise ValueError(f"crop_factor must be between 1 (the face box only) and 10, got {self.crop_factor!r}; "
                             f"FaceDetailer's default is {DEFAULT_CROP_FACTOR}")
        if not (isinstance(self.mask_grow, (int, float)) and math.isfinite(self.mask_grow)
                and 1.0 <= self.mask_grow <= self.crop_factor):
            raise ValueError(f"mask_grow must be between 1 (the face box) and crop_factor ({self.crop_factor}), "
                             f"got {self.mask_grow!r}: the pasted mask must lie inside the crop")
        if int(self.feather) != self.feather or not 0 <= self.feather <= 256:
            raise ValueError(f"feather must be a whole number of pixels from 0 to 256, got {self.feather!r}")
        if self.faces not in SELECT_MODES:
            raise ValueError(f"faces must be one of {SELECT_MODES}, got {self.faces!r}")
        if self.faces == "mask" and self.face_mask is None:
            raise ValueError("faces = mask needs a face_mask: connect a MASK, white over the faces to protect")
        return self

    def with_faces(self, faces: str, face_indices: str = "", face_mask=None) -> "PipelineOptions":
        """These options with another face choice (a node's own face inputs)."""
        from dataclasses import replace
        return replace(self, faces=faces, face_indices=face_indices, face_mask=face_mask).validated()


def feathered_box(height: int, width: int, box, feather: int) -> torch.Tensor:
    """(height, width) mask: 1 inside ``box`` (x0, y0, x1, y1), ramping linearly to 0 over ``feather`` pixels
    inside its edge, exactly 0 outside it."""
    x0, y0, x1, y1 = box
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    dx = torch.minimum(xs - x0, x1 - xs)
    dy = torch.minimum(ys - y0, y1 - ys)
    if feather > 0:
        rx, ry = (dx / feather).clamp(0, 1), (dy / feather).clamp(0, 1)
    else:
        rx, ry = (dx > 0).float(), (dy > 0).float()
    return ry[:, None] * rx[None, :]


@dataclass(frozen=True)
class Crop:
    """One face's square (x, y, side in photo pixels; it may run past the border) and its pasted mask."""
    x: int
    y: int
    side: int
    mask_box: tuple        # (x0, y0, x1, y1) photo pixels: where the mask is non-zero (inside the photo)
    feather: int
    face_index: int        # in the detector's order (largest first); -1 for the whole frame
    face_box: tuple = ()   # (x1, y1, x2, y2) the detected box, photo pixels
    landmarks: tuple = ()  # ((x, y) * 5) the detected landmarks, photo pixels

    def local_mask(self) -> torch.Tensor:
        """The pasted mask in the crop's own pixels, (side, side)."""
        x0, y0, x1, y1 = self.mask_box
        return feathered_box(self.side, self.side, (x0 - self.x, y0 - self.y, x1 - self.x, y1 - self.y),
                             self.feather)

    def photo_mask(self, height: int, width: int) -> torch.Tensor:
        """The pasted mask in the photo's pixels, (height, width)."""
        return feathered_box(height, width, self.mask_box, self.feather)

    def face_mask(self, size: int) -> torch.Tensor:
        """(size, size) mask of the face this crop was built around, at the working resolution: the face choice
        ("mask") that makes the method steer that face and not a neighbour the crop also holds."""
        if self.face_index < 0:
            return torch.ones(size, size)
        scale = size / self.side
        x1, y1, x2, y2 = self.face_box
        cx, cy = ((x1 + x2) / 2 - self.x) * scale, ((y1 + y2) / 2 - self.y) * scale
        half = SELECT_GROW * max(x2 - x1, y2 - y1) * scale / 2  # grown: the crop's detector boxes it a little apart
        return feathered_box(size, size, (cx - half, cy - half, cx + half, cy + half), 0)

    def working_landmarks(self, size: int) -> torch.Tensor | None:
        """The detected landmarks of the face this crop was built around, (5, 2) in the pixels of the crop resized to
        ``size`` (the working resolution): a method need not detect that face again. None where the crop knows none
        (the whole frame, a MASK's region, a plan read back from a key)."""
        if self.face_index < 0 or len(self.landmarks) != 5:
            return None
        scale = size / self.side  # pixel centres: photo (x + 0.5) lands at crop ((x + 0.5 - self.x) * scale)
        return ((torch.tensor(self.landmarks, dtype=torch.float32) - torch.tensor([float(self.x), float(self.y)])
                 + 0.5) * scale - 0.5)

    def work_size(self, resolution: int) -> int:
        """The working resolution of this crop: ``resolution``, or its own side (a multiple of 8) for 0."""
        return resolution if resolution else max(64, self.side // 8 * 8)

    def as_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "side": self.side, "mask_box": list(self.mask_box),
                "feather": self.feather, "face_index": self.face_index,
                "face_box": [round(float(v), 2) for v in self.face_box]}

    @classmethod
    def from_dict(cls, d: dict) -> "Crop":
        return cls(int(d["x"]), int(d["y"]), int(d["side"]), tuple(int(v) for v in d["mask_box"]),
                   int(d["feather"]), int(d["face_index"]), tuple(float(v) for v in d.get("face_box", ())))


@dataclass(frozen=True)
class Plan:
    """Where the pipeline cut a photo: its size, the working resolution and the crops, in paste order."""
    height: int
    width: int
    resolution: int
    mode: str
    crops: tuple

    def cut(self, photo: torch.Tensor) -> list[torch.Tensor]:
        """Each crop of ``photo`` ((H, W, 3) or (1, H, W, 3)) at its working size: a list of (1, R, R, 3)."""
        photo = self._check_photo(photo)
        return [cut_square(photo[None], c.x, c.y, c.side, c.work_size(self.resolution)) for c in self.crops]

    def paste(self, photo: torch.Tensor, protected: list[torch.Tensor]) -> torch.Tensor:
        """``photo`` (H, W, 3) with each crop's protected image(s) pasted back: ``protected[i]`` is crop i's
        (k, R, R, 3) (k outputs, the same k for every crop). Returns (k, H, W, 3); every pixel outside the
        masks is the photo's own."""
        photo = self._check_photo(photo)
        if len(protected) != len(self.crops):
            raise ValueError(f"{len(protected)} protected crop(s) for a plan of {len(self.crops)} crop(s)")
        counts = {p.shape[0] for p in protected}
        if len(counts) != 1:
            raise ValueError(f"every crop must have the same number of outputs, got {sorted(counts)}")
        out = photo[None].expand(counts.pop(), -1, -1, -1).clone()
        for crop, images in zip(self.crops, protected):
            if images.dim() != 4 or images.shape[1] != images.shape[2] or images.shape[-1] != 3:
                raise ValueError(f"a protected crop must be square images (k, R, R, 3), got {tuple(images.shape)}")
            back = resize_square(images.to(out).clamp(0, 1), crop.side)
            part, (x0, y0) = uncut_square(back, crop.x, crop.y, self.height, self.width)
            mask, _ = uncut_square(crop.local_mask()[None, :, :, None].to(out), crop.x, crop.y, self.height,
                                   self.width)
            h, w = part.shape[1:3]
            region = out[:, y0:y0 + h, x0:x0 + w]
            blend = region * (1 - mask) + part * mask
            out[:, y0:y0 + h, x0:x0 + w] = torch.where(mask > 0, blend, region)  # exactly the input where m = 0
        return out

    def mask(self) -> torch.Tensor:
        """(H, W): where any crop is pasted (the union of the masks; > 0 means the pixel may change)."""
        m = torch.zeros(self.height, self.width)
        for c in self.crops:
            m = torch.maximum(m, c.photo_mask(self.height, self.width))
        return m

    def _check_photo(self, photo: torch.Tensor) -> torch.Tensor:
        photo = photo[0] if photo.dim() == 4 and photo.shape[0] == 1 else photo
        if photo.dim() != 3 or tuple(photo.shape[:2]) != (self.height, self.width):
            raise ValueError(f"this plan belongs to a {self.width}x{self.height} photo; got an image of shape "
                             f"{tuple(photo.shape)}")
        return photo[..., :3].float()

    def as_dict(self) -> dict:
        return {"version": PLAN_VERSION, "height": self.height, "width": self.width, "resolution": self.resolution,
                "mode": self.mode, "crops": [c.as_dict() for c in self.crops]}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        version = d.get("version") if isinstance(d, dict) else None
        if version != PLAN_VERSION:
            raise ValueError(f"this face-crop plan has version {version!r}; these nodes read version {PLAN_VERSION}: "
                             "update Diff-Privacy nodes, or make the key again")
        try:
            return cls(int(d["height"]), int(d["width"]), int(d["resolution"]), str(d["mode"]),
                       tuple(Crop.from_dict(c) for c in d["crops"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"this face-crop plan is malformed ({e})") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError:
            raise ValueError("this face-crop plan is not JSON: the key file is damaged") from None


def face_crop(face, index: int, height: int, width: int, options: PipelineOptions) -> Crop:
    """The square around one detected face, and its mask (the grown box, inside the photo)."""
    x1, y1, x2, y2 = (float(v) for v in face.box)
    cx, cy, longer = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1, 1.0)
    sx, sy, square = square_region(height, width)  # never more than the photo's own letterbox square holds
    side = min(max(MIN_CROP_SIDE, int(round(longer * options.crop_factor))), square)
    x = min(max(int(round(cx - side / 2)), sx), sx + square - side)
    y = min(max(int(round(cy - side / 2)), sy), sy + square - side)
    half = longer * options.mask_grow / 2
    mx0, my0 = max(int(math.floor(cx - half)), x, 0), max(int(math.floor(cy - half)), y, 0)
    mx1, my1 = min(int(math.ceil(cx + half)), x + side, width), min(int(math.ceil(cy + half)), y + side, height)
    if mx1 <= mx0 or my1 <= my0:
        raise ValueError(f"face {index} lies outside the {width}x{height} photo (box {face.box.tolist()})")
    return Crop(x, y, side, (mx0, my0, mx1, my1), int(options.feather), index, (x1, y1, x2, y2),
                tuple(tuple(float(v) for v in p) for p in face.landmarks.tolist()))


def detection_side(face_model) -> int | None:
    """The longest side at which ``face_model``'s detector looks at a photo: it shrinks a larger photo to this side
    itself (dlib's ``work_size``, MTCNN's and RetinaFace's ``max_side``, SCRFD's input size). A copy shrunk to it
    beforehand shows the detector the same faces: the smallest face it can find in the photo stays findable. None
    when the model declares no such size (its photos are then analysed at their own size)."""
    for part in (face_model, getattr(face_model, "detector", None)):
        for obj in (part, getattr(part, "model", None)):  # DlibDetector holds the dlib FACE_MODEL as .model
            if obj is None:
                continue
            for name in ("work_size", "max_side"):
                side = getattr(obj, name, None)
                if isinstance(side, int) and not isinstance(side, bool) and side > 0:
                    return side
            hw = getattr(obj, "input_hw", None)
            if isinstance(hw, tuple) and len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw):
                return max(hw)
    return None


def detect_faces(face_model, photo: torch.Tensor) -> list:
    """``face_model.detect(photo)`` ((H, W, 3)), on a copy shrunk to :func:`detection_side` when the photo is larger
    (antialiased), with the boxes and landmarks scaled back to the photo's pixels."""
    side = detection_side(face_model)
    h, w = int(photo.shape[0]), int(photo.shape[1])
    if side is None or max(h, w) <= side:
        return face_model.detect(photo)
    scale = side / max(h, w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    small = torch.nn.functional.interpolate(photo.permute(2, 0, 1)[None], size=(sh, sw), mode="bilinear",
                                            align_corners=False, antialias=True)[0].permute(1, 2, 0).clamp(0, 1)
    back = torch.tensor([w / sw, h / sh])
    return [Face(box=f.box.float() * back.repeat(2), landmarks=f.landmarks.float() * back, score=f.score)
            for f in face_model.detect(small)]


def plan_photo(photo: torch.Tensor, face_model, options: PipelineOptions | None, resolution: int,
               index: int = 0) -> Plan:
    """Detect and choose the faces of one photo ((H, W, 3) or (1, H, W, 3)) and plan their crops; in whole-frame
    mode the one crop is the photo's letterbox square. ``index``: the photo's place in its batch (for the MASK
    and for messages). Raises :class:`NoFaceError` when no face is found or chosen."""
    options = (options or PipelineOptions()).validated()
    photo = photo[0] if photo.dim() == 4 else photo
    h, w = int(photo.shape[0]), int(photo.shape[1])
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"the image is {w}x{h} pixels: far too small to hold a face (at least {MIN_SIDE} a side)")
    if options.mode == "whole frame":
        x, y, side = square_region(h, w)
        return Plan(h, w, _resolution(resolution, side), options.mode, (Crop(x, y, side, (0, 0, w, h), 0, -1),))
    faces = detect_faces(face_model, photo[..., :3].float())
    if not faces:
        raise NoFaceError(index, f"{w}x{h} pixels")
    chosen, _ = select_faces(faces, options.faces, options.face_indices, photo_mask(options.face_mask, index))
    if not chosen:
        raise NoFaceError(index, f"none of the {len(faces)} face(s) found is chosen by faces = {options.faces}")
    crops = tuple(face_crop(faces[i], i, h, w, options) for i in chosen)
    return Plan(h, w, _resolution(resolution, max(c.side for c in crops)), options.mode, crops)


def _resolution(resolution: int, side: int) -> int:
    """The working resolution: the given one, or for 0 (keep the size) the largest crop's side, a multiple of 8."""
    return int(resolution) if resolution else max(64, side // 8 * 8)


def full_size_plan(faces: list, indices, height: int, width: int) -> Plan:
    """The plan of a method that changes the photo at its own size (no crop, no resize): one entry per chosen face
    (``indices`` into ``faces``), so that its receipt measures the same faces as the other methods'."""
    options = PipelineOptions().validated()
    return Plan(height, width, 0, FULL_SIZE, tuple(face_crop(faces[i], i, height, width, options) for i in indices))


def mask_plan(photo: torch.Tensor, mask: torch.Tensor, options: PipelineOptions | None, resolution: int) -> Plan:
    """The plan of one crop around a MASK's white region (a method told where to work instead of finding a face)."""
    from ..guidance.face.base import Face
    from ..guidance.working_image import check_resolution
    options = (options or PipelineOptions()).validated()
    m = photo_mask(mask, 0)
    h, w = photo.shape[:2]
    if tuple(m.shape) != (h, w):
        raise ValueError(f"the mask is {m.shape[1]}x{m.shape[0]} but the photo is {w}x{h}: use a mask of the photo's "
                         "size")
    ys, xs = torch.nonzero(m > 0.5, as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("the mask is empty: paint the region to work on white")
    box = torch.tensor([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
    crop = face_crop(Face(box, torch.zeros(5, 2), 1.0), 0, h, w, options)
    crop = Crop(crop.x, crop.y, crop.side, crop.mask_box, crop.feather, crop.face_index, crop.face_box)
    return Plan(h, w, _resolution(check_resolution(resolution), crop.side), options.mode, (crop,))


def paste_recovered(plan: dict, protected, recovered: torch.Tensor, key: str = "key") -> torch.Tensor:
    """A recovered face-crop key's result: ``recovered`` (one image (R, R, 3) per crop, as (N, R, R, 3)) pasted into
    the ``protected`` photo (an IMAGE of one) where the key's ``plan`` (a Plan's dict) says the crops were cut.
    The key holds nothing of the photo outside the faces, so the protected photo is required."""
    plan = Plan.from_dict(plan)
    if protected is None:
        raise ValueError(f"this {key} was made of face crops of a {plan.width}x{plan.height} photo and holds nothing "
                         "of the photo outside the faces: connect the protected photo ('protected') to paste the "
                         "recovered faces into")
    if not isinstance(protected, torch.Tensor) or protected.dim() != 4 or protected.shape[0] != 1:
        got = tuple(protected.shape) if isinstance(protected, torch.Tensor) else type(protected).__name__
        raise ValueError(f"protected must be the one protected photo this {key} belongs to (an IMAGE of one), got "
                         f"{got}")
    recovered = recovered.reshape(-1, *recovered.shape[-3:])
    return plan.paste(protected[0], [recovered[i:i + 1] for i in range(len(plan.crops))])
