"""One contract for every protection method, and the one pipeline that runs it on photos.

A method is a :class:`Method`: a name, its settings type (a frozen dataclass that validates itself when it is
built, so a run never re-checks it), how many faces it protects at once, and

    run(crops: list[CropJob], models: Models, settings, progress: Progress) -> MethodResult

``crops`` are the chosen faces of one photo, each cut square at the working resolution (:mod:`.pipeline`);
``models`` the ComfyUI objects it uses; ``progress`` receives :class:`~..guidance.progress.Step` s (the one
progress shape). The result holds, per crop, the protected image(s), a JSON-ready report and the key material
where the method has keys (:class:`FaceResult`).

:func:`protect` is the pipeline around every method, what the nodes and the dataset command call:

    detect -> choose faces -> crop -> method.run -> paste back (feathered, at the photo's size) -> receipt

per photo of a batch: a photo that cannot be protected (no face, too small: a ``ValueError``) is reported and the
others still run (:class:`Delivery` ``failures``); when none can, the first error is raised, so a failed run saves
nothing. A *full-size* method (hiding from detectors: it changes the photo at its own size, no crop, no resize)
gets the whole photo as its one crop and returns the plan of the faces it protected, for the receipt.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..guidance.progress import Progress, within
from ..guidance.working_image import check_resolution, single_image
from .pipeline import FULL_SIZE, Crop, Plan, PipelineOptions, plan_photo

log = logging.getLogger("diffprivacy")


@dataclass(frozen=True)
class CropJob:
    """One chosen face of a photo, as a method gets it: the crop at the working resolution and where it was cut."""
    image: torch.Tensor    # (1, R, R, 3) in [0, 1]
    crop: Crop
    photo: int = 0         # the photo's place in its batch
    position: int = 0      # the crop's place among its photo's crops (paste order)

    @property
    def resolution(self) -> int:
        return int(self.image.shape[1])

    def face_mask(self) -> torch.Tensor:
        """(R, R) mask of the face this crop was built around (the method steers that face, not a neighbour)."""
        return self.crop.face_mask(self.resolution)


@dataclass(frozen=True)
class Models:
    """The ComfyUI objects a method may use (each method reads its own; ``extra`` for the rest, by name)."""
    model: Any = None
    clip: Any = None
    vae: Any = None
    clip_vision: Any = None
    face_model: Any = None      # FACE_MODEL: the detector and the recognizer the method is guided by
    adapter: Any = None         # IDENTITY_ADAPTER
    extra: Mapping = field(default_factory=dict)


@dataclass
class FaceResult:
    """What a method made of one crop."""
    images: torch.Tensor            # (k, R, R, 3): the crop's protected image(s), k >= 1
    report: dict = field(default_factory=dict)  # JSON-ready, shown on the node and written into manifests
    key: Any = None                 # key material where the method has keys (Key-E, latents, ...)
    parts: dict = field(default_factory=dict)   # native parts for rewiring (LATENT, SAMPLER, SIGMAS, ...)


@dataclass
class MethodResult:
    """A method's result for one photo: one :class:`FaceResult` per crop, in the crops' order. A full-size method
    sets ``plan`` (the faces it protected, for the receipt) and returns the photo-size images as its one face."""
    faces: list
    plan: Plan | None = None

    @property
    def images(self) -> list[torch.Tensor]:
        return [f.images for f in self.faces]


Run = Callable[[list, Models, Any, Progress], MethodResult]


@dataclass(frozen=True)
class Method:
    """A protection method behind the one contract."""
    name: str
    run: Run
    settings_type: type
    max_faces: int | None = None   # faces protected at once per photo (one: a method moving one face's identity)
    full_size: bool = False        # works on the photo at its own size (no crop, no resize)
    check_models: Callable[[Models, Any], None] | None = None  # refuses unfit models before any photo is run

    def check_settings(self, settings) -> Any:
        if not isinstance(settings, self.settings_type):
            raise TypeError(f"{self.name} runs with {self.settings_type.__name__}, got {type(settings).__name__}")
        return settings


@dataclass
class Delivered:
    """One photo through the pipeline."""
    index: int                      # in the batch
    photo: torch.Tensor             # (H, W, 3) the input
    plan: Plan
    images: torch.Tensor            # (k, H, W, 3) the delivered photo(s), at the photo's size
    result: MethodResult
    receipt: dict
    crops: list = field(default_factory=list)   # the crops the method got, (1, R, R, 3) each


@dataclass
class Delivery:
    """A batch through the pipeline: what was delivered and which photos were not protected (index, why)."""
    delivered: list
    failures: list
    total: int

    @property
    def images(self) -> torch.Tensor:
        return torch.cat([d.images for d in self.delivered])

    @property
    def faces(self) -> list:
        return [f for d in self.delivered for f in d.result.faces]

    @property
    def crops(self) -> list:
        return [c for d in self.delivered for c in d.crops]

    @property
    def receipts(self) -> list:
        return [d.receipt for d in self.delivered]

    def report(self) -> str:
        lines = [f"protected {len(self.delivered)} of {self.total} image(s)"]
        lines += [f"image {i}: not protected: {why}" for i, why in self.failures]
        return "\n".join(lines)


def default_options(method: Method, options: PipelineOptions | None) -> PipelineOptions:
    """The pipeline's options: the given ones, or for a one-face method the largest face, all faces otherwise."""
    if options is None:
        options = PipelineOptions(faces="largest" if method.max_faces == 1 else "all")
    return options.validated()


