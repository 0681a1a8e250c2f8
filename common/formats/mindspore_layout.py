"""MindONE's MindSpore checkpoint layout, generated from the architecture like the diffusers view.

MindONE's Stable Diffusion example (examples/stable_diffusion_v2) stores the original LDM model
under slightly different names. `mindspore_entries(arch)` derives them from `keymap.iter_entries`,
so both views share one walk of the architecture and work for any config, tiny or full size:

- UNet: norms `gamma`/`beta`; ResBlock `in_layers.0` -> `in_layers_norm`, `in_layers.2` ->
  `in_layers_conv.conv`, `out_layers.0` -> `out_layers_norm`, `out_layers.3` -> `out_layers_conv.conv`;
  every other nn.Conv2d gets an extra `.conv` level (`input_blocks.0.0.conv`, `skip_connection.conv`,
  `op.conv`, upsample `conv.conv`, `out.2.conv`); SpatialTransformer proj_in / proj_out do not.
- VAE: original names, except that its GroupNorms are `gamma`/`beta`: MindONE builds them with
  `mindspore.nn.GroupNorm`. Files this project wrote before that fix say `weight`/`bias`; both are
  read, `gamma`/`beta` is written. It matters because MindONE loads non-strictly: a VAE norm
  under the wrong name is silently left at 1 / 0 and the VAE decodes garbage.
- Text encoder (SD1 CLIP and SD2 OpenCLIP alike) under `cond_stage_model.transformer.`:
  `embedding_table`, `positional_embedding`, `ln_final.{gamma,beta}` and per block
  `transformer_layer.resblocks.N.{ln_1,ln_2}.{gamma,beta}`, `attn.attn.in_proj`, `attn.attn.out_proj`,
  `c_fc`, `c_proj`. SD1's separate q/k/v are fused into `in_proj` in q, k, v row order. MindONE runs
  only the used blocks (23 for SD2's penultimate layer); the blocks past them, OpenCLIP's
  `text_projection` and `logit_scale` are written under names in the same style
  (`transformer_layer.resblocks.23.*`, `cond_stage_model.transformer.text_projection`, ...), which
  MindONE's non-strict load ignores, so converting back gives the original file complete.

Dtypes are kept as they are (MindONE's own files hold the two embedding tables in Float16; its
loader casts whatever it reads to the network's dtype).

LoRA (MindONE's `LoRADenseLayer`, scale 1, no alpha): `<module path>.lora_down.weight` [r, in] and
`.lora_up.weight` [out, r] with the original module paths (UNet attention to_q/to_k/to_v/to_out.0;
text encoder fused `attn.attn.in_proj` and `attn.attn.out_proj`), plus one `lora_rank` for all
layers. How a fused in_proj LoRA relates to per-projection (q/k/v) LoRAs, exactly:

- fused -> per projection: the q, k and v LoRAs share MindONE's down [r, d] and take rows
  0:d, d:2d, 2d:3d of its up [3d, r] (delta_q = up_q @ down: exact);
- per projection -> fused: identical q/k/v downs are fused back into that shared form; different
  downs are stacked into rank r_q + r_k + r_v with a block-diagonal up (the extra products are
  exact zeros). When reading, a block-diagonal up is recognised and split back.
- MindONE builds every layer with the one `lora_rank`, so smaller ranks are padded with zero
  components up to the largest; reading drops trailing components whose down row and up column
  are both zero. A LoRA alpha other than the rank is folded into `down` (MindONE has no alpha).
Round trips MindSpore -> per projection -> MindSpore are bit-exact; per projection -> MindSpore
-> per projection are bit-exact when alpha == rank (otherwise equal in value, down rescaled).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from common.formats import keymap
from common.arch import ModelArch
from common.formats.checkpoint_io import BF16, cast_array
from common.errors import UserError
from common.formats.keymap import CLIP_PREFIX, OPENCLIP_PREFIX, PARTS, UNET_PREFIX, Entry, Shape
from common.formats.lora import LoraPair, LoraSet, lora_targets

MS_TEXT_PREFIX = "cond_stage_model.transformer."
LORA_RANK_KEY = "lora_rank"
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")

_GAMMA_BETA = {"weight": "gamma", "bias": "beta"}
# (original ResBlock sub-module, MindONE name)
_RESBLOCK = (("in_layers.0", "in_layers_norm"), ("in_layers.2", "in_layers_conv"),
             ("out_layers.0", "out_layers_norm"), ("out_layers.3", "out_layers_conv"))
# diffusers leaf names of the UNet convolutions that MindONE wraps in a cell of its own.
_WRAPPED_CONVS = frozenset({"conv_in", "conv1", "conv2", "conv_shortcut", "conv", "conv_out"})
# original text-encoder suffix -> MindONE suffix, applied in order
_CLIP_RULES = ((r"^embeddings\.token_embedding\.weight$", "embedding_table"),
               (r"^embeddings\.position_embedding\.weight$", "positional_embedding"),
               (r"^final_layer_norm\.", "ln_final."),
               (r"^encoder\.layers\.(\d+)\.", r"transformer_layer.resblocks.\1."),
               (r"\.self_attn\.[qkv]_proj\.", ".attn.attn.in_proj."),
               (r"\.self_attn\.out_proj\.", ".attn.attn.out_proj."),
               (r"\.layer_norm(\d)\.", r".ln_\1."),
               (r"\.mlp\.fc1\.", ".c_fc."),
               (r"\.mlp\.fc2\.", ".c_proj."))
_OPENCLIP_RULES = ((r"^token_embedding\.weight$", "embedding_table"),
                   (r"^transformer\.resblocks\.", "transformer_layer.resblocks."),
                   (r"\.attn\.in_proj_(weight|bias)$", r".attn.attn.in_proj.\1"),
                   (r"\.attn\.out_proj\.", ".attn.attn.out_proj."),
                   (r"\.mlp\.c_fc\.", ".c_fc."),
                   (r"\.mlp\.c_proj\.", ".c_proj."))
_QKV = re.compile(r"\.self_attn\.([qkv])_proj\.")
# Scalars MindSpore training loops save next to the weights; never weights themselves.
_MS_BOOKKEEPING = frozenset({"epoch_num", "step_num", "global_step", "loss_scale", "scale_sense",
                             "current_iterator_step", "last_overflow_iterator_step"})


@dataclass(frozen=True)
class MsEntry:
    """One tensor of MindONE's layout and the original tensor(s) it is made of."""
    ms: str                      # MindSpore name (what this project writes)
    shape: Shape
    sources: Tuple[str, ...]     # original names; several: their rows concatenated (SD1 q, k, v)
    part: str                    # "unet" | "vae" | "text_encoder"
    optional: bool = False       # may be absent (not used by SD; see keymap.Entry.optional)
    alias: str = ""              # also accepted when reading (VAE norms as weight/bias)


