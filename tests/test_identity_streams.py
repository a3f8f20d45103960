"""Identity and style streams (IP-Adapter / FaceID) on the user's checkpoint: file kinds, the attn2 patch on all
cross-attention layers, per-entry switching, the published attention formula, gradients, nodes, bad input, and
the identity-from-donor workflow in a live server. Adapter files are random-weight fixtures with the released
key names (tests/ip_adapter_fixtures.py), scaled to the tiny UNet except in the full-size test."""
from __future__ import annotations

import io
import logging
import math
import types

import pytest
import torch

import ip_adapter_fixtures as fx
from conftest import SHARED, nodes_of
from face_fixtures import small_face_image
from diffprivacy.guidance import identity_streams as ids
from diffprivacy.guidance import ip_adapter as ipa
from diffprivacy.guidance.autograd import gradients_enabled, thaw_inference_tensors

FILES = {"ip-adapter": "ip-adapter_sd15.safetensors", "ip-adapter-plus": "ip-adapter-plus_sd15.safetensors",
         "faceid": "ip-adapter-faceid_sd15.bin", "faceid-plus": "ip-adapter-faceid-plusv2_sd15.bin"}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_path):
    """A private copy of the tiny MODEL (loaded under inference mode, as ComfyUI does), free to thaw."""
    import comfy.sd
    with torch.inference_mode():
        return comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint_path), output_vae=False,
                                                     output_clip=False)[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny, tiny_clip_vision):
    """The four kinds at tiny shapes under their released names, plus the FaceID LoRA and a buffalo_l pack."""
    d = tmp_path_factory.mktemp("ipadapter_files")
    shape = fx.tiny_shape(tiny, tiny_clip_vision)
    out = {kind: fx.write_adapter(d / name, kind, **shape) for kind, name in FILES.items()}
    out["lora"] = fx.write_unet_lora(d / ipa.FACEID_LORAS["faceid"], tiny)
    out["arcface"] = fx.export_arcface_onnx(d / "buffalo_l" / "w600k_r50.onnx")
    out["shape"] = shape
    return out


@pytest.fixture()
def models_dir(tmp_path, files, monkeypatch):
    """folder_paths pointed at temporary ipadapter / loras folders."""
    import folder_paths
    for name in ("ipadapter", "loras"):
        (tmp_path / name).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(tmp_path / name)], {".bin", ".safetensors"}))
    return tmp_path


def _load(files, kind):
    with torch.inference_mode():
        return ipa.load_adapter(files[kind])


def _run(model, x, t, ctx, **extra):
    to = dict(model.model_options["transformer_options"], **extra)
    return model.model.apply_model(x, t, c_crossattn=ctx, transformer_options=to)


def _inputs(seed=0, batch=1, ctx_dim=64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.full((batch,), 3.0),
            torch.randn(batch, 77, ctx_dim, generator=g))


def _identity_stream(adapter, weight=1.0, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=1)
    on, off = ids.identity_tokens(adapter, emb)
    return ids.Stream("identity", adapter, on, off, weight, **kw), emb


# -- files -------------------------------------------------------------------------------------------------------
def test_each_kind_is_recognised_from_its_tensors_not_its_file_name(files, tmp_path):
    shape = files["shape"]
    misnamed = {"faceid": tmp_path / "style.safetensors", "ip-adapter": tmp_path / "faceid.bin",
                "ip-adapter-plus": tmp_path / "ip-adapter_sd15.bin", "faceid-plus": tmp_path / "my-faceid-plus.bin"}
    for kind, path in misnamed.items():
        fx.write_adapter(path, kind, nested=kind != "faceid-plus", **shape)  # .bin: nested groups and flat
        spec = ipa.load_adapter(path).spec
        assert spec.kind == kind
        assert spec.num_tokens == fx.TOKENS[kind] and spec.layer_widths == shape["widths"]
        assert spec.cross_dim == shape["cross_dim"]
        assert spec.lora_in_file == kind.startswith("faceid")


