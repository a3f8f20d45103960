"""DIFP's own training (You et al. 2024, Eqs. 9 and 11), adapted to adapters on a frozen SD 1.5 UNet.

The paper trains a conditional UNet eps'(z_t, t, I_id, I_sty) in two stages: stage 1 with full conditions
(L'_sim = E||eps - eps'(z_t, t, I_id, I_sty)||, Eq. 9), stage 2 with "40% of the pixels associated with each
condition randomly replaced" (read here, as in the spec, as each condition dropped to ∅ independently with
p = 0.4; rows with both dropped give Eq. 11's unconditional loss L'_par). Our adaptation learns two decoupled
cross-attention adapters instead (the UNet stays frozen): an identity adapter in IP-Adapter-FaceID's layout
(MLP from the recognizer's embedding to 4 tokens) and a style adapter in IP-Adapter's layout (linear from the
CLIP image embedding to 4 tokens), each with per-layer to_k_ip / to_v_ip initialised from the layer's own
to_k / to_v (as IP-Adapter's training script does). ∅ is the projection of a zero embedding (the streams'
"off"). Files are IP-Adapter-format safetensors (``image_proj.*`` / ``ip_adapter.N.to_{k,v}_ip.weight``) that
:func:`..guidance.ip_adapter.load_adapter` reads.

Paper settings: 12k CelebA-HQ faces, Adam, lr 10^-4.5, weight decay 1e-3, batch 16 (step count unreported): a GPU
job. The loss is the mean squared error (the paper writes the L2 norm).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..guidance.autograd import gradients_enabled, thaw_inference_tensors
from ..guidance.host import check_interrupt as host_check_interrupt
from ..guidance.host import interrupt_exceptions, resident_clone
from ..guidance.identity_streams import COND_KEY, Stream, apply_identity_streams, cross_attention_layers
from ..guidance.ip_adapter import adapter_from_state_dict
from ..guidance.progress import Progress, report
from ..guidance.weights import read_tensor_file

log = logging.getLogger("diffprivacy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class DIFPTrainingOptions:
    steps: int = 2000
    stage1_fraction: float = 0.5
    drop_probability: float = 0.4
    batch_size: int = 16
    learning_rate: float = 10 ** -4.5
    weight_decay: float = 1e-3
    seed: int = 0
    tokens: int = 4
    checkpoint_every: int = 100

    def validated(self) -> "DIFPTrainingOptions":
        for name in ("stage1_fraction", "drop_probability"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        if int(self.steps) < 1 or int(self.batch_size) < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        return self

    @property
    def stage1_steps(self) -> int:
        return int(round(self.stage1_fraction * self.steps))


@dataclass
class DIFPDataset:
    latents: torch.Tensor    # (N, C, h, w) VAE latents
    identity: torch.Tensor   # (N, D) recognizer embeddings
    style: torch.Tensor      # (N, E) CLIP image embeds
    text: torch.Tensor       # (1, 77, C) the (empty) prompt's conditioning


@dataclass
class DIFPTrainingState:
    identity: object           # IdentityAdapter (faceid layout)
    style: object              # IdentityAdapter (ip-adapter layout)
    steps_done: int = 0
    losses: list = field(default_factory=list)
    optimizer: dict | None = None
    interrupted: bool = False


# -- adapters ---------------------------------------------------------------------------------------------------
def _unet_kv(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each cross-attention layer's to_k / to_v weights, in the adapters' layer order."""
    unet = model.model.diffusion_model
    blocks = {"input": unet.input_blocks, "output": unet.output_blocks, "middle": [unet.middle_block]}
    out = []
    for layer in cross_attention_layers(model):
        block, number, ti = layer.key
        from comfy.ldm.modules.attention import SpatialTransformer
        st = next(m for m in blocks[block][number] if isinstance(m, SpatialTransformer))
        attn = st.transformer_blocks[ti].attn2
        out.append((attn.to_k.weight.detach().float().clone(), attn.to_v.weight.detach().float().clone()))
    return out


