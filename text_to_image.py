#!/usr/bin/env python
"""Generate images with Stable Diffusion 1.x/2.x on PyTorch/CUDA or MindSpore/Ascend.

    python text_to_image.py --prompt "a sks dog swimming in a pool" --config configs/v2-inference.yaml \\
        --ckpt_path <checkpoint> [--use_lora True --lora_ckpt_path <lora>] --backend cuda

Images go to <output_path>/samples/00000.png, 00001.png, ... (numbering continues after existing
files) and one grid per run to <output_path>/grid-0000.png.
"""
import argparse
import logging
import os

import numpy as np

from common.cli import run_cli, setup_logging
from common.config import UserArgumentParser, add_bool, backend_name

log = logging.getLogger("text_to_image")
GRID_PATTERN = r"^grid-(\d{4})\.png$"
SAMPLER_FLAGS = {"ddim": "ddim", "plms": "plms", "dpm_solver": "dpm_solver_pp", "uni_pc": "unipc"}


def build_parser() -> argparse.ArgumentParser:
    from common.samplers import SAMPLERS

    p = UserArgumentParser(prog="text_to_image.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--prompt", default="A cute wolf in winter forest", help="text prompt")
    a("--negative_prompt", default="", help="negative prompt (the unconditional branch of guidance)")
    a("--data_path", default="", help="file with one prompt per line (overrides --prompt)")
    a("--negative_data_path", default="", help="file with one negative prompt per line, padded with ''")
    a("--config", default="configs/v2-inference.yaml", help="architecture yaml of the checkpoint")
    a("--ckpt_path", required=False, default=None,
      help="checkpoint: original-layout .safetensors/.ckpt (civitai, A1111, train_dreambooth.py), "
           "a MindONE MindSpore .ckpt, or a diffusers folder")
    add_bool(p, "--use_lora", default=False, help="apply a LoRA (--lora_ckpt_path) on top of --ckpt_path")
    a("--lora_ckpt_path", default=None, help="LoRA file (diffusers, kohya or PEFT format) or a training LoRA folder")
    add_bool(p, "--lora_ft_unet", default=True, help="apply the LoRA's UNet layers")
    add_bool(p, "--lora_ft_text_encoder", default=False, help="apply the LoRA's text-encoder layers")
    a("--lora_scale", type=float, default=1.0, help="multiplier of the LoRA update (0 = off)")
    a("--lora_rank", type=int, default=None, help="accepted for MindONE compatibility; the rank is read from the file")
    a("--sampler", default=None, choices=SAMPLERS, help="sampler (default dpm_solver_pp, as MindONE)")
    for flag, name in SAMPLER_FLAGS.items():
        a(f"--{flag}", action="store_true", help=f"MindONE spelling of --sampler {name}")
    a("--sampling_steps", type=int, default=20, help="sampler steps (50 recommended for ddim/plms, 20 for dpm_solver_pp/unipc)")
    a("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    a("--scale", type=float, default=None, help="classifier-free guidance scale (default 9.0 for SD2, 7.5 for SD1)")
    a("--H", type=int, default=None, help="image height in pixels (default: the model's native size)")
    a("--W", type=int, default=None, help="image width in pixels (default: the model's native size)")
    a("--n_samples", type=int, default=4, help="images per prompt per iteration (batch size)")
    a("--n_iter", type=int, default=2, help="iterations per prompt")
    a("--seed", type=int, default=42, help="seed of the initial latents and ancestral noise (same image on both backends)")
    add_bool(p, "--fixed_code", default=False, help="reuse one initial latent for every prompt and iteration")
    a("--output_path", default="output", help="images go to <output_path>/samples/, grids to <output_path>/")
    a("--skip_grid", action="store_true", help="do not write the grid image")
    a("--skip_save", action="store_true", help="do not write individual images")
    a("--backend", type=backend_name, default="cuda", help="cuda (PyTorch) or ascend (MindSpore)")
    a("--precision", default="auto", help="auto (fp16 on GPU/Ascend, fp32 on CPU), fp32, fp16 or bf16")
    a("--ms_mode", type=int, default=0, choices=(0, 1), help="ascend backend: 0 GRAPH_MODE, 1 PYNATIVE_MODE")
    a("--device_target", default=None, help="accepted for MindONE compatibility (the backend picks the device)")
    a("--version", "-v", default=None, help="accepted for MindONE compatibility; the architecture comes from --config")
    a("--tokenizer_path", default=None, help="CLIP BPE vocabulary; default: the one inside open_clip")
    a("--log_level", default="INFO", help="logging level")
    return p


def read_lines(path: str) -> list:
    from common.errors import UserError

    if not os.path.isfile(path):
        raise UserError(f"prompt file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise UserError(f"prompt file {path} is empty")
    return lines


def main() -> int:
    args = build_parser().parse_args()
    setup_logging(args.log_level)
    from backends import load_backend
    from common import lora as lora_fmt
    from common.arch import load_arch
    from common.checkpoint_io import load_model_weights
    from common.errors import UserError
    from common.generate import SampleSettings, pad_negatives, text_to_image
    from common.images import make_grid, next_index, save_images, save_png
    from common.tokenizer import tokenizer_for

    if not args.ckpt_path:
        raise UserError("--ckpt_path is required (nothing is downloaded; make a tiny model with tools/make_tiny_model.py)")
    for dim in (args.H, args.W):
        if dim is not None and dim % 8:
            raise UserError(f"--H/--W must be multiples of 8, got {dim}")
    arch = load_arch(args.config)
    sampler = args.sampler or next((n for f, n in SAMPLER_FLAGS.items() if getattr(args, f)), "dpm_solver_pp")
    prompts = read_lines(args.data_path) if args.data_path else [args.prompt]
    negatives = pad_negatives(prompts, read_lines(args.negative_data_path) if args.negative_data_path else [args.negative_prompt])
    weights = load_model_weights(args.ckpt_path, arch)
    lora = None
    if args.use_lora and args.lora_ckpt_path:
        full = lora_fmt.load_lora_file(args.lora_ckpt_path, arch)
        lora = lora_fmt.select(full, args.lora_ft_unet, args.lora_ft_text_encoder)
        ignored = set(lora_fmt.components(full)) - set(lora_fmt.components(lora))
        if ignored:
            log.warning("LoRA layers of %s are not applied (enable with --lora_ft_%s True)",
                        ", ".join(sorted(ignored)), "text_encoder" if "text_encoder" in ignored else "unet")
    backend = load_backend(args.backend)
    kwargs = {"mode": args.ms_mode} if args.backend == "ascend" else {}
    pipe = backend.Pipeline(arch, weights, precision=args.precision, lora=lora, lora_scale=args.lora_scale, **kwargs)
    del weights
    settings = SampleSettings(sampler=sampler, steps=args.sampling_steps, eta=args.ddim_eta,
                              scale=args.scale if args.scale is not None else (9.0 if arch.version == "sd2" else 7.5),
                              height=args.H or arch.image_size, width=args.W or arch.image_size, seed=args.seed)
    tokenizer = tokenizer_for(arch.text, args.tokenizer_path)
    samples_dir = os.path.join(args.output_path, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    start = next_index(samples_dir)
    all_images, written = [], []
    for batch in text_to_image(pipe, arch, tokenizer, prompts, negatives, settings, n_samples=args.n_samples,
                               n_iter=args.n_iter, fixed_code=args.fixed_code):
        all_images.extend(batch)
        if not args.skip_save:
            written += save_images(batch, samples_dir, start + len(written))
    if written:
        print(f"samples: {written[0]} ... {written[-1]} ({len(written)} images)")
    if not args.skip_grid:
        number = next_index(args.output_path, GRID_PATTERN)
        grid = os.path.join(args.output_path, f"grid-{number:04d}.png")
        save_png(np.asarray(make_grid(all_images, rows=len(prompts) * args.n_iter)), grid)
        print(f"grid: {grid}")
    return 0


if __name__ == "__main__":
    run_cli(main)