def test_faceid_plus_v1_and_v2_are_told_apart_by_their_released_names_and_an_unnamed_one_is_refused(files, tmp_path):
    """v1 and v2 hold the same tensors (the shortcut is a forward flag), so the version comes from the name."""
    shape = files["shape"]
    for name, version in (("ip-adapter-faceid-plus_sd15.bin", 1), ("ip-adapter-faceid-plusv2_sd15.bin", 2),
                          ("faceid_plus_v2.bin", 2), ("my-faceid-plus.bin", 1)):
        spec = ipa.load_adapter(fx.write_adapter(tmp_path / name, "faceid-plus", **shape)).spec
        assert (spec.kind, spec.extra["version"]) == ("faceid-plus", version), name
    with pytest.raises(ValueError, match=r"same tensors.*ip-adapter-faceid-plus_sd15\.bin \(v1\)"):
        ipa.load_adapter(fx.write_adapter(tmp_path / "plus.bin", "faceid-plus", **shape))


# -- an independent implementation of the published projection modules (tencent-ailab/IP-Adapter: resampler.py,
# ip_adapter.py ImageProjModel, ip_adapter_faceid.py MLPProjModel / ProjPlusModel), written from their structure:
# heads of 64, q and k each scaled by dim_head^-1/4, latents attend to [inputs; latents] --------------------------
class _RefAttention(torch.nn.Module):
    def __init__(self, dim, heads, dim_head=64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = torch.nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        heads = lambda t: t.view(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)  # noqa: E731
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = heads(self.to_q(latents)), heads(k), heads(v)
        scale = self.dim_head ** -0.25
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1)
        return self.to_out((weight @ v).permute(0, 2, 1, 3).reshape(b, n, -1))


class _RefPerceiver(torch.nn.Module):
    def __init__(self, dim, in_dim, out_dim, depth=4, ff_mult=4, num_queries=None):
        super().__init__()
        if num_queries:
            self.latents = torch.nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in, self.proj_out = torch.nn.Linear(in_dim, dim), torch.nn.Linear(dim, out_dim)
        self.norm_out = torch.nn.LayerNorm(out_dim)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList([_RefAttention(dim, dim // 64), torch.nn.Sequential(
            torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim * ff_mult, bias=False), torch.nn.GELU(),
            torch.nn.Linear(dim * ff_mult, dim, bias=False))]) for _ in range(depth))

    def forward(self, x, latents=None):
        latents = self.latents.repeat(x.shape[0], 1, 1) if latents is None else latents
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class _RefMLP(torch.nn.Module):  # MLPProjModel, and the first half of ProjPlusModel
    def __init__(self, c=768, id_dim=512, tokens=4, clip_dim=None):
        super().__init__()
        self.c, self.t = c, tokens
        self.proj = torch.nn.Sequential(torch.nn.Linear(id_dim, 2 * id_dim), torch.nn.GELU(),
                                        torch.nn.Linear(2 * id_dim, c * tokens))
        self.norm = torch.nn.LayerNorm(c)
        if clip_dim:
            self.perceiver_resampler = _RefPerceiver(c, clip_dim, c)

    def forward(self, id_embeds, clip_states=None, shortcut=False, scale=1.0):
        x = self.norm(self.proj(id_embeds).reshape(-1, self.t, self.c))
        if clip_states is None:
            return x
        out = self.perceiver_resampler(clip_states, x)
        return x + scale * out if shortcut else out


class _RefImageProj(torch.nn.Module):
    def __init__(self, c=768, clip_dim=1024, tokens=4):
        super().__init__()
        self.c, self.t = c, tokens
        self.proj, self.norm = torch.nn.Linear(clip_dim, tokens * c), torch.nn.LayerNorm(c)

    def forward(self, embeds):
        return self.norm(self.proj(embeds).reshape(-1, self.t, self.c))


