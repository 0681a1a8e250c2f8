"""Weight names: the original single-file layout and its diffusers view, generated from the arch.

The original LDM layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
what civitai / A1111 / MindONE checkpoints speak) is canonical. A diffusers folder is a view of it:
`iter_entries(arch)` walks the architecture the way LDM builds it and yields one `Entry` per
(original tensor, diffusers tensor) pair, so tiny and full-size models share the same rules and
nothing depends on fixed full-size name lists. Everything else here (shapes, configs, both
conversion directions) is derived from those entries.

numpy only: the diffusers / transformers config dicts are plain kwargs, built without importing them.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np

from common.arch import ModelArch, UNetArch, VAEArch
from common.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."     # SD1: HF CLIP inside LDM
OPENCLIP_PREFIX = "cond_stage_model.model."                   # SD2: OpenCLIP
HF_TEXT_PREFIX = "text_model."                                # diffusers text_encoder files

PARTS = ("unet", "vae", "text_encoder")
_PART_PREFIX = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}

# Buffers LDM stores next to the weights; they are recomputed from the schedule, never converted.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights"})

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Entry:
    """One original tensor (or one slice of it) and where it lives in the diffusers view.

    transform: how the original tensor becomes the diffusers one:
      ""          identical
      "squeeze"   1x1 conv kernel [o, i, 1, 1] -> linear [o, i] (VAE mid attention)
      "part{i}/{n}"  rows i*R/n:(i+1)*R/n of a fused tensor (OpenCLIP in_proj -> q, k, v);
                  the n entries of one original tensor together invert it.
    """
    ldm: str                # full original name
    shape: Shape            # original shape
    part: str               # "unet" | "vae" | "text_encoder"
    component: str          # diffusers component: a part, or "extras" (kept under `ldm`)
    name: str               # name inside `component`
    transform: str = ""
    optional: bool = False  # may be absent from a checkpoint (not used by SD at all)


# --------------------------------------------------------------------------- transforms

def _part_index(transform: str) -> Tuple[int, int]:
    i, n = transform[len("part"):].split("/")
    return int(i), int(n)


def target_shape(shape: Shape, transform: str) -> Shape:
    """Shape of the diffusers tensor made from an original tensor of `shape`."""
    if transform == "squeeze":
        return tuple(shape[:2])
    if transform.startswith("part"):
        _, n = _part_index(transform)
        return (shape[0] // n,) + tuple(shape[1:])
    return tuple(shape)


def _forward(x: np.ndarray, e: Entry) -> np.ndarray:
    if e.transform == "squeeze":
        return x.reshape(x.shape[:2])
    if e.transform.startswith("part"):
        i, n = _part_index(e.transform)
        rows = x.shape[0] // n
        return x[i * rows:(i + 1) * rows]
    return x


def _inverse(group: List[Tuple[Entry, np.ndarray]]) -> np.ndarray:
    """Rebuild one original tensor from the diffusers tensor(s) its entries produced."""
    e, x = group[0]
    if e.transform.startswith("part"):
        group = sorted(group, key=lambda ex: _part_index(ex[0].transform)[0])
        return np.concatenate([x for _, x in group], axis=0)
    if e.transform == "squeeze":
        return x.reshape(e.shape)
    return x


# --------------------------------------------------------------------------- raw layouts
# Each helper yields (original suffix, diffusers suffix, original shape, transform).

def _wb(l: str, d: str, w_shape: Shape, bias: bool = True, tf: str = ""):
    yield f"{l}.weight", f"{d}.weight", tuple(w_shape), tf
    if bias:
        yield f"{l}.bias", f"{d}.bias", (w_shape[0],), ""


def _norm(l, d, c):
    return _wb(l, d, (c,))


def _conv(l, d, cout, cin, k, tf=""):
    return _wb(l, d, (cout, cin, k, k), tf=tf)


def _linear(l, d, cout, cin, bias=True):
    return _wb(l, d, (cout, cin), bias=bias)


def _unet_resblock(l, d, cin, cout, emb):
    yield from _norm(f"{l}.in_layers.0", f"{d}.norm1", cin)
    yield from _conv(f"{l}.in_layers.2", f"{d}.conv1", cout, cin, 3)
    yield from _linear(f"{l}.emb_layers.1", f"{d}.time_emb_proj", cout, emb)
    yield from _norm(f"{l}.out_layers.0", f"{d}.norm2", cout)
    yield from _conv(f"{l}.out_layers.3", f"{d}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{l}.skip_connection", f"{d}.conv_shortcut", cout, cin, 1)


def _spatial_transformer(l, d, ch, u: UNetArch):
    """LDM SpatialTransformer == diffusers Transformer2DModel, same names inside. The inner width
    heads * head_dim equals ch (arch validates divisibility), so every projection is ch wide."""
    def proj(name):
        if u.use_linear_in_transformer:
            return _linear(f"{l}.{name}", f"{d}.{name}", ch, ch)
        return _conv(f"{l}.{name}", f"{d}.{name}", ch, ch, 1)

    yield from _norm(f"{l}.norm", f"{d}.norm", ch)
    yield from proj("proj_in")
    for b in range(u.transformer_depth):
        p = f"transformer_blocks.{b}"
        for attn, kv_in in (("attn1", ch), ("attn2", u.context_dim)):
            yield from _linear(f"{l}.{p}.{attn}.to_q", f"{d}.{p}.{attn}.to_q", ch, ch, bias=False)
            yield from _linear(f"{l}.{p}.{attn}.to_k", f"{d}.{p}.{attn}.to_k", ch, kv_in, bias=False)
            yield from _linear(f"{l}.{p}.{attn}.to_v", f"{d}.{p}.{attn}.to_v", ch, kv_in, bias=False)
            yield from _linear(f"{l}.{p}.{attn}.to_out.0", f"{d}.{p}.{attn}.to_out.0", ch, ch)
        # GEGLU: one projection to 2 * 4ch (value and gate), then back down from 4ch.
        yield from _linear(f"{l}.{p}.ff.net.0.proj", f"{d}.{p}.ff.net.0.proj", ch * 8, ch)
        yield from _linear(f"{l}.{p}.ff.net.2", f"{d}.{p}.ff.net.2", ch, ch * 4)
        for n in ("norm1", "norm2", "norm3"):
            yield from _norm(f"{l}.{p}.{n}", f"{d}.{p}.{n}", ch)
    yield from proj("proj_out")


def _unet_raw(u: UNetArch):
    """openaimodel.UNetModel in construction order, with the matching UNet2DConditionModel names."""
    emb, last = u.time_embed_dim, u.levels - 1
    yield from _linear("time_embed.0", "time_embedding.linear_1", emb, u.model_channels)
    yield from _linear("time_embed.2", "time_embedding.linear_2", emb, emb)
    yield from _conv("input_blocks.0.0", "conv_in", u.model_channels, u.in_channels, 3)
    ch, skips, k = u.model_channels, [u.model_channels], 1
    for level in range(u.levels):
        for j in range(u.num_res_blocks):
            d = f"down_blocks.{level}"
            yield from _unet_resblock(f"input_blocks.{k}.0", f"{d}.resnets.{j}", ch,
                                      u.channels(level), emb)
            ch = u.channels(level)
            if u.has_attention(level):
                yield from _spatial_transformer(f"input_blocks.{k}.1", f"{d}.attentions.{j}", ch, u)
            skips.append(ch)
            k += 1
        if level != last:
            yield from _conv(f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv",
                             ch, ch, 3)
            skips.append(ch)
            k += 1
    yield from _unet_resblock("middle_block.0", "mid_block.resnets.0", ch, ch, emb)
    yield from _spatial_transformer("middle_block.1", "mid_block.attentions.0", ch, u)
    yield from _unet_resblock("middle_block.2", "mid_block.resnets.1", ch, ch, emb)
    k = 0
    for level in reversed(range(u.levels)):
        d = f"up_blocks.{last - level}"
        for j in range(u.num_res_blocks + 1):
            yield from _unet_resblock(f"output_blocks.{k}.0", f"{d}.resnets.{j}", ch + skips.pop(),
                                      u.channels(level), emb)
            ch = u.channels(level)
            sub = 1
            if u.has_attention(level):
                yield from _spatial_transformer(f"output_blocks.{k}.1", f"{d}.attentions.{j}", ch, u)
                sub = 2
            if level != 0 and j == u.num_res_blocks:
                yield from _conv(f"output_blocks.{k}.{sub}.conv", f"{d}.upsamplers.0.conv", ch, ch, 3)
            k += 1
    yield from _norm("out.0", "conv_norm_out", ch)
    yield from _conv("out.2", "conv_out", u.out_channels, ch, 3)


def _vae_resblock(l, d, cin, cout):
    yield from _norm(f"{l}.norm1", f"{d}.norm1", cin)
    yield from _conv(f"{l}.conv1", f"{d}.conv1", cout, cin, 3)
    yield from _norm(f"{l}.norm2", f"{d}.norm2", cout)
    yield from _conv(f"{l}.conv2", f"{d}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{l}.nin_shortcut", f"{d}.conv_shortcut", cout, cin, 1)


def _vae_mid(side, ch):
    l, d = f"{side}.mid", f"{side}.mid_block"
    yield from _vae_resblock(f"{l}.block_1", f"{d}.resnets.0", ch, ch)
    a, da = f"{l}.attn_1", f"{d}.attentions.0"
    yield from _norm(f"{a}.norm", f"{da}.group_norm", ch)
    # LDM's single-head attention uses 1x1 convs; diffusers' Attention uses linears.
    for src, dst in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        yield from _conv(f"{a}.{src}", f"{da}.{dst}", ch, ch, 1, tf="squeeze")
    yield from _vae_resblock(f"{l}.block_2", f"{d}.resnets.1", ch, ch)


def _vae_raw(v: VAEArch):
    """ldm AutoencoderKL (Encoder, Decoder, quant convs) with the diffusers AutoencoderKL names."""
    n = len(v.ch_mult)
    yield from _conv("encoder.conv_in", "encoder.conv_in", v.ch, v.in_channels, 3)
    ch = v.ch
    for i in range(n):
        for j in range(v.num_res_blocks):
            yield from _vae_resblock(f"encoder.down.{i}.block.{j}",
                                     f"encoder.down_blocks.{i}.resnets.{j}", ch, v.ch * v.ch_mult[i])
            ch = v.ch * v.ch_mult[i]
        if i != n - 1:
            yield from _conv(f"encoder.down.{i}.downsample.conv",
                             f"encoder.down_blocks.{i}.downsamplers.0.conv", ch, ch, 3)
    yield from _vae_mid("encoder", ch)
    yield from _norm("encoder.norm_out", "encoder.conv_norm_out", ch)
    z_out = 2 * v.z_channels if v.double_z else v.z_channels
    yield from _conv("encoder.conv_out", "encoder.conv_out", z_out, ch, 3)

    ch = v.ch * v.ch_mult[-1]
    yield from _conv("decoder.conv_in", "decoder.conv_in", ch, v.z_channels, 3)
    yield from _vae_mid("decoder", ch)
    for i in reversed(range(n)):
        d = f"decoder.up_blocks.{n - 1 - i}"     # LDM counts up-levels from the output side
        for j in range(v.num_res_blocks + 1):
            yield from _vae_resblock(f"decoder.up.{i}.block.{j}", f"{d}.resnets.{j}", ch,
                                     v.ch * v.ch_mult[i])
            ch = v.ch * v.ch_mult[i]
        if i != 0:
            yield from _conv(f"decoder.up.{i}.upsample.conv", f"{d}.upsamplers.0.conv", ch, ch, 3)
    yield from _norm("decoder.norm_out", "decoder.conv_norm_out", ch)
    yield from _conv("decoder.conv_out", "decoder.conv_out", v.out_ch, ch, 3)
    yield from _conv("quant_conv", "quant_conv", 2 * v.embed_dim, z_out, 1)
    yield from _conv("post_quant_conv", "post_quant_conv", v.z_channels, v.embed_dim, 1)


def _clip_layer(w, ff):
    """One HF CLIPEncoderLayer: (suffix, shape) pairs."""
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        yield f"self_attn.{p}.weight", (w, w)
        yield f"self_attn.{p}.bias", (w,)
    for name, shape in (("layer_norm1", (w,)), ("mlp.fc1", (ff, w)), ("mlp.fc2", (w, ff)),
                        ("layer_norm2", (w,))):
        yield f"{name}.weight", shape
        yield f"{name}.bias", shape[:1]


def _openclip_layer(w, ff):
    """One OpenCLIP ResidualAttentionBlock -> HF CLIPEncoderLayer suffixes."""
    yield from _norm("ln_1", "layer_norm1", w)
    for tail in ("weight", "bias"):
        shape = (3 * w, w) if tail == "weight" else (3 * w,)
        for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
            yield f"attn.in_proj_{tail}", f"self_attn.{p}.{tail}", shape, f"part{i}/3"
    yield from _linear("attn.out_proj", "self_attn.out_proj", w, w)
    yield from _norm("ln_2", "layer_norm2", w)
    yield from _linear("mlp.c_fc", "mlp.fc1", ff, w)
    yield from _linear("mlp.c_proj", "mlp.fc2", w, ff)


def _text_entries(arch: ModelArch) -> Iterator[Entry]:
    """Text encoder. Blocks the model never runs (beyond used_layers), OpenCLIP's text_projection
    and logit_scale are optional: kept in "extras" under their original names when present."""
    t = arch.text
    w, ff = t.width, t.width * t.mlp_ratio
    hf = HF_TEXT_PREFIX
    emb = [("embeddings.token_embedding.weight", (t.vocab_size, w)),
           ("embeddings.position_embedding.weight", (t.context_length, w))]
    final = [("final_layer_norm.weight", (w,)), ("final_layer_norm.bias", (w,))]

    def used(ldm, shape, name, tf=""):
        return Entry(ldm, tuple(shape), "text_encoder", "text_encoder", name, tf)

    def extra(ldm, shape):
        return Entry(ldm, tuple(shape), "text_encoder", "extras", ldm, optional=True)

    if t.kind == "clip":
        for s, shape in emb:
            yield used(CLIP_PREFIX + s, shape, hf + s)
        for i in range(t.layers):
            for s, shape in _clip_layer(w, ff):
                ldm = f"{CLIP_PREFIX}encoder.layers.{i}.{s}"
                yield (used(ldm, shape, f"{hf}encoder.layers.{i}.{s}") if i < t.used_layers
                       else extra(ldm, shape))
        for s, shape in final:
            yield used(CLIP_PREFIX + s, shape, hf + s)
        return

    p = OPENCLIP_PREFIX
    yield used(p + "token_embedding.weight", emb[0][1], hf + emb[0][0])
    yield used(p + "positional_embedding", emb[1][1], hf + emb[1][0])
    for i in range(t.layers):
        for s, d, shape, tf in _openclip_layer(w, ff):
            ldm = f"{p}transformer.resblocks.{i}.{s}"
            if i < t.used_layers:
                yield used(ldm, shape, f"{hf}encoder.layers.{i}.{d}", tf)
            elif not tf.startswith("part") or tf == "part0/3":   # a fused tensor is one extra
                yield extra(ldm, shape)
    yield used(p + "ln_final.weight", (w,), hf + final[0][0])
    yield used(p + "ln_final.bias", (w,), hf + final[1][0])
    yield extra(p + "text_projection", (w, t.projection_dim or w))
    yield extra(p + "logit_scale", ())


# --------------------------------------------------------------------------- public: names

def token_embedding_name(arch: ModelArch) -> str:
    """The original-layout name of the text encoder's token-embedding table [vocab_size, width]."""
    return (CLIP_PREFIX + "embeddings.token_embedding.weight" if arch.text.kind == "clip"
            else OPENCLIP_PREFIX + "token_embedding.weight")


