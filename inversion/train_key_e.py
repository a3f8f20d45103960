"""Stage I of Diff-Privacy: learn the MSI, and with it Key-E = {C^0..C^9}, for one image.

Loss (paper Eq. 7):  L = || eps - eps_theta(z_t, t, C^{t//100}) ||^2,  t ~ U{0..T-1},
z_0 from the user's VAE, C^i = CLIP-text("*" with the MSI's vector for stage i). Only the MSI
is trained; UNet, VAE, CLIP text and CLIP vision are frozen.

ComfyUI samples in the variance-exploding form x = z_0 + sigma_t * eps (see guidance/ddim.py);
``apply_model(x, sigma)`` feeds the UNet z_t = x / sqrt(1 + sigma^2) (the paper's z_t, Eq. 1) at
the integer timestep t and returns x0_hat, so eps_theta = (x - x0_hat) / sigma exactly.

Speed (all optional; ``reference`` options reproduce the authors' loop): the latents and CLIP
features of the image and of its mirror image are computed once; ``timesteps_per_step`` > 1
averages the loss over several (t, eps, flip) draws in one batched UNet call; bf16 autocast;
a warm-up + cosine learning-rate schedule.

Interruption: ComfyUI's interrupt exception is caught, the MSI weights with the best smoothed
loss so far are restored, the ``on_checkpoint`` callback writes them, and the exception is
re-raised. A run resumes from a saved state (weights, steps done, loss curve; the optimiser's
moments are not kept and restart from zero).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..guidance.autograd import gradients_enabled, thaw_inference_tensors
from ..guidance.host import interrupt_exceptions, resident_clone
from ..guidance.progress import Progress, report
from ..guidance.working_image import resize_for_training
from .clip_features import DEFAULT_LAYERS, clip_layer_features, parse_layers, vision_width
from ..guidance.schedule import NUM_STAGES, stage_of
from .msi import VARIANT_MULTI_SCALE, VARIANT_ONE_EMBEDDING, MSI
from .text_injection import PLACEHOLDER, PseudoTokenEncoder

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


@dataclass
class KeyETrainingOptions:
    steps: int = 6100                # reference max_steps
    learning_rate: float = 1e-4      # reference code (the paper states 1e-3)
    weight_decay: float = 0.01       # torch AdamW default, as the reference
    seed: int = 23                   # reference seed
    timesteps_per_step: int = 1      # reference: batch 1
    random_flip: bool = True         # reference: RandomHorizontalFlip(0.5)
    lr_schedule: str = "constant"    # reference: no scheduler
    warmup_steps: int = 0
    precision: str = "fp32"          # reference: fp32
    variant: str = VARIANT_MULTI_SCALE
    layers: tuple = DEFAULT_LAYERS
    prompt: str = PLACEHOLDER
    resolution: int = 512            # reference: bicubic squash to 512x512; 0 keeps the image size
    checkpoint_every: int = 0        # call on_checkpoint every N steps (0: only at the end / on interrupt)
    loss_smoothing: float = 0.98     # EMA of the loss used to pick the best weights on interrupt

    def validated(self) -> "KeyETrainingOptions":
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.timesteps_per_step < 1:
            raise ValueError(f"timesteps_per_step must be at least 1, got {self.timesteps_per_step}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.resolution and (self.resolution < 64 or self.resolution % 8):
            raise ValueError(f"resolution must be 0 or a multiple of 8 of at least 64, got {self.resolution}")
        self.layers = parse_layers(self.layers)
        if self.variant == VARIANT_ONE_EMBEDDING:
            self.layers = self.layers[-1:]  # Ours-OE reads the last layer only
        elif self.variant != VARIANT_MULTI_SCALE:
            raise ValueError(f"unknown variant {self.variant!r}")
        return self

    def as_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


@dataclass
class TrainingImage:
    """What the loop needs from the image, computed once: latents and CLIP features, [plain, mirrored]."""
    latents: torch.Tensor   # [F, C, h, w] in the model's latent space (process_latent_in applied)
    features: torch.Tensor  # [F, L, D]


@dataclass
class KeyETrainingState:
    msi: MSI
    steps_done: int = 0
    losses: list = field(default_factory=list)
    best_smoothed_loss: float = math.inf
    interrupted: bool = False


@torch.no_grad()
def prepare_training_image(model_patcher, vae, clip_vision, image: torch.Tensor,
                           options: KeyETrainingOptions) -> TrainingImage:
    """Encode the first image of the batch (and its mirror image when flips are on) once."""
    img = resize_for_training(image[:1], options.resolution)
    if options.random_flip:
        img = torch.cat([img, img.flip(2)])
    latents = model_patcher.model.process_latent_in(vae.encode(img).float())
    features = clip_layer_features(clip_vision, img, options.layers)
    return TrainingImage(latents=latents, features=features)


def new_msi(clip_vision, encoder: PseudoTokenEncoder, options: KeyETrainingOptions) -> MSI:
    """A freshly initialised MSI (seeded by the caller)."""
    return MSI(vision_width(clip_vision), encoder.width, options.layers, variant=options.variant)


@torch.no_grad()
def compute_key_e(msi: MSI, features: torch.Tensor, encoder: PseudoTokenEncoder):
    """Key-E: the ten stage conditionings C^0..C^9 of the (unmirrored) image, dropout off."""
    was_training = msi.training
    msi.eval()
    try:
        feats = features[:1].expand(NUM_STAGES, -1, -1)
        vectors = msi(feats, torch.arange(NUM_STAGES, device=feats.device))
        cond, pooled = encoder.encode(vectors)
    finally:
        msi.train(was_training)
    return cond.float().cpu(), (pooled.float().cpu() if pooled is not None else None)


def learning_rate_at(step: int, options: KeyETrainingOptions) -> float:
    base = options.learning_rate
    if options.warmup_steps and step < options.warmup_steps:
        return base * (step + 1) / options.warmup_steps
    if options.lr_schedule == "cosine":
        span = max(1, options.steps - options.warmup_steps)
        progress = min(1.0, (step - options.warmup_steps) / span)
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base


def epsilon_loss(model, msi, encoder, data: TrainingImage, t, flip_index, noise, autocast_dtype=None):
    """|| eps - eps_theta(z_t, t, C^{t//100}) ||^2 for a batch of draws (mean over elements)."""
    ms = model.model_sampling
    device = data.latents.device
    z0 = data.latents[flip_index]
    sigma = ms.sigma(t).to(device=device, dtype=torch.float32)
    x = ms.noise_scaling(sigma, noise, z0)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        vectors = msi(data.features[flip_index], stage_of(t, ms.num_timesteps).to(device))
        cond, _ = encoder.encode(vectors, prepare=False)
        denoised = model.apply_model(x, sigma, c_crossattn=cond)
    eps_pred = (x - denoised.float()) / sigma.view(-1, 1, 1, 1)
    return F.mse_loss(eps_pred, noise)


def _draw(step: int, options: KeyETrainingOptions, num_timesteps: int, latent_shape, device):
    """The step's random draws from a generator keyed by (seed, step), so a resumed run continues identically."""
    g = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
    k = options.timesteps_per_step
    t = torch.randint(0, num_timesteps, (k,), generator=g)
    flip = (torch.rand(k, generator=g) < 0.5).long() if options.random_flip else torch.zeros(k, dtype=torch.long)
    noise = torch.randn((k,) + tuple(latent_shape), generator=g)
    return t.to(device), flip.to(device), noise.to(device)


def train_key_e(model_patcher, clip, vae, clip_vision, image: torch.Tensor, options: KeyETrainingOptions, *,
                state: KeyETrainingState | None = None, progress: Progress | None = None, check_interrupt=None,
                on_checkpoint=None):
    """Train (or continue training) the MSI for one image. Returns (state, key_e_cond, key_e_pooled, encoder).

    ``progress`` gets a :class:`~..guidance.progress.Step` after every step (``detail["loss"]``: that step's
    loss); ``check_interrupt()`` may raise ComfyUI's
    interrupt exception; ``on_checkpoint(state, cond, pooled)`` is called every
    ``checkpoint_every`` steps, at the end, and on interrupt (with the best weights) before re-raising.
    Runs under ComfyUI's inference mode: autograd is switched on inside, and the frozen models'
    inference-tensor weights are replaced by equal normal tensors (values unchanged).
    """
    import comfy.model_management

    options = options.validated()
    # Back-propagation needs weights that stay put: newer ComfyUI streams them ("dynamic VRAM") unless asked not to.
    model_patcher, clip = resident_clone(model_patcher, "the MODEL"), resident_clone(clip, "the CLIP")
    encoder = PseudoTokenEncoder(clip, options.prompt)
    model = model_patcher.model
    if getattr(model.model_sampling, "num_timesteps", None) is None or not hasattr(model.model_sampling, "sigma"):
        raise ValueError("Key-E learning needs a discrete-timestep model (SD 1.x); this MODEL has no DDPM timesteps")
    context_dim = getattr(model, "model_config", None) and model.model_config.unet_config.get("context_dim")
    if context_dim and context_dim != encoder.width:
        raise ValueError(f"the CLIP's width ({encoder.width}) does not match the MODEL's cross-attention width "
                         f"({context_dim}): use the CLIP of the same SD 1.x checkpoint")

    prepared = prepare_training_image(model_patcher, vae, clip_vision, image, options)
    device = model_patcher.load_device
    comfy.model_management.load_models_gpu([model_patcher, clip.patcher], force_full_load=True)
    encoder.prepare()
    requires_grad = {id(m): {n: p.requires_grad for n, p in m.named_parameters()}
                     for m in (model, clip.cond_stage_model)}
    devices = [device] if device.type == "cuda" else []
    with gradients_enabled(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(options.seed)
        data = TrainingImage(latents=prepared.latents.to(device).clone(), features=prepared.features.to(device).clone())
        if state is None:
            state = KeyETrainingState(msi=new_msi(clip_vision, encoder, options))
        else:  # weights read under inference mode are inference tensors: rebuild them as normal ones
            fresh = MSI.from_config(state.msi.config())
            fresh.load_state_dict({k: v.clone() for k, v in state.msi.state_dict().items()})
            state.msi = fresh
        msi = state.msi = state.msi.to(device=device, dtype=torch.float32)
        _check_compatible(msi, options, data, encoder)
        if state.steps_done >= options.steps:
            cond, pooled = compute_key_e(msi, data.features, encoder)
            return state, cond, pooled, encoder
        torch.manual_seed(options.seed + state.steps_done)  # dropout draws, reproducible across resumes
        try:
            cond, pooled = _optimise(model, clip, msi, encoder, data, options, state, progress, check_interrupt,
                                     on_checkpoint)
        finally:
            for m in (model, clip.cond_stage_model):
                flags = requires_grad[id(m)]
                for n, p in m.named_parameters():
                    p.requires_grad_(flags.get(n, p.requires_grad))
            msi.eval()
    if on_checkpoint is not None:
        on_checkpoint(state, cond, pooled)
    return state, cond, pooled, encoder


def _check_compatible(msi: MSI, options: KeyETrainingOptions, data: TrainingImage, encoder: PseudoTokenEncoder):
    if tuple(msi.layers) != tuple(options.layers) or msi.variant != options.variant:
        raise ValueError(f"the saved MSI reads layers {msi.layers} ({msi.variant}); the options ask for "
                         f"{options.layers} ({options.variant})")
    if msi.feature_dim != data.features.shape[-1] or msi.token_dim != encoder.width:
        raise ValueError(f"the saved MSI maps {msi.feature_dim}-wide CLIP-vision features to {msi.token_dim}-wide "
                         f"tokens; these models give {data.features.shape[-1]} and {encoder.width}")


def unet_compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI's UNet actually computes in (its weights', or the manual-cast dtype)."""
    return getattr(model, "manual_cast_dtype", None) or model.get_dtype()


def _optimise(model, clip, msi, encoder, data, options, state, progress, check_interrupt, on_checkpoint):
    """The training loop proper (inside gradients_enabled). Returns the final Key-E."""
    for m in (model, clip.cond_stage_model):
        m.requires_grad_(False)
    thaw_inference_tensors(model)
    thaw_inference_tensors(clip.cond_stage_model)
    msi.train()
    state.interrupted = False
    optimizer = torch.optim.AdamW(msi.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    autocast_dtype = torch.bfloat16 if options.precision == "bf16" else None
    # ComfyUI runs an SD 1.5 UNet in fp16 on most GPUs whatever we ask: the loss gradient
    # (2(eps_hat - eps)/N per element) then falls into fp16's subnormal range and the MSI's
    # gradients come out quantised or zero. Scale the loss, as mixed-precision training does.
    scaler = torch.amp.GradScaler(data.latents.device.type, enabled=unet_compute_dtype(model) == torch.float16
                                  and autocast_dtype is None)
    best = {k: v.detach().clone() for k, v in msi.state_dict().items()}
    smoothed = None
    try:
        for step in range(state.steps_done, options.steps):
            if check_interrupt is not None:
                check_interrupt()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, options)
            t, flip, noise = _draw(step, options, model.model_sampling.num_timesteps, data.latents.shape[1:],
                                   data.latents.device)
            loss = epsilon_loss(model, msi, encoder, data, t, flip, noise, autocast_dtype)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the Key-E loss became {loss.item()} at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

            value = float(loss.detach())
            state.losses.append(value)
            state.steps_done = step + 1
            a = options.loss_smoothing
            smoothed = value if smoothed is None else a * smoothed + (1 - a) * value
            if smoothed < state.best_smoothed_loss:
                state.best_smoothed_loss = smoothed
                best = {k: v.detach().clone() for k, v in msi.state_dict().items()}
            report(progress, state.steps_done, options.steps,
                   f"step {state.steps_done}/{options.steps}  loss {value:.4f}", loss=value)
            if (on_checkpoint is not None and options.checkpoint_every
                    and state.steps_done % options.checkpoint_every == 0 and state.steps_done < options.steps):
                on_checkpoint(state, *compute_key_e(msi, data.features, encoder))
    except interrupt_exceptions():
        state.interrupted = True
        msi.load_state_dict(best)
        if on_checkpoint is not None:
            on_checkpoint(state, *compute_key_e(msi, data.features, encoder))
        raise
    return compute_key_e(msi, data.features, encoder)
