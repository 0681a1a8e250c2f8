"""Checkpoint and LoRA conversion behind tools/model_conversion/convert_weights.py (MindONE's
interface): recognise the source from its content, choose the architecture, map the names through
common.formats' key maps and write the target atomically. See the script's --help for the user's view.
"""
from __future__ import annotations

import os
import sys
import time

from common.errors import UserError

MODEL_CONFIGS = {"sdv1": "configs/v1-inference.yaml", "sdv2": "configs/v2-inference.yaml",
                 "diffusersv1": "configs/v1-inference.yaml", "diffusersv2": "configs/v2-inference.yaml"}
VPRED_CONFIG = "configs/v2-vpred-inference.yaml"
TARGETS = ("ms", "pt", "diffusers", "kohya")


# --------------------------------------------------------------------------- recognising sources

_DIFFUSERS_LORA_MARKS = (".lora.down.weight", ".lora.up.weight", ".lora_A.weight", ".lora_B.weight",
                         ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")


def _lora_kind(keys) -> str:
    """"ms", "kohya" or "diffusers" when every tensor is a LoRA tensor; "" otherwise."""
    from common.formats.mindspore_layout import LORA_RANK_KEY, LORA_SUFFIXES, is_mindspore_lora

    keys = list(keys)
    if is_mindspore_lora(keys) and all(k == LORA_RANK_KEY or k.endswith(LORA_SUFFIXES) for k in keys):
        return "ms"
    if keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        return "kohya"
    if keys and all(k.endswith(_DIFFUSERS_LORA_MARKS) for k in keys if k != "lora_rank"):
        return "diffusers"
    return ""


def _text_width(sd) -> int:
    """Cross-attention / text width from whichever tensor shows it (any layout, LoRAs too)."""
    for k, x in sd.items():
        if x.ndim != 2 or k.endswith(("up.weight", "lora_B.weight")):    # LoRA ups: [out, rank]
            continue
        flat = k.replace("_", ".")
        if "attn2.to.k" in flat or "q.proj" in flat or "in.proj" in flat \
                or flat.endswith(("embedding.table", "token.embedding.weight")):
            return int(x.shape[1])
    return 0


def choose_config(args, tensors, folder_prediction=None) -> str:
    if args.config:
        return args.config
    if args.model:
        return MODEL_CONFIGS[args.model]
    width = _text_width(tensors)
    if width == 768:
        return MODEL_CONFIGS["sdv1"]
    if width == 1024:
        return VPRED_CONFIG if folder_prediction == "v_prediction" else MODEL_CONFIGS["sdv2"]
    raise UserError(f"{args.source}: cannot tell SD1 from SD2 (text width {width or 'unknown'}); "
                    f"pass --model sdv1|sdv2 or --config <architecture yaml>")


def _check_source_version(args, framework: str) -> None:
    if args.source_version and args.source_version != framework:
        what = "a MindSpore checkpoint" if framework == "ms" else "a PyTorch-side checkpoint"
        raise UserError(f"{args.source} is {what}, but --source_version {args.source_version} was "
                        f"given; use --source_version {framework} (or leave it out)")


# --------------------------------------------------------------------------- models

def _load_vae(path: str, arch) -> dict:
    """A separate VAE in any supported form -> original-layout first_stage_model.* tensors."""
    from common.formats import checkpoint_io as cio, keymap, mindspore_layout

    if os.path.isdir(path):          # a diffusers model folder, or its vae/ folder
        folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
        names = [n for n in cio.DIFFUSERS_LAYOUT["vae"] if os.path.isfile(os.path.join(folder, n))]
        if not names:
            raise UserError(f"{path}: no VAE weights found")
        return keymap.diffusers_to_ldm({"vae": cio.load_state_dict(os.path.join(folder, names[0]),
                                                                     keep_bf16=True)}, arch)
    sd = cio.load_state_dict(path, keep_bf16=True)
    if cio.sniff_format(path) == "mindspore":
        return mindspore_layout.mindspore_to_ldm(sd, arch, parts=("vae",))
    if any(k.startswith(keymap.VAE_PREFIX) for k in sd):
        return mindspore_layout.canonical_ldm(sd, arch, parts=("vae",))
    # A standalone VAE file: original names without the prefix (plus, in some, the training
    # loss's discriminator and EMA copies), or diffusers names.
    body = {k: x for k, x in sd.items() if not k.startswith(("loss.", "model_ema."))}
    if any(".down_blocks." in k or ".mid_block." in k for k in body):
        return keymap.diffusers_to_ldm({"vae": body}, arch)
    return mindspore_layout.canonical_ldm({keymap.VAE_PREFIX + k: x for k, x in body.items()},
                                          arch, parts=("vae",))


def _convert_model(args, kind: str, source, arch, target_kind: str) -> str:
    from common.formats import checkpoint_io as cio, keymap, mindspore_layout

    if args.ema and kind != "pt":
        raise UserError(f"--ema: {args.source} holds no EMA weights (only original PyTorch "
                        f"checkpoints carry model_ema.*)")
    if kind == "ms":
        ldm = mindspore_layout.mindspore_to_ldm(source, arch)
    elif kind == "diffusers":
        ldm = keymap.diffusers_to_ldm(source, arch)
    else:
        ldm = mindspore_layout.canonical_ldm(source, arch, ema=args.ema)
    if args.vae:
        ldm = {k: x for k, x in ldm.items() if not k.startswith(keymap.VAE_PREFIX)}
        ldm.update(_load_vae(args.vae, arch))
    parts = keymap.present_parts(ldm)
    if target_kind == "ms":
        out = mindspore_layout.ldm_to_mindspore(ldm, arch)
        cio.save_mindspore_ckpt(args.target, out, overwrite=args.overwrite, dtype=args.dtype)
        count = len(out)
    elif target_kind == "pt":
        cio.save_state_dict(args.target, ldm, overwrite=args.overwrite, dtype=args.dtype)
        count = len(ldm)
    elif target_kind == "diffusers":
        comps = keymap.ldm_to_diffusers(ldm, arch, parts=parts)
        cio.save_diffusers_folder(args.target, comps, arch, overwrite=args.overwrite, dtype=args.dtype)
        count = sum(len(c) for c in comps.values())
    else:
        raise UserError("--to kohya is for LoRAs; a model goes to ms, pt or diffusers")
    missing = [p for p in keymap.PARTS if p not in parts]
    note = f"; no {'/'.join(missing)} in the source (add a VAE with --vae)" if missing else ""
    return f"{count} tensors ({'/'.join(parts)}){note}"


# --------------------------------------------------------------------------- LoRA

def _convert_lora(args, kind: str, sd, arch, target_kind: str) -> str:
    from common.formats import checkpoint_io as cio, lora as lora_fmt, mindspore_layout

    if args.ema or args.vae:
        raise UserError("--ema and --vae apply to models, not to a LoRA")
    # LoRA arithmetic (alpha folding) needs real floats: widen kept bf16, write bf16 again.
    dtype = args.dtype
    if any(x.dtype == cio.BF16 for x in sd.values()):
        sd = {k: cio.cast_array(x, "fp32") for k, x in sd.items()}
        dtype = dtype or "bf16"
    lora = mindspore_layout.lora_from_mindspore(sd, arch) if kind == "ms" else \
        lora_fmt.from_state_dict(sd, arch)
    if target_kind == "ms":
        out = mindspore_layout.lora_to_mindspore(lora, arch)
        cio.save_mindspore_ckpt(args.target, out, overwrite=args.overwrite, dtype=dtype)
        fmt = f"MindSpore LoRA, lora_rank {int(out[mindspore_layout.LORA_RANK_KEY])}"
    else:
        fmt = "diffusers LoRA" if target_kind == "diffusers" else "kohya LoRA"
        out = lora_fmt.to_diffusers(lora) if target_kind == "diffusers" else lora_fmt.to_kohya(lora)
        if not args.target.lower().endswith(cio.SAFETENSORS_EXT + cio.TORCH_EXT):
            raise UserError(f"{args.target}: a {fmt} target must end in .safetensors (or a torch "
                            f"pickle extension)")
        cio.save_state_dict(args.target, out, overwrite=args.overwrite, dtype=dtype)
    comps = "/".join(lora_fmt.components(lora))
    return f"{len(lora)} LoRA layers ({comps}) as {fmt}"


# --------------------------------------------------------------------------- one conversion

def convert(args) -> str:
    """Convert as the parsed flags say; returns the one-line summary."""
    from common.formats import checkpoint_io as cio
    from common.arch import load_arch

    if os.path.lexists(args.target) and not args.overwrite:
        raise UserError(f"{args.target} already exists; pass --overwrite to replace it")
    start = time.time()
    if os.path.isdir(args.source):       # a LoRA training output folder holds the file itself
        from common.formats.lora import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
        for name in (DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            if os.path.isfile(os.path.join(args.source, name)) and not cio.is_diffusers_folder(args.source):
                args.source = os.path.join(args.source, name)
                break
    fmt = cio.checkpoint_format(args.source)
    framework = "ms" if fmt == "mindspore" else "pt"
    _check_source_version(args, framework)

    prediction = None
    lora_file = None
    if fmt == "diffusers":
        source = cio.load_diffusers_folder(args.source, keep_bf16=True)
        prediction = cio.folder_prediction_type(args.source)
        tensors = {k: x for comp in source.values() for k, x in comp.items()}
        kind = "diffusers"
    else:
        source = tensors = cio.load_state_dict(args.source, keep_bf16=True)
        kind = framework
        lora_file = _lora_kind(tensors)
    if args.lora and not lora_file:
        raise UserError(f"--lora: {args.source} is not a LoRA file (diffusers/PEFT, kohya or "
                        f"MindSpore LoRA names expected)")

    config = choose_config(args, tensors, prediction)
    arch = load_arch(config)
    default_target = "diffusers" if args.model in ("diffusersv1", "diffusersv2") else \
        ("pt" if framework == "ms" else "ms")
    target_kind = args.to or default_target
    if target_kind == "ms" and args.target.lower().endswith(cio.SAFETENSORS_EXT):
        raise UserError(f"{args.target}: a MindSpore checkpoint is a .ckpt file, not .safetensors")
    if target_kind == "pt" and not lora_file and not args.target.lower().endswith(
            cio.SAFETENSORS_EXT + cio.TORCH_EXT):
        raise UserError(f"{args.target}: use .safetensors (or .ckpt/.pt/.pth/.bin for a torch "
                        f"pickle) for a PyTorch single-file target, or --to diffusers for a folder")
    if prediction == "v_prediction" and arch.schedule.parameterization != "v":
        print(f"note: {args.source} is a v-prediction model but {config} says eps; pass "
              f"--config {VPRED_CONFIG} if the schedule matters to you", file=sys.stderr)

    if lora_file:
        target_kind = {"pt": "kohya"}.get(target_kind, target_kind)
        what = _convert_lora(args, lora_file, tensors, arch, target_kind)
    else:
        what = _convert_model(args, kind, source, arch, target_kind)
    dtype = args.dtype or "dtypes as stored"
    return (f"converted {args.source} -> {args.target} [{target_kind}]: {what}; {dtype}; "
            f"config {config}; {time.time() - start:.1f} s")