def iter_entries(arch: ModelArch, parts: Sequence[str] = PARTS) -> Iterator[Entry]:
    """All (original, diffusers) name pairs of `arch`, part by part in construction order."""
    parts = check_parts(parts)
    if "unet" in parts:
        for l, d, shape, tf in _unet_raw(arch.unet):
            yield Entry(UNET_PREFIX + l, shape, "unet", "unet", d, tf)
    if "vae" in parts:
        for l, d, shape, tf in _vae_raw(arch.vae):
            yield Entry(VAE_PREFIX + l, shape, "vae", "vae", d, tf)
    if "text_encoder" in parts:
        yield from _text_entries(arch)


def ldm_shapes(arch: ModelArch, parts: Sequence[str] = PARTS) -> Dict[str, Shape]:
    """Every tensor of the original single-file layout -> shape, without allocating anything.
    Includes the optional text tensors (all OpenCLIP blocks, text_projection, logit_scale);
    leaves out buffers (position_ids, schedule buffers)."""
    return {e.ldm: e.shape for e in iter_entries(arch, parts)}


def diffusers_shapes(arch: ModelArch, parts: Sequence[str] = PARTS) -> Dict[str, Dict[str, Shape]]:
    """The diffusers view's names -> shapes per component (plus "extras"), without arrays."""
    out: Dict[str, Dict[str, Shape]] = {p: {} for p in check_parts(parts)}
    out["extras"] = {}
    for e in iter_entries(arch, parts):
        out[e.component][e.name] = target_shape(e.shape, e.transform)
    return out