def new_adapter_state_dict(model, kind: str, in_dim: int, tokens: int = 4, seed: int = 0) -> dict:
    """A fresh IP-Adapter-format state dict (``faceid`` or ``ip-adapter``) for ``model``'s layers."""
    g = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(model)
    c = layers[0].context_dim
    sd = {}
    if kind == "faceid":
        hidden = 2 * in_dim
        sd["image_proj.proj.0.weight"] = torch.randn(hidden, in_dim, generator=g) / math.sqrt(in_dim)
        sd["image_proj.proj.0.bias"] = torch.zeros(hidden)
        sd["image_proj.proj.2.weight"] = torch.randn(tokens * c, hidden, generator=g) / math.sqrt(hidden)
        sd["image_proj.proj.2.bias"] = torch.zeros(tokens * c)
    elif kind == "ip-adapter":
        sd["image_proj.proj.weight"] = torch.randn(tokens * c, in_dim, generator=g) / math.sqrt(in_dim)
        sd["image_proj.proj.bias"] = torch.zeros(tokens * c)
    else:
        raise ValueError(f"DIFP trains 'faceid' and 'ip-adapter' layouts, not {kind!r}")
    sd["image_proj.norm.weight"], sd["image_proj.norm.bias"] = torch.ones(c), torch.zeros(c)
    for i, (k, v) in enumerate(_unet_kv(model)):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = k
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = v
    return sd


def adapter_state_dict(adapter) -> dict:
    """The flat IP-Adapter-format tensors of an adapter (what :func:`save_adapter` writes)."""
    sd = {f"image_proj.{k}": v.detach().float().cpu().contiguous() for k, v in adapter.image_proj.state_dict().items()}
    for i, layer in enumerate(adapter.ip_adapter):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = layer.to_k_ip.weight.detach().float().cpu().contiguous()
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = layer.to_v_ip.weight.detach().float().cpu().contiguous()
    return sd


def save_adapter(adapter, path) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.clone() for k, v in adapter_state_dict(adapter).items()}, str(tmp),
              metadata={"format": "ip-adapter", "trained_by": "diffprivacy DIFP"})
    tmp.replace(path)
    return path


def _fresh(sd: dict, name: str):
    """An adapter whose tensors are normal (not inference) tensors requiring grad."""
    adapter = adapter_from_state_dict({k: v.clone() for k, v in sd.items()}, name)
    for p in adapter.parameters():
        p.requires_grad_(True)
    return adapter.train()


# -- training -----------------------------------------------------------------------------------------------------
def _draw(step: int, options: DIFPTrainingOptions, n: int, num_timesteps: int, latent_shape):
    g = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
    b = options.batch_size
    idx = torch.randint(0, n, (b,), generator=g)
    t = torch.randint(0, num_timesteps, (b,), generator=g)
    noise = torch.randn((b,) + tuple(latent_shape), generator=g)
    keep = torch.rand(b, 2, generator=g) >= options.drop_probability
    if step < options.stage1_steps:
        keep = torch.ones(b, 2, dtype=torch.bool)
    return idx, t, noise, keep.float()


def epsilon_loss(patched, streams, state: DIFPTrainingState, data: DIFPDataset, idx, t, noise, flags):
    """MSE(eps, eps'(z_t, t, I_id or ∅, I_sty or ∅)) with per-row condition flags (1 = on, 0 = ∅)."""
    return F.mse_loss(epsilon_prediction(patched, streams, state, data, idx, t, noise, flags), noise.to(
        data.latents.device))


def epsilon_prediction(patched, streams, state: DIFPTrainingState, data: DIFPDataset, idx, t, noise, flags):
    """eps'(z_t, t, I_id or ∅, I_sty or ∅) per row: a row whose flag is 0 gets that stream's "off" tokens (the
    projection of a zero condition, as IP-Adapter's condition dropout trains it)."""
    model = patched.model
    ms = model.model_sampling
    device = data.latents.device
    sigma = ms.sigma(t.float().to(ms.sigmas.device)).to(device=device, dtype=torch.float32)
    z0 = model.process_latent_in(data.latents[idx])
    x = ms.noise_scaling(sigma, noise.to(device), z0)
    streams.set_tokens("identity", on=state.identity.tokens(data.identity[idx]), off=state.identity.off_tokens())
    streams.set_tokens("style", on=state.style.tokens(data.style[idx]), off=state.style.off_tokens())
    to = dict(patched.model_options.get("transformer_options", {}))
    to[COND_KEY] = flags.to(device)
    denoised = model.apply_model(x, sigma, c_crossattn=data.text.to(device).expand(len(idx), -1, -1),
                                 transformer_options=to)
    return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)


