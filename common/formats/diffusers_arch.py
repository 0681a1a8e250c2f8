"""The architecture of a diffusers Stable Diffusion 1.x / 2.x folder, read from its config files.

`arch_from_diffusers(folder)` reads `unet/config.json`, `vae/config.json`, `text_encoder/config.json`
and `scheduler/scheduler_config.json` (plus, when present, `model_index.json`, the tokenizer's
special tokens and this project's `ldm_extras.safetensors` header) with the json module only, builds
the original LDM-style config dict (`ldm_config_from_diffusers`) and hands it to
`common.arch.parse_arch`, so a folder gives the same `ModelArch` as the matching yaml (only `path`
differs: it is the folder). A key a config file leaves out means the default diffusers /
transformers would use when loading it. Anything SD 1.x / 2.x cannot represent (SDXL, extra
embeddings, other block types, other schedules, ...) is a one-line UserError naming the folder.

How diffusers' names map to LDM's:
- UNet `attention_head_dim` is the head COUNT (diffusers' misnomer): an int is LDM's fixed
  `num_heads` (SD1); a per-level list is LDM's fixed head width `num_head_channels` (SD2,
  [5, 10, 20, 20] = 64-wide heads), as keymap.diffusers_unet_config writes them. A list whose
  widths differ but whose counts agree is a fixed count. The mid block uses the last level's count.
- Cross-attention down blocks -> attention_resolutions (2**level, deepest first, as LDM's yamls);
  `use_linear_projection` -> use_linear_in_transformer; `upcast_attention` (set in SD 2.1's own
  config) only asks for float32 attention scores and is not part of the architecture.
- Text encoder: SD2's OpenCLIP ViT-H is stored by diffusers with the 23 blocks SD runs; LDM's
  FrozenOpenCLIPEmbedder (layer "penultimate") counts 24. SD1's CLIP runs all its blocks ("last").
  Which of the two a folder holds: this project's extras file, else the tokenizer's pad token
  ("!" = OpenCLIP, "<|endoftext|>" = CLIP), else the config's pad_token_id as this project writes it
  (0 / 49407), else the activation (gelu = OpenCLIP, quick_gelu = CLIP), which is how every official
  SD 1.x / 2.x folder is told apart too.
- Scheduler: diffusers' "scaled_linear" is LDM's "linear" (linear in sqrt(beta)); prediction_type
  epsilon / v_prediction -> parameterization eps / v.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, List, Optional

from common.arch import ModelArch, parse_arch
from common.errors import UserError

UNET_CONFIG = os.path.join("unet", "config.json")
VAE_CONFIG = os.path.join("vae", "config.json")
TEXT_CONFIG = os.path.join("text_encoder", "config.json")
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
EXTRAS_FILE = "ldm_extras.safetensors"      # == checkpoint_io.EXTRAS_FILE (not imported: keeps this light)

_OPENCLIP_PREFIX = "cond_stage_model.model."
_CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers UNet2DConditionModel settings SD 1.x / 2.x use, at diffusers' defaults (a missing key
# takes the default); any other value cannot be represented by the LDM UNet.
_UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_eps": 1e-5, "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None,
    "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
_VAE_FIXED = {
    "act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
_TEXT_FIXED = {"model_type": "clip_text_model"}
_SCHEDULER_FIXED = {"trained_betas": None, "rescale_betas_zero_snr": False}

# transformers CLIPTextConfig / diffusers scheduler defaults for keys a file leaves out.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5)
_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                           beta_schedule="linear", prediction_type="epsilon")
_PREDICTION = {"epsilon": "eps", "v_prediction": "v"}


class _Reader:
    """Config files of one folder; every error is one line naming the folder and the file."""

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)

    def fail(self, what: str) -> UserError:
        return UserError(f"diffusers folder {self.folder}: {what}")

    def load(self, rel: str, required: bool = True) -> Optional[dict]:
        path = os.path.join(self.folder, rel)
        if not os.path.isfile(path):
            if required:
                raise self.fail(f"{rel} is missing (an SD 1.x / 2.x pipeline folder has unet/, vae/, "
                                f"text_encoder/ and scheduler/ with their configs)")
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise self.fail(f"{rel} is not readable JSON ({first})") from None
        if not isinstance(data, dict):
            raise self.fail(f"{rel} is not a JSON object")
        return data

    def integer(self, cfg: dict, rel: str, key: str, default: Any = None) -> int:
        value = cfg.get(key, default)
        if value is None:
            raise self.fail(f"{rel}: {key} is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise self.fail(f"{rel}: {key} must be an integer, got {value!r}")
        return int(value)

    def integers(self, cfg: dict, rel: str, key: str) -> List[int]:
        value = cfg.get(key)
        if not isinstance(value, (list, tuple)) or not value:
            raise self.fail(f"{rel}: {key} must be a non-empty list, got {value!r}")
        return [self.integer({key: v}, rel, key) for v in value]

    def number(self, cfg: dict, rel: str, key: str, default: Any = None) -> float:
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{rel}: {key} must be a number, got {value!r}")
        return float(value)

    def same(self, cfg: dict, rel: str, key: str, levels: int, default: Any = None) -> int:
        """An int setting diffusers also accepts per level; LDM has one value for all levels."""
        value = cfg.get(key, default)
        if isinstance(value, (list, tuple)):
            values = [self.integer({key: v}, rel, key) for v in value]
            if len(values) != levels or len(set(values)) != 1:
                raise self.fail(f"{rel}: {key} {value} differs per level; SD 1.x / 2.x use one value")
            return values[0]
        return self.integer({key: value}, rel, key)

    def fixed(self, cfg: dict, rel: str, fixed: Dict[str, Any]) -> None:
        for key, want in fixed.items():
            got = cfg.get(key, want)
            if not _matches(key, got, want):
                raise self.fail(f"{rel}: {_describe(key, got)} is not supported (Stable Diffusion "
                                f"1.x / 2.x use {json.dumps(want)})")


def _matches(key: str, got: Any, want: Any) -> bool:
    if isinstance(want, bool):        # a per-level list of the same flag is the flag
        values = got if isinstance(got, (list, tuple)) and got else [got]
        return all(v is want for v in values)
    if want is None:                  # "off" may be spelt false (shift_factor: 0)
        return got is None or got is False or (key == "shift_factor" and got == 0)
    if isinstance(want, (int, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and got == want
    return got == want


_NOTES = {"addition_embed_type": "SDXL-style added embeddings", "addition_time_embed_dim": "SDXL",
          "time_cond_proj_dim": "LCM-distilled", "class_embed_type": "class-conditioned, e.g. the x4 upscaler",
          "num_class_embeds": "class-conditioned, e.g. the x4 upscaler", "attention_type": "GLIGEN"}


def _describe(key: str, value: Any) -> str:
    note = "SDXL" if key == "addition_embed_type" and value == "text_time" else _NOTES.get(key)
    return f"{key} {json.dumps(value)}" + (f" ({note})" if note else "")


def _safetensors_names(path: str) -> Dict[str, list]:
    """name -> shape from a .safetensors header ({} when unreadable: loading the weights reports it)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.path.getsize(path) - 8:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return {}
    if not isinstance(header, dict):
        return {}
    return {k: v.get("shape") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_pad(r: _Reader) -> Optional[str]:
    for rel in (os.path.join("tokenizer", "special_tokens_map.json"),
                os.path.join("tokenizer", "tokenizer_config.json")):
        path = os.path.join(r.folder, rel)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue                        # the tokenizer's own loader reports a broken file
            pad = _token_text(data.get("pad_token")) if isinstance(data, dict) else None
            if pad is not None:
                return pad
    return None


# --------------------------------------------------------------------------- the parts

def _check_pipeline(r: _Reader) -> None:
    index = r.load("model_index.json", required=False)
    if index is None:
        return
    name = str(index.get("_class_name", ""))
    if "text_encoder_2" in index or "XL" in name:
        raise r.fail(f"model_index.json: {name or 'a pipeline with text_encoder_2'} is SDXL; "
                     f"this project runs Stable Diffusion 1.x / 2.x only")
    for comp, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        entry = index.get(comp)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] not in (None, cls):
            raise r.fail(f"model_index.json: {comp} is a {entry[1]}, not the {cls} of "
                         f"Stable Diffusion 1.x / 2.x")


