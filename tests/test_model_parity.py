"""The transformer computes what the official WorldStereo forward computes.

A second, plain implementation of the official forward (camera branch + stitched spatial-stereo memory, as the
release's WorldStereoRefSModel / WanXControlNet / SingleAttentionBlock / WanTransformerSparseSpatialBlock define it)
is written here from the model's state dict with plain torch ops in float64; the model must match it to float
rounding. The invariants of the official memory forward are checked on the model itself with hooks.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from engine.models.loading import build_transformer, load_transformer, save_checkpoint, tiny_transformer_config
from engine.models.transformer import InputError, memory_block
from tiny_model import wake_zero_layers

pytestmark = pytest.mark.usefixtures("one_thread")

B, FR, H, W, R = 2, 3, 4, 6, 2  # latent frames/size; pixels are 8x; R references
TEXT, IMAGE = 512, 5  # the Wan attention splits image/text context at 512 text tokens
MASK_FRAMES = FR  # mask_downsample 1 (the released configs'): one mask frame per keyframe, no padding


# ---------------------------------------------------------------------------------------------- the reference
def _sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's sinusoidal timestep features (cos first), computed in float32 as the official code does."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).double()


def _angles(t, h, w, head_dim: int) -> torch.Tensor:
    """Rotary angle of every channel pair: the head's pairs split over (time, height, width) axes."""
    hw = 2 * (head_dim // 6)
    parts = []
    for pos, dim in ((t, head_dim - 2 * hw), (h, hw), (w, hw)):
        freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        parts.append(pos.double()[..., None] * freqs)
    return torch.cat(parts, dim=-1)  # [..., N, head_dim / 2]


def _grid(frames: torch.Tensor, hp: int, wp: int, w0: int = 0):
    t = frames[:, None, None].expand(-1, hp, wp).reshape(-1)
    h = torch.arange(hp)[None, :, None].expand(len(frames), hp, wp).reshape(-1)
    w = (torch.arange(wp) + w0)[None, None, :].expand(len(frames), hp, wp).reshape(-1)
    return t, h, w


class Reference:
    """The official forward, from a state dict, in float64."""

    def __init__(self, model):
        self.p = {k: v.detach().double() for k, v in model.state_dict().items()}
        c = model.config
        self.heads, self.head_dim, self.eps = c.num_attention_heads, c.attention_head_dim, c.eps
        self.patch = tuple(c.patch_size)
        cn = model.ws_config.controlnet_cfg
        self.cn = cn

    def lin(self, x, name):
        return x @ self.p[name + ".weight"].T + self.p[name + ".bias"]

    @staticmethod
    def ln(x, eps, w=None, b=None):
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        return x * w + b if w is not None else x

    @staticmethod
    def rms(x, w, eps):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    @staticmethod
    def rotate(x, ang):  # x [B, N, heads, d]; ang [N, d/2] or [B, N, d/2]
        cos, sin = torch.cos(ang).unsqueeze(-2), torch.sin(ang).unsqueeze(-2)
        if cos.ndim == 3:
            cos, sin = cos[None], sin[None]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    @staticmethod
    def attend(q, k, v):  # [B, N, heads, d] → [B, N, heads·d]
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v).flatten(2)

    def qkv(self, x, pre, heads, eps):
        split = lambda t: t.unflatten(-1, (heads, -1))  # noqa: E731
        q = self.rms(self.lin(x, pre + ".to_q"), self.p[pre + ".norm_q.weight"], eps)
        k = self.rms(self.lin(x, pre + ".to_k"), self.p[pre + ".norm_k.weight"], eps)
        return split(q), split(k), split(self.lin(x, pre + ".to_v"))

    def patch_tokens(self, x, name):
        return F.conv3d(x, self.p[name + ".weight"], self.p[name + ".bias"], stride=self.patch).flatten(2).transpose(1, 2)

    def camera_codes(self, codes, per_frame):
        x = self.lin(F.silu(self.lin(F.silu(self.lin(codes, "camera_embedding.0")), "camera_embedding.2")),
                     "camera_embedding.4")
        return x.repeat_interleave(per_frame, dim=1)

    def camera_branch(self, kw, temb, ang):
        p, cn = self.p, self.cn
        ci = self.patch_tokens(torch.cat([kw["hidden_states"][:, :20], kw["render_latent"]], 1).double(),
                               "controlnet.controlnet_patch_embedding")
        m = torch.cat([kw["render_mask"], kw["camera_embedding"]], 1).double()
        if cn.mask_downsample > 1:  # the release pads 3 frames in front only then
            m = F.pad(m, (0, 0, 0, 0, 3, 0))
        pre = "controlnet.controlnet_mask_embedding."
        m = F.conv3d(m, p[pre + "mask_proj.0.weight"], p[pre + "mask_proj.0.bias"], stride=(cn.mask_downsample, 8, 8))
        m = F.silu(F.group_norm(m, cn.mid_channels // 8, p[pre + "mask_proj.1.weight"], p[pre + "mask_proj.1.bias"]))
        m = F.conv3d(m, p[pre + "mask_zero_proj.weight"], p[pre + "mask_zero_proj.bias"], stride=self.patch)
        c = ci + m.flatten(2).transpose(1, 2)
        out = []
        for j in range(cn.num_layers):
            pre = f"controlnet.controlnet_blocks.{j}."
            shift, scale, gate = self.lin(F.silu(temb), pre + "norm1.linear")[:, None].chunk(3, -1)
            hdn = self.ln(c, 1e-5, p[pre + "norm1.norm.weight"], p[pre + "norm1.norm.bias"]) * (1 + scale) + shift
            q, k, v = self.qkv(hdn, pre + "self_attn", cn.num_heads, 1e-6)
            c = c + gate * self.lin(self.attend(self.rotate(q, ang), self.rotate(k, ang), v), pre + "self_attn.to_out.0")
            shift, scale, gate = self.lin(F.silu(temb), pre + "norm2.linear")[:, None].chunk(3, -1)
            hdn = self.ln(c, 1e-5, p[pre + "norm2.norm.weight"], p[pre + "norm2.norm.bias"]) * (1 + scale) + shift
            c = c + gate * self.lin(F.gelu(self.lin(hdn, pre + "ffn.0"), approximate="tanh"), pre + "ffn.2")
            out.append(self.lin(c, f"controlnet.proj_out.{j}"))
        return out

    def __call__(self, kw, update_ref: bool):
        p, heads, eps = self.p, self.heads, self.eps
        hs = kw["hidden_states"].double()
        b, _, f, h, w = hs.shape
        hp, wp = h // 2, w // 2
        per = hp * wp
        # embeddings
        temb = self.lin(F.silu(self.lin(_sinusoid(kw["timestep"], p["condition_embedder.time_embedder.linear_1.weight"]
                                                  .shape[1]), "condition_embedder.time_embedder.linear_1")),
                        "condition_embedder.time_embedder.linear_2")
        proj = self.lin(F.silu(temb), "condition_embedder.time_proj").unflatten(1, (6, -1))
        text = self.lin(F.gelu(self.lin(kw["encoder_hidden_states"].double(), "condition_embedder.text_embedder.linear_1"),
                               approximate="tanh"), "condition_embedder.text_embedder.linear_2")
        pre = "condition_embedder.image_embedder."
        img = self.ln(kw["encoder_hidden_states_image"].double(), 1e-5, p[pre + "norm1.weight"], p[pre + "norm1.bias"])
        img = self.lin(F.gelu(self.lin(img, pre + "ff.net.0.proj")), pre + "ff.net.2")
        img = self.ln(img, 1e-5, p[pre + "norm2.weight"], p[pre + "norm2.bias"])
        x = self.patch_tokens(hs, "patch_embedding") + self.camera_codes(kw["camera_qt"].double(), per)
        ref0 = self.patch_tokens(torch.cat([kw["reference_latent"], torch.ones_like(kw["reference_latent"][:, :4]),
                                            kw["reference_latent"]], 1).double(), "patch_embedding")
        ref0 = ref0 + self.camera_codes(kw["camera_qt_ref"].double(), per)
        ang_x = _angles(*_grid(torch.arange(f), hp, wp), self.head_dim)
        ang_r = _angles(*_grid(kw["ref_index"] + 1, hp, wp, wp), self.head_dim)
        residuals = self.camera_branch(kw, temb, _angles(*_grid(torch.arange(f), hp, wp),
                                                         self.cn.dim // self.cn.num_heads))
        ref = ref0
        for i in range(len([k for k in p if k.endswith(".scale_shift_table") and k.startswith("blocks.")])):
            pre = f"blocks.{i}."
            sh, sc, g, csh, csc, cg = (p[pre + "scale_shift_table"] + proj).chunk(6, dim=1)
            nx, nr = self.ln(x, eps) * (1 + sc) + sh, self.ln(ref, eps) * (1 + sc) + sh
            qx, kx, vx = self.qkv(nx, pre + "attn1", heads, eps)
            qr, kr, vr = self.qkv(nr, pre + "attn1", heads, eps)
            qx, kx, qr, kr = self.rotate(qx, ang_x), self.rotate(kx, ang_x), self.rotate(qr, ang_r), self.rotate(kr, ang_r)
            k, v = torch.cat([kr, kx], 1), torch.cat([vr, vx], 1)
            x = x + self.lin(self.attend(qx, k, v), pre + "attn1.to_out.0") * g
            ref = ref + self.lin(self.attend(qr, k, v), pre + "attn1.to_out.0") * g
            # cross-attention: target tokens only, text and image context
            nx = self.ln(x, eps, p[pre + "norm2.weight"], p[pre + "norm2.bias"])
            q = self.rms(self.lin(nx, pre + "attn2.to_q"), p[pre + "attn2.norm_q.weight"], eps).unflatten(-1, (heads, -1))
            kt = self.rms(self.lin(text, pre + "attn2.to_k"), p[pre + "attn2.norm_k.weight"], eps).unflatten(-1, (heads, -1))
            vt = self.lin(text, pre + "attn2.to_v").unflatten(-1, (heads, -1))
            ki = self.rms(self.lin(img, pre + "attn2.add_k_proj"), p[pre + "attn2.norm_added_k.weight"], eps)
            vi = self.lin(img, pre + "attn2.add_v_proj").unflatten(-1, (heads, -1))
            x = x + self.lin(self.attend(q, kt, vt) + self.attend(q, ki.unflatten(-1, (heads, -1)), vi),
                             pre + "attn2.to_out.0")
            ffn = lambda t: self.lin(F.gelu(self.lin(t, pre + "ffn.net.0.proj"), approximate="tanh"),  # noqa: E731
                                     pre + "ffn.net.2")
            x = x + ffn(self.ln(x, eps) * (1 + csc) + csh) * cg
            ref = ref + ffn(self.ln(ref, eps) * (1 + csc) + csh) * cg
            if not update_ref:
                ref = ref0
            if i < len(residuals):
                x = x + residuals[i]
        shift, scale = (p["scale_shift_table"] + temb[:, None]).chunk(2, dim=1)
        x = self.lin(self.ln(x, eps) * (1 + scale) + shift, "proj_out")
        x = x.reshape(b, f, hp, wp, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ---------------------------------------------------------------------------------------------- fixtures
def _randomised(variant="worldstereo-memory", update_ref=False, seed=0):
    """The tiny model with every parameter random, the zero-initialised ones included (so each path matters)."""
    cfg, base = tiny_transformer_config(variant)
    cfg.controlnet_cfg.update_ref = update_ref
    return wake_zero_layers(build_transformer(cfg, base, seed=seed), seed=seed + 1, scale=0.3)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, 36, FR, H, W, generator=g), timestep=torch.tensor([321.0, 654.0]),
                encoder_hidden_states=torch.randn(B, TEXT, 32, generator=g),
                encoder_hidden_states_image=torch.randn(B, IMAGE, 24, generator=g),
                render_latent=torch.randn(B, 16, FR, H, W, generator=g),
                render_mask=(torch.rand(B, 1, MASK_FRAMES, 8 * H, 8 * W, generator=g) > 0.4).float(),
                camera_embedding=torch.randn(B, 6, MASK_FRAMES, 8 * H, 8 * W, generator=g),
                camera_qt=torch.randn(B, FR, 7, generator=g), reference_latent=torch.randn(B, 16, R, H, W, generator=g),
                ref_index=torch.tensor([1, 0]), camera_qt_ref=torch.randn(B, R, 7, generator=g))


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("update_ref", [False, True])
def test_memory_forward_matches_a_float64_reimplementation_of_the_official_one(update_ref):
    model = _randomised(update_ref=update_ref)
    kw = _inputs()
    ref = Reference(model)(kw, update_ref)
    with torch.no_grad():
        got32 = model(**kw)
        got64 = model.double()(**{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()})
    err32, err64, rounding = _rel(got32, ref), _rel(got64, ref), _rel(got32, got64)
    print(f"update_ref={update_ref}: relative error float32 {err32:.1e}, float64 {err64:.1e}; "
          f"float32 rounding alone {rounding:.1e}")
    # Measured: float32 1.1e-6, float64 1.6e-7, float32 vs float64 model 1.1e-6. In float64 the model still runs
    # diffusers' FP32LayerNorms in float32 (so does the official code), which bounds err64.
    assert err64 < 1e-6
    assert err32 < 3 * rounding + 1e-7  # at the float32 rounding level of this very model
    # the other setting is a different function, a thousand times more than rounding apart
    assert _rel(Reference(model)(kw, not update_ref), ref) > 1e3 * rounding


# ---------------------------------------------------------------------------------------------- invariants
@pytest.fixture(scope="module")
def memory_model():
    return _randomised()


def test_reference_tokens_never_enter_cross_attention(memory_model):
    kw = _inputs(1)
    seen = []
    hooks = [b.attn2.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for b in memory_model.blocks]
    self_seen = []
    hooks += [b.attn1.register_forward_pre_hook(lambda m, args: self_seen.append(args[0].shape[1]))
              for b in memory_model.blocks]
    with torch.no_grad():
        memory_model(**kw)
    for hk in hooks:
        hk.remove()
    n_target, n_ref = FR * (H // 2) * (W // 2), R * (H // 2) * (W // 2)
    assert seen == [n_target] * len(memory_model.blocks)  # cross-attention: exactly the target tokens
    assert self_seen == [n_ref + n_target] * len(memory_model.blocks)  # self-attention: references joined


def test_ref_index_embedding_has_no_effect(memory_model):
    kw = _inputs(2)
    with torch.no_grad():
        before = memory_model(**kw)
        saved = memory_model.ref_index_embedding.weight.clone()
        memory_model.ref_index_embedding.weight.normal_(0, 5.0)
        after = memory_model(**kw)
        memory_model.ref_index_embedding.weight.copy_(saved)
    assert torch.equal(before, after)


def _reference_rows_fed_to_blocks(model, kw):
    """For every block, the reference rows of the joint sequence entering its norm1 (the block's input)."""
    rows = []
    hooks = [b.norm1.register_forward_pre_hook(lambda m, args: rows.append(args[0][:, : R * (H // 2) * (W // 2)]))
             for b in model.blocks]
    with torch.no_grad():
        model(**kw)
    for hk in hooks:
        hk.remove()
    return rows


def test_update_ref_false_feeds_every_block_the_original_reference_tokens(memory_model):
    kw = _inputs(3)
    assert memory_model.ws_config.controlnet_cfg.update_ref is False
    rows = _reference_rows_fed_to_blocks(memory_model, kw)
    with torch.no_grad():
        original, _ = memory_model.reference_tokens(kw["reference_latent"], kw["ref_index"], kw["camera_qt_ref"])
    assert len(rows) == len(memory_model.blocks)
    for r in rows:
        assert torch.equal(r, original.float())


def test_update_ref_true_feeds_each_block_the_previous_blocks_reference_output():
    model = _randomised(update_ref=True, seed=4)
    kw = _inputs(4)
    rows = _reference_rows_fed_to_blocks(model, kw)
    with torch.no_grad():
        original, ref_rot = model.reference_tokens(kw["reference_latent"], kw["ref_index"], kw["camera_qt_ref"])
        e = model.embed(kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"],
                        kw["encoder_hidden_states_image"], kw["camera_qt"])
        rotary = tuple(torch.cat([r.to(t.dtype), t.expand(r.shape[0], -1, -1, -1)], 1) for r, t in zip(ref_rot, e.rotary))
        _, ref_after_block0 = memory_block(model.blocks[0], e.tokens, original, e.context, e.timestep_proj, rotary)
    assert torch.equal(rows[0], original)
    assert torch.allclose(rows[1], ref_after_block0, rtol=0, atol=1e-6)
    assert (rows[1] - original).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- camera variant
def test_camera_config_with_memory_flags_loads_strictly_and_ignores_camera_codes(examples, tmp_path):
    official = json.loads((examples.parent / "reference/official_state_dict_tiny.json").read_text())
    cfg, base = tiny_transformer_config("worldstereo-camera")
    cfg.controlnet_cfg.ref_embedding = cfg.controlnet_cfg.main_camera_embedding = True  # as the official json has
    cfg.controlnet_cfg.mask_downsample = official["controlnet_cfg"]["mask_downsample"]  # the official tiny build's
    got = {k: list(v.shape) for k, v in build_transformer(cfg, base, seed=5).state_dict().items()}
    assert got == official["state_dict"]["worldstereo-camera"]
    cfg.controlnet_cfg.mask_downsample = 1  # the released configs' value, the one the inputs below fit
    model = build_transformer(cfg, base, seed=5)
    # a camera package whose config carries the flags and no variant key loads strictly from its variant folder
    folder = tmp_path / "worldstereo-camera"
    cfg.variant = None
    save_checkpoint(model, cfg, folder, base_transformer_config=base)
    assert "variant" not in json.loads((folder / "config.json").read_text())
    loaded = load_transformer(folder)
    assert loaded.camera_embedding is None and loaded.ref_index_embedding is None
    kw = _inputs(5)
    with torch.no_grad():
        a = loaded(**{k: v for k, v in kw.items() if "ref" not in k})
        b = loaded(**{**{k: v for k, v in kw.items() if "ref" not in k}, "camera_qt": kw["camera_qt"] + 3.0})
        c = loaded(**{k: v for k, v in kw.items() if "ref" not in k and k != "camera_qt"})
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(InputError, match="not trained with references"):
        loaded(**kw)