def train_difp_adapters(model_patcher, data: DIFPDataset, options: DIFPTrainingOptions,
                        state: DIFPTrainingState | None = None, *, progress: Progress | None = None,
                        check_interrupt=None, on_checkpoint=None) -> DIFPTrainingState:
    """Train (or continue) both adapters. ``state`` None: fresh adapters for this model. Returns the state
    (adapters, steps done, losses, optimizer state). On interrupt the state so far is checkpointed and re-raised.
    ``progress`` gets a :class:`~..guidance.progress.Step` after every step (``detail["loss"]``: that step's loss)."""
    options = options.validated()
    check_interrupt = check_interrupt or host_check_interrupt
    model_patcher = resident_clone(model_patcher, "the MODEL")
    with gradients_enabled():
        unet = model_patcher.model.diffusion_model
        thaw_inference_tensors(model_patcher.model)
        flags = {n: p.requires_grad for n, p in unet.named_parameters()}
        unet.requires_grad_(False)
        if state is None:
            state = DIFPTrainingState(
                _fresh(new_adapter_state_dict(model_patcher, "faceid", data.identity.shape[1], options.tokens,
                                              options.seed), "difp-identity"),
                _fresh(new_adapter_state_dict(model_patcher, "ip-adapter", data.style.shape[1], options.tokens,
                                              options.seed + 1), "difp-style"))
        else:
            state.identity = _fresh(adapter_state_dict(state.identity), "difp-identity")
            state.style = _fresh(adapter_state_dict(state.style), "difp-style")
        dummy_i, dummy_s = state.identity.off_tokens().detach(), state.style.off_tokens().detach()
        patched, streams = apply_identity_streams(model_patcher, [
            Stream("identity", state.identity, dummy_i, dummy_i), Stream("style", state.style, dummy_s, dummy_s)])
        params = list(state.identity.parameters()) + list(state.style.parameters())
        optimizer = torch.optim.Adam(params, lr=options.learning_rate, weight_decay=options.weight_decay)
        if state.optimizer:  # read under inference mode (a node, or torch.load there): normal copies first
            optimizer.load_state_dict(_normal_tensors(state.optimizer))
        data = DIFPDataset(data.latents.float(), data.identity.float(), data.style.float(), data.text.float())
        try:
            for step in range(state.steps_done, options.steps):
                check_interrupt()
                idx, t, noise, keep = _draw(step, options, data.latents.shape[0], model_patcher.model.model_sampling
                                            .num_timesteps, data.latents.shape[1:])
                loss = epsilon_loss(patched, streams, state, data, idx, t, noise, keep)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"the DIFP adapter loss became {float(loss)} at step {step}; lower the "
                                       "learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state.steps_done = step + 1
                state.losses.append(float(loss.detach()))
                report(progress, state.steps_done, options.steps,
                       f"step {state.steps_done}/{options.steps}, loss {state.losses[-1]:.4f}", loss=state.losses[-1])
                if on_checkpoint is not None and options.checkpoint_every and \
                        state.steps_done % options.checkpoint_every == 0:
                    state.optimizer = optimizer.state_dict()
                    on_checkpoint(state)
        except interrupt_exceptions():
            state.interrupted = True
            state.optimizer = optimizer.state_dict()
            if on_checkpoint is not None:
                on_checkpoint(state)
            raise
        finally:
            for n, p in unet.named_parameters():
                p.requires_grad_(flags.get(n, False))
        state.optimizer = optimizer.state_dict()
    for adapter in (state.identity, state.style):
        adapter.eval().requires_grad_(False)
    return state