@pytest.mark.parametrize("kind, name", [*FILES.items(), ("faceid-plus", "ip-adapter-faceid-plus_sd15.bin")])
def test_projections_match_an_independent_implementation_of_the_published_modules_on_the_same_weights(kind, name):
    """The released layouts (SD 1.5 shapes, random weights): tokens equal the published modules' outputs."""
    path = fx.cached_sd15_file(kind, name)
    proj_sd = {k[len("image_proj."):]: v.float() for k, v in ipa.read_state_dict(path).items()
               if k.startswith("image_proj.")}
    ref = {"ip-adapter": lambda: _RefImageProj(), "ip-adapter-plus": lambda: _RefPerceiver(768, 1280, 768,
                                                                                           num_queries=16),
           "faceid": lambda: _RefMLP(), "faceid-plus": lambda: _RefMLP(clip_dim=1280)}[kind]()
    ref.load_state_dict(proj_sd, strict=True)
    with torch.inference_mode():
        adapter = ipa.load_adapter(path)
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(2, 512, generator=g)
    states = torch.randn(2, 257, 1280, generator=g)
    with torch.no_grad():
        if kind == "ip-adapter":
            image_embeds = torch.randn(2, 1024, generator=g)
            got, want = adapter.tokens(image_embeds), ref(image_embeds)
        elif kind == "ip-adapter-plus":
            got, want = adapter.tokens(clip_states=states), ref(states)
        elif kind == "faceid":
            got, want = adapter.tokens(emb), ref(emb)
        else:
            v2 = "plusv2" in name
            got, want = adapter.tokens(emb, states, 0.7), ref(emb, states, shortcut=v2, scale=0.7)
            assert adapter.spec.extra["version"] == (2 if v2 else 1)
    assert got.shape == want.shape == (2, fx.TOKENS[kind], 768)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_sd15_files_have_the_released_shapes_and_patch_all_16_layers_of_the_full_size_checkpoint(full_sd15_path):
    """Released layouts (parameter counts of the published models) on the real SD 1.5 UNet shapes."""
    import comfy.sd
    millions = {"ip-adapter": 3.15, "ip-adapter-plus": 29.9, "faceid": 3.68, "faceid-plus": 33.6}
    adapters = {}
    for kind, name in FILES.items():
        path = fx.cached_sd15_file(kind, name)
        with torch.inference_mode():
            adapters[kind] = a = ipa.load_adapter(path)
        assert a.spec.layer_widths == ipa.SD15_LAYER_WIDTHS and a.spec.cross_dim == 768
        n_proj = sum(p.numel() for p in a.image_proj.parameters()) / 1e6
        assert n_proj == pytest.approx(millions[kind], abs=0.05), kind
        assert sum(p.numel() for p in a.ip_adapter.parameters()) / 1e6 == pytest.approx(19.2, abs=0.1)
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(full_sd15_path), output_vae=False, output_clip=False)[0]
        g = torch.Generator().manual_seed(0)
        emb = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=1)
        on, off = ids.identity_tokens(adapters["faceid"], emb)
        s_on = adapters["ip-adapter-plus"].tokens(clip_states=torch.randn(1, 257, 1280, generator=g))
        s_off = adapters["ip-adapter-plus"].tokens(clip_states=torch.zeros(1, 257, 1280))
        patched, ss = ids.apply_identity_streams(model, [
            ids.Stream("identity", adapters["faceid"], on, off),
            ids.Stream("style", adapters["ip-adapter-plus"], s_on, s_off)])
        keys = set(patched.model_options["transformer_options"]["patches_replace"]["attn2"])
        assert len(keys) == 16 and ("middle", 0, 0) in keys
        for kind in ("ip-adapter", "faceid-plus"):  # the other two fit as well
            ids.check_fits(adapters[kind], ss.layers)
        x, t, ctx = _inputs(ctx_dim=768)
        y = _run(patched, x[:, :, :8, :8], t, ctx)
    assert torch.isfinite(y).all() and ss.calls == [1] * 16