# --------------------------------------------------------------------------- names

def _split(name: str) -> Tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _unet_name(e: Entry) -> str:
    module, param = _split(e.ldm[len(UNET_PREFIX):])
    leaf = _split(e.name)[0].rpartition(".")[2]
    for old, new in _RESBLOCK:
        if module.endswith("." + old):
            module = module[:-len(old)] + new
            break
    if leaf in _WRAPPED_CONVS:
        module += ".conv"
    if "norm" in leaf:
        param = _GAMMA_BETA[param]
    return f"{UNET_PREFIX}{module}.{param}"


def _text_name(e: Entry, kind: str) -> Tuple[str, int]:
    """(MindSpore name, row slot in a fused tensor) of an original text-encoder tensor."""
    prefix, rules = (CLIP_PREFIX, _CLIP_RULES) if kind == "clip" else (OPENCLIP_PREFIX, _OPENCLIP_RULES)
    rel = e.ldm[len(prefix):]
    slot = "qkv".index(_QKV.search(rel).group(1)) if kind == "clip" and _QKV.search(rel) else 0
    for pattern, repl in rules:
        rel = re.sub(pattern, repl, rel)
    module, param = _split(rel)
    if module.rpartition(".")[2] in ("ln_1", "ln_2", "ln_final"):
        rel = f"{module}.{_GAMMA_BETA[param]}"
    return MS_TEXT_PREFIX + rel, slot


