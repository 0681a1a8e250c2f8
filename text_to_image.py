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

from common.cli import check_output_dir, run_cli, setup_logging
from common.config import UserArgumentParser, add_bool, backend_name, count, non_negative, ranged

log = logging.getLogger("text_to_image")
GRID_PATTERN = r"^grid-(\d{4})\.png$"
SAMPLER_FLAGS = {"ddim": "ddim", "plms": "plms", "dpm_solver": "dpm_solver_pp", "uni_pc": "unipc"}
# MindONE's -v/--version table: version -> (checkpoint it looks for under models/, architecture config)
VERSIONS = {"2.1": ("sd_v2-1_base-7c8d09ce.ckpt", "configs/v2-inference.yaml"),
            "2.1-v": ("sd_v2-1_768_v-061732d1.ckpt", "configs/v2-vpred-inference.yaml"),
            "2.0": ("sd_v2_base-57526ee4.ckpt", "configs/v2-inference.yaml"),
            "2.0-v": ("sd_v2_768_v-e12e3a9b.ckpt", "configs/v2-vpred-inference.yaml"),
            "1.5": ("sd_v1.5-d0ab7146.ckpt", "configs/v1-inference.yaml")}
DEFAULT_CONFIG = "configs/v2-inference.yaml"


def build_parser() -> argparse.ArgumentParser:
    from common.diffusion.samplers import SAMPLERS

    p = UserArgumentParser(prog="text_to_image.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--prompt", default="A cute wolf in winter forest", help="text prompt")
    a("--negative_prompt", default="", help="negative prompt (the unconditional branch of guidance)")
    a("--data_path", default="", help="file with one prompt per line (overrides --prompt)")
    a("--from-file", dest="from_file", default="", help="the original SD scripts' name for --data_path")
    a("--negative_data_path", default="", help="file with one negative prompt per line, padded with ''")
    a("--config", default=None,
      help=f"architecture yaml of the checkpoint (MindONE's own, e.g. configs/train_dreambooth_sd_v2.yaml, "
           f"work as they are). Default: from -v, else {DEFAULT_CONFIG}")
    a("--version", "-v", default=None, choices=sorted(VERSIONS),
      help="MindONE's Stable Diffusion version: picks --config (2.x: v2-inference.yaml, 2.x-v: "
           "v2-vpred-inference.yaml, 1.5: v1-inference.yaml) and, without --ckpt_path, the "
           "checkpoint MindONE would use, models/<its file name> (never downloaded)")
    a("--ckpt_path", required=False, default=None,
      help="checkpoint: original-layout .safetensors/.ckpt (civitai, A1111, train_dreambooth.py), "
           "a MindONE MindSpore .ckpt, or a diffusers folder")
    add_bool(p, "--use_lora", default=False, help="apply LoRA file(s) (--lora_ckpt_path) on top of --ckpt_path")
    a("--lora_ckpt_path", nargs="+", default=None, metavar="PATH",
      help="LoRA file(s), applied in order: kohya/A1111/civitai LoRA, LoCon, LyCORIS LoHa / LoKr / full "
           "(DoRA too), diffusers or PEFT files, MindONE's MindSpore LoRA .ckpt, or a training LoRA folder")
    add_bool(p, "--lora_ft_unet", default=True, help="apply the LoRAs' UNet layers")
    add_bool(p, "--lora_ft_text_encoder", default=None,
             help="apply the LoRAs' text-encoder layers (default: whatever the files hold, as A1111 and ComfyUI do)")
    a("--lora_scale", nargs="+", type=non_negative, default=[1.0], metavar="SCALE",
      help="multiplier of each LoRA's update (0 = off): one for all files, or one per --lora_ckpt_path")
    a("--lora_rank", type=ranged(int, low=1, optional=True), default=None, help="accepted for MindONE compatibility; the rank is read from the file")
    a("--sampler", default=None, choices=SAMPLERS, help="sampler (default dpm_solver_pp, as MindONE)")
    for flag, name in SAMPLER_FLAGS.items():
        a(f"--{flag}", action="store_true", help=f"MindONE spelling of --sampler {name}")
    a("--sampling_steps", type=count, default=20, help="sampler steps (50 recommended for ddim/plms, 20 for dpm_solver_pp/unipc)")
    a("--ddim_eta", type=non_negative, default=0.0, help="DDIM eta (0 = deterministic)")
    a("--scale", type=ranged(float, low=0, optional=True), default=None, help="classifier-free guidance scale (default 9.0 for SD2, 7.5 for SD1)")
    a("--H", type=ranged(int, low=1, optional=True), default=None, help="image height in pixels (default: the model's native size)")
    a("--W", type=ranged(int, low=1, optional=True), default=None, help="image width in pixels (default: the model's native size)")
    a("--n_samples", type=count, default=4, help="images per prompt per iteration (batch size)")
    a("--n_iter", type=count, default=2, help="iterations per prompt")
    a("--n_rows", type=ranged(int, low=0), default=0,
      help="images per row of the grid, as in the original SD scripts (0 = --n_samples: one row per batch)")
    a("--seed", type=int, default=42, help="seed of the initial latents and ancestral noise (same image on both backends)")
    add_bool(p, "--fixed_code", default=False, help="reuse one initial latent for every prompt and iteration")
    a("--output_path", default="output", help="images go to <output_path>/samples/, grids to <output_path>/")
    a("--skip_grid", action="store_true", help="do not write the grid image")
    a("--skip_save", action="store_true", help="do not write individual images")
    a("--add_watermark", action="store_true",
      help="embed MindONE's / Stable Diffusion's invisible watermark (b'StableDiffusion', DWT-DCT; "
           "images of at least 256x256 pixels)")
    a("--check_safety", action="store_true",
      help="replace images the safety checker flags as NSFW with black images (weights from local files only)")
    a("--clip_ckpt_path", default=None,
      help="safety checker CLIP: with --safety_version 2 a CLIP ViT-L/14 (default models/clip_vit_l_14.ckpt, "
           "MindONE's; also OpenAI/open_clip files or a transformers CLIP folder); with 1 the diffusers/CompVis "
           "safety checker folder or weight file (default models/safety_checker)")
    a("--safety_version", type=int, default=2, choices=(1, 2),
      help="1: diffusers/CompVis concept checker (SD 1.x); 2: LAION's CLIP NSFW detector (MindONE's default)")
    a("--nsfw_ckpt_path", default=None,
      help="--safety_version 2 head: LAION's NSFW MLP (default models/l14_nsfw.safetensors, else "
           "models/l14_nsfw*.ckpt such as MindONE's l14_nsfw-c7c99ae7.ckpt)")
    add_bool(p, "--support_long_prompts", default=False,
             help="encode prompts longer than the text encoder's 75 tokens in chunks of 75 (each framed to 77 and "
                  "encoded on its own, the results concatenated; the negative prompt padded to as many chunks), as "
                  "MindONE and A1111 do. Without it a longer prompt is truncated, with a warning")
    a("--ti_ckpt_path", nargs="+", default=None, metavar="PATH",
      help="textual-inversion embedding file(s): A1111/civitai .pt or .safetensors (trigger word: the file name "
           "without extension), diffusers' learned_embeds.bin/.safetensors or MindONE's textual-inversion .ckpt "
           "(trigger word: the token stored in the file). The trigger word stands for the embedding in prompts "
           "and negative prompts, as a whole word in any case")
    a("--clip_skip", type=ranged(int, low=1, optional=True), default=None, metavar="N",
      help="condition on the text encoder's N-th layer from the end, then its final layer norm (A1111/kohya "
           "clip skip: 1 = the model's own layer, 2 = one earlier, usual for anime SD 1.x models). diffusers' "
           "clip_skip=k is N=k+1. SD 2.x already stops one layer early; N counts from there, as in kohya's "
           "scripts (A1111 ignores clip skip for SD 2.x). Default: the model's own layer")
    a("--backend", type=backend_name, default="cuda", help="cuda (PyTorch) or ascend (MindSpore)")
    a("--precision", default="auto", help="auto (fp16 on GPU/Ascend, fp32 on CPU), fp32, fp16 or bf16")
    a("--ms_mode", type=int, default=0, choices=(0, 1), help="ascend backend: 0 GRAPH_MODE, 1 PYNATIVE_MODE")
    a("--jit_level", default=None, choices=("O0", "O1", "O2"),
      help="ascend backend on Ascend: MindSpore's graph compilation level (MindONE's flag; default MindSpore's)")
    add_bool(p, "--use_parallel", default=False,
             help="accepted for MindONE compatibility: sampling runs on one device (start one process per device "
                  "with its own --seed/--output_path to sample in parallel)")
    a("--device_target", default=None, help="accepted for MindONE compatibility (the backend picks the device)")
    a("--tokenizer_path", default=None, help="CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz, e.g. MindONE's); default: open_clip's copy when installed, else the vocabulary built into instant-clip-tokenizer")
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