# --------------------------------------------------------------------------- public: configs

def diffusers_unet_config(arch: ModelArch) -> dict:
    """kwargs for diffusers `UNet2DConditionModel(**cfg)`.

    `attention_head_dim` is diffusers' misnomer for the head COUNT (UNet2DConditionModel uses it as
    num_attention_heads): an int for a fixed count (SD1), a per-level list when LDM fixes the head
    width instead (SD2), as diffusers' own single-file loader writes it.
    """
    u = arch.unet
    heads = [u.heads(level) for level in range(u.levels)]
    attn = [u.has_attention(level) for level in range(u.levels)]
    return dict(
        sample_size=arch.latent_size,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=[u.channels(level) for level in range(u.levels)],
        layers_per_block=u.num_res_blocks,
        attention_head_dim=heads[0] if u.num_head_channels is None else heads,
        cross_attention_dim=u.context_dim,
        use_linear_projection=u.use_linear_in_transformer,
        transformer_layers_per_block=u.transformer_depth,
        norm_num_groups=u.norm_num_groups,
    )


def _require_diffusers_vae(arch: ModelArch) -> None:
    v = arch.vae
    if not v.double_z or v.embed_dim != v.z_channels:
        raise UserError(f"model config {arch.path}: diffusers' AutoencoderKL needs double_z and "
                        f"embed_dim == z_channels (got {v.double_z}, {v.embed_dim}, {v.z_channels})")


