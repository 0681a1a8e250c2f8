#!/usr/bin/env python
"""Evaluate a DreamBooth run: CLIP-T (prompt fidelity), CLIP-I and DINO (subject fidelity) of the
images generated for a list of prompts against the instance (real subject) images, written to one
JSON file and a markdown report with an image grid per prompt.

    python tools/eval/eval_dreambooth.py --gen_image_path_or_dir output/samples \\
        --prompt_or_path prompts.txt --real_image_path_or_dir datasets/dog \\
        --ckpt_path models/ViT-B-32-quickgelu.safetensors \\
        --dino_ckpt_path models/dino_deitsmall16_pretrain.pth --output_path output/eval

Generated images are given either as one folder plus the prompts (a prompt or a file with one
per line; N images are split consecutively, N/P per prompt, as text_to_image.py --data_path
writes them), or as a folder with one sub-folder per prompt (the prompt is the sub-folder's
prompt.txt, else the matching line of --prompt_or_path, else the folder name with '_' as space).

Writes <output_path>/results.json, <output_path>/report.md and <output_path>/grids/*.png.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _path  # noqa: F401,E402  (repository root on sys.path)

from common.evaluation import arguments as ea  # noqa: E402
from common.cli import check_output_dir, run_cli
from common.config import add_bool
from common.evaluation.models import DEFAULT_DINO, load_clip_source, load_dino_source
from common.evaluation.scores import (DEFINITIONS, PREPROCESS_HELP, check_images, describe_encoder, evaluate_dreambooth,
                                      list_eval_images, load_clip_encoder, load_dino_encoder, prompt_groups,
                                      write_dreambooth_report)


def build_parser():
    p = ea.parser("eval_dreambooth.py", __doc__)
    g = p.add_argument_group("inputs")
    g.add_argument("--gen_image_path_or_dir", required=True,
                   help="folder of generated images (with --prompt_or_path), or of one sub-folder per prompt")
    g.add_argument("--prompt_or_path", default=None,
                   help="a prompt, or a text file with one prompt per line (optional with sub-folders)")
    g.add_argument("--real_image_path_or_dir", "--instance_data_dir", dest="real_image_path_or_dir", required=True,
                   help="the instance (real subject) images: an image or a folder")
    g.add_argument("--identifier", default=None,
                   help="rare-token identifier (e.g. sks) removed from the prompts before CLIP-T, as "
                        "DreamBench evaluations do (default: prompts are used as they are)")
    ea.add_clip_flags(p, ckpt_flags=("--ckpt_path", "--clip_ckpt_path"))
    g = p.add_argument_group("DINO model (optional: without --dino_ckpt_path DINO is not computed)")
    g.add_argument("--dino_ckpt_path", default=None, help="DINO ViT weights (a local file)")
    g.add_argument("--dino_model_name", default=DEFAULT_DINO,
                   help="timm ViT name (default vit_small_patch16_224, DINO ViT-S/16) or dino_vits16-style names")
    g.add_argument("--dino_config", default=None, help="DINO architecture file instead of --dino_model_name")
    g = p.add_argument_group("run")
    g.add_argument("--backend", type=ea.backend_name, default="cuda",
                   help="cuda (PyTorch) or ascend (MindSpore); pt / ms work too (default: cuda)")
    g.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default: 32)")
    g.add_argument("--output_path", default="eval_output",
                   help="folder for results.json, report.md and grids/ (default: eval_output)")
    add_bool(g, "--overwrite", default=False, help="replace an existing report in --output_path")
    add_bool(g, "--quiet", default=False, help="print only the final scores")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ea.setup(args)
    check_output_dir(args.output_path, "--output_path")
    groups = prompt_groups(args.gen_image_path_or_dir, args.prompt_or_path)
    real = list_eval_images(args.real_image_path_or_dir, "real")
    check_images([p for _, paths in groups for p in paths] + real)
    clip_source = load_clip_source(args.ckpt_path, args.model_name, args.config)
    tokenizer = ea.clip_tokenizer(clip_source, args.tokenizer_path)
    dino_source = load_dino_source(args.dino_ckpt_path, args.dino_model_name, args.dino_config) \
        if args.dino_ckpt_path else None
    clip = load_clip_encoder(args.backend, clip_source)
    dino = load_dino_encoder(args.backend, dino_source) if dino_source else None
    results = evaluate_dreambooth(clip, tokenizer, groups, real, dino=dino, identifier=args.identifier,
                                  batch_size=args.batch_size)
    results.update(backend=args.backend, definitions=DEFINITIONS, preprocessing=PREPROCESS_HELP,
                   models={"clip": describe_encoder(clip, clip_source),
                           "dino": describe_encoder(dino, dino_source) if dino else None})
    written = write_dreambooth_report(args.output_path, results, overwrite=args.overwrite)
    s = results["scores"]
    if not args.quiet:
        for e in results["prompts"]:
            dino_text = f" DINO {e['dino']:.4f}" if e["dino"] is not None else ""
            print(f"CLIP-T {e['clip_t']:.4f} CLIP-I {e['clip_i']:.4f}{dino_text}  {len(e['images'])} images: {e['prompt']}")
    dino_text = f"{s['dino']['cosine']:.4f}" if s["dino"] else "not computed (no --dino_ckpt_path)"
    print(f"CLIP-T {s['clip_t']['cosine']:.4f} (x100 {s['clip_t']['x100']:.2f}) | CLIP-I {s['clip_i']['cosine']:.4f} | "
          f"DINO {dino_text}  [{clip_source.arch.name}, backend {args.backend}]")
    for role, src in (("CLIP", clip_source), ("DINO", dino_source)):
        if src is not None and src.arch.description:
            print(f"note: {role} model is a {src.arch.description}")
    print(f"results: {written['json']}\nreport:  {written['report']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