def plan_for(method: Method, photo: torch.Tensor, face_model, options: PipelineOptions, resolution: int,
             index: int = 0) -> Plan:
    """Where ``method`` will cut ``photo`` (H, W, 3); refuses more chosen faces than the method protects at once."""
    if method.full_size:
        h, w = int(photo.shape[0]), int(photo.shape[1])
        return Plan(h, w, 0, FULL_SIZE, (Crop(0, 0, max(h, w), (0, 0, w, h), 0, -1),))
    plan = plan_photo(photo, face_model, options, resolution, index)
    if method.max_faces is not None and len(plan.crops) > method.max_faces:
        raise ValueError(f"{method.name} protects {method.max_faces} face(s) at a time and {len(plan.crops)} are "
                         "chosen: set the pipeline's faces to largest, or to indices with one index (0 is the largest "
                         "face)")
    return plan


def run_photo(method: Method, photo: torch.Tensor, plan: Plan, models: Models, settings,
              progress: Progress | None = None, index: int = 0) -> tuple[torch.Tensor, MethodResult, list]:
    """``method`` on the crops of one photo, pasted back: (delivered (k, H, W, 3), the method's result, the crops
    it got)."""
    if method.full_size:
        jobs = [CropJob(photo[None], plan.crops[0], index)]
    else:
        jobs = [CropJob(image, crop, index, n) for n, (image, crop) in enumerate(zip(plan.cut(photo), plan.crops))]
    result = method.run(jobs, models, settings, progress)
    if len(result.faces) != len(jobs):
        raise RuntimeError(f"{method.name} returned {len(result.faces)} result(s) for {len(jobs)} crop(s)")
    if method.full_size:
        images = result.faces[0].images
        if tuple(images.shape[1:3]) != tuple(photo.shape[:2]):
            raise RuntimeError(f"{method.name} is a full-size method but returned {tuple(images.shape)} for a "
                               f"{photo.shape[1]}x{photo.shape[0]} photo")
        return images, result, [j.image for j in jobs]
    return plan.paste(photo, result.images), result, [j.image for j in jobs]


@dataclass
class Planned:
    """Where the pipeline will cut each photo of a batch: (index, photo (H, W, 3), plan), and the photos it will not
    protect (index, why)."""
    plans: list
    failures: list
    total: int

    @property
    def crop_count(self) -> int:
        return sum(len(plan.crops) for _, _, plan in self.plans)

    def positions(self) -> list[tuple[int, int]]:
        """(photo index, crop position) of every crop, in batch order (to hand out per-crop inputs: Key-Es)."""
        return [(i, n) for i, _, plan in self.plans for n in range(len(plan.crops))]


def plan_batch(images: torch.Tensor, method: Method, face_model, options: PipelineOptions | None = None,
               resolution: int = 512) -> Planned:
    """Detect, choose and plan the crops of every photo of ``images`` (N, H, W, 3); a photo that cannot be planned
    (no face, too small, too many faces: a ``ValueError``) is recorded as a failure."""
    options = default_options(method, options)
    resolution = check_resolution(resolution)
    count = int(images.shape[0])
    planned = Planned([], [], count)
    for i in range(count):
        try:
            photo = single_image(images[i:i + 1])[0].float()
            planned.plans.append((i, photo, plan_for(method, photo, face_model, options, resolution, i)))
        except ValueError as e:  # NoFaceError is one
            _failed(planned.failures, i, e)
    return planned


def _failed(failures: list, i: int, error: ValueError) -> None:
    failures.append((i, str(error), error))
    log.warning("[Diff-Privacy] image %d of the batch not protected: %s", i, error)


def protect(images: torch.Tensor, method: Method, models: Models, settings, options: PipelineOptions | None = None,
            resolution: int = 512, progress: Progress | None = None, receipt: bool = True,
            planned: Planned | None = None) -> Delivery:
    """Every photo of ``images`` (N, H, W, 3) through the pipeline around ``method``: detect with
    ``models.face_model``, choose and crop the faces (``options``; or the crops already ``planned`` by
    :func:`plan_batch`), run, paste back, and measure the receipt on what is delivered (a recognizer the method was
    not guided by: :func:`.receipt.receipt_for`)."""
    from .receipt import receipt_for

    method.check_settings(settings)
    if method.check_models is not None:  # a missing or unfit model is the run's error, not a photo's
        method.check_models(models, settings)
    options = default_options(method, options)
    planned = planned or plan_batch(images, method, models.face_model, options, resolution)
    failures = list(planned.failures)
    delivered, parts = [], len(planned.plans)
    for n, (i, photo, plan) in enumerate(planned.plans):
        try:
            out, result, cut = run_photo(method, photo, plan, models, settings,
                                    within(progress, n, parts, f"image {i + 1}/{planned.total}" if parts > 1 else ""),
                                    i)
            plan = result.plan or plan
            receipt_dict = (receipt_for(photo, out, plan, options, guided_by=models.face_model, method=method.name)
                            if receipt else {})
            delivered.append(Delivered(i, photo, plan, out, result, receipt_dict, cut))
        except ValueError as e:
            _failed(failures, i, e)
    failures.sort(key=lambda f: f[0])
    if not delivered:
        first_error = failures[0][2]
        if planned.total == 1:
            raise first_error
        report = Delivery([], [f[:2] for f in failures], planned.total).report()
        raise ValueError(f"no image of the batch could be protected. {report}") from first_error
    return Delivery(delivered, [f[:2] for f in failures], planned.total)