def diffusers_vae_config(arch: ModelArch) -> dict:
    """kwargs for diffusers `AutoencoderKL(**cfg)`."""
    _require_diffusers_vae(arch)
    v = arch.vae
    n = len(v.ch_mult)
    return dict(
        in_channels=v.in_channels,
        out_channels=v.out_ch,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[v.ch * m for m in v.ch_mult],
        layers_per_block=v.num_res_blocks,
        latent_channels=v.z_channels,
        norm_num_groups=v.norm_num_groups,
        sample_size=arch.image_size,
        scaling_factor=arch.scale_factor,
    )


def clip_text_config(arch: ModelArch) -> dict:
    """kwargs for transformers `CLIPTextConfig(**cfg)`. Only the blocks SD runs are built
    (`used_layers`; SD2 reads the penultimate block), so `last_hidden_state` after the final layer
    norm is the conditioning, as in diffusers' SD2 text encoder."""
    t = arch.text
    return dict(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        intermediate_size=t.width * t.mlp_ratio,
        num_attention_heads=t.heads,
        num_hidden_layers=t.used_layers,
        hidden_act=t.hidden_act,
        layer_norm_eps=t.eps,
        max_position_embeddings=t.context_length,
        projection_dim=t.projection_dim or t.width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=t.pad_token,
    )