# -- the patch ------------------------------------------------------------------------------------------------------
def test_every_cross_attention_layer_fires_including_the_middle_block(tiny, files):
    adapter = _load(files, "faceid")
    layers = ids.cross_attention_layers(tiny)
    assert layers[-1].key == ("middle", 0, 0) and [l.key[0] for l in layers].count("middle") == 1
    x, t, ctx = _inputs()
    with torch.inference_mode():
        plain = _run(tiny, x, t, ctx)
        for i, layer in enumerate(layers):
            only_i = tuple(1.0 if j == i else 0.0 for j in range(len(layers)))
            stream, _ = _identity_stream(adapter, weight=2.0, layer_weights=only_i)
            patched, ss = ids.apply_identity_streams(tiny, [stream])
            y = _run(patched, x, t, ctx)
            assert ss.calls == [1] * len(layers)  # every replacement is called once per UNet pass
            assert (y - plain).abs().max() > 1e-4, f"layer {layer.key} has no effect"


def test_decoupled_attention_matches_the_published_equation_on_one_layer(files, tiny):
    """out = Attn(Q, K, V) + w * lambda_l * Attn(Q, t W'_k^T, t W'_v^T), written here from the paper's Eq. 5."""
    groups = torch.load(str(files["faceid"]), weights_only=True)  # the file's own tensors, not our module's
    adapter = _load(files, "faceid")
    stream, _ = _identity_stream(adapter, weight=0.7, layer_weights=(1, 1, 1.5, 1, 1, 1, 1))
    ss = ids.StreamSet({"identity": stream}, ids.cross_attention_layers(tiny))
    i, heads = 2, 4
    width = ss.layers[i].width
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 24, width, generator=g) for _ in range(3))
    k, v = k[:, :10], v[:, :10]

    def attention(q, k, v):
        b, n, d = q.shape
        split = lambda z: z.reshape(b, z.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        return (w @ split(v)).transpose(1, 2).reshape(b, n, d)

    wk = groups["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"].float()
    wv = groups["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"].float()
    tokens = stream.on.expand(2, -1, -1)
    expected = attention(q, k, v) + 0.7 * 1.5 * attention(q, tokens @ wk.T, tokens @ wv.T)
    with torch.inference_mode():
        got = ids.LayerPatch(ss, i)(q, k, v, {"n_heads": heads, "attn_precision": None, "cond_or_uncond": [0]})
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class _ThreeConds:
    """A guider's view: three conds in one batched calc_cond_batch call (as DIFP's dual CFG needs)."""

    def __init__(self, model, conds, switches=None):
        import comfy.samplers
        outer = self

        class Guider(comfy.samplers.CFGGuider):
            def predict_noise(self, x, timestep, model_options={}, seed=None):
                mo = (model_options if outer.switches is None
                      else ids.with_stream_switches(model_options, outer.switches))
                names = ("c0", "c1", "c2")
                outer.outs = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds[n] for n in names], x,
                                                            timestep, mo)
                outer.x, outer.t = x.clone(), timestep.clone()
                return outer.outs[0]

        self.switches = switches
        self.guider = Guider(model)
        self.guider.inner_set_conds({"c0": conds[0], "c1": conds[1], "c2": conds[2]})

    def run(self, latent):
        import comfy.samplers
        sampler = comfy.samplers.ksampler("euler")
        self.guider.sample(torch.zeros_like(latent), latent, sampler, torch.tensor([3.0, 0.0]), disable_pbar=True,
                           seed=0)
        return self