def _class_name(r: _Reader, cfg: dict, rel: str, want: str) -> None:
    got = cfg.get("_class_name", want)
    if got != want:
        raise r.fail(f"{rel}: _class_name {got!r} is not supported (Stable Diffusion 1.x / 2.x "
                     f"use {want})")


def _unet(r: _Reader) -> tuple:
    rel = UNET_CONFIG
    u = r.load(rel)
    _class_name(r, u, rel, "UNet2DConditionModel")
    r.fixed(u, rel, _UNET_FIXED)
    boc = r.integers(u, rel, "block_out_channels")
    levels = len(boc)
    down = u.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = u.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if not isinstance(down, list) or not isinstance(up, list) or len(down) != levels or len(up) != levels:
        raise r.fail(f"{rel}: down_block_types / up_block_types need one entry per "
                     f"block_out_channels entry ({levels})")
    bad = [b for b in down if b not in kinds]
    if bad:
        raise r.fail(f"{rel}: down block type {bad[0]!r} is not supported (SD 1.x / 2.x use "
                     f"CrossAttnDownBlock2D and DownBlock2D)")
    attn = [kinds[b] for b in down]
    want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if up != want_up:
        raise r.fail(f"{rel}: up_block_types {up} do not mirror down_block_types (expected {want_up})")
    ch = boc[0]
    if any(c % ch for c in boc):
        raise r.fail(f"{rel}: block_out_channels {boc} are not multiples of the first")

    # attention_head_dim = head counts (see the module docstring)
    heads = u.get("attention_head_dim", 8)
    used = [i for i in range(levels) if attn[i]] + [levels - 1]      # + the mid block
    if isinstance(heads, (list, tuple)):
        counts = [r.integer({"attention_head_dim": h}, rel, "attention_head_dim") for h in heads]
        if len(counts) != levels or any(counts[i] < 1 or boc[i] % counts[i] for i in used):
            raise r.fail(f"{rel}: attention_head_dim {heads} (head counts per level) does not "
                         f"divide block_out_channels {boc}")
        widths = {boc[i] // counts[i] for i in used}
        if len(widths) == 1:
            num_heads, num_head_channels = -1, widths.pop()
        elif len({counts[i] for i in used}) == 1:
            num_heads, num_head_channels = counts[levels - 1], -1
        else:
            raise r.fail(f"{rel}: attention_head_dim {heads} gives neither one head count nor one "
                         f"head width across levels, which LDM's UNet needs")
    else:
        num_heads, num_head_channels = r.integer(u, rel, "attention_head_dim", 8), -1
        if num_heads < 1:
            raise r.fail(f"{rel}: attention_head_dim must be positive, got {num_heads}")

    size = u.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if size is None:
        raise r.fail(f"{rel}: sample_size (the latent size) is missing")
    size = r.integer({"sample_size": size}, rel, "sample_size")
    groups = u.get("norm_num_groups", 32)
    if groups is None:
        raise r.fail(f"{rel}: norm_num_groups null (no GroupNorm) is not supported")
    params = dict(
        image_size=size,
        in_channels=r.integer(u, rel, "in_channels", 4),
        out_channels=r.integer(u, rel, "out_channels", 4),
        model_channels=ch,
        attention_resolutions=[2 ** i for i in reversed(range(levels)) if attn[i]],
        num_res_blocks=r.same(u, rel, "layers_per_block", levels, 2),
        channel_mult=[c // ch for c in boc],
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        use_spatial_transformer=True,
        use_linear_in_transformer=bool(u.get("use_linear_projection", False)),
        transformer_depth=r.same(u, rel, "transformer_layers_per_block", levels, 1),
        context_dim=r.same(u, rel, "cross_attention_dim", levels, 1280),
        norm_num_groups=r.integer({"norm_num_groups": groups}, rel, "norm_num_groups"),
        legacy=False,
    )
    return params, size


def _vae(r: _Reader) -> tuple:
    rel = VAE_CONFIG
    v = r.load(rel)
    _class_name(r, v, rel, "AutoencoderKL")
    r.fixed(v, rel, _VAE_FIXED)
    boc = r.integers(v, rel, "block_out_channels") if "block_out_channels" in v else [64]
    n = len(boc)
    down = v.get("down_block_types", ["DownEncoderBlock2D"])
    up = v.get("up_block_types", ["UpDecoderBlock2D"])
    if down != ["DownEncoderBlock2D"] * n or up != ["UpDecoderBlock2D"] * n:
        raise r.fail(f"{rel}: the VAE needs {n} DownEncoderBlock2D and {n} UpDecoderBlock2D blocks "
                     f"(one per block_out_channels entry), got {down} / {up}")
    ch = boc[0]
    if any(c % ch for c in boc):
        raise r.fail(f"{rel}: block_out_channels {boc} are not multiples of the first")
    z = r.integer(v, rel, "latent_channels", 4)
    size = v.get("sample_size", 32)        # unused by SD (LDM's `resolution`, kept for the record)
    params = dict(
        embed_dim=z,
        ddconfig=dict(double_z=True, z_channels=z, resolution=size if isinstance(size, int) else 256,
                      in_channels=r.integer(v, rel, "in_channels", 3), out_ch=r.integer(v, rel, "out_channels", 3),
                      ch=ch, ch_mult=[c // ch for c in boc],
                      num_res_blocks=r.integer(v, rel, "layers_per_block", 1), attn_resolutions=[],
                      norm_num_groups=r.integer(v, rel, "norm_num_groups", 32), dropout=0.0))
    return params, r.number(v, rel, "scaling_factor", 0.18215)


def _text(r: _Reader) -> dict:
    rel = TEXT_CONFIG
    t = r.load(rel)
    r.fixed(t, rel, _TEXT_FIXED)
    archs = t.get("architectures")
    if isinstance(archs, list) and archs and "CLIPTextModel" not in archs:
        raise r.fail(f"{rel}: architectures {archs} is not supported (Stable Diffusion 1.x / 2.x "
                     f"use CLIPTextModel)")
    cfg = {k: t.get(k, d) for k, d in _TEXT_DEFAULTS.items()}
    width = r.integer(cfg, rel, "hidden_size")
    blocks = r.integer(cfg, rel, "num_hidden_layers")
    inter = r.integer(cfg, rel, "intermediate_size")
    if width < 1 or inter % width:
        raise r.fail(f"{rel}: intermediate_size {inter} is not a multiple of hidden_size {width}")
    act = cfg["hidden_act"]
    if act not in ("quick_gelu", "gelu"):
        raise r.fail(f"{rel}: hidden_act {act!r} is not supported (quick_gelu for SD 1.x, gelu for SD 2.x)")

    # Which encoder (see the module docstring), and what this project's extras file says.
    extras = _safetensors_names(os.path.join(r.folder, EXTRAS_FILE))
    kind = None
    if any(k.startswith(_OPENCLIP_PREFIX) for k in extras):
        kind = "openclip"
    elif any(k.startswith(_CLIP_PREFIX) for k in extras):
        kind = "clip"
    if kind is None:
        kind = {"!": "openclip", "<|endoftext|>": "clip"}.get(_tokenizer_pad(r) or "")
    if kind is None:
        kind = {0: "openclip", 49407: "clip"}.get(t.get("pad_token_id")) \
            if t.get("bos_token_id") == 49406 else None
    if kind is None:
        kind = "openclip" if act == "gelu" else "clip"

    params = dict(vocab_size=r.integer(cfg, rel, "vocab_size"),
                  context_length=r.integer(cfg, rel, "max_position_embeddings"),
                  width=width, heads=r.integer(cfg, rel, "num_attention_heads"), mlp_ratio=inter // width,
                  hidden_act=act, epsilon=r.number(cfg, rel, "layer_norm_eps"))
    if kind == "openclip":
        # diffusers keeps the blocks SD runs; LDM's penultimate-layer embedder counts one more.
        # CLIPTextModel has no projection, so the config's projection_dim (512 in SD 2.x's own
        # folders) says nothing: OpenCLIP ViT-H's text_projection is width x width, unless this
        # project's extras file carries another one.
        proj = extras.get(_OPENCLIP_PREFIX + "text_projection")
        embed = int(proj[1]) if isinstance(proj, list) and len(proj) == 2 else width
        return dict(target="ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                    params=dict(params, layer="penultimate", layers=blocks + 1, embed_dim=embed))
    # SD1 runs every block; an extra block in this project's extras file means a penultimate-layer
    # config was written out (the last block kept beside, unused).
    penultimate = any(k.startswith(f"{_CLIP_PREFIX}encoder.layers.{blocks}.") for k in extras)
    return dict(target="ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                params=dict(params, layer="penultimate" if penultimate else "last",
                            layers=blocks + 1 if penultimate else blocks))


def _schedule(r: _Reader) -> dict:
    rel = SCHEDULER_CONFIG
    s = r.load(rel)
    r.fixed(s, rel, _SCHEDULER_FIXED)
    cfg = {k: s.get(k, d) for k, d in _SCHEDULER_DEFAULTS.items()}
    if cfg["beta_schedule"] != "scaled_linear":
        given = "" if "beta_schedule" in s else " (diffusers' default: the file does not say)"
        raise r.fail(f"{rel}: beta_schedule {cfg['beta_schedule']!r}{given} is not supported; "
                     f"Stable Diffusion 1.x / 2.x use 'scaled_linear'")
    param = _PREDICTION.get(cfg["prediction_type"])
    if param is None:
        raise r.fail(f"{rel}: prediction_type {cfg['prediction_type']!r} is not supported "
                     f"(epsilon or v_prediction)")
    return dict(linear_start=r.number(cfg, rel, "beta_start"), linear_end=r.number(cfg, rel, "beta_end"),
                timesteps=r.integer(cfg, rel, "num_train_timesteps"), beta_schedule="linear",
                parameterization=param)


# --------------------------------------------------------------------------- public

def ldm_config_from_diffusers(folder: str) -> dict:
    """The original LDM-style config dict (what `parse_arch` / an inference yaml holds) of a
    diffusers SD 1.x / 2.x folder."""
    r = _Reader(folder)
    if not os.path.isdir(r.folder):
        raise UserError(f"diffusers folder {r.folder}: not a folder")
    _check_pipeline(r)
    unet, latent_size = _unet(r)
    vae, scale_factor = _vae(r)
    text = _text(r)
    schedule = _schedule(r)
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": dict(
            schedule, num_timesteps_cond=1, first_stage_key="jpg", cond_stage_key="txt",
            image_size=latent_size, channels=vae["embed_dim"], cond_stage_trainable=False,
            conditioning_key="crossattn", scale_factor=scale_factor, use_ema=False,
            unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae},
            cond_stage_config=text)}}


def arch_from_diffusers(folder: str) -> ModelArch:
    """The ModelArch of a diffusers SD 1.x / 2.x folder, equal to `load_arch` of the matching yaml
    except `path`, which is the folder."""
    return parse_arch(ldm_config_from_diffusers(folder), where=os.fspath(folder))