# --------------------------------------------------------------------------- public: conversion

def check_parts(parts: Iterable[str]) -> Tuple[str, ...]:
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise UserError(f"unknown model part(s) {bad}; choose from {list(PARTS)}")
    return parts


def listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _ignorable(key: str) -> bool:
    return (key in SCHEDULE_BUFFERS or key.startswith("model_ema.")
            or (key.startswith(TEXT_PREFIX) and key.endswith("embeddings.position_ids")))


def part_of(key: str):
    for part, prefix in _PART_PREFIX.items():
        if key.startswith(prefix):
            return part
    return None


def normalize_ldm(sd: Dict[str, np.ndarray], arch: ModelArch) -> Dict[str, np.ndarray]:
    """Drop buffers; give SD1 text keys the `text_model.` level older transformers lacked."""
    out: Dict[str, np.ndarray] = {}
    old = "cond_stage_model.transformer."
    for k, x in sd.items():
        if _ignorable(k):
            continue
        if arch.text.kind == "clip" and k.startswith(old) and not k.startswith(CLIP_PREFIX):
            k = CLIP_PREFIX + k[len(old):]
            if k in sd:
                raise UserError(f"checkpoint holds text encoder tensor {k} twice (with and "
                                f"without the 'text_model.' level)")
        out[k] = x
    return out