def test_an_entry_with_a_stream_off_gets_exactly_the_zero_embedding_projection(tiny, files, tiny_clip_vision):
    """(id off, style off), (id on, style off), (id off, style on) in ONE batched UNet call, switched by cond index
    and by per-condition flags in another order; each entry equals a model whose 'off' stream carries the adapter's
    projection of a zero embedding, computed here independently."""
    face, style = _load(files, "faceid"), _load(files, "ip-adapter")
    with torch.inference_mode():
        id_stream, _ = _identity_stream(face, weight=1.5)
        image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
        s_on, s_off = ids.style_tokens(style, tiny_clip_vision, image)
        patched, _ = ids.apply_identity_streams(tiny, [id_stream, ids.Stream("style", style, s_on, s_off, 1.5)])
        g = torch.Generator().manual_seed(4)
        ctx = [torch.randn(1, 77, 64, generator=g) for _ in range(3)]
        conds = [[[c, {}]] for c in ctx]
        latent = torch.randn(1, 4, 16, 16, generator=g)
        by_index = _ThreeConds(patched, conds, {0: (), 1: ("identity",), 2: ("style",)}).run(latent)
        # per-condition flags, in the order stock DualCFGGuider uses (negative, middle, positive), no switches
        flagged = [ids.set_cond_streams(conds[2], False, True), ids.set_cond_streams(conds[0], False, False),
                   ids.set_cond_streams(conds[1], True, False)]
        by_flag = _ThreeConds(patched, flagged).run(latent)

        zero_face = face.image_proj(torch.zeros(1, 512))             # the projection of a zero ArcFace embedding
        zero_style = style.image_proj(torch.zeros(1, style.spec.clip_dim))
        want = {(False, False): (zero_face, zero_style), (True, False): (id_stream.on, zero_style),
                (False, True): (zero_face, s_on)}
        refs = {}
        for key, (id_tokens, style_tokens) in want.items():
            ref_model, _ = ids.apply_identity_streams(tiny, [
                ids.Stream("identity", face, id_tokens, id_tokens, 1.5),
                ids.Stream("style", style, style_tokens, style_tokens, 1.5)])
            refs[key] = [_run(ref_model, by_index.x, by_index.t, c) for c in ctx]
    for j, key in enumerate([(False, False), (True, False), (False, True)]):
        torch.testing.assert_close(by_index.outs[j], refs[key][j], atol=1e-5, rtol=1e-4)
    order = [(False, True), (False, False), (True, False)]
    ctx_of = [2, 0, 1]
    for j, key in enumerate(order):
        torch.testing.assert_close(by_flag.outs[j], refs[key][ctx_of[j]], atol=1e-5, rtol=1e-4)
    assert (by_index.outs[1] - refs[(False, False)][1]).abs().max() > 1e-4  # the switch matters
    with torch.inference_mode():  # and "off" is the zero embedding's term, not a missing term
        assert (_run(tiny, by_index.x, by_index.t, ctx[0]) - by_index.outs[0]).abs().max() > 1e-4


def test_gradient_to_the_identity_embedding_matches_finite_differences(tiny, files):
    """Under ComfyUI's inference mode (weights are inference tensors), after thawing: d loss / d embedding."""
    with torch.inference_mode():
        adapter = _load(files, "faceid")
        stream, emb0 = _identity_stream(adapter, weight=2.0)
        patched, ss = ids.apply_identity_streams(tiny, [stream])
    x, t, ctx = _inputs(seed=7)
    r = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    with gradients_enabled():
        thaw_inference_tensors(tiny.model.diffusion_model)
        ss.thaw()

        def loss(e):
            ss.set_tokens("identity", on=adapter.tokens(e))
            return (_run(patched, x, t, ctx) * r).sum()

        e = emb0.clone().requires_grad_(True)
        loss(e).backward()
        u = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(9)), dim=1)
        h = 1e-2
        with torch.no_grad():
            fd = (loss(emb0 + h * u) - loss(emb0 - h * u)) / (2 * h)
    analytic = (e.grad * u).sum()
    assert abs(float(fd)) > 1e-2  # a derivative worth comparing
    assert float(analytic) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)


