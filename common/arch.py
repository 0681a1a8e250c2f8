"""Architecture configs: an original LDM-style yaml (or MindONE's variant) -> plain dataclasses.

Everything that builds a model, maps weight names or sizes a latent reads these dataclasses, so the
tiny test models and full-size SD 1.x / 2.x go through the same code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import yaml

from common.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class UNetArch:
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: Tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: Tuple[int, ...]
    num_heads: Optional[int]            # fixed head count (SD1) ...
    num_head_channels: Optional[int]    # ... or fixed head width (SD2)
    transformer_depth: int
    context_dim: int
    use_linear_in_transformer: bool
    norm_num_groups: int = 32

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]

    def has_attention(self, level: int) -> bool:
        """LDM puts a SpatialTransformer after each res block at downsample factor 2**level."""
        return 2 ** level in self.attention_resolutions

    def heads(self, level: int) -> int:
        if self.num_head_channels:
            return self.channels(level) // self.num_head_channels
        return self.num_heads

    def head_dim(self, level: int) -> int:
        return self.channels(level) // self.heads(level)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


@dataclass(frozen=True)
class VAEArch:
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: Tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    double_z: bool = True
    norm_num_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextArch:
    kind: str                  # "clip" (SD1: OpenAI CLIP in HF layout) or "openclip" (SD2)
    width: int
    layers: int                # transformer blocks stored in an original checkpoint
    used_layers: int           # blocks actually run (layers - 1 for SD2's penultimate layer)
    heads: int
    vocab_size: int = 49408
    context_length: int = 77
    mlp_ratio: int = 4
    hidden_act: str = "quick_gelu"
    eps: float = 1e-5
    projection_dim: int = 0    # OpenCLIP text_projection width (carried, not used by SD)

    @property
    def pad_token(self) -> int:
        """SD1's CLIPTokenizer pads with <|endoftext|>; OpenCLIP's tokenizer pads with 0."""
        return 49407 if self.kind == "clip" else 0


@dataclass(frozen=True)
class ScheduleArch:
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    beta_schedule: str = "linear"      # LDM "linear" == diffusers "scaled_linear"
    parameterization: str = "eps"      # "eps" or "v"


@dataclass(frozen=True)
class ModelArch:
    path: str
    version: str                # "sd1" or "sd2"
    unet: UNetArch
    vae: VAEArch
    text: TextArch
    schedule: ScheduleArch
    scale_factor: float
    latent_size: int

    @property
    def image_size(self) -> int:
        """Native pixel resolution (latent size times the VAE's downsampling)."""
        return self.latent_size * self.vae.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling times the UNet's (each
        UNet level halves the latent and the skip connections must line up again)."""
        return self.vae.downsample_factor * 2 ** (len(self.unet.channel_mult) - 1)

    def with_clip_skip(self, n: Optional[int], source: str = "--clip_skip") -> "ModelArch":
        """This architecture with the text encoder stopping `n - 1` blocks earlier (A1111 / kohya
        "clip skip": the output of the n-th block from the end of those the model runs, then the
        final layer norm; n = 1 or None is the model itself). The skipped blocks stay in checkpoints
        as optional extras, so weights load and save unchanged. For SD2, which already stops at the
        penultimate block, n counts from there (as kohya's scripts do). diffusers' `clip_skip=k`
        is n = k + 1."""
        if n is None:
            return self
        used = self.text.used_layers
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= used:
            raise UserError(f"{source} {n}: must be an integer from 1 (the model's own layer) to {used} "
                            f"for {os.path.basename(self.path)}, whose text encoder runs {used} blocks")
        return self if n == 1 else replace(self, text=replace(self.text, used_layers=used - (n - 1)))

    def with_extra_tokens(self, count: int) -> "ModelArch":
        """This architecture with `count` more rows in the text encoder's token-embedding table
        (textual-inversion vectors appended after the CLIP vocabulary)."""
        return replace(self, text=replace(self.text, vocab_size=self.text.vocab_size + count)) if count else self

    def check_image_size(self, pixels: int, flag: str) -> None:
        """One line naming the flag when `pixels` is not a positive multiple of size_multiple."""
        if pixels < 1 or pixels % self.size_multiple:
            raise UserError(f"{flag} {pixels}: image sides must be positive multiples of "
                            f"{self.size_multiple} for {os.path.basename(self.path)} (e.g. "
                            f"{max(self.size_multiple, pixels // self.size_multiple * self.size_multiple)})")


_SD1_CLIP = dict(width=768, layers=12, heads=12)
_SD2_OPENCLIP = dict(width=1024, layers=24, heads=16)


def resolve_config_path(path: str) -> str:
    """Find an architecture yaml as given, or relative to the repository (MindONE resolves it
    relative to the script directory, so `configs/v2-inference.yaml` works from anywhere)."""
    for candidate in (path, os.path.join(REPO_ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"model config not found: {path}")


def _get(d: dict, key: str, default=None, *, where: str):
    if key in d:
        return d[key]
    if default is None:
        raise UserError(f"model config {where}: missing key '{key}'")
    return default


def _text_arch(cond: dict, context_dim: int, where: str) -> TextArch:
    target = str(cond.get("target", ""))
    p = dict(cond.get("params") or {})
    openclip = ("OpenCLIP" in target or str(p.get("version", "")).startswith("2")
                or p.get("use_quick_gelu") is False)
    if "layer" in p and p["layer"] not in ("last", "penultimate"):
        raise UserError(f"model config {where}: cond_stage_config layer must be 'last' or "
                        f"'penultimate', got {p['layer']!r}")
    if openclip:
        base = dict(_SD2_OPENCLIP)
        if "layers" in p and "layer" not in p:
            # MindONE writes the number of blocks it builds (23 = penultimate of ViT-H's 24).
            p["layers"] = int(p["layers"]) + 1
        layer = p.get("layer", "penultimate")
        act = "quick_gelu" if p.get("use_quick_gelu") else p.get("hidden_act", "gelu")
    else:
        base = dict(_SD1_CLIP)
        layer = p.get("layer", "last")
        act = "quick_gelu" if p.get("use_quick_gelu", True) else "gelu"
        act = p.get("hidden_act", act)
    width = int(p.get("width", p.get("output_dim", base["width"])))
    layers = int(p.get("layers", base["layers"]))
    heads = int(p.get("heads", base["heads"]))
    if width != context_dim:
        raise UserError(f"model config {where}: text encoder width {width} does not match "
                        f"unet context_dim {context_dim}")
    if width % heads:
        raise UserError(f"model config {where}: text width {width} not divisible by heads {heads}")
    used = layers - 1 if layer == "penultimate" else layers
    if used < 1:
        raise UserError(f"model config {where}: text encoder needs at least one used layer")
    return TextArch(
        kind="openclip" if openclip else "clip", width=width, layers=layers, used_layers=used,
        heads=heads, vocab_size=int(p.get("vocab_size", 49408)),
        context_length=int(p.get("context_length", p.get("max_length", 77))),
        mlp_ratio=int(p.get("mlp_ratio", 4)), hidden_act=str(act),
        eps=float(p.get("epsilon", 1e-5)),
        # MindONE's configs omit OpenCLIP's projection (carried, unused): ViT-H's equals its width
        projection_dim=int(p.get("embed_dim", width)) if openclip else 0)


def parse_arch(cfg: dict, where: str = "<dict>") -> ModelArch:
    try:
        mp = cfg["model"]["params"]
        up = mp["unet_config"]["params"]
        vp = mp["first_stage_config"]["params"]
        dd = vp["ddconfig"]
        cond = mp["cond_stage_config"]
    except (KeyError, TypeError) as e:
        raise UserError(f"model config {where}: not an LDM model config (missing {e})") from None
    num_heads = up.get("num_heads", -1)
    num_head_channels = up.get("num_head_channels", -1)
    unet = UNetArch(
        in_channels=int(_get(up, "in_channels", where=where)),
        out_channels=int(_get(up, "out_channels", where=where)),
        model_channels=int(_get(up, "model_channels", where=where)),
        channel_mult=tuple(int(c) for c in _get(up, "channel_mult", where=where)),
        num_res_blocks=int(_get(up, "num_res_blocks", where=where)),
        attention_resolutions=tuple(int(a) for a in _get(up, "attention_resolutions", where=where)),
        num_heads=int(num_heads) if num_heads not in (-1, None) else None,
        num_head_channels=int(num_head_channels) if num_head_channels not in (-1, None) else None,
        transformer_depth=int(up.get("transformer_depth", 1)),
        context_dim=int(_get(up, "context_dim", where=where)),
        use_linear_in_transformer=bool(up.get("use_linear_in_transformer", False)),
        norm_num_groups=int(up.get("norm_num_groups", 32)))
    if unet.num_heads is None and unet.num_head_channels is None:
        raise UserError(f"model config {where}: unet needs num_heads or num_head_channels")
    for level in range(unet.levels):
        if unet.has_attention(level) and unet.channels(level) % unet.heads(level):
            raise UserError(f"model config {where}: unet level {level} width "
                            f"{unet.channels(level)} not divisible into {unet.heads(level)} heads")
    vae = VAEArch(
        in_channels=int(_get(dd, "in_channels", where=where)), out_ch=int(_get(dd, "out_ch", where=where)),
        ch=int(_get(dd, "ch", where=where)), ch_mult=tuple(int(c) for c in _get(dd, "ch_mult", where=where)),
        num_res_blocks=int(_get(dd, "num_res_blocks", where=where)),
        z_channels=int(_get(dd, "z_channels", where=where)), embed_dim=int(_get(vp, "embed_dim", where=where)),
        double_z=bool(dd.get("double_z", True)), norm_num_groups=int(dd.get("norm_num_groups", 32)))
    param = str(mp.get("parameterization", mp.get("prediction_type", "eps")))
    param = {"eps": "eps", "noise": "eps", "epsilon": "eps", "v": "v", "velocity": "v",
             "v_prediction": "v"}.get(param)
    if param is None:
        raise UserError(f"model config {where}: parameterization must be 'eps' or 'v', "
                        f"got {mp.get('parameterization')!r}")
    schedule = ScheduleArch(
        linear_start=float(mp.get("linear_start", 0.00085)), linear_end=float(mp.get("linear_end", 0.012)),
        timesteps=int(mp.get("timesteps", 1000)), beta_schedule=str(mp.get("beta_schedule", "linear")),
        parameterization=param)
    text = _text_arch(cond, unet.context_dim, where)
    return ModelArch(path=where, version="sd2" if text.kind == "openclip" else "sd1", unet=unet,
                     vae=vae, text=text, schedule=schedule,
                     scale_factor=float(mp.get("scale_factor", 0.18215)),
                     latent_size=int(mp.get("image_size", up.get("image_size", 64))))


def load_arch(path: str) -> ModelArch:
    path = resolve_config_path(path)
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"model config {path}: invalid yaml ({e.__class__.__name__})") from None
    return parse_arch(cfg, where=path)