def ema_name(ldm: str) -> str:
    # LitEma stores "model.diffusion_model.a.b" as "model_ema.diffusion_modelab".
    return "model_ema." + ldm[len("model."):].replace(".", "")


def present_parts(keys: Iterable[str]) -> Tuple[str, ...]:
    """The parts (unet / vae / text_encoder) an original-layout checkpoint has any tensor of."""
    found = {part_of(k) for k in keys}
    return tuple(p for p in PARTS if p in found)


def check_shapes(pairs, what: str) -> None:
    bad = [f"{name} {tuple(x.shape)} != {tuple(shape)}" for name, x, shape in pairs
           if tuple(x.shape) != tuple(shape)]
    if bad:
        raise UserError(f"{what}: {len(bad)} tensor(s) have the wrong shape for this model config "
                        f"(wrong config for the checkpoint?): {listing(bad, 4)}")


def ldm_to_diffusers(sd: Dict[str, np.ndarray], arch: ModelArch, parts: Sequence[str] = PARTS,
                     *, ema: bool = False) -> Dict[str, Dict[str, np.ndarray]]:
    """Original single-file state dict -> {part: {diffusers name: array}, "extras": {...}}.

    Only `parts` are converted (e.g. `("unet",)` for a UNet-only file); tensors of other parts are
    skipped. Text encoder names carry the `text_model.` prefix. Optional text tensors go to
    "extras" under their original names, so `diffusers_to_ldm` restores the file exactly. Buffers
    (position_ids, schedule buffers, model_ema.*) are ignored; with `ema=True` the UNet weights come
    from model_ema.* instead. Unknown or missing tensors, or wrong shapes, raise UserError. Arrays
    are views of the inputs (no copies), dtypes untouched.
    """
    parts = check_parts(parts)
    if "vae" in parts:
        _require_diffusers_vae(arch)
    src = normalize_ldm(sd, arch)
    entries = list(iter_entries(arch))
    known = {e.ldm for e in entries}
    unknown = [k for k in src if k not in known and part_of(k) in parts + (None,)]
    if unknown:
        raise UserError(f"checkpoint has {len(unknown)} tensor(s) that {arch.path} does not "
                        f"define (wrong config?): {listing(unknown)}")

    def source(e: Entry) -> str:
        return ema_name(e.ldm) if ema and e.part == "unet" else e.ldm

    if ema and "unet" in parts and not any(k.startswith("model_ema.") for k in sd):
        raise UserError("checkpoint has no EMA weights (model_ema.*) to extract")
    pool = dict(src)
    if ema:
        pool.update((k, x) for k, x in sd.items() if k.startswith("model_ema."))
    have = present_parts(pool) + (("unet",) if ema else ())
    absent = [p for p in parts if p not in have]
    if absent:
        raise UserError(f"checkpoint lacks the whole {'/'.join(absent)} (has "
                        f"{'/'.join(have) or 'nothing'}); convert only the parts it has")
    wanted = [e for e in entries if e.part in parts]
    missing = {source(e) for e in wanted if not e.optional and source(e) not in pool}
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} tensor(s) that {arch.path} needs "
                        f"for {'/'.join(parts)}: {listing(missing)}")
    present = [e for e in wanted if source(e) in pool]
    check_shapes([(source(e), pool[source(e)], e.shape) for e in present], "checkpoint")
    out: Dict[str, Dict[str, np.ndarray]] = {p: {} for p in parts}
    out["extras"] = {}
    for e in present:
        out[e.component][e.name] = _forward(pool[source(e)], e)
    return out