# -- nodes -------------------------------------------------------------------------------------------------------------
def test_every_node_input_has_a_tooltip_and_every_node_a_description():
    from diffprivacy.nodes.identity_nodes import NODE_CLASS_MAPPINGS
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("DiffPrivacy") and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        for section in cls.INPUT_TYPES().values():
            for name, spec in section.items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_faceid_with_its_lora_patches_the_clone_and_without_it_runs_with_a_warning(tiny, files, models_dir, caplog):
    import shutil
    from diffprivacy.nodes.identity_nodes import DiffPrivacyApplyIdentityStreams, DiffPrivacyIdentityAdapterLoader
    shutil.copy(files["faceid"], models_dir / "ipadapter" / FILES["faceid"])
    emb = {"embedding": torch.nn.functional.normalize(torch.randn(1, 512), dim=1), "warning": None}
    apply = DiffPrivacyApplyIdentityStreams()
    x, t, ctx = _inputs()
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="diffprivacy"):
        (bare,) = DiffPrivacyIdentityAdapterLoader().load(FILES["faceid"], "auto", 1.0)
        assert bare.lora is None and "quality drops" in caplog.text
        caplog.clear()
        (without,) = apply.apply(tiny, 1.0, 1.0, 0.0, 1.0, identity_adapter=bare, face_embedding=emb)
        assert "quality drops" in caplog.text and not without.patches
        shutil.copy(files["lora"], models_dir / "loras" / ipa.FACEID_LORAS["faceid"])
        (with_lora,) = DiffPrivacyIdentityAdapterLoader().load(FILES["faceid"], "auto", 0.8)
        (patched,) = apply.apply(tiny, 1.0, 1.0, 0.0, 1.0, identity_adapter=with_lora, face_embedding=emb)
        assert len(patched.patches) > 0 and not tiny.patches  # the LoRA goes on the clone only
        assert torch.isfinite(_run(without, x, t, ctx)).all()
    identity_nodes = __import__("diffprivacy.nodes.identity_nodes", fromlist=["x"])
    assert "DiffPrivacyIdentityAdapterLoader" in identity_nodes.NODE_CLASS_MAPPINGS


def test_applying_streams_again_is_idempotent_one_lora_entry_per_weight_and_each_stream_once(tiny, files):
    """Re-applying (e.g. DIFP / FSAP / De-ID / DP render on a MODEL from Apply Identity Streams) replaces: the FaceID
    LoRA's patch entries stay at one per weight key, each stream is present once, and the output equals one
    application of the last streams."""
    import comfy.utils
    from diffprivacy.guidance.identity_streams import faceid_lora_entries
    lora = comfy.utils.load_torch_file(str(files["lora"]))
    x, t, ctx = _inputs()
    with torch.inference_mode():
        adapter = ipa.load_adapter(files["faceid"])
        adapter.lora, adapter.lora_name, adapter.lora_strength = lora, ipa.FACEID_LORAS["faceid"], 1.0
        style = _load(files, "ip-adapter")
        first, _ = _identity_stream(adapter, seed=1)
        second, _ = _identity_stream(adapter, seed=2)
        s_on = style.tokens(torch.randn(1, style.spec.clip_dim, generator=torch.Generator().manual_seed(3)))
        once, _ = ids.apply_identity_streams(tiny, [second])
        twice, ss = ids.apply_identity_streams(ids.apply_identity_streams(tiny, [first])[0], [second])
        thrice, ss3 = ids.apply_identity_streams(twice, [ids.Stream("style", style, s_on, style.off_tokens())])
        per_key = {k: len(v) for k, v in twice.patches.items()}
        assert per_key and set(per_key.values()) == {1}, per_key
        assert faceid_lora_entries(twice) == faceid_lora_entries(once) == {k: 1 for k in once.patches}
        assert set(per_key) == set(once.patches)
        assert {k: len(v) for k, v in thrice.patches.items()} == per_key  # a style stream keeps the one LoRA
        assert sorted(ss.streams) == ["identity"] and sorted(ss3.streams) == ["identity", "style"]
        assert torch.equal(ss.streams["identity"].on, second.on)
        torch.testing.assert_close(_run(twice, x, t, ctx), _run(once, x, t, ctx))
        # a FaceID adapter without its LoRA takes the earlier LoRA off (the identity it belonged to is replaced)
        bare = _load(files, "faceid")
        replaced, _ = ids.apply_identity_streams(twice, [_identity_stream(bare, seed=2)[0]])
        assert not replaced.patches and not tiny.patches