def legacy_vae_norm_name(name: str) -> Optional[str]:
    """The `weight`/`bias` spelling of a MindSpore VAE GroupNorm name (`...norm1.gamma`), which
    files written before MindONE's naming was followed use; None for any other name."""
    module, param = _split(name)
    if name.startswith(keymap.VAE_PREFIX) and "norm" in module.rpartition(".")[2] \
            and param in ("gamma", "beta"):
        return f"{module}.{'weight' if param == 'gamma' else 'bias'}"
    return None


def _ms_name(e: Entry, arch: ModelArch) -> Tuple[str, int, str]:
    """(MindSpore name, slot, alias) of one keymap entry."""
    if e.part == "unet":
        return _unet_name(e), 0, ""
    if e.part == "vae":
        module, param = _split(e.ldm)
        if "norm" not in _split(e.name)[0].rpartition(".")[2]:
            return e.ldm, 0, ""
        return f"{module}.{_GAMMA_BETA[param]}", 0, e.ldm
    name, slot = _text_name(e, arch.text.kind)
    return name, slot, ""


@functools.lru_cache(maxsize=32)
def _entries(arch: ModelArch, parts: Tuple[str, ...]) -> Tuple[MsEntry, ...]:
    groups: Dict[str, Dict[int, Entry]] = {}
    extra: Dict[str, str] = {}
    seen = set()
    for e in keymap.iter_entries(arch, parts):
        if e.ldm in seen:                 # one fused original tensor, several diffusers entries
            continue
        seen.add(e.ldm)
        ms, slot, alias = _ms_name(e, arch)
        groups.setdefault(ms, {})[slot] = e
        extra[ms] = alias
    out = []
    for ms, slots in groups.items():
        es = [slots[i] for i in sorted(slots)]
        shape = es[0].shape if len(es) == 1 else (sum(e.shape[0] for e in es),) + es[0].shape[1:]
        out.append(MsEntry(ms, tuple(shape), tuple(e.ldm for e in es), es[0].part,
                           all(e.optional for e in es), extra[ms]))
    return tuple(out)


def mindspore_entries(arch: ModelArch, parts: Sequence[str] = PARTS) -> Tuple[MsEntry, ...]:
    """Every tensor of MindONE's layout for `arch` (incl. the optional carried ones), in
    construction order, without allocating anything."""
    return _entries(arch, keymap.check_parts(parts))


def mindspore_shapes(arch: ModelArch, parts: Sequence[str] = PARTS) -> Dict[str, Shape]:
    """MindSpore name -> shape for `arch`, as this project writes them (MindONE's names)."""
    return {e.ms: e.shape for e in mindspore_entries(arch, parts)}


# --------------------------------------------------------------------------- weights