# diffusers < 0.14 named the VAE mid attention like this; old folders still carry these names.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_vae_name(name: str) -> str:
    head, _, tail = name.partition(".mid_block.attentions.0.")
    if not tail:
        return name
    layer, _, param = tail.rpartition(".")
    return f"{head}.mid_block.attentions.0.{_LEGACY_VAE_ATTENTION.get(layer, layer)}.{param}"


def diffusers_to_ldm(parts: Dict[str, Dict[str, np.ndarray]], arch: ModelArch) -> Dict[str, np.ndarray]:
    """Exact inverse of `ldm_to_diffusers` for whichever components `parts` holds ("unet", "vae",
    "text_encoder", "extras"). Text encoder names may come with or without `text_model.`
    (transformers 5 writes them without); its position_ids buffer is ignored. Legacy VAE
    attention names (query/key/value/proj_attn) are accepted."""
    bad = [c for c in parts if c not in PARTS + ("extras",)]
    if bad:
        raise UserError(f"unknown diffusers component(s) {bad}; expected {list(PARTS)} or 'extras'")
    if "vae" in parts:
        _require_diffusers_vae(arch)
    by_component: Dict[str, Dict[str, Entry]] = defaultdict(dict)
    for e in iter_entries(arch):
        by_component[e.component][e.name] = e
    groups: Dict[str, List[Tuple[Entry, np.ndarray]]] = defaultdict(list)
    for comp, tensors in parts.items():
        if comp == "text_encoder":
            tensors = {(k if k.startswith(HF_TEXT_PREFIX) else HF_TEXT_PREFIX + k): x
                       for k, x in tensors.items() if not k.endswith("embeddings.position_ids")}
        elif comp == "vae":
            renamed = {_modern_vae_name(k): x for k, x in tensors.items()}
            if len(renamed) != len(tensors):
                raise UserError("diffusers vae holds mid attention weights under both the legacy "
                                "(query/key/value/proj_attn) and the current names")
            tensors = renamed
        expected = by_component[comp]
        unknown = [k for k in tensors if k not in expected]
        if unknown:
            raise UserError(f"diffusers {comp} has {len(unknown)} tensor(s) that {arch.path} does "
                            f"not define (wrong config?): {listing(unknown)}")
        if comp != "extras":
            missing = [k for k in expected if k not in tensors]
            if missing:
                raise UserError(f"diffusers {comp} lacks {len(missing)} tensor(s) that {arch.path} "
                                f"needs: {listing(missing)}")
        check_shapes([(k, x, target_shape(expected[k].shape, expected[k].transform))
                       for k, x in tensors.items()], f"diffusers {comp}")
        for k, x in tensors.items():
            groups[expected[k].ldm].append((expected[k], x))
    out: Dict[str, np.ndarray] = {}
    for ldm, group in groups.items():
        if group[0][0].transform.startswith("part") and len(group) != _part_index(group[0][0].transform)[1]:
            raise UserError(f"diffusers tensors for {ldm} are incomplete ({len(group)} of "
                            f"{_part_index(group[0][0].transform)[1]} slices)")
        out[ldm] = _inverse(group)
    return out