def test_sigma_range_turns_the_streams_off_outside_it(tiny, files):
    adapter = _load(files, "faceid")
    x, t, ctx = _inputs()
    with torch.inference_mode():
        plain = _run(tiny, x, t, ctx)
        stream, _ = _identity_stream(adapter, weight=2.0, sigma_start=2.0, sigma_end=0.5)  # t = 3.0 is outside
        patched, _ = ids.apply_identity_streams(tiny, [stream])
        torch.testing.assert_close(_run(patched, x, t, ctx, sigmas=t), plain)  # samplers pass sigmas this way
        inside = torch.full((1,), 1.0)
        assert (_run(patched, x, inside, ctx, sigmas=inside) - _run(tiny, x, inside, ctx)).abs().max() > 1e-4


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_missing_adapter_names_the_folder_and_the_expected_files(models_dir):
    from diffprivacy.nodes.identity_nodes import DiffPrivacyIdentityAdapterLoader
    with pytest.raises(FileNotFoundError) as e:
        DiffPrivacyIdentityAdapterLoader().load(FILES["faceid"], "auto", 1.0)
    msg = str(e.value)
    assert str(models_dir / "ipadapter") in msg and all(name in msg for name in FILES.values())


class NeedsCode:  # a pickled instance of this class needs code to load
    pass


def test_files_of_other_kinds_say_what_they_are(tmp_path, files, tiny_checkpoint_path):
    sdxl = tmp_path / "ip-adapter_sdxl.safetensors"
    from safetensors.torch import save_file
    save_file(fx.flat(fx.adapter_state_dict("ip-adapter", widths=(16,) * 70, cross_dim=2048, clip_embed=32,
                                            dtype=torch.float32)), str(sdxl))
    with pytest.raises(ValueError, match="SDXL IP-Adapter"):
        ipa.load_adapter(sdxl)
    with pytest.raises(ValueError, match="Stable Diffusion checkpoint .*models/checkpoints"):
        ipa.load_adapter(tiny_checkpoint_path)
    with pytest.raises(ValueError, match="is a LoRA .*models/loras"):
        ipa.load_adapter(files["lora"])
    pickle = tmp_path / "ip-adapter-faceid_sd15.bin"
    torch.save({"image_proj": {"x": NeedsCode()}}, str(pickle))
    with pytest.raises(ValueError, match="needs code to load"):
        ipa.load_adapter(pickle)
    with pytest.raises(ValueError, match="is an IP-Adapter file"):
        ipa.read_lora(files["faceid"])


def test_a_vit_l_clip_vision_is_refused_for_a_vit_h_adapter(tiny_clip_vision):
    import json
    import os
    import comfy.clip_model
    import comfy.ops
    config = json.load(open(os.path.join(os.path.dirname(comfy.clip_model.__file__), "clip_vision_config_vitl.json")))
    vit_l = types.SimpleNamespace(model=comfy.clip_model.CLIPVisionModelProjection(
        config, torch.float32, "meta", comfy.ops.manual_cast))  # the real ViT-L structure, no weights
    with torch.inference_mode():
        adapter = ipa.adapter_from_state_dict(fx.flat(fx.adapter_state_dict(  # ViT-H input, tiny layers
            "ip-adapter", widths=(8,), cross_dim=16, dtype=torch.float32)), "ip-adapter_sd15.safetensors")
    with pytest.raises(ValueError, match="CLIP-ViT-H-14.*ViT-L/14"):
        ids.check_clip_vision(adapter, vit_l)
    with pytest.raises(ValueError, match="CLIP-ViT-H-14"):
        ids.style_tokens(adapter, tiny_clip_vision, torch.rand(1, 32, 32, 3))