def canonical_ldm(sd: Mapping[str, np.ndarray], arch: ModelArch, parts: Optional[Sequence[str]] = None,
                  *, ema: bool = False) -> Dict[str, np.ndarray]:
    """The original-layout tensors of `sd` that `arch` defines, validated: buffers (schedule,
    position_ids, model_ema.*) dropped, the `text_model.` level restored, the UNet taken from
    model_ema.* with `ema`. `parts` defaults to the parts `sd` has any tensor of. Unknown tensors,
    missing ones and wrong shapes raise UserError listing them. Arrays are the inputs (no copies).
    """
    src = keymap.normalize_ldm(dict(sd), arch)
    pool = dict(src)
    if ema:
        if not any(k.startswith("model_ema.") for k in sd):
            raise UserError("checkpoint has no EMA weights (model_ema.*) to extract")
        pool.update((k, x) for k, x in sd.items() if k.startswith("model_ema."))
    have = keymap.present_parts(src) + (("unet",) if ema and "unet" not in keymap.present_parts(src) else ())
    if parts is None:
        parts = tuple(p for p in PARTS if p in have)
        if not parts:
            raise UserError(f"checkpoint holds no tensor of a Stable Diffusion model (no "
                            f"{keymap.UNET_PREFIX}, {keymap.VAE_PREFIX} or {keymap.TEXT_PREFIX} names)")
    parts = keymap.check_parts(parts)
    entries = {e.ldm: e for e in keymap.iter_entries(arch)}
    unknown = [k for k in src if k not in entries and keymap.part_of(k) in parts + (None,)]
    if unknown:
        raise UserError(f"checkpoint has {len(unknown)} tensor(s) that {arch.path} does not "
                        f"define (wrong config?): {keymap.listing(unknown)}")
    absent = [p for p in parts if p not in have]
    if absent:
        raise UserError(f"checkpoint lacks the whole {'/'.join(absent)} (has "
                        f"{'/'.join(have) or 'nothing'}); convert only the parts it has")

    def source(e: Entry) -> str:
        return keymap.ema_name(e.ldm) if ema and e.part == "unet" else e.ldm

    wanted = [e for e in entries.values() if e.part in parts]
    missing = {source(e) for e in wanted if not e.optional and source(e) not in pool}
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} tensor(s) that {arch.path} needs for "
                        f"{'/'.join(parts)}: {keymap.listing(missing)}")
    present = [e for e in wanted if source(e) in pool]
    keymap.check_shapes([(source(e), pool[source(e)], e.shape) for e in present], "checkpoint")
    return {e.ldm: pool[source(e)] for e in present}


def ldm_to_mindspore(sd: Mapping[str, np.ndarray], arch: ModelArch, parts: Optional[Sequence[str]] = None,
                     *, ema: bool = False) -> Dict[str, np.ndarray]:
    """Original single-file state dict -> MindONE's MindSpore names (validated like
    `canonical_ldm`). Views of the inputs, dtypes kept; SD1's fused in_proj is the one copy."""
    ldm = canonical_ldm(sd, arch, parts, ema=ema)
    out: Dict[str, np.ndarray] = {}
    for me in mindspore_entries(arch):
        have = [s for s in me.sources if s in ldm]
        if not have:
            continue
        if len(have) != len(me.sources):
            raise UserError(f"checkpoint has only {len(have)} of {', '.join(me.sources)}, which "
                            f"MindSpore stores fused as {me.ms}")
        xs = [ldm[s] for s in me.sources]
        out[me.ms] = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=0)
    return out


def _ms_ignorable(name: str) -> bool:
    return name in _MS_BOOKKEEPING or name in keymap.SCHEDULE_BUFFERS