def _normal_tensors(obj):
    """``obj`` with every tensor replaced by a normal (non-inference) clone; call inside gradients_enabled()."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _normal_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_normal_tensors(v) for v in obj)
    return obj


# -- files: checkpoints and a folder of faces ------------------------------------------------------------------------
def save_training_state(state: DIFPTrainingState, path) -> Path:
    path = Path(path)
    blob = {"steps_done": state.steps_done, "losses": torch.tensor(state.losses, dtype=torch.float64),
            "optimizer": state.optimizer or {}, "identity": adapter_state_dict(state.identity),
            "style": adapter_state_dict(state.style)}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(blob, str(tmp))
    tmp.replace(path)
    return path


def load_training_state(path) -> DIFPTrainingState:
    blob = read_tensor_file(path, "Expected a DIFP training state written by Train DIFP Adapters.")
    return DIFPTrainingState(adapter_from_state_dict(blob["identity"], "difp-identity"),
                             adapter_from_state_dict(blob["style"], "difp-style"), int(blob["steps_done"]),
                             [float(v) for v in blob["losses"]], blob.get("optimizer") or None)


def folder_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"face folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"face folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def prepare_dataset(vae, clip, clip_vision, face_model, files: list[Path], resolution: int = 512) -> DIFPDataset:
    """Latents, identity embeddings and CLIP image embeds of every photo with a face (others skipped, logged)."""
    import numpy as np
    from PIL import Image

    from ..guidance.face.base import NoFaceError
    from ..guidance.identity_streams import face_identity
    from ..guidance.working_image import resize_for_training
    latents, ids, styles = [], [], []
    for f in files:
        host_check_interrupt()
        image = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0)[None]
        image = resize_for_training(image, resolution)
        try:
            found = face_identity(face_model, image)
        except NoFaceError:
            log.warning("[Diff-Privacy] %s: no face found, skipped", f.name)
            continue
        ids.append(found["embedding"][:1].float())
        styles.append(clip_vision.encode_image(image)["image_embeds"][:1].float().cpu())
        latents.append(vae.encode(image).float().cpu())
    if not latents:
        raise ValueError(f"no face found in any of the {len(files)} image(s)")
    text = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0][0]
    return DIFPDataset(torch.cat(latents), torch.cat(ids), torch.cat(styles), text.float().cpu())


@dataclass
class DIFPTrainingResult:
    identity_file: str
    style_file: str
    state: DIFPTrainingState
    images: int

    def summary(self) -> str:
        last = self.state.losses[-1] if self.state.losses else float("nan")
        return (f"{self.state.steps_done} steps on {self.images} face(s), last loss {last:.4f}: "
                f"{self.identity_file}, {self.style_file}")


def train_from_folder(model, clip, vae, clip_vision, face_model, folder, name: str, options: DIFPTrainingOptions,
                      *, out_dir=None, resume: bool = True, resolution: int = 512, progress: Progress | None = None
                      ) -> DIFPTrainingResult:
    """Node and CLI entry: ``folder`` (relative: under ComfyUI's input folder) -> two adapter files in ``out_dir``
    (default models/ipadapter) named <name>-identity / <name>-style, checkpointing <name>.train.pt."""
    from ..guidance.ip_adapter import register_model_folder
    if not name or any(ch in name for ch in "/\\") or name.startswith("."):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    folder = Path(folder)
    if not folder.is_absolute():
        import folder_paths
        folder = Path(folder_paths.get_input_directory()) / folder
    out = Path(out_dir) if out_dir is not None else Path(register_model_folder()[-1])
    out.mkdir(parents=True, exist_ok=True)
    files = folder_images(folder)
    data = prepare_dataset(vae, clip, clip_vision, face_model, files, resolution)
    ckpt = out / f"{name}.train.pt"
    state = load_training_state(ckpt) if resume and ckpt.exists() else None
    id_path, sty_path = out / f"{name}-identity.safetensors", out / f"{name}-style.safetensors"

    def checkpoint(s):
        save_training_state(s, ckpt)
        save_adapter(s.identity, id_path)
        save_adapter(s.style, sty_path)

    state = train_difp_adapters(model, data, options, state, progress=progress, on_checkpoint=checkpoint)
    checkpoint(state)
    (out / f"{name}.losses.json").write_text(json.dumps(state.losses))
    return DIFPTrainingResult(id_path.name, sty_path.name, state, data.latents.shape[0])