@pytest.mark.parametrize("config", ["SDXL", "SD20"])
def test_sdxl_and_sd2_models_are_refused(config, files):
    import comfy.supported_models as sm
    from diffprivacy.nodes.identity_nodes import DiffPrivacyApplyIdentityStreams
    cfg = getattr(sm, config)(dict(getattr(sm, config).unet_config))
    fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=cfg))
    with pytest.raises(ValueError, match="only fit SD 1.5") as e:
        DiffPrivacyApplyIdentityStreams().apply(fake, 1.0, 1.0, 0.0, 1.0, identity_adapter=_load(files, "faceid"),
                                                 face_embedding={"embedding": torch.zeros(1, 512)})
    assert ("SDXL" if config == "SDXL" else "SD 2.x") in str(e.value)


def test_no_face_in_the_donor_photo_raises_the_packs_no_face_error(files):
    from diffprivacy.guidance.face.base import FaceModel, NoFaceError
    from diffprivacy.guidance.face.loader import load_detector, load_recognizer
    from diffprivacy.nodes.identity_nodes import DiffPrivacyFaceEmbedding
    model = FaceModel(load_detector("mtcnn"), load_recognizer("arcface-r50", path=files["arcface"]))
    with torch.inference_mode(), pytest.raises(NoFaceError, match="image 0"):
        DiffPrivacyFaceEmbedding().embed(torch.full((1, 96, 96, 3), 0.5), model, "largest", 0)


# -- live server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(comfy_server, files):
    comfy_server.put_model("ipadapter", FILES["faceid"], files["faceid"])
    comfy_server.put_model("loras", ipa.FACEID_LORAS["faceid"], files["lora"])
    comfy_server.put_model("insightface/models/buffalo_l", "w600k_r50.onnx", files["arcface"])
    donor = SHARED / "data" / "photos" / "biden.jpg"
    if not donor.exists():
        pytest.skip("shared photos are not present")
    small_face_image(donor, 128).save(comfy_server.base / "input" / "donor.png")
    return comfy_server


def _small(api, steps=3):
    for node in nodes_of(api, "KSampler"):
        node["inputs"]["steps"] = steps
    load = [nid for nid, n in api.items() if n["class_type"] == "LoadImage" and n["inputs"]["image"] == "face.png"][0]
    api["9001"] = {"class_type": "ImageScale", "inputs": {"image": [load, 0], "upscale_method": "area",
                                                          "width": 128, "height": 128, "crop": "center"}}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if nid != "9001" and value == [load, 0]:
                node["inputs"][name] = ["9001", 0]
    return api


def test_identity_from_donor_runs_live_and_the_server_survives_a_wrong_adapter_file(served, workflow_api):
    from PIL import Image
    served.put_model("ipadapter", "not-an-adapter.safetensors", served.base / "models" / "loras" /
                     ipa.FACEID_LORAS["faceid"])
    bad = _small(workflow_api("identity-from-donor"))
    nodes_of(bad, "DiffPrivacyIdentityAdapterLoader")[0]["inputs"]["adapter_name"] = "not-an-adapter.safetensors"
    entry = served.run(bad, timeout=300, expect_error=True)
    error = [m for kind, m in entry["status"]["messages"] if kind == "execution_error"][0]
    assert error["node_type"] == "DiffPrivacyIdentityAdapterLoader" and "LoRA" in error["exception_message"]
    assert served.alive()
    entry = served.run(_small(workflow_api("identity-from-donor")), timeout=600)
    images = served.output_images(entry)
    assert images and Image.open(io.BytesIO(images[-1])).size == (128, 128)