def mindspore_to_ldm(sd: Mapping[str, np.ndarray], arch: ModelArch,
                     parts: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """MindONE-layout state dict -> original single-file names; exact inverse of
    `ldm_to_mindspore`. Converts the parts present (or only `parts`); each present part must be
    complete. VAE norms may be `weight`/`bias` or `gamma`/`beta`. Training bookkeeping scalars
    (epoch_num, loss_scale, ...) are skipped; unknown names, missing tensors and wrong shapes raise
    UserError listing them. Fused SD1 in_proj tensors are split into row views."""
    entries = mindspore_entries(arch)
    index: Dict[str, MsEntry] = {}
    for me in entries:
        index[me.ms] = me
        if me.alias:
            index[me.alias] = me
    if LORA_RANK_KEY in sd or any(k.endswith(LORA_SUFFIXES) for k in sd):
        raise UserError("this is a LoRA checkpoint, not a model; convert it as a LoRA (--lora)")
    src = {k: x for k, x in sd.items() if not _ms_ignorable(k)}
    unknown = [k for k in src if k not in index]
    if unknown:
        raise UserError(f"MindSpore checkpoint has {len(unknown)} tensor(s) that {arch.path} does "
                        f"not define (wrong config?): {keymap.listing(unknown)}")
    if parts is not None:
        parts = keymap.check_parts(parts)
        src = {k: x for k, x in src.items() if index[k].part in parts}
    found: Dict[str, Tuple[str, np.ndarray]] = {}
    for k, x in src.items():
        me = index[k]
        if me.ms in found:
            raise UserError(f"MindSpore checkpoint holds {me.ms} twice (as {found[me.ms][0]} and {k})")
        found[me.ms] = (k, x)
    present = {index[k].part for k in src}
    if not present:
        raise UserError("MindSpore checkpoint holds no tensor of the requested model parts")
    missing = [me.ms for me in entries if me.part in present and not me.optional and me.ms not in found]
    if missing:
        raise UserError(f"MindSpore checkpoint lacks {len(missing)} tensor(s) that {arch.path} needs "
                        f"for {'/'.join(p for p in PARTS if p in present)}: {keymap.listing(missing)}")
    keymap.check_shapes([(k, x, index[k].shape) for k, x in found.values()], "MindSpore checkpoint")
    out: Dict[str, np.ndarray] = {}
    for me in entries:
        if me.ms not in found:
            continue
        x = found[me.ms][1]
        if len(me.sources) == 1:
            out[me.sources[0]] = x
        else:
            rows = x.shape[0] // len(me.sources)
            for i, s in enumerate(me.sources):
                out[s] = x[i * rows:(i + 1) * rows]
    return out


# --------------------------------------------------------------------------- LoRA

@functools.lru_cache(maxsize=32)
def lora_modules(arch: ModelArch) -> Dict[str, Tuple[str, ...]]:
    """MindONE LoRA module path -> the LoRA targets (common.formats.lora) it covers: one per UNet
    attention projection; three (q, k, v) for a text encoder's fused in_proj."""
    out: Dict[str, Tuple[str, ...]] = {}
    for target, layer in lora_targets(arch, True, False, "attention").items():
        out[_split(layer.ldm)[0]] = (target,)
    for n in range(arch.text.used_layers):
        block = f"{MS_TEXT_PREFIX}transformer_layer.resblocks.{n}.attn.attn"
        layer = f"text_encoder:encoder.layers.{n}.self_attn"
        out[f"{block}.in_proj"] = tuple(f"{layer}.{p}_proj" for p in "qkv")
        out[f"{block}.out_proj"] = (f"{layer}.out_proj",)
    return out


def is_mindspore_lora(keys: Iterable[str]) -> bool:
    """MindONE LoRA names: `<original module path>.lora_down.weight` / `.lora_up.weight`."""
    return any(k.endswith(LORA_SUFFIXES) and k.startswith((UNET_PREFIX, MS_TEXT_PREFIX)) for k in keys)


def _as_f32(x: np.ndarray) -> np.ndarray:
    return cast_array(x, "fp32") if x.dtype == BF16 else x


def _scaled_down(pair: LoraPair) -> np.ndarray:
    """down * alpha / rank, so that MindONE's scale-1 LoRA gives the same update."""
    scale = pair.alpha / pair.rank
    if scale == 1:
        return pair.down
    if pair.down.dtype == BF16:
        return cast_array(cast_array(pair.down, "fp32") * np.float32(scale), "bf16")
    return pair.down * np.asarray(scale, pair.down.dtype)


def _zeros(shape, like: np.ndarray) -> np.ndarray:
    return np.zeros(shape, like.dtype)


def _fuse(pairs: List[Optional[LoraPair]], fan_out: int) -> Tuple[np.ndarray, np.ndarray]:
    """q/k/v LoRAs (None = absent) -> one (down, up) for the fused in_proj."""
    present = [p for p in pairs if p is not None]
    downs = [_scaled_down(p) if p is not None else None for p in pairs]
    real = [d for d in downs if d is not None]
    if len(real) == len(pairs) and all(d.shape == real[0].shape and d.dtype == real[0].dtype
                                       and d.tobytes() == real[0].tobytes() for d in real):
        return real[0], np.concatenate([p.up for p in present], axis=0)      # shared down: exact
    # Different downs: stack them (rank r_q + r_k + r_v) under a block-diagonal up.
    like = present[0].up
    down = np.concatenate(real, axis=0)
    up = _zeros((fan_out * len(pairs), down.shape[0]), like)
    col = 0
    for i, p in enumerate(pairs):
        if p is not None:
            up[i * fan_out:(i + 1) * fan_out, col:col + p.rank] = p.up
            col += p.rank
    return down, up


def lora_to_mindspore(lora: LoraSet, arch: ModelArch) -> Dict[str, np.ndarray]:
    """A LoraSet -> MindONE's LoRA checkpoint dict (see the module docstring), with `lora_rank`
    (int64 scalar, as MindONE's append_dict writes it) and every layer padded to that rank."""
    valid = lora_targets(arch, True, True)
    bad = [t for t in lora if t not in valid]
    if bad:
        raise UserError(f"MindONE's LoRA format holds attention layers only (to_q/to_k/to_v/to_out, "
                        f"q/k/v/out_proj); this LoRA also has {keymap.listing(bad, 3)}")
    if any(not isinstance(p, LoraPair) or p.mid is not None or p.dora_scale is not None for p in lora.values()):
        raise UserError("MindONE's LoRA format holds plain LoRA only (no LoHa, LoKr, Tucker or DoRA)")
    fused: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for module, targets in lora_modules(arch).items():
        pairs = [lora.get(t) for t in targets]
        if all(p is None for p in pairs):
            continue
        if len(targets) == 1:
            fused[module] = (_scaled_down(pairs[0]), pairs[0].up)
        else:
            fused[module] = _fuse(pairs, valid[targets[0]].fan_out)
    if not fused:
        raise UserError("LoRA holds no layers")
    rank = max(d.shape[0] for d, _ in fused.values())
    out: Dict[str, np.ndarray] = {}
    for module, (down, up) in fused.items():
        pad = rank - down.shape[0]
        if pad:                  # zero components: MindONE builds every layer with one rank
            down = np.concatenate([down, _zeros((pad, down.shape[1]), down)], axis=0)
            up = np.concatenate([up, _zeros((up.shape[0], pad), up)], axis=1)
        out[module + LORA_SUFFIXES[0]] = down
        out[module + LORA_SUFFIXES[1]] = up
    out[LORA_RANK_KEY] = np.asarray(rank, np.int64)
    return out


def _nonzero_rows(x: np.ndarray) -> np.ndarray:
    """Per row: does it hold any non-zero value (bitwise; -0.0 counts as zero)?"""
    x = _as_f32(x)
    return np.any(x != 0, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x != 0


def _strip_padding(down: np.ndarray, up: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Drop trailing components whose down row and up column are both zero (rank padding)."""
    used = _nonzero_rows(down) | _nonzero_rows(up.T)
    keep = max(int(np.nonzero(used)[0][-1]) + 1 if used.any() else down.shape[0], 1)
    return down[:keep], up[:, :keep]


def _split_fused(down: np.ndarray, up: np.ndarray, targets: Tuple[str, ...]) -> Dict[str, LoraPair]:
    """A fused in_proj (down [r, d], up [n*d, r]) -> per-projection LoRAs (see module docstring)."""
    n, r = len(targets), down.shape[0]
    rows = up.shape[0] // n
    blocks = [up[i * rows:(i + 1) * rows] for i in range(n)]
    owners = np.stack([_nonzero_rows(b.T) for b in blocks])          # [n, r]
    if owners.any() and (owners.sum(axis=0) <= 1).all():
        owner = np.where(owners.any(axis=0), owners.argmax(axis=0), -1)
        if r % n == 0 and all(o in (-1, j // (r // n)) for j, o in enumerate(owner)):
            owner = np.arange(r) // (r // n)                          # the usual equal ranks
        else:                                  # contiguous ranges; zero columns join the left one
            for j in range(r):
                if owner[j] < 0:
                    owner[j] = owner[j - 1] if j else next(o for o in owner if o >= 0)
        if (np.diff(owner) >= 0).all():
            out = {}
            for i, t in enumerate(targets):
                cols = np.nonzero(owner == i)[0]
                if len(cols):
                    a, b = cols[0], cols[-1] + 1
                    out[t] = LoraPair(down=down[a:b], up=blocks[i][:, a:b], alpha=float(b - a))
            return out
    # Genuinely fused (MindONE-trained) or untrained: the projections share the down matrix.
    return {t: LoraPair(down=down, up=blocks[i], alpha=float(r)) for i, t in enumerate(targets)}


def lora_from_mindspore(sd: Mapping[str, np.ndarray], arch: ModelArch) -> LoraSet:
    """MindONE's LoRA checkpoint -> LoraSet (alpha = rank: MindONE's scale 1). Inverse of
    `lora_to_mindspore`; a fused text in_proj becomes q/k/v LoRAs (shared down, or split back when
    block-diagonal). Unknown names, a missing half of a pair, or ranks that disagree with
    `lora_rank` raise UserError."""
    modules = lora_modules(arch)
    downs: Dict[str, np.ndarray] = {}
    ups: Dict[str, np.ndarray] = {}
    for k, x in sd.items():
        if k == LORA_RANK_KEY or _ms_ignorable(k):
            continue
        module = next((k[:-len(s)] for s in LORA_SUFFIXES if k.endswith(s)), None)
        if module not in modules:
            raise UserError(f"MindSpore LoRA tensor {k} does not match a LoRA layer of {arch.path} "
                            f"(wrong config, or not a MindONE LoRA?)")
        (downs if k.endswith(LORA_SUFFIXES[0]) else ups)[module] = x
    if not downs:
        raise UserError("MindSpore LoRA checkpoint holds no lora_down/lora_up tensors")
    declared = int(np.asarray(sd[LORA_RANK_KEY])) if LORA_RANK_KEY in sd else None
    valid = lora_targets(arch, True, True)
    out: LoraSet = {}
    for module in sorted(set(downs) | set(ups)):
        if module not in downs or module not in ups:
            raise UserError(f"MindSpore LoRA layer {module} lacks its "
                            f"{'lora_down' if module not in downs else 'lora_up'} tensor")
        down, up = downs[module], ups[module]
        targets = modules[module]
        fan_in, fan_out = valid[targets[0]].fan_in, valid[targets[0]].fan_out
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != fan_in or up.shape != (
                fan_out * len(targets), down.shape[0]):
            raise UserError(f"MindSpore LoRA layer {module}: shapes {down.shape}/{up.shape} do not fit "
                            f"{arch.path} ({fan_in} -> {fan_out * len(targets)})")
        if declared is not None and down.shape[0] != declared:
            raise UserError(f"MindSpore LoRA layer {module} has rank {down.shape[0]} but the file "
                            f"says lora_rank {declared}")
        down, up = _strip_padding(down, up)
        if len(targets) == 1:
            out[targets[0]] = LoraPair(down=down, up=up, alpha=float(down.shape[0]))
        else:
            out.update(_split_fused(down, up, targets))
    return out
