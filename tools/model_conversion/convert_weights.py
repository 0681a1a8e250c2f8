#!/usr/bin/env python
"""Convert Stable Diffusion checkpoints and LoRAs between PyTorch-side formats and MindONE's
MindSpore layout, in both directions, for any architecture config.

MindONE's interface works as before, e.g. a civitai model for Ascend:

    python tools/model_conversion/convert_weights.py --source models/toonyou_beta3.safetensors \\
        --target models/toonyou_beta3.ckpt --model sdv1 --source_version pt

and back (`--source_version ms`), or to a diffusers folder (`--model diffusersv2`, `--to diffusers`).
MindSpore files get exactly MindONE's parameter names (VAE GroupNorms as gamma/beta); `--to ms` on a
MindSpore file written by an earlier version of this project (VAE norms as weight/bias) rewrites it
with MindONE's names.

Sources, recognised from their content (a .ckpt may be a torch pickle or a MindSpore file):
  original single-file models (.safetensors, .ckpt/.pt/.bin torch pickles, loaded safely),
  MindONE MindSpore .ckpt files, diffusers folders, and LoRAs: diffusers / PEFT, kohya
  (lora_unet_* / lora_te_*, what A1111 and ComfyUI use) and MindONE's MindSpore LoRA .ckpt.
Targets (--to): ms (MindONE .ckpt), pt (original layout; .safetensors or a torch pickle by the
target's extension; for a LoRA: kohya), diffusers (a folder; for a LoRA: the diffusers file),
kohya (LoRA only). By default the other framework than the source's.

Names are mapped by rules generated from the architecture config, so every tensor is accounted
for: unknown or missing tensors are an error that lists them, and a conversion there and back
gives the same bits. Dtypes are kept unless --dtype is given. The target is written to a temporary
name and renamed; an existing target is only replaced with --overwrite.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _path  # noqa: F401,E402  (repository root on sys.path)

from common.cli import run_cli  # noqa: E402
from common.config import UserArgumentParser, add_bool  # noqa: E402
from common.formats.conversion import MODEL_CONFIGS, TARGETS, convert  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = UserArgumentParser(prog="convert_weights.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", "-s", required=True,
                   help="checkpoint file, diffusers folder or LoRA file to convert")
    p.add_argument("--target", "-t", required=True,
                   help="output file (a folder for --to diffusers models); must not exist unless "
                        "--overwrite")
    p.add_argument("--model", "-m", choices=sorted(MODEL_CONFIGS), default=None,
                   help="sdv1 / sdv2: use configs/v1-inference.yaml / configs/v2-inference.yaml; "
                        "diffusersv1 / diffusersv2: the same, writing a diffusers folder (as "
                        "MindONE's diffusersv2). Default: recognised from the weights (SD1 vs SD2 "
                        "by the text width; a diffusers folder's v_prediction picks "
                        "v2-vpred-inference.yaml)")
    p.add_argument("--source_version", "-sv", choices=("pt", "ms"), default=None,
                   help="framework of the source: pt (PyTorch side: single file, diffusers, "
                        "kohya) or ms (MindSpore). Default: recognised from the content; if given, "
                        "it must agree with it")
    p.add_argument("--config", default=None,
                   help="architecture yaml for any model (e.g. configs/tiny-v1-inference.yaml); "
                        "overrides --model's default config")
    p.add_argument("--to", choices=TARGETS, default=None,
                   help="target format: ms = MindONE MindSpore .ckpt; pt = original single-file "
                        "layout (.safetensors, or a torch pickle for .ckpt/.pt/.pth/.bin), for a "
                        "LoRA the kohya format; diffusers = diffusers folder (for a LoRA: "
                        "diffusers' pytorch_lora_weights format); kohya = kohya LoRA. Default: ms "
                        "for a PyTorch-side source, pt for a MindSpore one, diffusers with "
                        "--model diffusersv1/v2")
    p.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), default=None,
                   help="store floating tensors in this precision (default: keep each tensor's "
                        "dtype as stored; integers are never changed)")
    add_bool(p, "--ema", default=False,
             help="take the UNet from the EMA weights (model_ema.*) of an original checkpoint "
                  "instead of the regular ones")
    p.add_argument("--vae", default=None,
                   help="a separate VAE to put in (replacing the source's VAE, if any): an "
                        "original VAE file (encoder.*/decoder.* or first_stage_model.*), a "
                        "diffusers VAE file or folder, or a MindSpore checkpoint with a VAE")
    add_bool(p, "--overwrite", default=False, help="replace an existing target")
    add_bool(p, "--lora", default=False,
             help="convert a LoRA (recognised from its names anyway; with this flag a source "
                  "that is not a LoRA is an error)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(convert(args))
    return 0


def _main() -> int:
    try:
        return main()
    except KeyboardInterrupt:            # the target is only renamed into place when complete
        print("interrupted; the target was not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    run_cli(_main)
