#!/usr/bin/env python
"""CLIP-T (prompt fidelity): the mean cosine similarity between the CLIP embeddings of generated
images and their prompts, with MindONE's flags, on PyTorch (--backend cuda) or MindSpore
(--backend ascend):

    python tools/eval/eval_clip_score.py --ckpt_path models/ViT-B-16.safetensors \\
        --image_path_or_dir output/samples --prompt_or_path prompts.txt

With P prompts and N images (N a multiple of P, images sorted by file name), images [0, N/P)
belong to the first prompt, the next N/P to the second, ... Prints the raw cosine (as the
DreamBooth paper reports it) and x100 (MindONE's number), plus torchmetrics' variant.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _path  # noqa: F401,E402  (repository root on sys.path)

from common.evaluation import arguments as ea  # noqa: E402
from common.cli import run_cli
from common.evaluation.models import load_clip_source
from common.evaluation.scores import (check_images, evaluate_clip_t, list_eval_images, load_clip_encoder, prompt_index,
                                      read_prompts)


def build_parser():
    p = ea.parser("eval_clip_score.py", __doc__)
    g = p.add_argument_group("inputs")
    g.add_argument("--image_path_or_dir", required=True, help="an image, or a folder of images (sorted by name)")
    g.add_argument("--prompt_or_path", required=True, help="a prompt, or a text file with one prompt per line")
    ea.add_clip_flags(p)
    ea.add_common_flags(p, result_default=True)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ea.setup(args)
    # Every input is checked before a framework or model is loaded, so mistakes fail fast.
    paths = list_eval_images(args.image_path_or_dir, "generated")
    prompts = read_prompts(args.prompt_or_path)
    prompt_index(len(paths), len(prompts))
    check_images(paths)
    source = load_clip_source(args.ckpt_path, args.model_name, args.config)
    tokenizer = ea.clip_tokenizer(source, args.tokenizer_path)
    encoder = load_clip_encoder(args.backend, source)
    result = evaluate_clip_t(encoder, tokenizer, paths, prompts, args.batch_size)
    if not args.quiet:
        for row in result["per_image"]:
            print(f"{row['image_path']}  {row['cosine']:.4f}  ({row['prompt']})")
    print(f"CLIP-T ({source.arch.name}, backend {args.backend}, {result['pairs']} image-prompt pairs): "
          f"cosine {result['cosine']:.4f} | x100 {result['x100']:.2f} | torchmetrics max(mean, 0) "
          f"{result['torchmetrics']:.2f} | mean per-pair clamp {result['x100_clamped_pairs']:.2f}")
    if args.save_result:
        ea.save_scores(args, "clip_t", result, encoder, source, prompts=prompts)
    return 0


if __name__ == "__main__":
    run_cli(main)