def read_loras(args, arch) -> list:
    """[(adapters, scale)] for --lora_ckpt_path / --lora_scale, limited by --lora_ft_*."""
    from common.formats import lora as lora_fmt
    from common.formats.loading import load_lora_file

    out = []
    for i, path in enumerate(args.lora_ckpt_path):
        full = load_lora_file(path, arch)
        text = args.lora_ft_text_encoder is not False
        lora = lora_fmt.select(full, args.lora_ft_unet, text)
        ignored = set(lora_fmt.components(full)) - set(lora_fmt.components(lora))
        if ignored:
            log.warning("%s: LoRA layers of %s are not applied (--lora_ft_%s False)", path,
                        ", ".join(sorted(ignored)), "text_encoder" if "text_encoder" in ignored else "unet")
        scale = args.lora_scale[i % len(args.lora_scale)]
        log.info("%s: %d %s layers (%s), scale %g", path, len(lora), lora_fmt.kinds(lora),
                 "/".join(lora_fmt.components(lora)) or "none", scale)
        out.append((lora, scale))
    return out


def main() -> int:
    args = build_parser().parse_args()
    setup_logging(args.log_level)
    from backends import load_backend
    from common.formats import lora as lora_fmt
    from common import watermark
    from common.arch import load_arch
    from common.formats.loading import lora_clip_skip, load_model_weights
    from common.errors import UserError
    from common.diffusion.generate import SampleSettings, pad_negatives, text_to_image
    from common.images import make_grid, next_index, save_images, save_png
    from common.evaluation.safety import load_safety_checker
    from common.tokenizer import tokenizer_for
    from common.formats.embeddings import add_embeddings, read_embeddings

    if args.use_lora and not args.lora_ckpt_path:
        raise UserError("--use_lora True needs --lora_ckpt_path (the LoRA file(s) or training LoRA folder)")
    if args.lora_ckpt_path and not args.use_lora:
        raise UserError("--lora_ckpt_path is given but --use_lora is False: add --use_lora True to apply it")
    if len(args.lora_scale) not in (1, len(args.lora_ckpt_path or ())):
        raise UserError(f"--lora_scale takes one value, or one per --lora_ckpt_path file "
                        f"({len(args.lora_ckpt_path or ())}); got {len(args.lora_scale)}")
    if not args.ckpt_path and args.version:
        args.ckpt_path = os.path.join("models", VERSIONS[args.version][0])
        if not os.path.exists(args.ckpt_path):
            raise UserError(f"-v {args.version}: {args.ckpt_path} not found (nothing is downloaded); "
                            f"put the checkpoint there or pass --ckpt_path")
    if not args.ckpt_path:
        raise UserError("--ckpt_path is required (nothing is downloaded; make a tiny model with tools/make_tiny_model.py)")
    arch = load_arch(args.config or (VERSIONS[args.version][1] if args.version else DEFAULT_CONFIG))
    clip_skip = args.clip_skip
    if clip_skip is None and args.use_lora:
        clip_skip = lora_clip_skip(args.lora_ckpt_path)
        if clip_skip is not None:
            log.info("clip skip %d, as the LoRA's metadata (ss_clip_skip) says; --clip_skip overrides it", clip_skip)
    arch = arch.with_clip_skip(clip_skip)     # None: the model's own layer
    for flag, dim in (("--H", args.H), ("--W", args.W)):
        if dim is not None:
            arch.check_image_size(dim, flag)
    sampler = args.sampler or next((n for f, n in SAMPLER_FLAGS.items() if getattr(args, f)), "dpm_solver_pp")
    prompt_file = args.data_path or args.from_file
    prompts = read_lines(prompt_file) if prompt_file else [args.prompt]
    negatives = pad_negatives(prompts, read_lines(args.negative_data_path) if args.negative_data_path else [args.negative_prompt])
    check_output_dir(args.output_path, "--output_path")
    tokenizer = tokenizer_for(arch.text, args.tokenizer_path)
    embeddings = read_embeddings(args.ti_ckpt_path or [], arch)     # small files: fail early
    loras = read_loras(args, arch) if args.use_lora else []    # small files: a wrong one fails early
    checker = None
    if args.check_safety:          # read the checker's files now: a missing one fails before sampling
        checker = load_safety_checker(args.backend, args.clip_ckpt_path, args.safety_version, args.nsfw_ckpt_path)
    weights = load_model_weights(args.ckpt_path, arch)
    if loras:
        weights = lora_fmt.merge_loras(weights, arch, loras)
    arch = add_embeddings(embeddings, weights, arch, tokenizer)
    backend = load_backend(args.backend)
    kwargs = {"mode": args.ms_mode, "jit_level": args.jit_level} if args.backend == "ascend" else {}
    pipe = backend.Pipeline(arch, weights, precision=args.precision, **kwargs)
    del weights
    settings = SampleSettings(sampler=sampler, steps=args.sampling_steps, eta=args.ddim_eta,
                              scale=args.scale if args.scale is not None else (9.0 if arch.version == "sd2" else 7.5),
                              height=args.H or arch.image_size, width=args.W or arch.image_size, seed=args.seed)
    samples_dir = os.path.join(args.output_path, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    start = next_index(samples_dir)
    all_images, written = [], []
    marked = 0
    for batch in text_to_image(pipe, arch, tokenizer, prompts, negatives, settings, n_samples=args.n_samples,
                               n_iter=args.n_iter, fixed_code=args.fixed_code,
                               long_prompts=args.support_long_prompts):
        if args.add_watermark:
            with_mark = [watermark.embed(img) for img in batch]
            marked += sum(m is not None for m in with_mark)
            batch = np.stack([img if m is None else m for img, m in zip(batch, with_mark)])
        if checker is not None:    # after the watermark, as MindONE does
            batch, _ = checker(batch)
        all_images.extend(batch)
        if not args.skip_save:
            written += save_images(batch, samples_dir, start + len(written))
    if args.add_watermark and marked < len(all_images):
        log.warning("%d image(s) smaller than 256x256 pixels carry no watermark (too small for it)",
                    len(all_images) - marked)
    if written:
        print(f"samples: {written[0]} ... {written[-1]} ({len(written)} images)")
    if not args.skip_grid:
        number = next_index(args.output_path, GRID_PATTERN)
        grid = os.path.join(args.output_path, f"grid-{number:04d}.png")
        save_png(np.asarray(make_grid(all_images, cols=args.n_rows or args.n_samples)), grid)
        print(f"grid: {grid}")
    return 0


if __name__ == "__main__":
    run_cli(main)
